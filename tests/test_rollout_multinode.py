"""Multi-node rollouts: actors on two nodes, output identical to a one-node run.

A driver process can join only one Ray cluster, and the session fixture's local Ray is
already joined by this process (and stays up for the other tests). So the 2-node
``ray.cluster_utils.Cluster`` lives in a subprocess (tests/multinode_rollout_job.py)
with its own driver; the one-node reference run uses the session fixture here. Both
write Parquet to local folders that this test compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tripost_ray.config import RolloutConfig
from tripost_ray.rollout import read_rollouts, run_rollouts
from tripost_ray.specs import GenerationSpec, TaskSpec
from tripost_ray.tasks import get_task

from conftest import require_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def multinode_problems():
    task = get_task("multistep_arithmetic")
    return task.generate(5, "test_seen", seed=9) + task.generate(3, "test_unseen", seed=9)


def multinode_cfg(actors: int, engine: str, resources: dict | None = None) -> RolloutConfig:
    # equal batches and one torch thread everywhere: same arithmetic on every node
    return RolloutConfig(engine=engine, min_actors=actors, max_actors=actors, num_cpus_per_actor=0.5,
                         torch_threads_per_actor=1, batch_size=2, max_new_tokens=8, self_improve_rounds=1,
                         resources_per_actor=resources or {})


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_node_rollout_equals_one_node_run(ray_cluster, tiny_model_dir, sft_model_dir, tmp_path, engine):
    if engine == "vllm":
        require_vllm()
    model_dir = sft_model_dir if engine == "vllm" else tiny_model_dir  # vLLM's CPU attention needs head size >= 32
    multi_out = tmp_path / "multi"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_rollout_job.py"), model_dir,
                           str(multi_out), "21", engine], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cluster_nodes"] == 2

    multi = read_rollouts(str(multi_out))
    problems = multinode_problems()
    assert sorted(r["problem_id"] for r in multi) == sorted(p.id for p in problems)
    assert len({r["node_id"] for r in multi}) == 2, "the actors did not run on both nodes"
    assert summary["n_nodes_seen"] == 2 and summary["n_written"] == len(problems)

    single_out = str(tmp_path / "single")
    run_rollouts(problems, model_dir, GenerationSpec.build(multinode_cfg(actors=1, engine=engine),
                                                        TaskSpec(name="multistep_arithmetic"),
                                                        self_improve=True, temperature=1.0, seed=21), single_out)
    single = read_rollouts(single_out)
    assert len({r["node_id"] for r in single}) == 1
    keys = ("problem_id", "output", "attempts", "feedbacks", "final_answer", "correct", "generated_tokens", "rounds")
    assert [{k: r[k] for k in keys} for r in multi] == [{k: r[k] for k in keys} for r in single]
