"""Ray Train + DeepSpeed on 2 CPU workers (real local Ray, real DeepSpeed over gloo).

* ZeRO-2 (an SFT run on gold rationales, all weights 1) and ZeRO-3 (feedback-weighted
  examples) give the same per-step losses as the plain one-process loop on the same
  data and batches, and export the same weights;
* the exported models reload through the model factory and generate;
* the short SFT lowers the held-out loss of gold rationales.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from tripost_ray import progress
from tripost_ray.config import TrainConfig
from tripost_ray.models import load_model_and_tokenizer
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import TrainingExample, Turn, render_trajectory, weighted_example
from tripost_ray.training import train
from tripost_ray.training.plain import evaluate_loss, train_plain

pytestmark = pytest.mark.integration
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions"))

ALL_CORRECT = "Step (1) to step (3) are correct. The final response is also correct."


def gold_rows(split: str, n: int, seed: int) -> list[dict]:
    task = get_task("multistep_arithmetic")
    rows = []
    for p in task.generate(n, split, seed=seed):
        text = render_trajectory(p.question, [Turn(task.gold_rationale(p))])
        rows.append(TrainingExample(text, ((0, len(text), 1.0),), "gold", p.id).to_dict())
    return rows


def weighted_rows(n: int, seed: int) -> list[dict]:
    task = get_task("multistep_arithmetic")
    return [weighted_example(render_trajectory(p.question, [Turn(task.gold_rationale(p), ALL_CORRECT)]),
                             "terminal", 1.5, p.id).to_dict() for p in task.generate(n, "train", seed=seed)]


def small_cfg(**kw) -> TrainConfig:
    base = dict(num_workers=2, cpus_per_worker=1, micro_batch_size=2, grad_accum_steps=2, learning_rate=3e-3,
                epochs=3, warmup_ratio=0.1, max_seq_len=512, log_every_steps=4, seed=0)
    return TrainConfig(**{**base, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _assert_same_training(ray_result, plain_run, first_steps=3):
    ray_losses = [h["loss"] for h in ray_result.history]
    plain_losses = [h["loss"] for h in plain_run.history]
    assert len(ray_losses) == len(plain_losses)
    assert ray_losses[:first_steps] == pytest.approx(plain_losses[:first_steps], rel=1e-5)
    assert ray_losses == pytest.approx(plain_losses, rel=1e-3)
    assert [h["lr"] for h in ray_result.history] == pytest.approx([h["lr"] for h in plain_run.history])


def _assert_export_matches(model_dir: str, plain_model):
    model, tok = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    exported, ref = _state(model), _state(plain_model)
    assert exported.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(exported[k], ref[k], rtol=0, atol=2e-3, msg=k)
    prompt = get_task("multistep_arithmetic").prompt(get_task("multistep_arithmetic").generate(1, "test_seen", 3)[0])
    enc = tok([prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    return model, tok


def test_zero2_sft_matches_plain_loop_exports_and_lowers_heldout_loss(ray_cluster, tiny_model_dir, tmp_path, caplog):
    rows, held_out = gold_rows("train", 24, seed=11), gold_rows("test_seen", 12, seed=12)
    cfg = small_cfg(zero_stage=2)
    caplog.set_level(logging.INFO, logger="tripost")
    progress.configure("lines")
    try:
        result = train(rows, tiny_model_dir, str(tmp_path / "model"), cfg, run_name="zero2-sft",
                       storage_path=str(tmp_path / "runs"))
    finally:
        progress.configure("bars")
    # rank 0 reported every step to the driver's progress
    assert [r.getMessage().split(" in ")[0] for r in caplog.records if r.getMessage().startswith("train: ")] == [
        "train: started", "train: done, 9/9 steps"]
    plain = train_plain(rows, tiny_model_dir, cfg)
    _assert_same_training(result, plain)
    assert result.steps == 9 and result.tokens_trained > 0 and result.checkpoint_path
    model, tok = _assert_export_matches(str(tmp_path / "model"), plain.model)

    init_model, _ = load_model_and_tokenizer(tiny_model_dir, dtype="float32", device="cpu")
    before = evaluate_loss(init_model, tok, held_out, cfg.max_seq_len)
    after = evaluate_loss(model, tok, held_out, cfg.max_seq_len)
    assert after < before - 0.5, (before, after)


def test_zero3_weighted_matches_plain_loop_and_exports(ray_cluster, tiny_model_dir, tmp_path):
    rows = weighted_rows(20, seed=21)
    cfg = small_cfg(zero_stage=3, epochs=2)
    result = train(rows, tiny_model_dir, str(tmp_path / "model"), cfg, run_name="zero3-weighted",
                   storage_path=str(tmp_path / "runs"))
    plain = train_plain(rows, tiny_model_dir, cfg)
    _assert_same_training(result, plain)
    _assert_export_matches(str(tmp_path / "model"), plain.model)


def test_examples_from_parquet_url_and_bad_columns(ray_cluster, tmp_path):
    """The pipeline passes the post-processing Parquet URL; a file missing columns is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tripost_ray.training.dataset import TrainingDataError, canonical_order
    from tripost_ray.training.trainer import _as_dataset

    rows = weighted_rows(5, seed=41)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    ds = _as_dataset(f"file://{tmp_path / 'train.parquet'}")
    got = canonical_order([{k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
                            for k, v in r.items()} for r in ds.iter_rows()])
    assert [(r["text"], r["span_weights"]) for r in got] == [(r["text"], r["span_weights"])
                                                              for r in canonical_order(rows)]
    pq.write_table(pa.Table.from_pylist([{"text": "Q: 1", "span_starts": [0]}]), tmp_path / "bad.parquet")
    with pytest.raises(TrainingDataError, match=r"span_ends"):
        _as_dataset(str(tmp_path / "bad.parquet"))
