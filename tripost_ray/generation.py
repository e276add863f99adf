"""Text generation behind a small interface: Hugging Face ``generate`` here, vLLM in
:mod:`tripost_ray.vllm_engine` (``rollout.engine`` picks one; :func:`tripost_ray.rollout.build_engine`).

:class:`HFGenerationEngine` runs Hugging Face ``generate`` with a KV cache on left-padded
batches sorted by prompt length (results come back in input order).

Determinism. Sampling does not use ``generate``'s batch-wide random stream: a logits
processor draws each row's token from that row's own ``torch.Generator``, seeded from the
prompt's seed (``seeds`` argument, or a hash of ``(params.seed, prompt)``), and greedy
decoding then picks exactly that token. The promise, precisely:

- *Exact*: given the same logits, a row's token depends only on its logits and its seed,
  never on the other rows of its batch. With the same batch composition (which the rollout
  stage's fixed batches give, whichever actor or node runs them) a run repeats bit for bit
  on one machine.
- *Near-certain, not exact*: the same prompt in a batch of another shape, or with another
  number of intra-op threads (a rollout actor given one core where a plain loop used two).
  The model's logits then differ in the last bits (a differently shaped or differently split
  matmul picks other kernels: 6e-8 on this project's CPU tiny model, more in bf16). The sampler walks the CDF in *vocabulary*
  order, not sorted by probability, so such a difference changes the token only when the
  row's uniform draw falls within it of an interval boundary: about 1e-7 per token in fp32.
  (Sorting by probability made near-ties - common in a barely trained model - swap places
  and diverge within a few tokens on AVX-512 CPUs.) bf16 logits differ by far more, so
  there expect some divergence (with the earlier sort-based sampler, 18 of 20 sampled
  prompts stayed identical across batch shapes on an H200).

Stopping. A row stops at end-of-sequence, at ``max_new_tokens``, when its generated text
contains one of ``params.stop`` (the text is cut before it) or when it matches
``params.stop_regex`` (the text is cut after the match: used to end a round at the end of a
``Feedback:`` line).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

StopReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` is greedy; ``seed`` seeds every prompt's generator.

    ``stop_regex_trigger``: a literal that every match of ``stop_regex`` contains on its last
    line. An engine without regex stops (vLLM) stops there, finishes the line and tests the
    regex; without it, it tests the regex at every line end. HF tests the regex directly.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_regex: str | None = None
    stop_regex_trigger: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One prompt's continuation (stop string excluded) and its accounting."""

    text: str
    stop_reason: StopReason
    prompt_tokens: int
    generated_tokens: int
    time_s: float  # this item's share of its batch's wall time
    meta: dict = field(default_factory=dict)


class GenerationEngine(Protocol):
    """Anything that turns prompts into continuations."""

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int] | None = None) -> list[Generation]:
        """Continuations in the order of ``prompts``; ``seeds`` (one per prompt) fix sampling."""
        ...


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------- stopping


def cut_at_stop(text: str, stop: tuple[str, ...], stop_regex: re.Pattern | None) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string (before it) or regex match (after it).

    Returns the kept text and whether anything matched.
    """
    cut: int | None = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (cut is None or i < cut):
            cut = i
    if stop_regex is not None:
        m = stop_regex.search(text)
        if m and (cut is None or m.end() < cut):
            cut = m.end()
    if cut is None:
        return text, False
    return text[:cut], True


class _StopCriteria:
    """Per-row stopping on stop strings / a line regex, checked on decoded text.

    Each step decodes only a short window of every running row (enough to contain any
    stop string); the full continuation is decoded only when that window holds a newline
    and a ``stop_regex`` is set. This keeps the check O(batch) per step instead of
    O(batch x length).
    """

    def __init__(self, tokenizer, prompt_len: int, stop: tuple[str, ...], stop_regex: re.Pattern | None,
                 batch_size: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = stop
        self.stop_regex = stop_regex
        self.window = max([len(s) for s in stop] + [1]) + 1
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.stopped_at = [-1] * batch_size  # generated-token count when the row stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows = [i for i in range(input_ids.shape[0]) if not self.done[i]]
        n_gen = input_ids.shape[1] - self.prompt_len
        if rows and n_gen > 0:
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            tails = self.tokenizer.batch_decode(input_ids[rows, start:], skip_special_tokens=True)
            for row, tail in zip(rows, tails):
                hit = any(s in tail for s in self.stop)
                if not hit and self.stop_regex is not None and "\n" in tail:
                    text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
                    hit = self.stop_regex.search(text) is not None
                if hit:
                    self.done[row] = True
                    self.stopped_at[row] = n_gen
        return self.done.to(input_ids.device).clone()


class _PerRowSampler:
    """Logits processor: sample each row from its own seeded stream; greedy then takes it.

    Every row pre-draws one uniform number per step from its own ``torch.Generator``, and
    the token is found by inverse-CDF sampling over the vocabulary in *id order* (vectorised
    over the batch). Top-p only decides which ids stay in (by their sorted probabilities);
    the walk itself never depends on a sort, so last-bit differences in the logits move a
    row's choice only when its uniform sits right at an interval boundary.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, max_steps: int, prompt_len: int):
        self.uniforms = torch.stack([torch.rand(max_steps, generator=torch.Generator().manual_seed(s),
                                                dtype=torch.float64) for s in seeds])
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        choice = sample_rows(scores, self.uniforms[:, step].to(scores.device), self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, choice.unsqueeze(-1), 0.0)
        return out


def sample_rows(scores: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token id per row of ``scores`` from that row's uniform in [0, 1) (inverse CDF).

    Row-wise only: a row's choice is a function of its own scores and uniform, which is
    what makes sampling independent of the batch it is in.
    """
    probs = torch.softmax(scores.double() / temperature, dim=-1)
    if top_p < 1.0:
        # the nucleus as a probability threshold (ids tied with its smallest member stay in),
        # so membership never depends on how a sort orders ties
        ranked = probs.sort(dim=-1, descending=True).values
        n_keep = ((ranked.cumsum(dim=-1) - ranked) < top_p).sum(dim=-1, keepdim=True)  # >= 1: the top id
        probs = probs * (probs >= ranked.gather(-1, n_keep - 1))
    cdf = probs.cumsum(dim=-1)
    u = uniforms.unsqueeze(-1) * cdf[:, -1:]
    # right=True: the first id whose CDF exceeds u, so an id with zero probability is never picked
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


# ------------------------------------------------------------------- engine


class HFGenerationEngine:
    """Hugging Face ``generate`` on CPU or GPU (see the module docstring for guarantees)."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if tokenizer.padding_side != "left":
            tokenizer.padding_side = "left"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int] | None = None) -> list[Generation]:
        if seeds is None:
            seeds = [derive_seed(params.seed, p) for p in prompts]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._generate_batch([prompts[i] for i in idx], params, [seeds[i] for i in idx])
            for i, gen in zip(idx, batch):
                results[i] = gen
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        t0 = time.perf_counter()
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        stop_regex = re.compile(params.stop_regex) if params.stop_regex else None
        criteria = _StopCriteria(tok, prompt_len, params.stop, stop_regex, len(prompts))
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(_PerRowSampler(seeds, params.temperature, params.top_p, params.max_new_tokens, prompt_len))
        gen_config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, use_cache=True,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        )
        out = self.model.generate(
            **enc, generation_config=gen_config, logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([criteria] if (params.stop or stop_regex) else []),
        )
        gen_ids = out[:, prompt_len:].cpu()
        elapsed = time.perf_counter() - t0
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row in range(len(prompts)):
            ids = gen_ids[row].tolist()
            reason: StopReason = "length"
            n = len(ids)
            if criteria.stopped_at[row] >= 0:
                n, reason = criteria.stopped_at[row], "stop"
            if tok.eos_token_id in ids[:n]:
                n, reason = ids.index(tok.eos_token_id) + 1, "eos"
            text = tok.decode(ids[:n], skip_special_tokens=True)
            text, hit = cut_at_stop(text, params.stop, stop_regex)
            if hit and reason == "length":  # matched on the very last token
                reason = "stop"
            results.append(Generation(text=text, stop_reason=reason, prompt_tokens=int(prompt_tokens[row]),
                                      generated_tokens=n, time_s=0.0))
        for g in results:
            g.time_s = elapsed / len(prompts)
        return results
