"""The weighted token loss of TriPosT, and how it stays exact across micro-batches and ranks.

Definition (per optimizer step, over the GLOBAL batch B = all micro-batches of all ranks):

    L = sum_{tokens t in B} w_t * CE_t  /  sum_{tokens t in B} w_t

where ``w_t`` is the weight of the *label* token (the token being predicted) and ``CE_t``
the cross-entropy of predicting it. Padding and anything after EOS have ``w = 0``. SFT on
gold rationales is the same loss with every real token's weight 1 (a plain token-mean).

Why a weighted *mean over the global batch* (and not a mean of per-example or
per-micro-batch means): every token of a given weight counts the same no matter how long
its example is or how the batch was cut into micro-batches and ranks, so gradient
accumulation and data parallelism change the wall-clock, never the objective.

How it is made exact under gradient accumulation (A micro-batches per rank) and data
parallelism (P ranks). Write S_{r,m} = sum w*CE of micro-batch m on rank r, and
W = sum of all weights of the global batch (the weights are data, known before the
forward pass; every rank holds the whole small training set, so each computes W itself
with no collective, :func:`~tripost_ray.training.dataset.global_batch_totals`). DeepSpeed's ``engine.backward(loss)`` divides
the loss by A, and its gradient reduction *averages* over the P ranks, so the gradient
it applies is

    g = (1/P) * sum_r sum_m (1/A) * grad(loss_{r,m}).

We want g = grad(L) = sum_r sum_m grad(S_{r,m}) / W. Hence each micro-batch backpropagates

    loss_{r,m} = S_{r,m} * (P * A) / W                 (:func:`micro_batch_objective`)

A plain single-process loop (P = 1, no automatic 1/A) backpropagates S_{r,m} / W for every
micro-batch, which is the same gradient. The logged loss is sum_{r,m} S_{r,m} / W, obtained
by an all-reduce of the ranks' S sums; it is exactly L. The trainer batches that
all-reduce: one vector of the pending steps' sums at each log, report or checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of w*CE, sum of w) of one micro-batch (causal shift applied here).

    ``logits`` [B, T, V]; ``input_ids`` and ``weights`` [B, T], where ``weights[b, t]`` is
    the weight of token t *as a label*: position t-1 predicts it, so position 0 is never a
    label. Positions with weight 0 (padding, after EOS, special tokens) cost nothing and
    their label id is irrelevant. The cross-entropy is computed in fp32 whatever the
    model's dtype, so bf16 training sums the same quantity.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != weights.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"weights {tuple(weights.shape)}")
    shift_logits = logits[:, :-1, :].float()
    labels = input_ids[:, 1:]
    w = weights[:, 1:].to(torch.float32)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum(), w.sum()


def micro_batch_objective(loss_sum: torch.Tensor, global_weight_sum: float | torch.Tensor, *,
                          world_size: int = 1, grad_accum_steps: int = 1) -> torch.Tensor:
    """The scalar a micro-batch backpropagates so the applied gradient is grad(L).

    Use ``world_size=P, grad_accum_steps=A`` under DeepSpeed (which divides by A and
    averages over P, see the module docstring) and ``1, 1`` in a plain loop that calls
    ``loss.backward()`` once per micro-batch. A global batch whose weights are all zero
    gives a zero objective (no NaN), i.e. a no-op step apart from weight decay.
    """
    denom = torch.as_tensor(global_weight_sum, dtype=torch.float32, device=loss_sum.device).clamp_min(1e-12)
    return loss_sum * (world_size * grad_accum_steps) / denom


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w*CE)/sum(w) of one batch on its own (evaluation, and a reference for tests)."""
    s, w = weighted_token_loss_sum(logits, input_ids, weights)
    return s / w.clamp_min(1e-12)
