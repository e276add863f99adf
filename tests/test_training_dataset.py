"""Training data: char-span weights through real tokenizer offsets, EOS and padding
weights, collation, and the deterministic length-bucketed batch plan."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tripost_ray.config import TinyModelConfig
from tripost_ray.models import train_tokenizer
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import Turn, render_trajectory, weighted_example
from tripost_ray.training.dataset import (
    BatchGeometry,
    TokenizedExample,
    TrainingDataError,
    canonical_order,
    collate,
    global_batch_totals,
    plan_global_batches,
    rank_micro_batches,
    tokenize_rows,
    total_steps,
)


def _texts(n: int = 6) -> list[str]:
    task = get_task("multistep_arithmetic")
    out = []
    for p in task.generate(n, "train", seed=4):
        gold = task.gold_rationale(p)
        out.append(render_trajectory(p.question, [Turn(gold, "Step (1) to step (2) are correct. "
                                                         "The final response is also correct.")]))
    return out


@pytest.fixture(scope="module", params=["numeric", "numeric_spaced", "char", "bpe"])
def tokenizer(request):
    return train_tokenizer(TinyModelConfig(tokenizer=request.param, bpe_vocab_size=300), _texts(20))


def test_span_weights_follow_token_offsets(tokenizer):
    text = _texts(1)[0]
    ex = weighted_example(text, "terminal", feedback_weight=1.5)
    cut = ex.spans[1][0]
    assert text[cut:].startswith("Feedback:")
    tok = tokenize_rows(tokenizer, [ex.to_dict()], max_seq_len=4096)[0]
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    n = len(enc["input_ids"])
    assert tok.input_ids[:n] == enc["input_ids"] and tok.input_ids[n:] == [tokenizer.eos_token_id]
    for (start, _end), special, w in zip(enc["offset_mapping"], enc["special_tokens_mask"], tok.weights):
        expected = 0.0 if special else (1.5 if start >= cut else 1.0)
        assert w == expected, (start, w)
    assert tok.weights[-1] == 1.5                      # EOS weighs like the last real token
    heavy = [i for i, w in zip(tok.input_ids[:n], tok.weights[:n]) if w == 1.5]
    assert tokenizer.decode(heavy).replace(" ", "") == text[cut:].replace(" ", "")


def test_chars_outside_every_span_weigh_zero_and_multi_span_weights_map(tokenizer):
    text = _texts(1)[0]
    a, b = text.index("\n") + 1, text.index("(2)")
    row = {"text": text, "span_starts": [a, b], "span_ends": [b, len(text)], "span_weights": [2.0, 0.5]}
    tok = tokenize_rows(tokenizer, [row], max_seq_len=4096)[0]
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    got = Counter()
    for (start, _e), special, w in zip(enc["offset_mapping"], enc["special_tokens_mask"], tok.weights):
        want = 0.0 if special or start < a else (2.0 if start < b else 0.5)
        assert w == want
        got[w] += 1
    assert got[0.0] > 1 and got[2.0] > 0 and got[0.5] > 0   # the question line is masked out


def test_truncation_is_flagged_and_keeps_length(tokenizer):
    ex = weighted_example(_texts(1)[0], "gold", 1.0).to_dict()
    tok = tokenize_rows(tokenizer, [ex], max_seq_len=16)[0]
    assert tok.truncated and len(tok.input_ids) == len(tok.weights) == 16
    assert tok.input_ids[-1] != tokenizer.eos_token_id


@pytest.mark.parametrize("row,match", [
    ({"text": "abc", "span_starts": [0], "span_ends": [9], "span_weights": [1.0]}, "outside the text"),
    ({"text": "abc", "span_starts": [0], "span_ends": [3], "span_weights": [-1.0]}, "weight"),
    ({"text": "abc", "span_starts": [0], "span_ends": [3]}, "missing column"),
    ({"text": "", "span_starts": [], "span_ends": [], "span_weights": []}, "non-empty"),
])
def test_bad_rows_are_named(tokenizer, row, match):
    good = weighted_example("Q: 1", "gold", 1.0).to_dict()
    with pytest.raises(TrainingDataError, match=rf"row 1: .*{match}|row 1.*{match}"):
        tokenize_rows(tokenizer, [good, row], max_seq_len=64)


def test_collate_pads_with_zero_weight_and_masks():
    a = TokenizedExample([5, 6, 7], [0.0, 1.0, 1.5])
    b = TokenizedExample([5, 8], [0.0, 1.0])
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["weights"].tolist() == [[0.0, 1.0, 1.5], [0.0, 1.0, 0.0]]
    empty = collate([], pad_id=0)
    assert empty["weights"].sum().item() == 0 and empty["input_ids"].shape == (1, 2)


def test_plan_is_deterministic_covers_each_epoch_and_buckets_by_length():
    torch.manual_seed(0)
    lengths = torch.randint(5, 200, (103,)).tolist()
    geo = BatchGeometry(micro_batch_size=2, grad_accum_steps=2, world_size=2)
    plan = plan_global_batches(lengths, geo, epochs=2.0, seed=7, window=4)
    assert plan == plan_global_batches(lengths, geo, epochs=2.0, seed=7, window=4)
    assert plan != plan_global_batches(lengths, geo, epochs=2.0, seed=8, window=4)
    per_epoch = total_steps(103, geo, 1.0)
    assert per_epoch == 13 and len(plan) == 26
    for e in range(2):
        seen = sorted(i for batch in plan[e * per_epoch:(e + 1) * per_epoch] for i in batch)
        assert seen == list(range(103))            # every example exactly once per epoch
    assert len(plan_global_batches(lengths, geo, epochs=0.5, seed=7, window=4)) == 7

    def padding(p):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in p)
    unbucketed = plan_global_batches(lengths, geo, epochs=2.0, seed=7, window=1)
    assert padding(plan) < padding(unbucketed)


def test_rank_micro_batches_partition_a_global_batch():
    geo = BatchGeometry(micro_batch_size=2, grad_accum_steps=3, world_size=2)
    batch = list(range(10))  # a short last batch: 12 slots, 10 examples
    slots = [rank_micro_batches(batch, r, geo) for r in range(2)]
    assert all(len(s) == 3 for s in slots)
    flat = [i for s in slots for mb in s for i in mb]
    assert flat == batch and slots[1][2] == []


def test_global_batch_totals_equal_the_collated_ranks_label_weights_and_tokens(tokenizer):
    rows = [weighted_example(t, "terminal", 1.5, problem_id=str(i)).to_dict() for i, t in enumerate(_texts(7))]
    examples = tokenize_rows(tokenizer, rows, 1024)
    geo = BatchGeometry(micro_batch_size=2, grad_accum_steps=2, world_size=2)
    batch = [6, 0, 3, 5, 1, 2, 4]  # 7 of 8 slots: one short micro-batch
    collated = [collate([examples[i] for i in mb], tokenizer.pad_token_id)
                for r in range(2) for mb in rank_micro_batches(batch, r, geo)]
    weight, tokens = global_batch_totals(examples, batch)
    assert weight == pytest.approx(float(sum(b["weights"][:, 1:].sum() for b in collated)), rel=1e-6)
    assert tokens == int(sum(b["attention_mask"].sum() for b in collated))
    assert weight > 0


def test_canonical_order_ignores_read_order():
    rows = [weighted_example(t, "gold", 1.0, problem_id=str(i)).to_dict() for i, t in enumerate(_texts(5))]
    assert canonical_order(rows) == canonical_order(list(reversed(rows)))
