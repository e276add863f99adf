"""Rollout throughput: a plain single-process generate loop vs the Ray Data stage.

The same model, prompts, batch size, sampling seed and token budget go through

  (a) a plain loop in this process (``self_improving_inference`` over an
      ``HFGenerationEngine``) with torch using all cores, and
  (b) the Ray Data rollout stage (``run_rollouts``) with 1 actor using all cores and with
      2 actors using half the cores each (equal cores in all three).

Reported: generated tokens/s, problems/s and the ratios (b)/(a), all from one run. Each
timed run includes loading the model (the plain loop) or starting the actors and loading
the model in them (the stage), so the stage pays its real per-stage cost; the one-off
``ray.init`` is timed and reported separately. Per-problem seeds and the same batches make
all three runs generate the same tokens, which the script checks; their thread counts
differ, so their logits may differ in the last bits, which the vocabulary-order sampler
turns into another token only very rarely (``tripost_ray.generation``). On a GPU machine every run uses the
GPU(s) and tokens/s per GPU are reported.

    python benchmarks/rollout.py                     # default: about 3-4 minutes on 2 idle cores
    python benchmarks/rollout.py --problems 32 --max-new-tokens 32   # a quick look

Writes benchmarks/results/rollout.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "gpus": gpus, "python": platform.python_version()}


def versions() -> dict:
    import importlib

    out = {}
    for name in ("torch", "transformers", "ray", "tokenizers", "pyarrow"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def plain_loop(model_dir: str, task, problems, args, threads: int, device: str) -> dict:
    """(a): one process, one engine, all cores."""
    import torch

    from tripost_ray.generation import HFGenerationEngine
    from tripost_ray.inference import self_improving_inference
    from tripost_ray.models import load_model_and_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        model, tok = load_model_and_tokenizer(model_dir, device=device)
        engine = HFGenerationEngine(model, tok, batch_size=args.batch_size)
        t_gen = time.perf_counter()
        results = []
        for start in range(0, len(problems), args.batch_size):  # the same batches the stage gets
            results += self_improving_inference(
                engine, task, problems[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                max_rounds=0, temperature=args.temperature, seed=args.seed, self_improve=False)
        wall = time.perf_counter() - t0
        generate_wall = time.perf_counter() - t_gen
    finally:
        torch.set_num_threads(before)
    tokens = sum(r.generated_tokens for r in results)
    return {"wall_s": wall, "generate_wall_s": generate_wall, "generated_tokens": tokens, "problems": len(results),
            "outputs": {r.problem_id: r.output for r in results}}


def ray_stage(model_dir: str, problems, args, actors: int, threads: int, gpus_per_actor: float, out: str) -> dict:
    """(b): the Ray Data stage with ``actors`` generator actors of ``threads`` threads each."""
    from tripost_ray.config import RolloutConfig
    from tripost_ray.rollout import read_rollouts, run_rollouts
    from tripost_ray.specs import GenerationSpec, TaskSpec

    cfg = RolloutConfig(min_actors=actors, max_actors=actors, num_cpus_per_actor=0.5,
                        num_gpus_per_actor=gpus_per_actor, torch_threads_per_actor=threads,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, self_improve_rounds=0,
                        top_p=1.0)
    t0, t_wall0 = time.perf_counter(), time.time()
    spec = GenerationSpec.build(cfg, TaskSpec(name="multistep_arithmetic"), self_improve=False,
                                temperature=args.temperature, seed=args.seed)
    summary = run_rollouts(problems, model_dir, spec, out)
    wall = time.perf_counter() - t0
    rows = read_rollouts(out)
    first_batch = min(r["batch_started_at"] for r in rows)
    generating = max(r["batch_finished_at"] for r in rows) - first_batch
    return {"wall_s": wall, "generated_tokens": summary.generated_tokens, "problems": summary.n_written,
            "actors_seen": summary.n_actors_seen, "actor_start_s": first_batch - t_wall0,
            "steady_wall_s": generating, "outputs": {r["problem_id"]: r["output"] for r in rows}}


def rates(run: dict, n_gpus: int) -> dict:
    """End-to-end rates, and steady-state rates (the stage after its actors are up)."""
    out = {k: v for k, v in run.items() if k != "outputs"}
    out["tokens_per_s"] = run["generated_tokens"] / run["wall_s"]
    out["problems_per_s"] = run["problems"] / run["wall_s"]
    steady = run.get("steady_wall_s", run.get("generate_wall_s", run["wall_s"]))
    out["steady_tokens_per_s"] = run["generated_tokens"] / steady
    out["steady_problems_per_s"] = run["problems"] / steady
    if n_gpus:
        out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / n_gpus
        out["steady_tokens_per_s_per_gpu"] = out["steady_tokens_per_s"] / n_gpus
    return out


def _ray_runs(args, model_dir: str, problems, n_gpus: int, tmp: str, results: dict) -> float:
    """Start Ray (timed apart) and run the stage with 1 and 2 actors."""
    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cores, num_gpus=n_gpus or None, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray_init_s = time.perf_counter() - t0
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        for actors in (1, 2):
            threads = max(1, args.cores // actors)
            gpus = (1.0 if n_gpus >= actors else n_gpus / actors) if n_gpus else 0.0
            print(f"(b) Ray Data stage, {actors} actor(s) x {threads} threads ...", flush=True)
            results[f"ray_{actors}_actor"] = ray_stage(model_dir, problems, args, actors, threads, gpus,
                                                       os.path.join(tmp, f"out{actors}"))
    finally:
        ray.shutdown()
    return ray_init_s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores given to every variant")
    p.add_argument("--model", default=None, help="an existing model folder (default: build a tiny one)")
    p.add_argument("--plain-only", action="store_true",
                   help="only the plain loop (a machine without Ray, e.g. to read a GPU's tokens/s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from tripost_ray.config import TinyModelConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.tasks import get_task

    task = get_task("multistep_arithmetic")
    problems = task.generate(args.problems, "test_seen", seed=args.seed)
    tiny = TinyModelConfig(hidden_size=args.hidden_size, num_layers=args.layers,
                           num_heads=max(1, args.hidden_size // 32), intermediate_size=4 * args.hidden_size)
    n_gpus = torch.cuda.device_count()
    device = "cuda" if n_gpus else "cpu"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        model_dir = args.model
        if model_dir is None:
            corpus_ps = task.generate(200, "train", seed=args.seed)
            corpus = [task.prompt(q) for q in corpus_ps + problems] + [task.gold_rationale(q) for q in corpus_ps]
            model_dir = build_tiny_model(tiny, corpus, os.path.join(tmp, "model"))

        results: dict[str, dict] = {}
        print(f"(a) plain loop, {args.cores} threads ...", flush=True)
        results["plain_loop"] = plain_loop(model_dir, task, problems, args, args.cores, device)

        ray_init_s = None
        if not args.plain_only:
            ray_init_s = _ray_runs(args, model_dir, problems, n_gpus, tmp, results)

    same = all(r["outputs"] == results["plain_loop"]["outputs"] for r in results.values()) if len(results) > 1 else None
    n_gpus_used = {"plain_loop": min(n_gpus, 1), "ray_1_actor": min(n_gpus, 1), "ray_2_actor": min(n_gpus, 2)}
    runs = {name: rates(r, n_gpus_used[name]) for name, r in results.items()}
    base = runs["plain_loop"]
    ratios = {f"{name}_vs_plain": {key: r[key] / base[key] for key in
                                   ("tokens_per_s", "problems_per_s", "steady_tokens_per_s", "steady_problems_per_s")}
              for name, r in runs.items() if name != "plain_loop"}
    report = {
        "benchmark": "rollout",
        "what": "same model, prompts, batch size and seeds: plain single-process loop vs Ray Data stage "
                "(1 and 2 actors, equal cores). tokens_per_s: end to end (plain: model load + generation; "
                "stage: actor start + model load + generation + Parquet write). steady_tokens_per_s: "
                "generation only (plain: after the model is loaded; stage: first batch start to last batch end). "
                "ray.init is excluded from both and reported as ray_init_s.",
        "target": "ray stage >= 0.85x plain loop tokens/s at equal cores",
        "machine": machine_info(),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "model")} | {
            "model": "tiny LLaMA built from config" if args.model is None else "given folder",
            "model_config": tiny.model_dump() if args.model is None else None, "device": device},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "ray_init_s": ray_init_s,
        "runs": runs,
        "ratios": ratios,
        "identical_outputs": same,
        "meets_target_end_to_end": all(r["tokens_per_s"] >= 0.85 for r in ratios.values()) if ratios else None,
        "meets_target_steady_state": all(r["steady_tokens_per_s"] >= 0.85 for r in ratios.values()) if ratios else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':<14} {'wall s':>7} {'tokens':>7} {'tok/s':>7} {'probl/s':>7} {'ratio':>6}"
          f" | {'steady tok/s':>12} {'ratio':>6} {'actor start s':>13}")
    for name, r in runs.items():
        print(f"{name:<14} {r['wall_s']:7.1f} {r['generated_tokens']:7d} {r['tokens_per_s']:7.1f} "
              f"{r['problems_per_s']:7.2f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f} | "
              f"{r['steady_tokens_per_s']:12.1f} {r['steady_tokens_per_s'] / base['steady_tokens_per_s']:6.2f} "
              f"{r.get('actor_start_s', 0.0):13.1f}")
    print(f"ray.init: {ray_init_s if ray_init_s is None else round(ray_init_s, 1)} s (excluded); "
          f"identical outputs: {same}; "
          f"load average before/after: {report['load_average_before'][0]}/{report['load_average_after'][0]}")
    print(f"written: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return report


if __name__ == "__main__":
    main()
