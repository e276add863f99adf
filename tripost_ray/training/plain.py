"""The same training as the Ray Train loop, in one process with plain torch (no Ray, no DeepSpeed).

It is the reference the distributed trainer is checked against (same first-step losses,
same final loss) and the baseline of ``benchmarks/train.py``: the recipe's own
``train_step`` (``recipe.py``) with the torch backend, which walks the very same global
batch plan micro-batch by micro-batch (all ranks' slices in turn), with the same loss,
AdamW, schedule and clipping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tripost_ray.config import TrainConfig
from tripost_ray.training.dataset import collate, tokenize_rows
from tripost_ray.training.loss import weighted_loss, weighted_token_loss_sum
from tripost_ray.training.recipe import WeightedFinetuneRecipe


@dataclass
class PlainRun:
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    setup_s: float = 0.0


def train_plain(rows: list[dict], init_model: str, cfg: TrainConfig, *, learning_rate: float | None = None,
                epochs: float | None = None, world_size: int | None = None, max_steps: int | None = None,
                threads: int | None = None) -> PlainRun:
    """Train in this process; ``world_size`` (default ``cfg.num_workers``) only shapes the plan."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    recipe = WeightedFinetuneRecipe(
        cfg, learning_rate=float(learning_rate if learning_rate is not None else cfg.learning_rate),
        epochs=float(epochs if epochs is not None else cfg.epochs), world_size=world_size or cfg.num_workers)
    recipe.setup(rows, init_model, backend="torch")
    run = PlainRun(model=recipe.model, setup_s=time.perf_counter() - t0)
    for step in range(min(max_steps, recipe.total_steps) if max_steps else recipe.total_steps):
        recipe.train_step(step)
    recipe.settle_losses()
    run.history = [r.to_dict() for r in recipe.history]
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
