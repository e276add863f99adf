"""The verification probe: its prompts are the training format, its verdicts follow the
scripted verifier, and it runs through ``evaluate_model`` on a real Ray worker; the
probability of calling an attempt correct is read off the model as decoding would."""

from __future__ import annotations

import random

import pytest

from conftest import EASY_ARITHMETIC
from tripost_ray.editing import all_correct_text
from tripost_ray.feedback.synthetic import corrupt_numbers
from tripost_ray.report import VERIFICATION_HEADERS, verification_rows
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import Feedback, Turn, parse_attempt, render_feedback, render_trajectory
from tripost_ray.verification import (GOLD_VERDICTS, WRONG_VERDICTS, ProbeItem, all_correct_logprob, auroc,
                                      probe_items, probe_metrics, probe_prompt, signal_metrics, verdict)

TASK = get_task("multistep_arithmetic")


def _wrong_item(seed: int) -> ProbeItem:
    """A gold rationale with one number changed, and the scripted verifier's verdict on it."""
    rng = random.Random(seed)
    for p in TASK.generate(50, "test_seen", seed=seed):
        attempt = corrupt_numbers(TASK.gold_rationale(p), rng)
        truth = TASK.verify(p, attempt)
        if not truth.is_correct:
            return ProbeItem(p, attempt, truth)
    raise AssertionError("no corruption was caught by the verifier")


def test_the_probe_prompt_is_the_training_text_up_to_the_feedback():
    p = TASK.generate(1, "test_seen", seed=3)[0]
    gold = TASK.gold_rationale(p)
    item = ProbeItem(p, gold, Feedback(step=None))
    feedback = render_feedback(TASK.verify(p, gold))
    assert probe_prompt(TASK, item) + " " + feedback == render_trajectory(p.question, [Turn(gold, feedback)])
    assert probe_prompt(TASK, item).startswith(TASK.prompt(p))  # the inference prompt, attempt forced in


def test_verdicts_follow_the_scripted_verifier():
    item = _wrong_item(seed=1)
    right = render_feedback(item.truth)
    other_step = render_feedback(Feedback(step="99", segment="x", reason="made up"))
    all_correct = render_feedback(Feedback(step=None))
    assert verdict(item, " " + right) == "right_step"
    assert verdict(item, other_step) == "wrong_step"
    assert verdict(item, all_correct) == "missed"
    assert verdict(item, "the answer is 7") == "malformed"
    gold = ProbeItem(item.problem, TASK.gold_rationale(item.problem), Feedback(step=None))
    assert verdict(gold, all_correct) == "accepted"
    assert verdict(gold, right) == "false_alarm"
    assert verdict(gold, "") == "malformed"


def test_items_take_only_rejected_first_attempts_and_cap_each_split():
    problems = TASK.generate(4, "test_seen", seed=0) + TASK.generate(4, "test_unseen", seed=0)
    rng = random.Random(0)
    outputs = {}
    for i, p in enumerate(problems):  # odd problems answered right, even ones with a changed number
        gold = TASK.gold_rationale(p)
        outputs[p.id] = (gold if i % 2 else corrupt_numbers(gold, rng)) + "\nFeedback: whatever"
    rejected = [p for p in problems if not TASK.verify(p, outputs[p.id].split("\nFeedback")[0]).is_correct]
    items = probe_items(TASK, problems, outputs, per_split=3)
    wrong = [it for it in items if it.kind == "wrong"]
    assert {it.problem.id for it in wrong} <= {p.id for p in rejected} and all(not it.truth.is_correct for it in wrong)
    for split, name in (("seen", "test_seen"), ("unseen", "test_unseen")):
        assert sum(it.split == split and it.kind == "gold" for it in items) == 3
        assert sum(it.split == split for it in wrong) == min(3, sum(p.split == name for p in rejected))
    assert all(it.kind == "gold" for it in probe_items(TASK, problems, {}, per_split=2))  # no outputs: gold only


def test_metrics_are_rates_per_split_and_kind_and_the_report_shows_them():
    wrong = _wrong_item(1)
    gold = ProbeItem(wrong.problem, TASK.gold_rationale(wrong.problem), Feedback(step=None))
    items = [wrong, wrong, gold]
    m = probe_metrics(items, ["right_step", "missed", "false_alarm"])
    assert m["seen"]["wrong"] == {"n": 2, "right_step": 0.5, "wrong_step": 0.0, "missed": 0.5, "malformed": 0.0}
    assert m["seen"]["gold"] == {"n": 1, "accepted": 0.0, "false_alarm": 1.0, "malformed": 0.0}
    assert m["unseen"]["wrong"]["n"] == 0 and m["unseen"]["wrong"]["missed"] is None
    rows = verification_rows({"iterations": [{"iteration": 1, "metrics": {"verification": m}},
                                             {"iteration": 2, "metrics": {}}]})
    assert [r[:3] for r in rows] == [[1, "seen", 2], [1, "unseen", 0]] and len(rows[0]) == len(VERIFICATION_HEADERS)


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_the_logprob_of_correct_sums_the_sentences_next_token_logprobs(tiny_model_dir):
    import torch

    model, tok = _load(tiny_model_dir)
    wrong = _wrong_item(2)
    items = [wrong, ProbeItem(wrong.problem, TASK.gold_rationale(wrong.problem), Feedback(step=None))]
    got = all_correct_logprob(model, tok, TASK, items)
    for it, lp in zip(items, got):  # decode the sentence token by token, as sampling would
        ids = tok(probe_prompt(TASK, it))["input_ids"]
        sentence = tok(probe_prompt(TASK, it) + " " + all_correct_text(parse_attempt(it.attempt)))["input_ids"][len(ids):]
        expected = 0.0
        with torch.inference_mode():
            for token in sentence:
                expected += torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)[token].item()
                ids.append(token)
        assert len(sentence) > 5 and lp == pytest.approx(expected, rel=1e-4)
    assert got[0] != got[1]  # each item is scored on its own attempt


def test_a_model_that_learnt_to_flag_its_mistakes_ranks_gold_attempts_above_wrong_ones(feedback_model_dir):
    model_dir, problems = feedback_model_dir  # memorised: a final answer of 77 is flagged, the gold one accepted
    task = get_task("multistep_arithmetic", **EASY_ARITHMETIC)
    items = []
    for p in problems:
        gold = task.gold_rationale(p)
        wrong = gold.rsplit("is ", 1)[0] + "is 77."
        items += [ProbeItem(p, wrong, task.verify(p, wrong)), ProbeItem(p, gold, Feedback(step=None))]
    model, tok = _load(model_dir)
    seen = signal_metrics(items, all_correct_logprob(model, tok, task, items))["seen"]
    assert seen["wrong"]["n"] == seen["gold"]["n"] == len(problems)
    # gold attempts were memorised as updated answers, not first ones: ranked well, not perfectly
    assert seen["auroc"] > 0.75
    assert seen["wrong"]["mean_p_correct"] < seen["gold"]["mean_p_correct"]


def test_auroc_counts_pairs_ranked_right_and_ties_as_half():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.9], [0.5]) == 0.75
    assert auroc([], [0.5]) is None


@pytest.mark.integration
def test_evaluate_model_runs_the_probe_on_the_models_own_first_attempts(ray_cluster, sft_model_dir, tmp_path):
    from tripost_ray.config import RolloutConfig
    from tripost_ray.evaluate import evaluate_model
    from tripost_ray.rollout import read_rollouts
    from tripost_ray.specs import GenerationSpec, TaskSpec
    from tripost_ray.trajectory import parse_model_output

    problems = TASK.generate(6, "test_seen", seed=5) + TASK.generate(4, "test_unseen", seed=5)
    rollout = RolloutConfig(num_cpus_per_actor=0.5, torch_threads_per_actor=1)
    spec = GenerationSpec.build(rollout, TaskSpec(name=TASK.name), self_improve=True, temperature=0.0, seed=0,
                                max_new_tokens=160, max_rounds=1)
    probe = evaluate_model(sft_model_dir, problems, spec, str(tmp_path / "out"), verification_per_split=3)["verification"]

    by_id = {p.id: p for p in problems}
    rejected = {"seen": 0, "unseen": 0}  # the model's own first attempts that the scripted verifier rejects
    for r in read_rollouts(str(tmp_path / "out")):
        turns = parse_model_output(r["output"]).turns
        if turns and turns[0].attempt.strip() and not TASK.verify(by_id[r["problem_id"]], turns[0].attempt).is_correct:
            rejected["seen" if r["split"] == "test_seen" else "unseen"] += 1
    for split in ("seen", "unseen"):
        wrong, gold = probe[split]["wrong"], probe[split]["gold"]
        assert wrong["n"] == min(3, rejected[split]) and gold["n"] == 3
        assert sum(gold[v] for v in GOLD_VERDICTS) == pytest.approx(1.0)
        if wrong["n"]:
            assert sum(wrong[v] for v in WRONG_VERDICTS) == pytest.approx(1.0)
    assert sum(rejected.values()) > 0, "the fixture model makes no mistakes: the probe's wrong side went untested"
