"""The vLLM engine on a real vLLM (the CPU build here), against the HF engine on the same fp32 model.

vLLM's CPU attention supports head sizes of 32 and more, so these tests use models with
head size 32 (the session's ``sft_model_dir`` and ``feedback_model_dir``, a model that writes feedback),
not ``tiny_model_dir`` (head size 16).
"""

from __future__ import annotations

import dataclasses
import gc
import re

import pytest

from tripost_ray.config import RolloutConfig
from tripost_ray.generation import HFGenerationEngine, SamplingParams, derive_seed
from tripost_ray.inference import FEEDBACK_LINE_RE, STOP_STRINGS, self_improving_inference
from tripost_ray.models import load_model_and_tokenizer
from tripost_ray.rollout import read_rollouts, run_rollouts
from tripost_ray.specs import GenerationSpec, TaskSpec
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import FEEDBACK_TAG
from tripost_ray.vllm_engine import VLLMGenerationEngine

from conftest import EASY_ARITHMETIC, require_vllm

require_vllm()

TASK = "multistep_arithmetic"
ROUND = dict(stop=STOP_STRINGS, stop_regex=FEEDBACK_LINE_RE, stop_regex_trigger=FEEDBACK_TAG.strip())


@pytest.fixture(scope="module")
def task():
    return get_task(TASK, **EASY_ARITHMETIC)


@pytest.fixture(scope="module")
def problems(task):
    return task.generate(8, "test_seen", seed=1) + task.generate(4, "test_unseen", seed=1)


@pytest.fixture(scope="module")
def vllm_for():
    """``vllm_for(path)``: a vLLM engine on the model at ``path``, one live engine at a time.

    vLLM keeps process-wide state (its parallel groups): destroying one engine tears it down
    for every other engine in the process. An actor holds one engine for its life; these
    tests switch models, so the previous engine is closed before the next one is built."""
    live: dict[str, VLLMGenerationEngine] = {}

    def get(path: str) -> VLLMGenerationEngine:
        if path not in live:
            live.clear()
            gc.collect()
            live[path] = VLLMGenerationEngine(path, dtype="float32")
        return live[path]

    yield get
    live.clear()
    gc.collect()


@pytest.fixture(scope="module")
def engines(sft_model_dir, vllm_for):
    model, tok = load_model_and_tokenizer(sft_model_dir, dtype="float32", device="cpu")
    return HFGenerationEngine(model, tok, batch_size=5), lambda: vllm_for(sft_model_dir)


def _same(a, b) -> None:
    """Two engines' generations agree in everything but timing."""
    key = lambda g: (g.text, g.stop_reason, g.prompt_tokens, g.generated_tokens)  # noqa: E731
    assert [key(g) for g in b] == [key(g) for g in a]


def test_greedy_vllm_equals_hf_with_every_stop_rule(engines, task, problems):
    hf, vllm = engines[0], engines[1]()
    prompts = [task.prompt(p) for p in problems] + ["Q: (3 + 4) =\nAnswer:", "Q:"]
    _same(hf.generate(prompts, SamplingParams(max_new_tokens=40)), vllm.generate(prompts, SamplingParams(max_new_tokens=40)))
    # the round's stops; then a regex whose trigger the model writes in mid-line (so the
    # request goes on past a trigger that does not end a match) and at line ends
    round_params = SamplingParams(max_new_tokens=96, **ROUND)
    _same(hf.generate(prompts, round_params), vllm.generate(prompts, round_params))
    free = hf.generate(prompts[:4], SamplingParams(max_new_tokens=96))
    assert all("calculate" in g.text for g in free), "the model no longer writes the trigger: pick another"
    regex = SamplingParams(max_new_tokens=128, stop_regex=r"calculate B[^\n]*\n", stop_regex_trigger="calculate")
    a, b = hf.generate(prompts, regex), vllm.generate(prompts, regex)
    _same(a, b)
    assert any(g.stop_reason == "stop" and re.search(r"calculate A.*calculate B[^\n]*\n$", g.text, re.S) for g in b)
    # without a trigger the regex is tested at every line end
    _same(a, vllm.generate(prompts, dataclasses.replace(regex, stop_regex_trigger=None)))


def test_vllm_sampling_repeats_for_a_seed_whatever_the_batch(engines, task, problems):
    """Per-engine reproducibility: a prompt's sample depends on its seed only. vLLM samples
    with its own generator, so its texts are not HF's for the same seed."""
    hf, vllm = engines[0], engines[1]()
    prompts = [task.prompt(p) for p in problems]
    seeds = [derive_seed(7, p.id) for p in problems]
    params = SamplingParams(max_new_tokens=48, temperature=1.0, top_p=0.9, seed=7, **ROUND)
    whole = vllm.generate(prompts, params, seeds)
    _same(whole, vllm.generate(prompts, params, seeds))
    _same(whole, vllm.generate(prompts[::-1], params, seeds[::-1])[::-1])
    _same(whole, [vllm.generate([p], params, [s])[0] for p, s in zip(prompts, seeds)])
    _same(whole[3:7], vllm.generate(prompts[3:7], params, seeds[3:7]))
    # a batch whose prompts exceed one engine step's token budget (4,096): vLLM would split a
    # prefill over steps, which crashed seeded sampling on CPU; samples stay those of small batches
    many = [(prompt, derive_seed(7, f"{p.id}-{k}")) for k in range(8) for prompt, p in zip(prompts, problems)]
    assert sum(len(vllm.tokenizer(prompt).input_ids) for prompt, _ in many) > 4096
    big = vllm.generate([m[0] for m in many], params, [m[1] for m in many])
    _same(big, [g for i in range(0, len(many), 12)
                for g in vllm.generate([m[0] for m in many[i:i + 12]], params, [m[1] for m in many[i:i + 12]])])
    other = vllm.generate(prompts, params, [derive_seed(8, p.id) for p in problems])
    assert [g.text for g in other] != [g.text for g in whole]
    assert [g.text for g in hf.generate(prompts, params, seeds)] != [g.text for g in whole]


def test_self_improving_inference_through_vllm_equals_hf(feedback_model_dir, vllm_for, task):
    path, problems = feedback_model_dir
    model, tok = load_model_and_tokenizer(path, dtype="float32", device="cpu")
    hf = HFGenerationEngine(model, tok, batch_size=4)
    vllm = vllm_for(path)
    kw = dict(max_new_tokens=300, max_rounds=2)  # an attempt is ~200 tokens with this tokenizer
    a = self_improving_inference(hf, task, problems, **kw)
    b = self_improving_inference(vllm, task, problems, **kw)
    for x, y in zip(a, b):
        assert dataclasses.replace(y, gen_time_s=0.0) == dataclasses.replace(x, gen_time_s=0.0)
    assert any(r.rounds > 1 for r in b), "no problem ran a second round: the test would prove nothing"
    assert any(r.stop_reason == "correct_feedback" for r in b)
    # sampled: the same results whatever the batch
    s = dict(kw, temperature=1.0, top_p=0.95, seed=3)
    strip = lambda rs: [dataclasses.replace(r, gen_time_s=0.0) for r in rs]  # noqa: E731
    sampled = self_improving_inference(vllm, task, problems, **s)
    assert strip(self_improving_inference(vllm, task, problems[::-1], **s)[::-1]) == strip(sampled)
    assert strip(self_improving_inference(vllm, task, problems[:3], **s)) == strip(sampled[:3])


@pytest.mark.integration
@pytest.mark.parametrize("actors, kill_one", [(1, False), (2, False), (1, True)], ids=["1-actor", "2-actors", "killed-actor"])
def test_the_rollout_stage_with_vllm_writes_every_problem_once(ray_cluster, sft_model_dir, engines, task, problems,
                                                               tmp_path, actors, kill_one):
    """Every problem exactly once, with the samples this process's engine draws for the same
    batches: with one actor, two actors, and an actor killed on its first batch (Ray Data
    restarts it and redoes that batch)."""
    cfg = RolloutConfig(engine="vllm", min_actors=actors, max_actors=actors, num_cpus_per_actor=0.5,
                        torch_threads_per_actor=1, batch_size=5, max_new_tokens=32, self_improve_rounds=1, top_p=0.95,
                        max_actor_restarts=2)
    spec = GenerationSpec.build(cfg, TaskSpec(name=TASK, options=EASY_ARITHMETIC), self_improve=True, temperature=1.0,
                                seed=3)
    out, marker = str(tmp_path / "rollouts"), tmp_path / "actor-died"
    summary = run_rollouts(problems, sft_model_dir, spec, out, fault_marker=str(marker) if kill_one else None)
    assert marker.exists() == kill_one, "the fault hook did not fire: the test would prove nothing"
    rows = read_rollouts(out)
    assert [r["problem_id"] for r in rows] == sorted(p.id for p in problems)
    assert summary.n_written == len(problems) and summary.generated_tokens > 0
    local = engines[1]()
    want = {}
    for i in range(0, len(problems), 5):
        batch = problems[i:i + 5]
        for p, r in zip(batch, self_improving_inference(local, task, batch, max_new_tokens=32, max_rounds=1,
                                                        temperature=1.0, top_p=0.95, seed=3)):
            want[p.id] = r.output
    assert {r["problem_id"]: r["output"] for r in rows} == want


def test_a_head_size_vllm_cannot_run_on_cpu_is_refused_in_one_message(tiny_model_dir):
    with pytest.raises(ValueError, match=r"head sizes .*the model at .* has 16 .*rollout.engine=hf"):
        VLLMGenerationEngine(tiny_model_dir, dtype="float32")
