"""Weighted fine-tuning: dataset (span weights onto tokens), loss, DeepSpeed config, the
Ray Train loop and its driver, HF export, and a plain one-process reference loop.

Heavy imports (ray, deepspeed, transformers) happen inside the functions that need them.
"""

from tripost_ray.training.trainer import (
    FailureInjection,
    RunExistsError,
    TrainingError,
    TrainResult,
    train,
)

__all__ = ["FailureInjection", "RunExistsError", "TrainResult", "TrainingError", "train"]
