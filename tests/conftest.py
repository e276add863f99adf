"""Shared fixtures: one local Ray cluster for the whole test session, sized for 2 cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once per test session (no dashboard, 4 logical CPUs
    so fractional actors, tasks and trainers fit on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 300
    yield ray
    # left running until the session ends: ray shuts down atexit


def _tiny_corpus() -> list[str]:
    """Task text for the tiny model's tokenizer: prompts and gold rationales of both tasks."""
    from tripost_ray.tasks import get_task

    corpus = []
    for name in ("multistep_arithmetic", "word_sorting"):
        task = get_task(name)
        for split in ("train", "test_seen", "test_unseen"):
            for p in task.generate(20, split, seed=0):
                corpus += [task.prompt(p), task.gold_rationale(p)]
    return corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random LLaMA (hidden 32, 1 layer) with a numeric tokenizer trained on task
    text, saved in Hugging Face format: what every stage loads in tests."""
    from tripost_ray.config import TinyModelConfig
    from tripost_ray.models import build_tiny_model

    cfg = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                          max_position_embeddings=2048, numeric_max_digits=3)
    return build_tiny_model(cfg, _tiny_corpus(), str(tmp_path_factory.mktemp("tiny_model")))
