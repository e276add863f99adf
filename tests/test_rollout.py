"""The Ray Data rollout stage on the real local Ray of the session fixture."""

from __future__ import annotations

import pytest

from tripost_ray.config import RolloutConfig, build_config
from tripost_ray.plan import resource_plan
from tripost_ray.rollout import ROLLOUT_SCHEMA, RolloutError, actor_resources, read_rollouts, run_rollouts
from tripost_ray.specs import GenerationSpec, TaskSpec
from tripost_ray.tasks import get_task

pytestmark = pytest.mark.integration

TASK = "multistep_arithmetic"


@pytest.fixture(scope="module")
def problems():
    task = get_task(TASK)
    return task.generate(6, "test_seen", seed=4) + task.generate(3, "test_unseen", seed=4)


def _cfg(**kw) -> RolloutConfig:
    base = dict(min_actors=2, max_actors=2, num_cpus_per_actor=0.5, torch_threads_per_actor=1, batch_size=4,
                max_new_tokens=8, self_improve_rounds=1, top_p=0.95)
    base.update(kw)
    return RolloutConfig(**base)


def _spec(cfg: RolloutConfig, *, self_improve: bool, temperature: float, seed: int) -> GenerationSpec:
    return GenerationSpec.build(cfg, TaskSpec(name=TASK), self_improve=self_improve, temperature=temperature, seed=seed)


def test_a_vllm_actor_on_cpu_reserves_its_kv_cache_as_ray_memory():
    def resources(engine: str, **kw) -> dict:
        spec = _spec(_cfg(**kw), self_improve=False, temperature=0.0, seed=0).model_copy(update={"engine": engine})
        return actor_resources(spec)

    on_cpu = resources("vllm", vllm_cpu_kv_cache_gib=3, resources_per_actor={"rollout": 1.0})
    assert on_cpu == {"num_cpus": 0.5, "num_gpus": None, "memory": 3 * 2**30, "resources": {"rollout": 1.0}}
    assert resources("hf", vllm_cpu_kv_cache_gib=3)["memory"] is None  # HF allocates as it goes
    on_gpu = resources("vllm", vllm_cpu_kv_cache_gib=3, num_gpus_per_actor=1.0)
    assert on_gpu["num_gpus"] == 1.0 and on_gpu["memory"] is None  # the cache lives in the GPU's memory
    # and `tripost run --dry-run` shows the reservation
    plan = resource_plan(build_config({"rollout": {"engine": "vllm", "vllm_cpu_kv_cache_gib": 3}}))
    assert plan[0]["stage"].startswith("rollouts") and plan[0]["memory_gib_each"] == 3


def test_rollouts_write_every_problem_exactly_once(ray_cluster, tiny_model_dir, problems, tmp_path):
    out = str(tmp_path / "rollouts")
    summary = run_rollouts(problems, tiny_model_dir, _spec(_cfg(), self_improve=True, temperature=1.0, seed=3), out)
    rows = read_rollouts(out)
    assert [r["problem_id"] for r in rows] == sorted(p.id for p in problems)
    assert set(rows[0]) == set(ROLLOUT_SCHEMA.names)
    by_id = {p.id: p for p in problems}
    for r in rows:
        p = by_id[r["problem_id"]]
        assert (r["question"], r["target"], r["split"]) == (p.question, p.target, p.split)
        assert r["output"].startswith("Let's think step by step.")
        assert r["n_turns"] == len(r["attempts"]) == len(r["feedbacks"]) >= 1
        assert 0 < r["generated_tokens"] <= 8 * r["rounds"] and r["prompt_tokens"] > 0
        assert r["seed"] == 3 and r["node_id"] and r["actor_id"] and r["temperature"] == 1.0
    assert summary.n_problems == summary.n_written == len(problems)
    assert summary.generated_tokens == sum(r["generated_tokens"] for r in rows)
    assert summary.tokens_per_s > 0 and summary.problems_per_s > 0 and summary.n_actors_seen >= 1

    # the same seed on one actor (other batches per actor) gives the same outputs;
    # writing to memory:// goes through the same fsspec path
    mem = "memory://rollout-test/one-actor"
    run_rollouts(problems, tiny_model_dir,
                 _spec(_cfg(min_actors=1, max_actors=1), self_improve=True, temperature=1.0, seed=3), mem)
    single = read_rollouts(mem)
    assert [(r["problem_id"], r["output"]) for r in single] == [(r["problem_id"], r["output"]) for r in rows]
    assert {r["actor_id"] for r in single} != {r["actor_id"] for r in rows}

    # another seed samples other outputs
    other = str(tmp_path / "other")
    run_rollouts(problems, tiny_model_dir, _spec(_cfg(), self_improve=True, temperature=1.0, seed=4), other)
    assert [r["output"] for r in read_rollouts(other)] != [r["output"] for r in rows]


def test_a_dying_actor_is_restarted_and_nothing_is_lost(ray_cluster, tiny_model_dir, problems, tmp_path):
    marker = tmp_path / "actor-died"
    out = str(tmp_path / "rollouts")
    cfg = _cfg(min_actors=1, max_actors=1, max_actor_restarts=2)
    summary = run_rollouts(problems, tiny_model_dir, _spec(cfg, self_improve=False, temperature=0.0, seed=0), out,
                           fault_marker=str(marker))
    assert marker.exists(), "the fault hook did not fire: the test would prove nothing"
    rows = read_rollouts(out)
    assert sorted(r["problem_id"] for r in rows) == sorted(p.id for p in problems)
    assert summary.n_written == len(problems)
    # the dead actor's id never wrote a row: its batch was redone by the restarted actor
    assert marker.read_text() not in {r["actor_id"] for r in rows} or len({r["actor_id"] for r in rows}) == 1
    assert all(r["rounds"] == 1 and r["stop_reason"] in {"no_feedback", "no_progress", "bad_feedback",
                                                          "single_pass", "correct_feedback"} for r in rows)


def test_duplicate_problem_ids_are_rejected_before_any_work(ray_cluster, tiny_model_dir, problems, tmp_path):
    with pytest.raises(RolloutError, match="unique"):
        run_rollouts(problems + problems[:1], tiny_model_dir, _spec(_cfg(), self_improve=False, temperature=0.0, seed=0),
                     str(tmp_path / "x"))


def test_an_actor_loads_the_model_in_the_configured_dtype_from_the_configured_cache(ray_cluster, tiny_model_dir,
                                                                                   tmp_path):
    """``model.dtype`` and ``model.cache_dir`` reach the rollout actors (through their spec)."""
    import ray

    from tripost_ray.config import ModelConfig
    from tripost_ray.rollout import GeneratorActor

    class Probe(GeneratorActor):
        def loaded(self) -> tuple[str, str]:
            return str(next(self.engine.model.parameters()).dtype), str(self.engine.model.name_or_path)

    cache = tmp_path / "model-cache"
    model = ModelConfig(dtype="bfloat16", cache_dir=str(cache))
    spec = GenerationSpec.build(_cfg(), TaskSpec(name=TASK), model=model, self_improve=False, temperature=0.0, seed=0)
    actor = ray.remote(num_cpus=0.25)(Probe).remote(spec, f"local://{tiny_model_dir}")
    dtype, folder = ray.get(actor.loaded.remote())
    ray.kill(actor)
    assert dtype == "torch.bfloat16"
    assert folder.startswith(str(cache)) and any(cache.rglob("config.json"))
