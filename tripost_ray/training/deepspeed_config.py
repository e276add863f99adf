"""The DeepSpeed config, built from the typed ``TrainConfig`` (no free-form JSON).

Only the fields the trainer relies on are set, so the mapping from config to behaviour is
readable in one place. On CPU, DeepSpeed runs in fp32 over gloo; bf16/fp16 are GPU-only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from tripost_ray.config import TrainConfig

Precision = Literal["fp32", "bf16", "fp16"]


class TrainSetupError(ValueError):
    """A training configuration that cannot run; the message names the field."""


def resolve_precision(cfg: TrainConfig, use_gpu: bool) -> Precision:
    """``auto`` is bf16 on GPU and fp32 on CPU; 16-bit on CPU is refused (slow, unsupported)."""
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if cfg.precision in ("bf16", "fp16") and not use_gpu:
        raise TrainSetupError(f"train.precision={cfg.precision} needs train.use_gpu=true; CPU training runs in fp32 "
                              "(use precision=auto or fp32)")
    return cfg.precision  # type: ignore[return-value]


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that run but waste time; the trainer logs these once, on the driver."""
    warnings = []
    if cfg.zero_stage == 3 and cfg.num_workers == 1 and not cfg.offload_params:
        warnings.append("train.zero_stage=3 on a single worker partitions nothing and only adds ZeRO-3's "
                        "per-block gather/release work (measured in benchmarks/README.md); use zero_stage=2 "
                        "unless train.offload_params is on")
    return warnings


def build_deepspeed_config(cfg: TrainConfig, world_size: int, use_gpu: bool,
                           block_classes: Iterable[str] = ()) -> dict[str, Any]:
    """The ``config=`` dict for ``deepspeed.initialize`` (optimizer and scheduler come from torch).

    ``block_classes``: the model's transformer-block class names (``model._no_split_modules``).
    Under ZeRO-3 they become DeepSpeed leaf modules: one parameter fetch and release per
    block and pass, instead of pre/post hooks on every linear and norm. That hook work is a
    fixed cost per submodule and micro batch, so it weighs most on small models
    (benchmarks/README.md). A block's parameters are then live together, the unit that
    FSDP's transformer wrap policy also uses; the arithmetic is unchanged."""
    if cfg.offload_params and cfg.zero_stage != 3:
        raise TrainSetupError(f"train.offload_params=true needs train.zero_stage=3 (got {cfg.zero_stage})")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise TrainSetupError("train.offload_optimizer=true needs train.zero_stage >= 1 (got 0)")
    precision = resolve_precision(cfg, use_gpu)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        # lets engine.save_16bit_model / _zero3_consolidated_16bit_state_dict gather full weights for export
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if block_classes:
            zero["leaf_module"] = {"classes": sorted(block_classes)}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # we pass a torch AdamW (the same optimizer the plain loop uses, also when its state is offloaded)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
