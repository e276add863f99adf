"""The generation engine (real tiny model) and self-improving inference.

The inference-loop tests use ``ScriptedEngine``, a stand-in for a *trained* model (which
cannot be trained in a unit test): it answers each round with a fixed text, so the tests
can drive every stop rule. The engine tests use the real tiny model.
"""

from __future__ import annotations

import re

import pytest
import torch

from tripost_ray.generation import (Generation, HFGenerationEngine, SamplingParams, cut_at_stop, derive_seed,
                                   sample_rows)
from tripost_ray.inference import self_improving_inference
from tripost_ray.models import load_model_and_tokenizer
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import Feedback, parse_model_output, render_feedback

PROMPTS = [
    "Q: ((1 + 2) * 3) =\nAnswer: Let's think step by step.",
    "Q: (9 - -4) =\nAnswer:",
    "Q: ((7 - -1 + -1 + -4) - (9 * 2 - 3)) =\nAnswer: Let's think step by step.\n(1)",
    "Q:",
    "Sort the following words: apple zebra",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    return HFGenerationEngine(model, tok, batch_size=3)


def test_the_sampler_is_row_wise_whatever_the_batch():
    """Exact on any machine: given the same logits, a row's token depends only on its own
    logits and uniform, whichever rows share its batch and in which order."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 1640, generator=gen) * 0.3  # near-uniform, like a barely trained model
    uniforms = torch.rand(6, generator=gen, dtype=torch.float64)
    for top_p in (1.0, 0.9):
        whole = sample_rows(scores, uniforms, 1.0, top_p)
        assert [sample_rows(scores[i:i + 1], uniforms[i:i + 1], 1.0, top_p).item() for i in range(6)] == whole.tolist()
        assert sample_rows(scores.flip(0), uniforms.flip(0), 1.0, top_p).flip(0).tolist() == whole.tolist()
    # a near-tie that a sort would reorder does not move the choice
    tie = torch.zeros(1, 8)
    nudged = tie.clone()
    nudged[0, 5] = 1e-7
    u = torch.tensor([0.3], dtype=torch.float64)
    assert sample_rows(tie, u, 1.0, 1.0).item() == sample_rows(nudged, u, 1.0, 1.0).item() == 2
    # top-p keeps exactly the nucleus; an id outside it is never drawn
    probs = torch.log(torch.tensor([[0.05, 0.5, 0.05, 0.3, 0.1]]))
    drawn = {sample_rows(probs, torch.tensor([k / 50], dtype=torch.float64), 1.0, 0.75).item() for k in range(50)}
    assert drawn == {1, 3}


def test_sampling_repeats_under_a_seed_and_does_not_depend_on_the_batch(engine):
    """The same batches repeat bit for bit (the promise the rollout stage relies on). A prompt
    sampled alone, in a reordered batch or with another thread count gets logits that differ in
    the last bits (6e-8 here);
    with the vocabulary-order sampler that changes a token only if its uniform lands within
    that distance of a CDF boundary (~1e-7 per token), so the texts agree. This failed on
    AVX-512 CPUs while the sampler walked a probability-sorted CDF (near-ties swapped)."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    a = engine.generate(PROMPTS, params)
    assert [g.text for g in engine.generate(PROMPTS, params)] == [g.text for g in a]
    # reversed order and one-by-one give each prompt the same continuation (input order kept)
    assert [g.text for g in engine.generate(PROMPTS[::-1], params)[::-1]] == [g.text for g in a]
    assert [engine.generate([p], params)[0].text for p in PROMPTS] == [g.text for g in a]
    # another intra-op thread count (an actor with one core against a loop with two) as well
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert [g.text for g in engine.generate(PROMPTS, params)] == [g.text for g in a]
    finally:
        torch.set_num_threads(threads)
    # another seed samples something else
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=6))
    assert [g.text for g in b] != [g.text for g in a]
    # explicit per-prompt seeds override the derived ones
    seeds = [derive_seed("x", i) for i in range(len(PROMPTS))]
    c1 = engine.generate(PROMPTS, params, seeds)
    c2 = engine.generate(PROMPTS[:2], params, seeds[:2])
    assert [g.text for g in c1[:2]] == [g.text for g in c2]
    for g in a:
        assert g.generated_tokens == 12 and g.stop_reason == "length" and g.prompt_tokens > 0 and g.time_s > 0


def test_greedy_is_deterministic_and_equals_top_p_near_zero(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    assert [g.text for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=10))] == [g.text for g in greedy]
    nucleus = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-9, seed=3))
    assert [g.text for g in nucleus] == [g.text for g in greedy]


def test_stop_strings_and_line_regex_cut_the_continuation(engine):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=11)
    free = engine.generate(PROMPTS, params)
    text = free[0].text
    stop = text[5:7]  # a string the sampled continuation is known to contain
    cut = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=1.0, seed=11, stop=(stop,)))
    assert cut[0].text == text[: text.index(stop)]
    assert cut[0].stop_reason == "stop" and cut[0].generated_tokens < free[0].generated_tokens
    for f, c in zip(free, cut):  # every row is the free text cut at its first stop (if any)
        assert c.text == (f.text[: f.text.index(stop)] if stop in f.text else f.text)
    ch = re.escape(text[3])
    regex = SamplingParams(max_new_tokens=30, temperature=1.0, seed=11, stop_regex=ch)
    # the regex is checked when a line ends; a char regex then cuts right after its first match
    assert engine.generate(PROMPTS[:1], regex)[0].text.startswith(text[: text.index(text[3]) + 1])


def test_cut_at_stop_and_params_validation():
    assert cut_at_stop("a\nFeedback: x\nUpdated", (), re.compile(r"\nFeedback: [^\n]*\n")) == ("a\nFeedback: x\n", True)
    assert cut_at_stop("abc\nQ: next", ("\nQ:",), None) == ("abc", True)
    assert cut_at_stop("abc", ("\nQ:",), None) == ("abc", False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=1, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")


# ----------------------------------------------------------------- inference


class ScriptedEngine:
    """Stand-in for a trained small model: round r of a question returns script[question][r]."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = scripts
        self.prompts: list[str] = []

    def generate(self, prompts, params, seeds=None):
        out = []
        for prompt in prompts:
            self.prompts.append(prompt)
            question = prompt.split("\n", 1)[0][len("Q: "):]
            rnd = prompt.count("Updated Answer:")
            text = self.scripts[question][rnd]
            out.append(Generation(text=text, stop_reason="stop", prompt_tokens=len(prompt), generated_tokens=len(text),
                                  time_s=0.01))
        return out


@pytest.fixture(scope="module")
def arith():
    task = get_task("multistep_arithmetic")
    return task, task.generate(7, "test_seen", seed=3)


def _round(task, problem, attempt: str, fb: Feedback | None) -> str:
    body = attempt[len(task.attempt_prefix):]
    return body + (f"\nFeedback: {render_feedback(fb)}\n" if fb else "")


def test_self_improving_inference_follows_the_stop_rules(arith):
    task, ps = arith
    gold = {p.id: task.gold_rationale(p) for p in ps}
    wrong = {p.id: gold[p.id].rsplit("is ", 1)[0] + "is 12345." for p in ps}
    wrong2 = {p.id: gold[p.id].rsplit("is ", 1)[0] + "is 54321." for p in ps}
    ok = lambda p, a: task.verify(p, a)  # noqa: E731 - the scripted verifier writes the model's feedback
    scripts = {
        ps[0].question: [_round(task, ps[0], gold[ps[0].id], ok(ps[0], gold[ps[0].id]))],
        ps[1].question: [_round(task, ps[1], wrong[ps[1].id], ok(ps[1], wrong[ps[1].id])),
                         _round(task, ps[1], gold[ps[1].id], ok(ps[1], gold[ps[1].id]))],
        ps[2].question: [_round(task, ps[2], wrong[ps[2].id], ok(ps[2], wrong[ps[2].id]))] * 3,
        ps[3].question: [_round(task, ps[3], wrong[ps[3].id], ok(ps[3], wrong[ps[3].id])),
                         _round(task, ps[3], wrong2[ps[3].id], ok(ps[3], wrong2[ps[3].id])),
                         _round(task, ps[3], wrong[ps[3].id], ok(ps[3], wrong[ps[3].id]))],
        ps[4].question: [_round(task, ps[4], wrong[ps[4].id], None)],
        # correct first answer that the model wrongly "fixes": correct -> wrong
        ps[5].question: [_round(task, ps[5], gold[ps[5].id], Feedback(step="final", segment="So", reason="no")),
                         _round(task, ps[5], wrong[ps[5].id], Feedback.all_correct("6"))],
        ps[6].question: [_round(task, ps[6], wrong[ps[6].id], None) + "\nFeedback: looks fine to me\n"],
    }
    engine = ScriptedEngine(scripts)
    res = self_improving_inference(engine, task, ps, max_new_tokens=50, max_rounds=1)
    by = {r.problem_id: r for r in res}
    assert [r.problem_id for r in res] == [p.id for p in ps]

    r = by[ps[0].id]
    assert (r.stop_reason, r.rounds, r.n_turns, r.correct, r.first_correct) == ("correct_feedback", 1, 1, True, True)
    assert r.output.startswith(task.attempt_prefix) and r.final_answer == ps[0].target

    r = by[ps[1].id]
    assert (r.stop_reason, r.rounds, r.n_turns, r.correct, r.first_correct) == ("correct_feedback", 2, 2, True, False)
    assert r.first_answer == "12345" and r.final_answer == ps[1].target
    assert "\nUpdated Answer: Let's think step by step.\n" in r.output
    assert [t.attempt for t in parse_model_output(r.output).turns] == [wrong[ps[1].id], gold[ps[1].id]]
    # round 2 continued the model's own text with "Updated Answer:" + the attempt prefix
    second = [p for p in engine.prompts if p.startswith("Q: " + ps[1].question) and "Updated" in p][0]
    assert second == task.prompt(ps[1]) + _round(task, ps[1], wrong[ps[1].id], ok(ps[1], wrong[ps[1].id])) + \
        "Updated Answer: " + task.attempt_prefix

    assert (by[ps[2].id].stop_reason, by[ps[2].id].n_turns) == ("repetition", 2)
    assert (by[ps[3].id].stop_reason, by[ps[3].id].rounds, by[ps[3].id].final_answer) == ("round_limit", 2, "54321")
    assert (by[ps[4].id].stop_reason, by[ps[4].id].n_turns, by[ps[4].id].final_answer) == ("no_feedback", 1, "12345")
    r = by[ps[5].id]
    assert (r.first_correct, r.correct, r.n_turns, r.stop_reason) == (True, False, 2, "correct_feedback")
    assert by[ps[6].id].stop_reason == "bad_feedback"

    # without self-improvement only one round runs
    single = self_improving_inference(ScriptedEngine(scripts), task, ps[1:2], max_new_tokens=50, max_rounds=3,
                                      self_improve=False)[0]
    assert (single.stop_reason, single.rounds, single.correct) == ("single_pass", 1, False)
    # and the round limit bounds the number of updates
    three = self_improving_inference(ScriptedEngine(scripts), task, ps[2:4], max_new_tokens=50, max_rounds=5)
    assert [r.stop_reason for r in three] == ["repetition", "repetition"]


def test_inference_with_the_real_tiny_model(engine, arith):
    task, ps = arith
    res = self_improving_inference(engine, task, ps[:4], max_new_tokens=16, max_rounds=2, temperature=1.0, seed=2)
    again = self_improving_inference(engine, task, ps[:4][::-1], max_new_tokens=16, max_rounds=2, temperature=1.0,
                                     seed=2)[::-1]
    assert [r.output for r in res] == [r.output for r in again]
    for r, p in zip(res, ps):
        assert r.problem_id == p.id and r.output.startswith(task.attempt_prefix)
        assert 1 <= r.rounds <= 3 and 0 < r.generated_tokens <= 16 * r.rounds
        assert r.correct == task.is_correct(p, r.final_answer)
