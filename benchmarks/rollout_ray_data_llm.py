"""One rollout round: the Ray Data stage with ``rollout.engine: vllm`` vs Ray's own ``ray.data.llm``.

#14 asks to use ``ray.data.llm`` wherever one round is enough (iteration 1's rollouts are a
single attempt per problem) if it measures at least as fast as the stage. Both run here on
the same model, prompts, token budget and stop strings, at equal cores, in one Ray session:

  (a) ``run_rollouts`` with ``--actors`` generator actors of one vLLM engine each, and
  (b) a ``ray.data.llm`` processor (``vLLMEngineProcessorConfig``) with as many engine
      replicas of one CPU each, its tokenize and detokenize stages on fractional CPUs.

On CPU both engines are set up alike: eager, no chunked prefill (vLLM 0.32 cannot rewind a
seeded CPU generator: ``tripost_ray.vllm_engine``), a 1 GiB KV cache, one OpenMP thread per
engine. Reported: generated tokens/s end to end (start-up included) and the wall time; the
two sample with different seeds, so texts are not compared, only throughput.

    python benchmarks/rollout_ray_data_llm.py                 # 1,024 problems x 200 tokens, 2 engines
    python benchmarks/rollout_ray_data_llm.py --problems 64   # a quick look

Writes benchmarks/results/rollout_ray_data_llm.json and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ray_data_llm(model_dir: str, problems, task, args) -> dict:
    """(b): the ``ray.data.llm`` processor over the same prompts; generated tokens and wall time."""
    import ray
    from ray.data.llm import vLLMEngineProcessorConfig, build_processor

    from tripost_ray.generation import derive_seed
    from tripost_ray.inference import STOP_STRINGS

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = vLLMEngineProcessorConfig(
        model_source=model_dir, batch_size=args.batch_size, concurrency=args.actors,
        engine_kwargs=dict(dtype="float32", enable_prefix_caching=True, enable_chunked_prefill=False,
                           max_num_batched_tokens=4096, compilation_config={"mode": 0}, generation_config="vllm"),
        runtime_env={"env_vars": env}, placement_group_config={"bundles": [{"CPU": 1}]},
        chat_template_stage=False, tokenize_stage={"num_cpus": 0.1, "concurrency": 1},
        detokenize_stage={"num_cpus": 0.1, "concurrency": 1}, log_engine_metrics=False)
    max_tokens, temperature = args.max_new_tokens, args.temperature
    processor = build_processor(
        config,
        preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=dict(
            temperature=temperature, max_tokens=max_tokens, seed=row["seed"], stop=list(STOP_STRINGS),
            include_stop_str_in_output=True)),
        postprocess=lambda row: dict(problem_id=row["problem_id"], generated=len(row["generated_tokens"])),
        preprocess_map_kwargs={"num_cpus": 0.1}, postprocess_map_kwargs={"num_cpus": 0.1})
    rows = [{"problem_id": p.id, "prompt": task.prompt(p), "seed": derive_seed(args.seed, p.id, 0) % 2**31}
            for p in problems]
    t0 = time.perf_counter()
    out = processor(ray.data.from_items(rows)).take_all()
    wall = time.perf_counter() - t0
    if sorted(r["problem_id"] for r in out) != sorted(p.id for p in problems):
        raise RuntimeError("ray.data.llm did not return every problem exactly once")
    return {"wall_s": wall, "generated_tokens": sum(r["generated"] for r in out), "problems": len(out)}


def main(argv: list[str] | None = None) -> dict:
    from rollout import add_workload_arguments, machine_info, ray_stage, versions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(p)
    p.add_argument("--actors", type=int, default=2, help="vLLM engines in each variant, one core each")
    p.add_argument("--model", default=None, help="an existing model folder (default: build rollout.py's tiny one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_ray_data_llm.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from tripost_ray.config import RayConfig, TinyModelConfig
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.models import build_tiny_model
    from tripost_ray.tasks import get_task

    task = get_task("multistep_arithmetic")
    problems = task.generate(args.problems, "test_seen", seed=args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-rdllm-") as tmp:
        model_dir = args.model
        if model_dir is None:  # rollout.py's default model: hidden 128, 2 layers, head size 32
            corpus_ps = task.generate(200, "train", seed=args.seed)
            corpus = [task.prompt(q) for q in corpus_ps + problems] + [task.gold_rationale(q) for q in corpus_ps]
            model_dir = build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4,
                                                         intermediate_size=512), corpus, os.path.join(tmp, "model"))
        init_ray(RayConfig(num_cpus=os.cpu_count(), log_to_driver=False))
        try:
            print(f"(a) Ray Data stage, vllm, {args.actors} actor(s) x 1 thread ...", flush=True)
            stage = ray_stage("vllm", model_dir, problems, args, args.actors, 1, 0.0, os.path.join(tmp, "stage"))
            stage.pop("outputs")
            print(f"(b) ray.data.llm, {args.actors} engine(s) x 1 CPU ...", flush=True)
            llm = ray_data_llm(model_dir, problems, task, args)
        finally:
            ray.shutdown()
    for run in (stage, llm):
        run["tokens_per_s"] = run["generated_tokens"] / run["wall_s"]
    report = {
        "benchmark": "rollout_ray_data_llm",
        "what": "one sampled round at equal cores: the Ray Data rollout stage with rollout.engine vllm vs a "
                "ray.data.llm vLLMEngineProcessorConfig processor; tokens_per_s end to end (engine start-up "
                "included), ray.init excluded",
        "machine": machine_info(), "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": {"ray_stage_vllm": stage, "ray_data_llm": llm},
        "ratio_ray_data_llm_vs_stage": llm["tokens_per_s"] / stage["tokens_per_s"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, run in report["runs"].items():
        print(f"{name:<16} wall {run['wall_s']:6.1f} s  tokens {run['generated_tokens']:7d}  "
              f"{run['tokens_per_s']:7.1f} tok/s")
    print(f"ray.data.llm / stage: {report['ratio_ray_data_llm_vs_stage']:.2f}; load average before/after: "
          f"{report['load_average_before'][0]}/{report['load_average_after'][0]}")
    return report


if __name__ == "__main__":
    main()
