"""The two ways the training recipe applies a step: a DeepSpeed engine, or plain torch.

The recipe (``recipe.py``) owns the step's math (batches, the weighted loss, its
objective); a backend only runs the model forward, backpropagates an objective, applies
the optimizer and schedule, and sums a tensor over ranks. Keeping that surface this
small is what lets the Ray Train worker and the one-process reference loop share one
``train_step``:

* :class:`DeepSpeedBackend`: one rank of a data-parallel group. ``engine.backward``
  divides by the accumulation steps and the gradient reduction averages over ranks, so
  the objective is scaled by ``P * A`` (``loss.py``); the engine applies the optimizer,
  clipping and schedule itself at the accumulation boundary. It also checkpoints and
  exports (collectives: every rank calls them).
* :class:`TorchBackend`: the module, torch AdamW and the schedule in this process,
  computing every rank's micro-batches in turn; ``backward`` per micro-batch with nothing
  dividing, then clipping, the optimizer and the schedule once per step. It keeps no
  checkpoints: the reference loop runs start to end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from tripost_ray.config import TrainConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


class Backend(Protocol):
    """What ``WeightedFinetuneRecipe.train_step`` needs of a backend."""

    device: torch.device
    #: (world size, accumulation steps) that ``micro_batch_objective`` scales by
    objective_scale: tuple[int, int]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def backward(self, objective: torch.Tensor) -> None: ...

    def finish_step(self) -> None: ...

    def lr(self) -> float: ...

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """Plain torch in one process (the reference loop and the benchmark's baseline)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float):
        self.model, self.optimizer, self.scheduler, self.grad_clip = model, optimizer, scheduler, grad_clip
        self.device = next(model.parameters()).device
        self.objective_scale = (1, 1)
        model.train()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def finish_step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values  # this one process computed every rank's micro-batches


class DeepSpeedBackend:
    """One rank's DeepSpeed engine (ZeRO, clipping and the schedule configured in it)."""

    def __init__(self, engine: DeepSpeedEngine, scheduler: torch.optim.lr_scheduler.LRScheduler, world_size: int,
                 grad_accum_steps: int):
        self.engine, self.scheduler = engine, scheduler
        # Collectives run on the engine's device: NCCL (GPU) has no CPU backend, gloo takes both.
        self.device = engine.device
        self.objective_scale = (world_size, grad_accum_steps)
        engine.train()

    @classmethod
    def build(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, world_size: int
              ) -> DeepSpeedBackend:
        from tripost_ray.training.deepspeed_config import build_deepspeed_config
        from tripost_ray.training.engine import initialize_engine

        ds_config = build_deepspeed_config(cfg, world_size, cfg.use_gpu, block_classes=model._no_split_modules or ())
        engine, scheduler = initialize_engine(model, optimizer, scheduler, ds_config)
        return cls(engine, scheduler, world_size, cfg.grad_accum_steps)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids, attention_mask=attention_mask).logits

    def backward(self, objective: torch.Tensor) -> None:
        self.engine.backward(objective)
        self.engine.step()  # DeepSpeed updates (and steps the scheduler) at the accumulation boundary

    def finish_step(self) -> None:
        """Nothing: the engine stepped at the last micro-batch's accumulation boundary."""

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(values)
        return values

    def save_checkpoint(self, directory: str, tag: str, step: int) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state={"step": step})

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)

    def export(self, tokenizer, output_dir: str, rank: int) -> None:
        from tripost_ray.training.export import export_engine_model

        export_engine_model(self.engine, tokenizer, output_dir, rank)
