"""The weighted token loss (pure torch): a hand-computed reference, and invariance of the
applied gradient to how a global batch is cut into micro-batches and data-parallel ranks.
Also the lr schedule and the DeepSpeed config mapping (pure functions, no cluster)."""

from __future__ import annotations

import math

import pytest
import torch

from tripost_ray.config import TrainConfig
from tripost_ray.training.deepspeed_config import (TrainSetupError, build_deepspeed_config, config_warnings,
                                                   resolve_precision)
from tripost_ray.training.loss import micro_batch_objective, weighted_loss, weighted_token_loss_sum
from tripost_ray.training.optim import lr_factor


def test_weighted_loss_matches_hand_computed_value_with_padding_and_two_spans():
    # vocab of 2. Logits [ln 3, 0] give p = (3/4, 1/4); logits [0, 0] give (1/2, 1/2).
    L3 = math.log(3.0)
    logits = torch.tensor([
        [[L3, 0.0], [0.0, 0.0], [L3, 0.0], [0.0, 0.0]],   # row 0: 4 real tokens
        [[0.0, 0.0], [L3, 0.0], [5.0, -5.0], [9.0, 9.0]],  # row 1: 2 real tokens + 2 padding
    ])
    ids = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
    # label weights: position 0 is never a label; row 0 has a weight-1 span then a 1.5 span
    weights = torch.tensor([[0.0, 1.0, 1.5, 1.5], [0.0, 1.0, 0.0, 0.0]])
    # by hand: row 0 predicts 0 from p(3/4,1/4): -ln(3/4) weight 1; predicts 1 from (1/2,1/2): ln 2 weight 1.5;
    #          predicts 0 from (3/4,1/4): -ln(3/4) weight 1.5.  row 1 predicts 1 from (1/2,1/2): ln 2 weight 1.
    num = 1.0 * -math.log(0.75) + 1.5 * math.log(2) + 1.5 * -math.log(0.75) + 1.0 * math.log(2)
    den = 1.0 + 1.5 + 1.5 + 1.0
    assert weighted_loss(logits, ids, weights).item() == pytest.approx(num / den, rel=1e-6)
    s, w = weighted_token_loss_sum(logits, ids, weights)
    assert s.item() == pytest.approx(num, rel=1e-6) and w.item() == pytest.approx(den)


def test_padding_logits_do_not_change_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    weights = torch.tensor([[0, 1, 1, 2, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    base = weighted_loss(logits, ids, weights)
    scrambled_logits, scrambled_ids = logits.clone(), ids.clone()
    scrambled_logits[1, 2:] = 100 * torch.randn(3, 7)   # positions predicting weight-0 labels
    scrambled_ids[1, 2:] = 3
    scrambled_logits[0, 4] = 50.0                         # the last position predicts nothing
    assert weighted_loss(scrambled_logits, scrambled_ids, weights).item() == pytest.approx(base.item(), rel=1e-6)


def test_all_zero_weights_give_zero_not_nan():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    s, w = weighted_token_loss_sum(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    obj = micro_batch_objective(s, w)
    obj.backward()
    assert obj.item() == 0.0 and torch.isfinite(logits.grad).all()


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("world_size,accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_gradient_is_invariant_to_micro_batch_and_rank_split(world_size, accum):
    """Simulate DeepSpeed: backward(loss) divides by A; ranks' gradients are averaged (1/P)."""
    torch.manual_seed(2)
    n_rows, width = world_size * accum * 2, 9
    ids = torch.randint(0, 11, (n_rows, width))
    lengths = torch.randint(2, width + 1, (n_rows,))
    weights = torch.zeros(n_rows, width)
    for r, n in enumerate(lengths.tolist()):
        weights[r, 1:n] = torch.where(torch.rand(n - 1) < 0.5, 1.0, 1.5)

    ref = _TinyLM()
    loss = weighted_loss(ref(ids), ids, weights)
    loss.backward()
    expected = _grads(ref)

    model = _TinyLM()
    micro = ids.shape[0] // (world_size * accum)
    global_w = float(weights[:, 1:].sum())  # what the all-reduce of per-rank weight sums gives
    rank_grads, logged = [], 0.0
    for r in range(world_size):
        model.zero_grad()
        for m in range(accum):
            sl = slice((r * accum + m) * micro, (r * accum + m + 1) * micro)
            s, _ = weighted_token_loss_sum(model(ids[sl]), ids[sl], weights[sl])
            obj = micro_batch_objective(s, global_w, world_size=world_size, grad_accum_steps=accum)
            (obj / accum).backward()  # DeepSpeed's scale_wrt_gas
            logged += s.item()
        rank_grads.append(_grads(model).clone())
    averaged = torch.stack(rank_grads).mean(0)  # DeepSpeed's data-parallel gradient average
    torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-7)
    assert logged / global_w == pytest.approx(loss.item(), rel=1e-6)


def test_naive_per_micro_batch_mean_is_not_invariant():
    """The reason for the global normalisation: averaging micro-batch means weighs tokens unequally."""
    torch.manual_seed(3)
    ids = torch.randint(0, 11, (4, 8))
    weights = torch.zeros(4, 8)
    weights[0, 1:] = 1.0          # a long example
    weights[1:, 1:3] = 1.0        # three short ones
    model = _TinyLM()
    full = weighted_loss(model(ids), ids, weights).item()
    naive = 0.5 * (weighted_loss(model(ids[:2]), ids[:2], weights[:2]) +
                   weighted_loss(model(ids[2:]), ids[2:], weights[2:])).item()
    assert abs(full - naive) > 1e-4


def test_lr_schedule_warms_up_then_decays_linearly_to_zero():
    total = 10
    f = [lr_factor(s, total, 0.2, "linear") for s in range(total)]
    assert f[0] < f[1] < f[2] == 1.0            # 2 warm-up steps, then the peak
    assert all(a > b for a, b in zip(f[2:], f[3:]))
    assert f[-1] == pytest.approx(1 / 8)        # reaches 0 at step `total`
    assert lr_factor(5, total, 0.0, "constant") == 1.0
    assert lr_factor(total, total, 0.0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_deepspeed_config_from_typed_fields():
    cfg = TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum_steps=3, grad_clip=0.5, offload_optimizer=True,
                      offload_params=True)
    ds = build_deepspeed_config(cfg, world_size=4, use_gpu=False)
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]          # fp32 on CPU
    gpu = build_deepspeed_config(TrainConfig(), world_size=8, use_gpu=True)
    assert gpu["bf16"]["enabled"] and "offload_optimizer" not in gpu["zero_optimization"]


def test_zero3_block_leaves_map_to_deepspeed_leaf_modules():
    blocks = {"LlamaDecoderLayer"}
    zero3 = build_deepspeed_config(TrainConfig(zero_stage=3), 2, False, block_classes=blocks)["zero_optimization"]
    assert zero3["leaf_module"] == {"classes": ["LlamaDecoderLayer"]}
    for cfg, classes in ((TrainConfig(zero_stage=2), blocks),   # only ZeRO-3 hooks modules
                         (TrainConfig(zero_stage=3), ())):      # the model names no blocks
        assert "leaf_module" not in build_deepspeed_config(cfg, 2, False, block_classes=classes)["zero_optimization"]


@pytest.mark.parametrize("kwargs,use_gpu,field", [
    ({"precision": "bf16"}, False, "precision"),
    ({"offload_params": True, "zero_stage": 2}, False, "offload_params"),
    ({"offload_optimizer": True, "zero_stage": 0}, True, "offload_optimizer"),
])
def test_unusable_setups_are_refused_naming_the_field(kwargs, use_gpu, field):
    cfg = TrainConfig(**kwargs)
    with pytest.raises(TrainSetupError, match=field):
        resolve_precision(cfg, use_gpu)
        build_deepspeed_config(cfg, world_size=1, use_gpu=use_gpu)


def test_zero3_on_one_worker_without_offload_is_flagged_as_wasted_time():
    assert any("zero_stage=3 on a single worker" in w for w in config_warnings(TrainConfig(zero_stage=3, num_workers=1)))
    for fine in (TrainConfig(zero_stage=3, num_workers=2), TrainConfig(zero_stage=2, num_workers=1),
                 TrainConfig(zero_stage=3, num_workers=1, offload_params=True)):
        assert config_warnings(fine) == []
