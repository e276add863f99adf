"""Weighted fine-tuning as a recipe, in the shape of torchtune's: ``setup``, ``restore``,
``train_step``, ``maybe_checkpoint``, ``export``.

One ``train_step`` serves both loops that train a model here, so the reference the
distributed trainer is checked against cannot drift from it:

* the Ray Train worker (``trainer.py``): one rank of a DeepSpeed data-parallel group
  (``DeepSpeedBackend``), restored from and saving to Ray Train checkpoints;
* the plain reference loop (``plain.py``, also the baseline of ``benchmarks/train.py``):
  one process with torch AdamW (``TorchBackend``) that computes every rank's slice of
  each global batch in turn.

Both walk the same deterministic global batch plan (``dataset.py``) with the exact global
weighted loss (``loss.py``). A step's loss is a sum over ranks: ``train_step`` keeps each
step's local sum of w*CE pending, and :meth:`settle_losses` fills the pending records in
with one all-reduce of the whole vector, at the next log, report or checkpoint (the same
steps on every rank), so no step pays a collective of its own.

Hooks such as fault injection run after ``maybe_checkpoint``, outside ``train_step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from tripost_ray.config import TrainConfig
from tripost_ray.metrics import record_training_step
from tripost_ray.training.backends import Backend, DeepSpeedBackend, TorchBackend
from tripost_ray.training.dataset import (
    BatchGeometry,
    canonical_order,
    collate,
    data_fingerprint,
    global_batch_totals,
    plan_global_batches,
    rank_micro_batches,
    tokenize_rows,
)
from tripost_ray.training.deepspeed_config import TrainSetupError
from tripost_ray.training.loss import micro_batch_objective, weighted_token_loss_sum
from tripost_ray.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("tripost_ray.training")

#: the trainer state rank 0 adds to every checkpoint
STATE_FILE = "trainer_state.json"

#: ``report(metrics, checkpoint_dir or None)``: Ray Train's report in the worker
Report = Callable[[dict, "str | None"], None]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as it goes into the history (``history.json``, reports, tracking).

    ``loss`` (the step's global weighted loss) is None until :meth:`WeightedFinetuneRecipe.settle_losses`
    sums it over ranks."""

    step: int  # 1-based
    loss: float | None
    lr: float
    tokens: int  # non-padding tokens of the global batch
    tokens_per_s: float
    step_time_s: float
    epoch: float

    def to_dict(self) -> dict:
        return asdict(self)


class WeightedFinetuneRecipe:
    """Fine-tune a causal LM on weighted examples; see the module docstring.

    ``rank`` / ``world_size`` shape the batch plan; with ``backend="deepspeed"`` this
    process computes rank ``rank``'s micro-batches, with ``"torch"`` every rank's."""

    def __init__(self, cfg: TrainConfig, *, learning_rate: float, epochs: float, world_size: int, rank: int = 0,
                 run_name: str = ""):
        self.cfg, self.learning_rate, self.epochs = cfg, learning_rate, epochs
        self.rank, self.world_size, self.run_name = rank, world_size, run_name
        self.history: list[StepRecord] = []
        self.tokens_trained = 0
        self.start_step = 0
        self.restored_from: int | None = None
        self._pending: list[tuple[int, torch.Tensor, float]] = []  # (history index, local loss sum, weight sum)

    # ------------------------------------------------------------------ setup

    def setup(self, rows: list[dict], model_dir: str, backend: Literal["deepspeed", "torch"]) -> None:
        """Tokenize ``rows``, plan the global batches, load the model from the local folder
        ``model_dir``, and build the optimizer, schedule and backend."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rows = canonical_order(rows)
        self.fingerprint = data_fingerprint(rows)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.examples = tokenize_rows(self.tokenizer, rows, cfg.max_seq_len)
        truncated = sum(e.truncated for e in self.examples)
        if self.rank == 0 and truncated:
            log.warning("%d of %d examples were cut to max_seq_len=%d", truncated, len(self.examples),
                        cfg.max_seq_len)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.geometry = BatchGeometry(cfg.micro_batch_size, cfg.grad_accum_steps, self.world_size)
        self.plan = plan_global_batches([len(e) for e in self.examples], self.geometry, self.epochs, cfg.seed,
                                        cfg.length_bucket_window)
        self.total_steps = len(self.plan)
        self.steps_per_epoch = math.ceil(len(self.examples) / self.geometry.global_batch_size)

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.config.use_cache = False
        optimizer = build_optimizer(self.model, cfg, self.learning_rate)
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        if backend == "deepspeed":
            self.backend: Backend = DeepSpeedBackend.build(self.model, optimizer, scheduler, cfg, self.world_size)
            self.local_ranks: tuple[int, ...] = (self.rank,)
        else:
            self.backend = TorchBackend(self.model, optimizer, scheduler, cfg.grad_clip)
            self.local_ranks = tuple(range(self.world_size))

    def restore(self, checkpoint_dir: str) -> None:
        """Continue from a checkpoint written by :meth:`maybe_checkpoint` (same data and plan only)."""
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            state = json.load(f)
        if state["fingerprint"] != self.fingerprint or state["total_steps"] != self.total_steps:
            raise TrainSetupError(
                f"run {self.run_name!r} has a checkpoint of different training data or batch plan "
                f"(data {state['fingerprint']} vs {self.fingerprint}, steps {state['total_steps']} vs "
                f"{self.total_steps}); use a new run name")
        self._checkpointing().load_checkpoint(checkpoint_dir, state["tag"])
        self.start_step = self.restored_from = state["step"]
        self.history = [StepRecord(**h) for h in state["history"]]
        self.tokens_trained = state["tokens_trained"]
        if self.rank == 0:
            log.info("restored run %s at step %d/%d", self.run_name, self.start_step, self.total_steps)

    # ------------------------------------------------------------------ the step

    def train_step(self, step: int) -> StepRecord:
        """One optimizer step over global batch ``step`` (0-based) of the plan. The record's
        loss is pending (None) until :meth:`settle_losses`."""
        t0 = time.perf_counter()
        backend, global_batch = self.backend, self.plan[step]
        weight_sum, step_tokens = global_batch_totals(self.examples, global_batch)
        batches = [collate([self.examples[i] for i in mb], self.pad_id)
                   for r in self.local_ranks for mb in rank_micro_batches(global_batch, r, self.geometry)]
        lr_now = backend.lr()
        world, accum = backend.objective_scale
        loss_sum = torch.zeros((), dtype=torch.float64, device=backend.device)
        for b in batches:
            ids, mask, w = (b[k].to(backend.device) for k in ("input_ids", "attention_mask", "weights"))
            s, _ = weighted_token_loss_sum(backend.logits(ids, mask), ids, w)
            backend.backward(micro_batch_objective(s, weight_sum, world_size=world, grad_accum_steps=accum))
            loss_sum += s.detach().to(torch.float64)
        backend.finish_step()
        dt = time.perf_counter() - t0
        self.tokens_trained += step_tokens
        record = StepRecord(step=step + 1, loss=None, lr=lr_now, tokens=step_tokens,
                            tokens_per_s=step_tokens / dt if dt > 0 else 0.0, step_time_s=dt,
                            epoch=(step + 1) / self.steps_per_epoch)
        self._pending.append((len(self.history), loss_sum, weight_sum))
        self.history.append(record)
        return record

    def settle_losses(self) -> None:
        """Fill in the pending steps' losses: one sum over ranks of all their local sums."""
        if not self._pending:
            return
        sums = self.backend.sum_over_ranks(torch.stack([s for _, s, _ in self._pending]))
        for (index, _, weight), total in zip(self._pending, sums.tolist()):
            self.history[index] = replace(self.history[index], loss=total / max(weight, 1e-12))
        self._pending.clear()

    # ------------------------------------------------------------------ around the step

    def maybe_checkpoint(self, record: StepRecord, report: Report) -> None:
        """After step ``record``: log every ``log_every_steps`` (and the first and last step),
        checkpoint every ``checkpoint_every_steps`` and at the end, reporting through
        ``report``. Every rank must call it after every step (it may run collectives)."""
        cfg, done, total = self.cfg, record.step, self.total_steps
        periodic = bool(cfg.checkpoint_every_steps) and done % cfg.checkpoint_every_steps == 0
        logged = done % cfg.log_every_steps == 0 or done == total or done == self.start_step + 1
        if not (logged or periodic):
            return
        self.settle_losses()
        settled = self.history[-1]
        metrics = dict(settled.to_dict(), total_steps=total)
        if self.rank == 0 and logged:
            log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", done, total, settled.loss, settled.lr,
                     settled.tokens_per_s)
            record_training_step(self.run_name, done, settled.loss, settled.tokens_per_s)
        if done == total or periodic:
            self._save_checkpoint(done, metrics, report)
        elif done % cfg.log_every_steps == 0:
            report(metrics, None)

    def _save_checkpoint(self, done: int, metrics: dict, report: Report) -> None:
        """Every rank saves its DeepSpeed shard, rank 0 adds the trainer state; then one report."""
        state = {"step": done, "tag": f"step_{done}", "history": [h.to_dict() for h in self.history],
                 "tokens_trained": self.tokens_trained, "fingerprint": self.fingerprint,
                 "total_steps": self.total_steps}
        with tempfile.TemporaryDirectory(prefix="tripost-ckpt-") as tmp:
            self._checkpointing().save_checkpoint(tmp, state["tag"], done)
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f)
            report(metrics, tmp)

    def export(self, output_dir: str) -> None:
        """Write the trained model + tokenizer to ``output_dir`` (any fsspec URL); every rank calls it."""
        self._checkpointing().export(self.tokenizer, output_dir, self.rank)

    def _checkpointing(self) -> DeepSpeedBackend:
        if not isinstance(self.backend, DeepSpeedBackend):
            raise TypeError("checkpoints and export need the deepspeed backend; the torch backend's model is "
                            "recipe.model")
        return self.backend
