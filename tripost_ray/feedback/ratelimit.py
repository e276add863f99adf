"""Cluster-wide gates for teacher calls: one rate limiter per provider + model, one budget per run.

**Why actors.** Pool actors on many nodes call the same endpoint; limits that each
actor kept on its own would add up to N times the provider's limit. A *named* Ray actor
(namespace ``tripost_ray``, found with ``get_if_exists=True``) is the one place that
hands out leases, so N actors (or several jobs on one cluster) together stay under
the limits. Its lifetime is the default (owned by the job that created it): a limiter
does not outlive every job that uses it.

**What a lease is.** Every HTTP attempt, retries included, first takes a lease:

* *requests per minute* are enforced as a smooth rate (GCRA): request starts are at
  least ``60 / RPM`` seconds apart once ``burst`` requests went back to back. A
  per-minute bucket would let a whole minute's requests out in one burst, which
  providers punish with 429s and which no server log would call "under the limit";
* *tokens per minute* are a sliding 60 s window. A lease reserves an over-estimate
  (prompt estimate + ``max_tokens``); on release the reservation is replaced by the
  tokens the reply actually reported;
* *max in flight* counts unreleased leases; a lease whose holder died expires after
  ``lease_ttl_s`` so a crashed actor cannot wedge the cluster;
* *Retry-After*: a 429 reported on release pauses the whole limiter (every actor)
  until the time the server asked for.

Waiting happens inside the actor (an asyncio event wakes waiters on every release), so
a waiting caller costs one pending RPC, not a polling loop.

The logic is plain Python (:class:`LimiterState`, :class:`Budget`) with an injectable
clock, tested without Ray; the actors only wrap it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from tripost_ray.config import ProviderConfig, RateLimitConfig

NAMESPACE = "tripost_ray"
WINDOW_S = 60.0


@dataclass
class _Lease:
    start: float
    tokens: int


class LimiterState:
    """RPM (GCRA), TPM (sliding window), max in flight and Retry-After pauses of one endpoint."""

    def __init__(self, cfg: RateLimitConfig, lease_ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self._tat = 0.0  # GCRA "theoretical arrival time" of the next request
        self._window: deque[tuple[float, int]] = deque()  # (release time, tokens used)
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self.paused_until = 0.0
        self.granted = 0
        self.pauses = 0

    def configure(self, cfg: RateLimitConfig, lease_ttl_s: float | None = None) -> None:
        self.cfg = cfg
        if lease_ttl_s is not None:
            self.lease_ttl_s = lease_ttl_s

    # ------------------------------------------------------------------ queries

    def _prune(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - WINDOW_S:
            self._window.popleft()
        for lease_id in [i for i, lease in self._leases.items() if now - lease.start > self.lease_ttl_s]:
            del self._leases[lease_id]

    @property
    def in_flight(self) -> int:
        return len(self._leases)

    def try_acquire(self, est_tokens: int) -> tuple[int | None, float | None]:
        """``(lease_id, None)`` when granted, else ``(None, wait_s)``; ``wait_s`` None means
        "until a lease is released" (in-flight or token reservations are the bottleneck)."""
        cfg, now = self.cfg, self.clock()
        self._prune(now)
        if now < self.paused_until:
            return None, self.paused_until - now
        if cfg.max_in_flight is not None and len(self._leases) >= cfg.max_in_flight:
            return None, None
        interval = 60.0 / cfg.requests_per_minute if cfg.requests_per_minute else 0.0
        tat = max(self._tat, now)
        if interval and tat - now > (cfg.burst - 1) * interval + 1e-9:
            return None, tat - (cfg.burst - 1) * interval - now
        if cfg.tokens_per_minute is not None:
            reserved = sum(lease.tokens for lease in self._leases.values())
            used = sum(tokens for _, tokens in self._window)
            if used + reserved > 0 and used + reserved + est_tokens > cfg.tokens_per_minute:
                if used + est_tokens <= cfg.tokens_per_minute or not self._window:
                    return None, None  # only in-flight reservations block: wait for a release
                need = used + reserved + est_tokens - cfg.tokens_per_minute
                freed = 0
                for t, tokens in self._window:
                    freed += tokens
                    if freed >= need:
                        return None, max(0.0, t + WINDOW_S - now)
                return None, None
        self._tat = tat + interval
        lease_id = next(self._ids)
        self._leases[lease_id] = _Lease(now, est_tokens)
        self.granted += 1
        return lease_id, None

    def release(self, lease_id: int, used_tokens: int = 0, retry_after_s: float | None = None) -> None:
        """End a lease, charging the tokens the reply reported; a 429's Retry-After pauses everyone."""
        now = self.clock()
        self._leases.pop(lease_id, None)
        if used_tokens > 0:
            self._window.append((now, int(used_tokens)))
        if retry_after_s is not None and retry_after_s > 0:
            self.paused_until = max(self.paused_until, now + retry_after_s)
            self.pauses += 1

    def stats(self) -> dict:
        now = self.clock()
        self._prune(now)
        return {
            "granted": self.granted,
            "in_flight": len(self._leases),
            "tokens_in_window": sum(t for _, t in self._window),
            "paused_for_s": max(0.0, self.paused_until - now),
            "pauses": self.pauses,
            "limits": self.cfg.model_dump(),
        }


class Budget:
    """A USD budget with reservations: spent + reserved never exceeds ``max_usd``."""

    def __init__(self, max_usd: float | None):
        self.max_usd = max_usd
        self.spent = 0.0
        self.reserved = 0.0
        self.refused = 0

    def reserve(self, usd: float) -> bool:
        if self.max_usd is None:
            return True
        if self.spent + self.reserved + usd > self.max_usd + 1e-12:
            self.refused += 1
            return False
        self.reserved += usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        if self.max_usd is not None:
            self.reserved = max(0.0, self.reserved - reserved_usd)
        self.spent += actual_usd

    def stats(self) -> dict:
        return {"max_usd": self.max_usd, "spent_usd": self.spent, "reserved_usd": self.reserved,
                "refused": self.refused}


# ------------------------------------------------------------------------ actors

try:  # the actors need Ray; the pure logic above does not
    import ray
except ImportError:  # pragma: no cover - ray is a dependency, but keep pure imports working
    ray = None  # type: ignore[assignment]


class _RateLimiter:
    """Actor wrapper of :class:`LimiterState`; ``acquire`` waits inside the actor."""

    def __init__(self, cfg: dict, lease_ttl_s: float = 300.0):
        self.state = LimiterState(RateLimitConfig.model_validate(cfg), lease_ttl_s)
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def configure(self, cfg: dict, lease_ttl_s: float | None = None) -> None:
        self.state.configure(RateLimitConfig.model_validate(cfg), lease_ttl_s)
        self._notify()

    async def acquire(self, est_tokens: int = 0) -> int:
        while True:
            lease_id, wait_s = self.state.try_acquire(est_tokens)
            if lease_id is not None:
                return lease_id
            event = self._changed
            try:  # wake on a release, or when the computed wait is over (re-check every 1 s at most)
                await asyncio.wait_for(event.wait(), timeout=min(wait_s, 1.0) if wait_s is not None else 1.0)
            except asyncio.TimeoutError:
                pass

    async def release(self, lease_id: int, used_tokens: int = 0, retry_after_s: float | None = None) -> None:
        self.state.release(lease_id, used_tokens, retry_after_s)
        self._notify()

    async def stats(self) -> dict:
        return self.state.stats()


class _BudgetKeeper:
    """Actor wrapper of :class:`Budget`: one per editing run, shared by its pool actors."""

    def __init__(self, max_usd: float | None):
        self.budget = Budget(max_usd)

    def reserve(self, usd: float) -> bool:
        return self.budget.reserve(usd)

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self.budget.settle(reserved_usd, actual_usd)

    def stats(self) -> dict:
        return self.budget.stats()


def limiter_name(cfg: ProviderConfig) -> str:
    """Name of the limiter of an endpoint: provider, model and (hashed) base URL, never a key."""
    url = hashlib.sha256((cfg.base_url or "").encode()).hexdigest()[:10]
    return f"ratelimit/{cfg.provider}/{cfg.model}/{url}"


_LIMITERS: dict[str, Any] = {}  # this process's handles: a non-detached actor lives while a handle does


def get_limiter(cfg: ProviderConfig):
    """The cluster's limiter for this endpoint (created on first use), configured with ``cfg``.

    The driver keeps its handle for the rest of the job: a non-detached named actor is
    reference-counted, so dropping the last handle between two editing runs would kill
    it (and lose the pauses and windows it holds). A later job with other limits
    re-configures the same actor: an endpoint's limits belong to the account, and the
    latest config is taken as the truth.
    """
    actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000)(_RateLimiter)
    lease_ttl_s = 2 * cfg.timeout_s + 30.0
    limits = cfg.rate_limit.model_dump()
    name = limiter_name(cfg)
    handle = _LIMITERS.get(name)
    if handle is not None:
        try:
            ray.get(handle.configure.remote(limits, lease_ttl_s))
            return handle
        except ray.exceptions.RayActorError:  # killed (or its node died): make a new one
            _LIMITERS.pop(name, None)
    handle = actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(limits, lease_ttl_s)
    ray.get(handle.configure.remote(limits, lease_ttl_s))
    _LIMITERS[name] = handle
    return handle


def new_budget(max_usd: float | None):
    """A budget actor for one editing run (unnamed: its handle travels to the pool actors).

    Its methods are synchronous and take microseconds, so it serves one call at a time on
    one thread: that keeps ``reserve``'s check-then-add atomic. (A synchronous actor with
    ``max_concurrency=N`` starts N threads and Ray gives them 10 s to start; with 10,000 a
    loaded 2-core machine crashed the actor mid-stage.)
    """
    return ray.remote(num_cpus=0)(_BudgetKeeper).remote(max_usd)
