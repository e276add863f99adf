"""DeepSpeed's own per-step cost, without Ray: plain torch and a DeepSpeed engine step the
same batches in one process (gloo, world size 1), interleaved step by step, so machine
load hits both alike. It separates DeepSpeed's share of the training overhead from Ray
Train's (see benchmarks/README.md).

``--in-ray`` runs the same comparison inside a one-worker Ray Train worker: if the ratio
stays the same there, Ray's per-step cost falls on plain and DeepSpeed steps alike, and
the plain median step against the run without the flag is that cost.

Usage: python benchmarks/deepspeed_alone.py [--zero 2] [--global-batch 8] [--micro-batch 4] [--steps 30]
                                            [--zero-extra '{"stage3_param_persistence_threshold": 1e6}']
                                            [--in-ray]
Prints one line; writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--global-batch", type=int, default=8, help="a multiple of --micro-batch")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--zero-extra", default="{}", help="JSON merged into zero_optimization")
    ap.add_argument("--in-ray", action="store_true", help="measure inside a 1-worker Ray Train worker")
    return ap.parse_args(argv)


def measure(args: argparse.Namespace) -> str:
    """Interleave plain and DeepSpeed steps in this process; return the result line."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # also inside a Ray worker

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train import make_rows  # the training benchmark's data
    from tripost_ray.config import TinyModelConfig, TrainConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.training.dataset import BatchGeometry, collate, global_batch_totals, plan_global_batches, tokenize_rows
    from tripost_ray.training.deepspeed_config import build_deepspeed_config
    from tripost_ray.training.engine import initialize_engine
    from tripost_ray.training.loss import micro_batch_objective, weighted_token_loss_sum
    from tripost_ray.training.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    micro, accum = args.micro_batch, args.global_batch // args.micro_batch
    rows = make_rows(48, seed=0)
    model_dir = build_tiny_model(TinyModelConfig(numeric_max_digits=3), [r["text"] for r in rows],
                                 tempfile.mkdtemp(prefix="tripost-ds-alone-"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_rows(tokenizer, rows, 1024)
    cfg = TrainConfig(zero_stage=args.zero, micro_batch_size=micro, grad_accum_steps=accum, learning_rate=1e-3)
    plan = plan_global_batches([len(e) for e in examples], BatchGeometry(micro, accum, 1), 100.0, 0, 16)[:args.steps]

    own_group = not dist.is_initialized()  # inside Ray Train the group exists already
    if own_group:
        dist.init_process_group("gloo")
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wrapped = copy.deepcopy(plain)
    optimizer = build_optimizer(plain, cfg, cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, len(plan))
    ds_opt = build_optimizer(wrapped, cfg, cfg.learning_rate)
    ds_config = build_deepspeed_config(cfg, 1, False, block_classes=wrapped._no_split_modules or ())  # as the trainer
    ds_config["zero_optimization"].update(json.loads(args.zero_extra))
    # ZeRO-3 (memory_efficient_linear, DeepSpeed's default) replaces torch.nn.functional.linear
    # process-wide at initialize; the plain steps must run on torch's own
    native_linear = torch.nn.functional.linear
    engine, _ = initialize_engine(wrapped, ds_opt, build_scheduler(ds_opt, cfg, len(plan)), ds_config)

    def micro_batches(batch):
        return [collate([examples[i] for i in batch[j:j + micro]], tokenizer.pad_token_id)
                for j in range(0, len(batch), micro)]

    engine_linear = torch.nn.functional.linear
    plain_s, ds_s = [], []
    for batch in plan:
        torch.nn.functional.linear = native_linear
        weight, _ = global_batch_totals(examples, batch)
        t0 = time.perf_counter()
        for b in micro_batches(batch):
            s, _ = weighted_token_loss_sum(plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["input_ids"], b["weights"])
            micro_batch_objective(s, weight).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        plain_s.append(time.perf_counter() - t0)
        torch.nn.functional.linear = engine_linear
        t0 = time.perf_counter()
        for b in micro_batches(batch):
            s, _ = weighted_token_loss_sum(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["input_ids"], b["weights"])
            engine.backward(micro_batch_objective(s, weight, world_size=1, grad_accum_steps=accum))
            engine.step()
        ds_s.append(time.perf_counter() - t0)
    plain_s, ds_s = plain_s[args.warmup_steps:], ds_s[args.warmup_steps:]
    if own_group:
        dist.destroy_process_group()
    return (f"ZeRO-{args.zero}, global batch {args.global_batch} (micro {micro}), {len(plain_s)} steady steps, "
            f"{args.threads} threads, zero extra {args.zero_extra}{', in a Ray Train worker' if args.in_ray else ''}: "
            f"DeepSpeed {sum(plain_s) / sum(ds_s):.3f}x the plain loop "
            f"(median step {1e3 * statistics.median(ds_s):.0f} ms vs {1e3 * statistics.median(plain_s):.0f} ms)")


def measure_in_ray(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(ROOT))
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tripost_ray.config import RayConfig
    from tripost_ray.ray_setup import init_ray

    work = Path(tempfile.mkdtemp(prefix="tripost-ds-in-ray-"))

    def worker(config: dict) -> None:
        (work / "line.txt").write_text(measure(config["args"]))

    init_ray(RayConfig(num_cpus=args.threads + 1, log_to_driver=False))
    TorchTrainer(worker, train_loop_config={"args": args},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
                 run_config=RunConfig(storage_path=str(work / "runs"), name="ds-in-ray")).fit()
    ray.shutdown()
    return (work / "line.txt").read_text()


def main() -> int:
    args = parse_args()
    if args.in_ray:
        print(measure_in_ray(args))
        return 0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    print(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
