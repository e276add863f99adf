"""GPU smoke check of the project's GPU paths on one CUDA device.

Runs, in one process and one local Ray instance:

  a. the machine: ``nvidia-smi``, torch / CUDA / ray / deepspeed / transformers versions;
  b. a tiny LLaMA (hidden 128, 2 layers) built from arithmetic text, loaded with
     ``load_model_and_tokenizer`` and checked to be bf16 on CUDA (the ``dtype=auto`` rule);
  c. the rollout stage (``run_rollouts``) on a Ray Data actor that holds the whole GPU:
     every problem written exactly once, the actor placed where Ray gave it a GPU, tokens/s;
     then the same with ``rollout.engine: vllm`` (bf16, one engine on the GPU), tokens/s;
  d. gold-rationale SFT through Ray Train + DeepSpeed ZeRO-2 on one GPU worker (NCCL,
     ``precision=auto`` = bf16): the loss falls and the exported model reloads in bf16 on
     CUDA and generates;
  e. the same training with ZeRO-3, if the time budget allows.

Every step is run even when an earlier one failed (except where it needs the earlier
step's output), so one run reports everything; the exit status is 1 when any step failed.
A summary goes to ``<out>/gpu_check.json``.

    python benchmarks/gpu_check.py                    # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --cpu              # dry run of the same code paths on CPU
                                                      # (fp32, gloo, no GPU assertions)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TASK = "multistep_arithmetic"
RESULTS: dict = {"steps": {}}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step(name: str):
    """Run the decorated function now; record ok/error and what it returned, never raise."""
    def wrap(fn):
        t0 = time.perf_counter()
        log(f"=== {name}")
        try:
            out = fn()
            RESULTS["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **(out or {})}
            log(f"=== {name}: PASS ({time.perf_counter() - t0:.1f} s)")
            return out
        except Exception as err:  # report and go on: one run should say everything it can
            traceback.print_exc()
            RESULTS["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                      "error": f"{type(err).__name__}: {err}"[:2000]}
            log(f"=== {name}: FAIL ({type(err).__name__})")
            return None
    return wrap


def versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    for mod in ("ray", "deepspeed", "transformers", "pydantic", "pyarrow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # a missing module is the finding, keep going
            info[mod] = f"import failed: {type(err).__name__}: {err}"
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU: fp32, gloo, no GPU assertions")
    ap.add_argument("--out", default=None, help="folder for logs, models and the JSON summary (default: a temp dir)")
    ap.add_argument("--problems", type=int, default=64, help="rollout problems")
    ap.add_argument("--sft-examples", type=int, default=256, help="gold rationales for the training check")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs given to the local Ray")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="ZeRO-3 runs only if this much time has not yet passed since the start")
    ap.add_argument("--zero3-needs-s", type=float, default=90.0, help="time the ZeRO-3 step is assumed to need")
    args = ap.parse_args()
    t_start = time.perf_counter()
    gpu = not args.cpu
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"mode={'gpu' if gpu else 'cpu dry run'} out={out}")

    # ------------------------------------------------------------------ a. machine
    @step("a_machine")
    def _a():
        if shutil.which("nvidia-smi"):
            print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout, flush=True)
        info = versions()
        for k, v in info.items():
            log(f"{k}: {v}")
        RESULTS["machine"] = info
        if gpu:
            assert info["cuda_available"], "torch sees no CUDA device"
        return {}

    from tripost_ray.config import RayConfig, RolloutConfig, TinyModelConfig, TrainConfig
    from tripost_ray.models import build_tiny_model, load_model_and_tokenizer
    from tripost_ray.tasks.datasets import gold_sft_examples
    from tripost_ray.tasks import get_task

    task = get_task(TASK)
    train_problems = task.generate(max(args.sft_examples, args.problems), "train", seed=0)
    test_problems = task.generate(args.problems, "test_seen", seed=0)
    want_dtype = "torch.bfloat16" if gpu else "torch.float32"
    want_device = "cuda" if gpu else "cpu"

    # ------------------------------------------------------------------ b. model
    model_dir = str(out / "tiny_model")

    @step("b_tiny_model_auto_dtype")
    def _b():
        corpus = [task.prompt(p) for p in train_problems + test_problems] + [
            task.gold_rationale(p) for p in train_problems]
        build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=2), corpus, model_dir)
        model, tok = load_model_and_tokenizer(model_dir)
        dtype, device = str(model.dtype), next(model.parameters()).device.type
        n_params = sum(p.numel() for p in model.parameters())
        log(f"loaded tiny model: {n_params} parameters, dtype={dtype}, device={device}, vocab={len(tok)}")
        assert dtype == want_dtype and device == want_device, f"auto rule broken: {dtype} on {device}"
        del model
        return {"dtype": dtype, "device": device, "parameters": n_params}

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        log("no model was built: nothing further can run")
        return finish(out, t_start)

    # ------------------------------------------------------------------ c. rollouts
    import ray

    from tripost_ray.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=args.num_cpus, num_gpus=1 if gpu else 0))
    log(f"ray cluster resources: {ray.cluster_resources()}")

    def rollout_check(engine: str) -> dict:
        """The rollout stage with ``engine`` on one actor holding the whole GPU: every problem
        exactly once; its summary (tokens/s is per GPU: one GPU)."""
        from tripost_ray.rollout import read_rollouts, run_rollouts
        from tripost_ray.specs import GenerationSpec, TaskSpec

        cfg = RolloutConfig(engine=engine, num_gpus_per_actor=1 if gpu else 0, num_cpus_per_actor=1, batch_size=32,
                            max_new_tokens=args.max_new_tokens, wait_for_actors_s=300)
        uri = str(out / f"rollouts_{engine}")
        spec = GenerationSpec.build(cfg, TaskSpec(name=TASK), self_improve=False, temperature=1.0, seed=0)
        summary = run_rollouts(test_problems, model_dir, spec, uri)
        rows = read_rollouts(uri)
        ids = [r["problem_id"] for r in rows]
        assert len(ids) == len(set(ids)) == len(test_problems), f"{len(ids)} rows, {len(set(ids))} distinct"
        assert set(ids) == {p.id for p in test_problems}, "rows are not the problems asked for"
        s = summary.to_dict()
        log(f"rollout summary ({engine}): " + json.dumps({k: s[k] for k in (
            "n_problems", "n_written", "n_correct", "generated_tokens", "wall_time_s", "tokens_per_s",
            "problems_per_s", "n_actors_seen", "n_nodes_seen", "stop_reasons")}))
        return {"summary": {k: v for k, v in s.items() if k != "output_uri"}}

    @step("c_rollout_stage")
    def _c():
        @ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)
        def placement() -> dict:
            import torch
            return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "cuda_available": torch.cuda.is_available(),
                    "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

        seen = ray.get(placement.remote())
        log(f"a task holding num_gpus={1 if gpu else 0} sees: {seen}")
        result = rollout_check("hf")
        # The actor loads its model on "cuda" whenever num_gpus_per_actor > 0, so a finished
        # GPU stage means the actor had a GPU; the task above shows what Ray hands such a worker.
        if gpu:
            assert seen["cuda_available"] and seen["gpu_ids"], f"a GPU-holding Ray worker saw no GPU: {seen}"
        return {"placement": seen, **result}

    @step("c_rollout_stage_vllm")
    def _c_vllm():
        """The same stage with rollout.engine: vllm (bf16 by dtype=auto on GPU, prefix caching,
        one engine per actor, the actor holding the GPU)."""
        from tripost_ray.vllm_engine import INSTALL_HINT, vllm_installed

        assert vllm_installed(), f"vLLM is not installed: {INSTALL_HINT}"
        return rollout_check("vllm")

    # ------------------------------------------------------------------ d/e. training
    from tripost_ray.generation import HFGenerationEngine, SamplingParams
    from tripost_ray.training.trainer import train

    examples = gold_sft_examples(task, train_problems[: args.sft_examples])

    def train_check(zero_stage: int) -> dict:
        cfg = TrainConfig(use_gpu=gpu, num_workers=1, zero_stage=zero_stage, precision="auto", micro_batch_size=8,
                          epochs=1, learning_rate=1e-3, warmup_ratio=0.1, log_every_steps=5, max_failures=0,
                          cpus_per_worker=2, max_seq_len=512)
        export = str(out / f"sft_zero{zero_stage}")
        res = train(examples, model_dir, export, cfg, run_name=f"gpu_check_zero{zero_stage}",
                    storage_path=str(out / "ray_train"), resume=False)
        losses = [h["loss"] for h in res.history]
        steady = [h["tokens_per_s"] for h in res.history[2:]] or [h["tokens_per_s"] for h in res.history]
        log(f"ZeRO-{zero_stage}: {res.steps} steps, {res.tokens_trained} tokens, wall {res.wall_time_s:.1f} s")
        log("losses: " + " ".join(f"{x:.3f}" for x in losses))
        tail = sum(losses[-5:]) / len(losses[-5:])
        assert tail < losses[0] * 0.95, f"loss did not fall: first {losses[0]:.4f}, mean of last 5 {tail:.4f}"
        model, tok = load_model_and_tokenizer(export)
        dtype, device = str(model.dtype), next(model.parameters()).device.type
        assert dtype == want_dtype and device == want_device, f"exported model loads as {dtype} on {device}"
        gen = HFGenerationEngine(model, tok, batch_size=4).generate(
            [task.prompt(p) for p in test_problems[:4]], SamplingParams(max_new_tokens=48))
        assert all(g.generated_tokens > 0 for g in gen), "the exported model generated nothing"
        log(f"exported model ({dtype} on {device}) greedy sample: {gen[0].text[:200]!r}")
        return {"steps": res.steps, "first_loss": losses[0], "final_loss": losses[-1], "last5_mean_loss": tail,
                "losses": losses, "tokens_trained": res.tokens_trained, "wall_time_s": res.wall_time_s,
                "median_tokens_per_s": sorted(steady)[len(steady) // 2], "export_dtype": dtype,
                "export_device": device}

    step("d_train_zero2")(lambda: train_check(2))
    left = args.budget_s - (time.perf_counter() - t_start)
    if left >= args.zero3_needs_s:
        step("e_train_zero3")(lambda: train_check(3))
    else:
        log(f"skipping ZeRO-3: {left:.0f} s of the budget left (< {args.zero3_needs_s:.0f} s)")
        RESULTS["steps"]["e_train_zero3"] = {"ok": None, "skipped": f"{left:.0f} s of budget left"}
    return finish(out, t_start)


def finish(out: Path, t_start: float) -> int:
    RESULTS["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    failed = [k for k, v in RESULTS["steps"].items() if v.get("ok") is False]
    log(f"summary: {json.dumps({k: v.get('ok') for k, v in RESULTS['steps'].items()})} total {RESULTS['total_s']} s")
    log("FAILED: " + ", ".join(failed) if failed else "ALL PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
