"""The training recipe's step on the torch backend (one process, no Ray): what ``train_step``
returns, and that its settled loss is the global weighted loss of the step's batch.

The DeepSpeed backend runs the same ``train_step`` in test_training_deepspeed.py and
test_training_recovery.py, checked against this backend step by step."""

from __future__ import annotations

import pytest
import torch

from tripost_ray.training.dataset import collate, global_batch_totals
from tripost_ray.training.loss import weighted_loss
from tripost_ray.training.recipe import StepRecord, WeightedFinetuneRecipe

from test_training_deepspeed import small_cfg, weighted_rows


def test_train_step_records_a_pending_step_whose_settled_loss_is_the_global_batch_loss(tiny_model_dir, tmp_path):
    cfg = small_cfg(epochs=1)
    recipe = WeightedFinetuneRecipe(cfg, learning_rate=cfg.learning_rate, epochs=1.0, world_size=2)
    recipe.setup(weighted_rows(12, seed=5), tiny_model_dir, backend="torch")
    assert recipe.total_steps == 2 and recipe.local_ranks == (0, 1)

    # the first global batch's loss under the initial weights, as one batch on its own
    whole = collate([recipe.examples[i] for i in recipe.plan[0]], recipe.pad_id)
    with torch.no_grad():
        logits = recipe.model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
        expected = float(weighted_loss(logits, whole["input_ids"], whole["weights"]))
    before = [p.detach().clone() for p in recipe.model.parameters()]

    record = recipe.train_step(0)
    assert isinstance(record, StepRecord) and record.loss is None  # pending until settled
    assert (record.step, record.tokens, record.epoch) == (1, global_batch_totals(recipe.examples, recipe.plan[0])[1],
                                                          0.5)
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.model.parameters()))  # the optimizer stepped
    recipe.train_step(1)
    recipe.settle_losses()
    assert recipe.history[0].loss == pytest.approx(expected, rel=1e-4)
    assert all(h.loss is not None for h in recipe.history)
    # the keys history.json, reports and tracking read
    assert list(recipe.history[0].to_dict()) == ["step", "loss", "lr", "tokens", "tokens_per_s", "step_time_s",
                                                 "epoch"]
    with pytest.raises(TypeError, match="deepspeed backend"):
        recipe.export(str(tmp_path / "model"))
