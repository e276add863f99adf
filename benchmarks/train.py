"""Training throughput: the plain one-process torch loop vs Ray Train + DeepSpeed ZeRO.

Same model, same data, same global batches (the trainer's deterministic plan) and the
same ``train_step`` (``tripost_ray/training/recipe.py``: the torch backend in the plain
loop, DeepSpeed in the Ray Train workers) at equal total cores: the plain loop uses all
cores as torch threads; Ray Train runs 1 worker with all of them, or 2 workers with half
each. Reported per configuration:

* steady-state tokens/s: non-padding tokens over the summed step times of every step
  after the first ``--warmup-steps`` (step times are measured inside the loops, so they
  include DeepSpeed's engine, ZeRO collectives and the loss all-reduces, but not start-up);
* the ratio to the plain loop (plain runs interleave with the Ray runs, and each Ray run
  is compared with the mean of the plain runs right before and after it, so slow drifts
  of machine load cancel out);
* the fixed start-up cost: the run's wall time minus its step times (Ray Train worker
  group, DeepSpeed init, data read, tokenisation, checkpoint, export).

The default batch shape is the CPU jobs' (jobs/reproduce_cpu.yaml: micro batch 16 per
worker, 2 workers, so a global batch of 32). ZeRO-3's parameter hooks (one pair per
transformer block) cost a fixed time per micro batch, so on a model this small the
overhead grows as micro batches shrink; ``--micro-batch 4 --global-batch 8`` shows that
worst case (benchmarks/README.md).

Writes benchmarks/results/train.json and its own section of benchmarks/README.md.
Usage: python benchmarks/train.py [--steps 12] [--configs 1x2,1x3,2x2,2x3] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "benchmarks" / "results" / "train.json"
README = ROOT / "benchmarks" / "README.md"
TARGET_OVERHEAD = 0.15


def make_rows(n: int, seed: int) -> list[dict]:
    """Feedback-weighted single-turn examples from arithmetic gold rationales."""
    from tripost_ray.tasks import get_task
    from tripost_ray.trajectory import Turn, render_trajectory, weighted_example

    task = get_task("multistep_arithmetic")
    fb = "Step (1) to step (4) are correct. The final response is also correct."
    return [weighted_example(render_trajectory(p.question, [Turn(task.gold_rationale(p), fb)]), "terminal", 1.5,
                             p.id).to_dict() for p in task.generate(n, "train", seed=seed)]


def steady(history: list[dict], warmup: int) -> dict:
    tail = history[warmup:] or history
    tokens = sum(h["tokens"] for h in tail)
    seconds = sum(h["step_time_s"] for h in tail)
    return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / len(tail), "steady_steps": len(tail),
            "all_steps_s": sum(h["step_time_s"] for h in history)}


def versions() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


def update_readme(summary: str) -> None:
    begin, end = "<!-- train.py:begin -->", "<!-- train.py:end -->"
    section = f"{begin}\n## Training: plain torch loop vs Ray Train + DeepSpeed (`benchmarks/train.py`)\n\n{summary}\n{end}"
    text = README.read_text() if README.exists() else "# Benchmarks\n\nMeasured side by side in one run; JSON in results/.\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


def plain_worker(spec_json: str) -> int:
    """Child process of the benchmark: one plain-loop run; prints its history as JSON."""
    from tripost_ray.config import TrainConfig
    from tripost_ray.training.plain import train_plain

    spec = json.loads(spec_json)
    run = train_plain(make_rows(spec["examples"], seed=0), spec["model"], TrainConfig(**spec["cfg"]),
                      threads=spec["threads"])
    print(json.dumps(run.history))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain-worker"]:
        return plain_worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of steady state")
    ap.add_argument("--configs", default="1x2,1x3,2x2,2x3", help="WORKERSxZERO_STAGE list")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="total cores given to each setup")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=32, help="examples per optimizer step, all workers")
    ap.add_argument("--micro-batch", type=int, default=16, help="examples per forward pass and worker")
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes over --configs; each configuration's ratio is the mean over its passes")
    ap.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in spec.split("x")) for spec in args.configs.split(",")]
    for workers, _ in configs:
        if args.global_batch % (args.micro_batch * workers):
            ap.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch} "
                     f"x {workers} workers")

    import ray
    import torch

    from tripost_ray.config import RayConfig, TinyModelConfig, TrainConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.training import train
    from tripost_ray.training.dataset import BatchGeometry, steps_per_epoch

    cores = args.cores
    rows = make_rows(args.examples, seed=0)
    tiny = TinyModelConfig(numeric_max_digits=3)  # the default tiny model with a ~1k-token vocabulary
    work = Path(tempfile.mkdtemp(prefix="tripost-bench-train-"))
    model_dir = build_tiny_model(tiny, [r["text"] for r in rows], str(work / "model"))
    per_epoch = steps_per_epoch(len(rows), BatchGeometry(args.global_batch, 1, 1))
    epochs = args.steps / per_epoch

    def cfg_for(workers: int, zero: int) -> TrainConfig:
        micro = args.micro_batch
        return TrainConfig(num_workers=workers, zero_stage=zero, micro_batch_size=micro,
                           grad_accum_steps=args.global_batch // (micro * workers), cpus_per_worker=cores / workers,
                           torch_threads_per_worker=max(1, cores // workers), learning_rate=1e-3, epochs=epochs,
                           warmup_ratio=0.1, max_seq_len=1024, log_every_steps=10**6, checkpoint_every_steps=0)

    def run_plain(label: str) -> dict:
        # a fresh process, like each Ray worker: the driver's own heap and Ray's client
        # threads must not weigh on the baseline
        spec = json.dumps({"model": model_dir, "cfg": cfg_for(1, 2).model_dump(mode="json"), "threads": cores,
                           "examples": args.examples})
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--plain-worker", spec], capture_output=True, text=True,
                             check=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        history = json.loads(out.stdout.strip().splitlines()[-1])
        s = steady(history, args.warmup_steps)
        return {"name": label, "workers": 0, "zero_stage": None, "threads": cores, **s, "wall_s": wall,
                "startup_s": wall - s["all_steps_s"], "final_loss": history[-1]["loss"]}

    load_before = os.getloadavg()
    # plain runs interleave with the Ray runs; each Ray run is compared with the mean of the
    # plain runs just before and after it, so slow drifts of machine load cancel out
    plains = [run_plain("plain_0")]
    results = []
    # logical CPUs: workers claim `cores`, and Ray Data's small read tasks still get a slot
    init_ray(RayConfig(num_cpus=cores + 2, log_to_driver=args.verbose))
    for rep, (workers, zero) in ((r, c) for r in range(args.repeats) for c in configs):
        spec = f"{workers}x{zero}-{rep}"
        cfg = cfg_for(workers, zero)
        t0 = time.perf_counter()
        res = train(rows, model_dir, str(work / f"out_{spec}"), cfg, run_name=f"bench-{spec}-{int(t0)}",
                    storage_path=str(work / "runs"))
        wall = time.perf_counter() - t0
        s = steady(res.history, args.warmup_steps)
        plains.append(run_plain(f"plain_{len(plains)}"))
        baseline = (plains[-2]["tokens_per_s"] + plains[-1]["tokens_per_s"]) / 2
        results.append({"name": f"ray_{workers}w_zero{zero}", "repeat": rep, "workers": workers, "zero_stage": zero,
                        "threads": cfg.torch_threads_per_worker, **s, "wall_s": wall,
                        "startup_s": wall - s["all_steps_s"], "final_loss": res.final_loss,
                        "plain_baseline_tokens_per_s": baseline, "ratio_vs_plain": s["tokens_per_s"] / baseline,
                        "overhead": 1 - s["tokens_per_s"] / baseline})
        print(f"{results[-1]['name']}: {s['tokens_per_s']:.0f} tokens/s vs plain {baseline:.0f}, "
              f"start-up {results[-1]['startup_s']:.1f} s", flush=True)
    ray.shutdown()
    load_after = os.getloadavg()
    per_config = {}
    for r in results:
        per_config.setdefault(r["name"], []).append(r)
    summaries = [{"name": name, "runs": len(runs), "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
                  "ratio_vs_plain": statistics.fmean(r["ratio_vs_plain"] for r in runs),
                  "ratio_min": min(r["ratio_vs_plain"] for r in runs), "ratio_max": max(r["ratio_vs_plain"] for r in runs),
                  "startup_s": statistics.fmean(r["startup_s"] for r in runs)} for name, runs in per_config.items()]
    for c in summaries:
        c["overhead"] = 1 - c["ratio_vs_plain"]
    out = {
        "benchmark": "train",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "cores_used": cores, "loadavg_before": load_before,
                    "loadavg_after": load_after, "gpu": torch.cuda.is_available()},
        "versions": versions(),
        "config": {"model": tiny.model_dump(), "examples": len(rows), "global_batch": args.global_batch,
                   "micro_batch": args.micro_batch, "steps": args.steps, "repeats": args.repeats, "warmup_steps_excluded": args.warmup_steps,
                   "precision": "fp32 (CPU)", "loss": "weighted token loss, feedback weight 1.5"},
        "plain_runs": plains,
        "target_max_overhead": TARGET_OVERHEAD,
        "meets_target": {c["name"]: c["overhead"] <= TARGET_OVERHEAD for c in summaries},
        "summary": summaries,
        "results": results,
        "plain_startup_s": statistics.fmean(p["startup_s"] for p in plains),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"- {c['name']}: {c['tokens_per_s']:.0f} tokens/s steady, {c['ratio_vs_plain']:.2f}x plain"
             + (f" (mean of {c['runs']} runs, {c['ratio_min']:.2f}-{c['ratio_max']:.2f})" if c["runs"] > 1 else "")
             + f", overhead {100 * c['overhead']:.0f}% (target <= {100 * TARGET_OVERHEAD:.0f}%), "
             f"start-up {c['startup_s']:.1f} s" for c in summaries]
    plain_rates = [p["tokens_per_s"] for p in plains]
    summary = (f"{cores} cores, tiny LLaMA (hidden {tiny.hidden_size}, {tiny.num_layers} layers), fp32 CPU, "
               f"global batch {args.global_batch} (micro {args.micro_batch}), {args.steps} steps (first {args.warmup_steps} excluded); plain loop "
               f"{min(plain_rates):.0f}-{max(plain_rates):.0f} tokens/s "
               f"over {len(plains)} interleaved runs (run-to-run coefficient of variation "
               f"{100 * statistics.pstdev(plain_rates) / statistics.fmean(plain_rates):.0f}%; start-up {statistics.fmean(p['startup_s'] for p in plains):.1f} s), "
               f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}.\n\n" + "\n".join(lines))
    if max(r["ratio_vs_plain"] for r in results) > 1.15:
        summary += ("\n\nCaveat: ratios well above 1 are not a framework speed-up. On an oversubscribed box "
                    "(load average above the core count) multi-threaded torch loses most of its time in OpenMP "
                    "waits and one process's tokens/s swings by several times between runs (compare the "
                    "plain_runs and the two 1-worker runs in the JSON); the per-step losses of all runs are "
                    "identical, so the work is the same. Rerun on an idle machine for an overhead figure.")
    print(summary)
    if not args.no_readme:
        update_readme(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
