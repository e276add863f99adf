"""Shared fixtures: one local Ray cluster for the whole test session, sized for 2 cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tripost_ray.config import RayConfig
from tripost_ray.ray_setup import init_ray  # bound here: test_preflight trips its module's name

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's proxy must be ready within 5 s by default, which a busy 2-core box misses.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# Ray exports application metrics every 10 s by default; the metrics tests wait for them.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


#: Data kept outside the repository (too large, or not ours to ship): ``../shared/data``.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir(name: str) -> Path:
    """``../shared/data/<name>``, or skip the calling test with the reason where it is absent.

    A user's clone has no ``../shared`` beside it, so its tests skip and say what is missing.
    CI lays that folder beside the clone and sets ``CI=true``: there a missing folder is a
    failure, so the tests that need it can never pass by silently skipping.
    """
    path = SHARED_DATA / name
    if not path.is_dir():
        skip_outside_ci(f"needs {name}/, kept outside the repository in ../shared/data/ (not found at {path})")
    return path


def skip_outside_ci(reason: str) -> None:
    """Skip the calling test (or module) with ``reason``; under ``CI=true`` fail instead, so
    nothing CI is meant to cover can pass there by skipping."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_vllm() -> None:
    """Skip the calling test (or module) where vLLM is not installed; under ``CI=true`` fail:
    CI's set-up installs it, so a missing vLLM there is a broken set-up, not a reason to skip."""
    from tripost_ray.vllm_engine import vllm_installed

    if not vllm_installed():
        skip_outside_ci("vLLM is not installed (bash scripts/setup_env.sh installs it)")


@pytest.fixture
def without_s3fs(monkeypatch):
    """This process as on a machine without ``s3fs`` (whether or not this one has it), so
    the missing-backend errors are shown everywhere: importing it fails, and fsspec holds
    no S3 class it may have registered when an earlier test imported it."""
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (`fsspec.registry` is its read-only view)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    for protocol in ("s3", "s3a"):
        if protocol in registry.registry:
            monkeypatch.delitem(registry._registry, protocol)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once per test session the way every entry point starts
    one (:func:`init_ray`), with 4 logical CPUs so fractional actors, tasks and trainers
    fit on a 2-core machine."""
    import ray

    init_ray(RayConfig(num_cpus=4, log_to_driver=False, no_progress_timeout_s=300))
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


#: The easy arithmetic the pipeline tests use (groups of 2 operands, one nesting level).
EASY_ARITHMETIC = {"seen_group_sizes": [2], "seen_nestings": ["2"], "unseen_group_sizes": [3],
                   "unseen_nestings": ["2,2"]}


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory) -> str:
    """A tiny model fine-tuned on gold rationales of easy arithmetic (plain torch, ~30 s):
    it writes well-formed attempts with local arithmetic mistakes, which is what the
    pipeline tests need to exercise editing and training (a random model's output is
    all unparsable). Built once per session, like TRL's tiny-model fixtures."""
    from transformers import AutoTokenizer

    from tripost_ray.config import TinyModelConfig, TrainConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.tasks.datasets import gold_sft_examples, tokenizer_corpus
    from tripost_ray.tasks import get_task
    from tripost_ray.training.plain import train_plain

    task = get_task("multistep_arithmetic", **EASY_ARITHMETIC)
    problems = task.generate(1200, "train", seed=0)
    corpus = tokenizer_corpus(task, problems)
    root = tmp_path_factory.mktemp("sft_model")
    base = build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                                            numeric_max_digits=2), corpus, str(root / "base"))
    run = train_plain(gold_sft_examples(task, problems), base,
                      TrainConfig(micro_batch_size=16, learning_rate=2e-3, warmup_ratio=0.05, num_workers=1),
                      epochs=10, max_steps=300)
    out = str(root / "sft")
    run.model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def build_feedback_model(root: Path) -> tuple[str, list]:
    """A small model (head size 32, for vLLM's CPU attention) that has memorised trajectories
    of 6 easy arithmetic problems with a wrong first attempt, feedback on it and a correct
    update with all-correct feedback: greedy self-improving inference on those problems runs
    two rounds, each ended by the feedback-line stop (the gold-SFT model never writes
    feedback). Returns (model folder under ``root``, the problems). Plain torch, ~1 min."""
    from transformers import AutoTokenizer

    from tripost_ray.config import TinyModelConfig, TrainConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.tasks import get_task
    from tripost_ray.tasks.datasets import tokenizer_corpus
    from tripost_ray.trajectory import TrainingExample, Turn, render_feedback, render_trajectory
    from tripost_ray.training.plain import train_plain

    task = get_task("multistep_arithmetic", **EASY_ARITHMETIC)
    problems = task.generate(6, "train", seed=5)
    rows = []
    for p in problems:
        gold = task.gold_rationale(p)
        wrong = gold.rsplit("is ", 1)[0] + "is 77."
        text = render_trajectory(p.question, [Turn(wrong, render_feedback(task.verify(p, wrong))),
                                              Turn(gold, render_feedback(task.verify(p, gold)))])
        rows.append(TrainingExample(text=text, spans=((0, len(text), 1.0),), kind="gold", problem_id=p.id).to_dict())
    base = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                                            numeric_max_digits=2), tokenizer_corpus(task, problems), str(root / "base"))
    run = train_plain(rows, base, TrainConfig(micro_batch_size=6, learning_rate=3e-3, warmup_ratio=0.05, num_workers=1),
                      epochs=400, max_steps=400)
    out = str(root / "model")
    run.model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out, problems


@pytest.fixture(scope="session")
def feedback_model_dir(tmp_path_factory) -> tuple[str, list]:
    """:func:`build_feedback_model`, once per session (the vLLM and model-server tests)."""
    return build_feedback_model(tmp_path_factory.mktemp("feedback_model"))
