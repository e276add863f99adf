"""Training data: char-span weights onto tokens, a deterministic batch plan, and collation.

Rules (the contract with :class:`tripost_ray.trajectory.TrainingExample`):

* A token's weight is the weight of the span that contains the token's *first*
  character (the tokenizer's offset mapping). Characters covered by no span weigh 0, so
  a producer can mask text (e.g. a prompt) by leaving it out of every span. Special
  tokens the tokenizer adds (BOS) weigh 0.
* One EOS is appended to every example; it is weighted like the example's last real token,
  so the model learns where an answer ends (the "all correct" feedback is a stop signal).
* A weight is the weight of a token *as a label*: the loss of predicting token t+1 from
  the prefix up to t is multiplied by token t+1's weight (see ``loss.py``).
* Padding (and so anything after EOS) weighs 0; an example longer than ``max_seq_len``
  is cut (losing its EOS) and counted, because post-processing should have dropped it.

Batching: training must be exactly reproducible so that a restored run skips the steps it
already took and ends where an uninterrupted run ends, and so that Ray Train + DeepSpeed
on P ranks computes the same global batches as a plain one-process loop. Hence the *plan*
is a pure function of (example lengths, batch geometry, epochs, seed): per epoch, a seeded
shuffle, then sorting by length inside windows of ``length_bucket_window`` global batches
(similar lengths share a micro-batch: little padding, no packing needed), then the batches
of each window are shuffled again. Rows are first put in a content order
(:func:`canonical_order`) so the plan does not depend on how a Ray Dataset was read.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

REQUIRED_COLUMNS = ("text", "span_starts", "span_ends", "span_weights")


class TrainingDataError(ValueError):
    """Training rows that cannot be used; the message names the row and the problem."""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids (BOS .. EOS as the tokenizer makes them) and each token's label weight."""

    input_ids: list[int]
    weights: list[float]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------- validation


def _as_list(value: Any) -> list:
    return list(value.tolist() if hasattr(value, "tolist") else value)


def validate_row(row: dict, index: int) -> tuple[str, list[tuple[int, int, float]]]:
    """Check one row (a ``TrainingExample.to_dict()``) and return (text, spans)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise TrainingDataError(f"training row {index}: missing column(s) {missing}; "
                                f"expected TrainingExample.to_dict() columns {list(REQUIRED_COLUMNS)}")
    text = row["text"]
    if not isinstance(text, str) or not text:
        raise TrainingDataError(f"training row {index}: 'text' must be a non-empty string")
    starts, ends, weights = (_as_list(row[c]) for c in REQUIRED_COLUMNS[1:])
    if not (len(starts) == len(ends) == len(weights)):
        raise TrainingDataError(f"training row {index}: span_starts/span_ends/span_weights differ in length")
    spans = []
    for s, e, w in zip(starts, ends, weights):
        s, e, w = int(s), int(e), float(w)
        if not (0 <= s < e <= len(text)):
            raise TrainingDataError(f"training row {index}: span ({s}, {e}) is outside the text (length {len(text)})")
        if not math.isfinite(w) or w < 0:
            raise TrainingDataError(f"training row {index}: span weight {w} must be finite and >= 0")
        spans.append((s, e, w))
    return text, sorted(spans)


def canonical_order(rows: Sequence[dict]) -> list[dict]:
    """Rows in an order that depends only on their content (problem id, text, spans)."""
    def key(row: dict) -> tuple:
        return (str(row.get("problem_id", "")), row["text"], tuple(_as_list(row["span_starts"])),
                tuple(_as_list(row["span_weights"])))
    return sorted(rows, key=key)


def data_fingerprint(rows: Sequence[dict]) -> str:
    """A short hash of the (canonically ordered) rows: a restored run checks it."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row["text"].encode())
        h.update(repr((_as_list(row["span_starts"]), _as_list(row["span_ends"]),
                       [float(w) for w in _as_list(row["span_weights"])])).encode())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------- tokenization


def token_weights(offsets: Sequence[tuple[int, int]], special: Sequence[int],
                  spans: Sequence[tuple[int, int, float]]) -> list[float]:
    """Weight of each token: the span containing its first char (0 if none, or special)."""
    starts = [s for s, _, _ in spans]
    out = []
    for (a, _b), is_special in zip(offsets, special):
        w = 0.0
        if not is_special:
            i = bisect.bisect_right(starts, a) - 1
            # spans are sorted by start; scan back over earlier starts in case of overlap/gaps
            while i >= 0:
                s, e, sw = spans[i]
                if s <= a < e:
                    w = sw
                    break
                i -= 1
        out.append(w)
    return out


def tokenize_rows(tokenizer, rows: Sequence[dict], max_seq_len: int) -> list[TokenizedExample]:
    """Tokenize training rows with the offset mapping and map span weights onto tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise TrainingDataError("training needs a fast tokenizer (offset mapping); got a slow one")
    if tokenizer.eos_token_id is None:
        raise TrainingDataError("the tokenizer has no eos_token: cannot mark where an example ends")
    parsed = [validate_row(row, i) for i, row in enumerate(rows)]
    enc = tokenizer([t for t, _ in parsed], return_offsets_mapping=True, return_special_tokens_mask=True,
                    add_special_tokens=True)
    eos = int(tokenizer.eos_token_id)
    out = []
    for i, (text, spans) in enumerate(parsed):
        ids = list(enc["input_ids"][i])
        special = list(enc["special_tokens_mask"][i])
        weights = token_weights(enc["offset_mapping"][i], special, spans)
        real = [w for w, sp in zip(weights, special) if not sp]
        if not real:
            raise TrainingDataError(f"training row {i}: text produced no tokens")
        if not ids or ids[-1] != eos:
            ids.append(eos)
            weights.append(real[-1])
        truncated = len(ids) > max_seq_len
        out.append(TokenizedExample(ids[:max_seq_len], weights[:max_seq_len], truncated))
    return out


# ------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's global batch is cut: P ranks x A micro-batches x m rows."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def steps_per_epoch(num_examples: int, geometry: BatchGeometry) -> int:
    return max(1, math.ceil(num_examples / geometry.global_batch_size))


def total_steps(num_examples: int, geometry: BatchGeometry, epochs: float) -> int:
    """Optimizer steps of a run: ceil(epochs * steps per epoch), at least 1."""
    return max(1, math.ceil(epochs * steps_per_epoch(num_examples, geometry) - 1e-9))


def plan_global_batches(lengths: Sequence[int], geometry: BatchGeometry, epochs: float, seed: int,
                        window: int) -> list[list[int]]:
    """Example indices of every optimizer step (a pure function; see the module docstring).

    The last batch of an epoch may be short; the loss normalizes by the global weight sum
    so a short batch is still an exact weighted mean.
    """
    n = len(lengths)
    if n == 0:
        raise TrainingDataError("no training examples")
    gbs = geometry.global_batch_size
    steps = total_steps(n, geometry, epochs)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        epoch_batches: list[list[int]] = []
        span = gbs * window
        for w0 in range(0, n, span):
            chunk = sorted(order[w0:w0 + span], key=lambda i: (lengths[i], i))
            window_batches = [chunk[b:b + gbs] for b in range(0, len(chunk), gbs)]
            rng.shuffle(window_batches)
            epoch_batches.extend(window_batches)
        batches.extend(epoch_batches)
        epoch += 1
    return batches[:steps]


def rank_micro_batches(global_batch: Sequence[int], rank: int, geometry: BatchGeometry) -> list[list[int]]:
    """The A micro-batches of one rank: contiguous slices (similar lengths stay together).

    Slots past the end of a short global batch are empty lists; the trainer still runs
    them (a zero-weight dummy) so every rank does the same number of forward/backward
    passes, which ZeRO's collectives require.
    """
    m, a = geometry.micro_batch_size, geometry.grad_accum_steps
    out = []
    for j in range(a):
        lo = (rank * a + j) * m
        out.append(list(global_batch[lo:lo + m]))
    return out


def global_batch_totals(examples: Sequence[TokenizedExample], global_batch: Sequence[int]) -> tuple[float, int]:
    """(W, tokens) of a global batch: the sum of its label weights (position 0 of an example
    is never a label) and its non-padding tokens.

    Every rank holds every example, so each computes the global W itself, before the
    forward pass, with no collective: the loss normaliser costs nothing per step.
    """
    weight = math.fsum(math.fsum(examples[i].weights[1:]) for i in global_batch)
    return weight, sum(len(examples[i]) for i in global_batch)


def collate(examples: Iterable[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding weighs 0 and is masked from attention.

    An empty list gives a one-row batch of two pad tokens of weight 0 (see
    :func:`rank_micro_batches`): it still runs the whole graph, with zero gradient.
    """
    examples = list(examples)
    if not examples:
        examples = [TokenizedExample([pad_id, pad_id], [0.0, 0.0])]
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width), dtype=torch.float32)
    for r, e in enumerate(examples):
        n = len(e)
        ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[r, :n] = 1
        weights[r, :n] = torch.tensor(e.weights, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "weights": weights}
