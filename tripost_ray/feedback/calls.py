"""One FBK or IMP call, end to end: cache, budget, rate-limit lease, HTTP, retries, parse, outcome.

:class:`LLMTeacher` turns a provider section of the config into the editing rules'
``FbkCall`` / ``ImpCall`` (:mod:`tripost_ray.editing`). Every call ends as exactly one
:class:`~tripost_ray.outcomes.CallOutcome`:

=============  ==============================================================
``ok``         a reply that parsed (or a cache hit: ``cached=True``, no HTTP)
``parse_error``  replies arrived but none parsed within ``parse_retries`` re-asks
``api_error``  an HTTP error: not retryable (4xx, auth), or retries ran out
``timeout``    the last attempt timed out (client timeout) after retries
``refused``    the model declined (OpenAI ``refusal``/``content_filter``,
               Anthropic ``stop_reason == "refusal"``); not retried
``over_budget``  the run's ``max_usd`` could not cover the call's reservation
=============  ==============================================================

Per HTTP attempt: reserve the worst-case cost in the budget actor, take a lease from
the endpoint's limiter, send (the SDK with ``max_retries=0``), release the lease with
the usage the reply reported (or with the server's Retry-After on a 429, which pauses
the whole cluster), settle the budget with the real cost. Retryable errors (429, 5xx,
408/409, timeouts, connection errors) back off exponentially with equal jitter,
``base * 2**(n-1)`` capped at ``backoff_max_s``, and never less than Retry-After.

Usage and cost on the outcome are the sums over all its attempts (a malformed reply
that was paid for is counted); ``attempts`` is the number of HTTP requests made
(0 for a cache hit), so the sum over outcomes equals the server's request count.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any, Callable

from tripost_ray.config import Price, ProviderConfig
from tripost_ray.feedback import prompts
from tripost_ray.feedback.cache import CachedReply, ResponseCache, cache_key
from tripost_ray.feedback.costs import cost_usd, reservation
from tripost_ray.feedback.providers import Prompt, ProviderError, make_provider
from tripost_ray.metrics import InFlight
from tripost_ray.outcomes import CallOutcome
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import Feedback

RAW_LIMIT = 4000  # characters of a failed reply kept in the record


def backoff_s(cfg: ProviderConfig, failures: int, retry_after_s: float | None, rng: random.Random) -> float:
    """Equal-jitter exponential backoff, at least the server's Retry-After."""
    cap = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** max(0, failures - 1))
    delay = cap / 2 + rng.uniform(0, cap / 2)
    return max(delay, retry_after_s or 0.0)


class LLMTeacher:
    """FBK or IMP over an LLM provider, shared by the coroutines of one pool actor."""

    def __init__(
        self,
        task: Task,
        cfg: ProviderConfig,
        price: Price | None,
        *,
        limiter: Any = None,
        budget: Any = None,
        cache: ResponseCache | None = None,
        provider: Any = None,
        seed: int | None = None,
        api_key: str | None = None,
    ):
        self.task, self.cfg, self.price = task, cfg, price
        self.limiter, self.budget, self.cache = limiter, budget, cache
        self.provider = provider if provider is not None else make_provider(cfg, api_key)
        self.rng = random.Random(seed)
        self.in_flight = InFlight(cfg.provider, cfg.model)

    # ------------------------------------------------------------ the two roles

    async def fbk(self, problem: Problem, attempt: str) -> CallOutcome[Feedback]:
        prompt = prompts.fbk_prompt(self.task, problem.question, attempt, self.cfg.few_shot)
        return await self.call(prompt, prompts.parse_fbk_reply)

    async def imp(self, problem: Problem, attempt: str, feedback: Feedback) -> CallOutcome[str]:
        prompt = prompts.imp_prompt(self.task, problem.question, attempt, feedback, self.cfg.few_shot)
        return await self.call(prompt, lambda text: prompts.parse_imp_reply(attempt, feedback, text))

    # ---------------------------------------------------------------- one call

    def key(self, prompt: Prompt) -> str:
        cfg = self.cfg
        return cache_key(
            provider=cfg.provider, model=cfg.model, system=prompt.system, messages=list(prompt.messages),
            temperature=cfg.temperature, max_tokens=cfg.max_tokens, stop=cfg.stop, prompt_version=prompt.version,
        )

    async def call(self, prompt: Prompt, parse: Callable[[str], Any]) -> CallOutcome:
        cfg, start = self.cfg, time.monotonic()
        acc = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "attempts": 0}
        # for the live metrics (tripost_ray.metrics): what the outcome's sums cannot tell
        waited, request_errors = 0.0, Counter()

        def outcome(status: str, value: Any = None, detail: str = "", raw: str | None = None, **extra) -> CallOutcome:
            if status != "ok" and raw is not None:
                raw = raw[:RAW_LIMIT]
            if acc["attempts"]:
                extra.update(limiter_wait_s=waited, request_errors=dict(request_errors))
            return CallOutcome(
                status=status, value=value, detail=detail, raw=raw, role=prompt.role, provider=cfg.provider,
                model=cfg.model, latency_s=time.monotonic() - start, extra=extra, **acc,
            )

        key = self.key(prompt) if self.cache is not None else None
        if key is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                value = parse(hit.text)
                if value is not None:
                    out = outcome("ok", value, "cache hit", hit.text, saved_input_tokens=hit.input_tokens,
                                  saved_output_tokens=hit.output_tokens,
                                  saved_usd=cost_usd(self.price, hit.input_tokens, hit.output_tokens))
                    out.cached = True
                    return out

        est_tokens, est_usd = reservation(self.price, prompt.text, cfg.max_tokens)
        api_failures = parse_failures = 0
        while True:
            if self.budget is not None and not await self.budget.reserve.remote(est_usd):
                return outcome("over_budget", detail=f"the run's budget cannot cover a call reserving ${est_usd:.6f}")
            asked = time.monotonic()
            lease = await self.limiter.acquire.remote(est_tokens) if self.limiter is not None else None
            waited += time.monotonic() - asked
            acc["attempts"] += 1
            used, retry_after, charged = 0, None, 0.0
            try:
                with self.in_flight:
                    reply = await self.provider.complete(prompt)
                acc["input_tokens"] += reply.input_tokens
                acc["output_tokens"] += reply.output_tokens
                used = reply.input_tokens + reply.output_tokens
                charged = cost_usd(self.price, reply.input_tokens, reply.output_tokens)
                acc["cost_usd"] += charged
            except ProviderError as err:
                request_errors[err.kind] += 1
                retry_after = err.retry_after_s if err.kind == "rate_limited" else None
                await self._settle(lease, 0, retry_after, est_usd, 0.0)
                if not err.retryable or api_failures >= cfg.max_retries:
                    status = "timeout" if err.kind == "timeout" else "api_error"
                    tail = f" after {acc['attempts']} attempts" if acc["attempts"] > 1 else ""
                    return outcome(status, detail=f"{err}{tail}", error_kind=err.kind, status_code=err.status_code)
                api_failures += 1
                await asyncio.sleep(backoff_s(cfg, api_failures, err.retry_after_s, self.rng))
                continue
            except BaseException:
                await asyncio.shield(self._settle(lease, 0, None, est_usd, 0.0))
                raise
            await self._settle(lease, used, None, est_usd, charged)
            if reply.refused:
                return outcome("refused", detail=f"the model refused ({reply.finish_reason})", raw=reply.text)
            value = parse(reply.text)
            if value is None:
                if parse_failures >= cfg.parse_retries:
                    what = "an empty reply" if not reply.text.strip() else "a reply in no known format"
                    return outcome("parse_error", detail=f"{what} (after {parse_failures + 1} tries)", raw=reply.text)
                parse_failures += 1
                continue
            if key is not None:
                await asyncio.to_thread(
                    self.cache.put, key, CachedReply(reply.text, reply.input_tokens, reply.output_tokens),
                    {"provider": cfg.provider, "model": cfg.model, "prompt_version": prompt.version},
                )
            return outcome("ok", value, raw=reply.text)

    async def _settle(self, lease, used: int, retry_after: float | None, est_usd: float, actual_usd: float) -> None:
        if lease is not None:
            await self.limiter.release.remote(lease, used, retry_after)
        if self.budget is not None:
            await self.budget.settle.remote(est_usd, actual_usd)
