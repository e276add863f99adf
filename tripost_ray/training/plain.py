"""The same training as the Ray Train loop, in one process with plain torch (no Ray, no DeepSpeed).

It is the reference the distributed trainer is checked against (same first-step losses,
same final loss) and the baseline of ``benchmarks/train.py``: it walks the very same
global batch plan, micro-batch by micro-batch (all ranks' slices in turn), with the same
loss, AdamW, schedule and clipping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tripost_ray.config import TrainConfig
from tripost_ray.training.dataset import (
    BatchGeometry,
    canonical_order,
    collate,
    global_batch_totals,
    plan_global_batches,
    rank_micro_batches,
    tokenize_rows,
)
from tripost_ray.training.loss import micro_batch_objective, weighted_loss, weighted_token_loss_sum
from tripost_ray.training.optim import build_optimizer, build_scheduler


@dataclass
class PlainRun:
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    setup_s: float = 0.0


def train_plain(rows: list[dict], init_model: str, cfg: TrainConfig, *, learning_rate: float | None = None,
                epochs: float | None = None, world_size: int | None = None, max_steps: int | None = None,
                threads: int | None = None) -> PlainRun:
    """Train in this process; ``world_size`` (default ``cfg.num_workers``) only shapes the plan."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    lr = float(learning_rate if learning_rate is not None else cfg.learning_rate)
    n_epochs = float(epochs if epochs is not None else cfg.epochs)
    P = world_size or cfg.num_workers
    tokenizer = AutoTokenizer.from_pretrained(init_model)
    examples = tokenize_rows(tokenizer, canonical_order(rows), cfg.max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    geometry = BatchGeometry(cfg.micro_batch_size, cfg.grad_accum_steps, P)
    plan = plan_global_batches([len(e) for e in examples], geometry, n_epochs, cfg.seed, cfg.length_bucket_window)
    model = AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, len(plan))
    run = PlainRun(model=model, setup_s=time.perf_counter() - t0)
    steps_per_epoch = math.ceil(len(examples) / geometry.global_batch_size)
    for step, global_batch in enumerate(plan[:max_steps] if max_steps else plan):
        t1 = time.perf_counter()
        batches = [collate([examples[i] for i in mb], pad_id)
                   for r in range(P) for mb in rank_micro_batches(global_batch, r, geometry)]
        weight_sum, tokens = global_batch_totals(examples, global_batch)
        lr_now = scheduler.get_last_lr()[0]
        loss_sum = 0.0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            s, _ = weighted_token_loss_sum(logits, b["input_ids"], b["weights"])
            micro_batch_objective(s, weight_sum).backward()
            loss_sum += float(s.detach())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t1
        run.history.append({"step": step + 1, "loss": loss_sum / max(weight_sum, 1e-12), "lr": lr_now,
                            "tokens": tokens, "tokens_per_s": tokens / dt if dt > 0 else 0.0, "step_time_s": dt,
                            "epoch": (step + 1) / steps_per_epoch})
    return run


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokenizer, rows: list[dict], max_seq_len: int, batch_size: int = 8
                  ) -> float:
    """Weighted loss of ``rows`` over all of them (sum(w*CE)/sum(w)), for held-out checks."""
    examples = tokenize_rows(tokenizer, rows, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    total, weight = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s, w = weighted_token_loss_sum(logits, b["input_ids"], b["weights"])
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1e-12)


__all__ = ["PlainRun", "evaluate_loss", "train_plain", "weighted_loss"]
