"""Checkpoints and recovery on a real local Ray with DeepSpeed ZeRO-3 on 2 CPU workers.

A training worker process is SIGKILLed after step 3 (first attempt only; a marker file
records it; a short delay lets the controller register the step-2 checkpoint first). Ray Train restarts the worker group, the loop restores the step-2
DeepSpeed checkpoint from ``ray.train.get_checkpoint()``, skips the steps already taken,
and finishes with the losses of an uninterrupted run (the plain loop on the same plan).
A re-started driver with the same run name resumes the finished run instead of training
again; a fresh run (resume=False) or a different setup under that name is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tripost_ray.training import FailureInjection, RunExistsError, train
from tripost_ray.training.plain import train_plain

from test_training_deepspeed import small_cfg, weighted_rows

pytestmark = pytest.mark.integration
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions"))


def test_killed_worker_restores_from_checkpoint_and_matches_uninterrupted_run(ray_cluster, tiny_model_dir, tmp_path):
    rows = weighted_rows(16, seed=31)
    cfg = small_cfg(zero_stage=3, epochs=3, checkpoint_every_steps=2, max_failures=1)
    marker = tmp_path / "killed"
    kw = dict(run_name="recover", storage_path=str(tmp_path / "runs"))
    result = train(rows, tiny_model_dir, str(tmp_path / "model"), cfg,
                   inject_failure=FailureInjection(step=3, rank=1, marker=str(marker), delay_s=6.0), **kw)
    assert marker.read_text().startswith("killed rank 1 after step 3")
    assert result.restored_from_step == 2
    plain = train_plain(rows, tiny_model_dir, cfg)
    assert result.steps == len(plain.history) == 6
    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert result.final_loss == pytest.approx(plain.history[-1]["loss"], rel=1e-4)
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)

    # a re-started driver resumes the finished run: nothing is trained again, the result is the same
    again = train(rows, tiny_model_dir, str(tmp_path / "model"), cfg, **kw)
    assert again.restored_from_step == 6 and again.history == result.history
    assert (tmp_path / "model" / "config.json").exists()

    # fresh runs never resume by accident
    with pytest.raises(RunExistsError, match="already exists"):
        train(rows, tiny_model_dir, str(tmp_path / "model"), cfg, resume=False, **kw)
    with pytest.raises(RunExistsError, match="learning_rate"):
        train(rows, tiny_model_dir, str(tmp_path / "model"), cfg, learning_rate=1e-2, **kw)
