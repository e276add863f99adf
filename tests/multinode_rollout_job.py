"""Run the rollout stage on a 2-node local cluster (``ray.cluster_utils.Cluster``).

Started by tests/test_rollout_multinode.py in a subprocess of its own: a process can be
connected to one Ray cluster only, and the test session already holds the session
fixture's. Usage: ``python multinode_rollout_job.py MODEL_DIR OUT_DIR SEED ENGINE``; prints a
JSON summary on its last line.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, out_dir: str, seed: int, engine: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from test_rollout_multinode import multinode_cfg, multinode_problems
    from tripost_ray.rollout import run_rollouts
    from tripost_ray.specs import GenerationSpec, TaskSpec

    # two nodes with their own CPUs and one "rollout_slot" each: one generator actor per node
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"rollout_slot": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"rollout_slot": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_no_progress_timeout_s = 300
        n_nodes = len([n for n in ray.nodes() if n["Alive"]])
        spec = GenerationSpec.build(multinode_cfg(actors=2, engine=engine, resources={"rollout_slot": 1}),
                                    TaskSpec(name="multistep_arithmetic"), self_improve=True, temperature=1.0, seed=seed)
        summary = run_rollouts(multinode_problems(), model_dir, spec, out_dir)
        return {"cluster_nodes": n_nodes, **summary.to_dict()}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))
