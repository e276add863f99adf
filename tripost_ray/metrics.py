"""Live metrics of a running job, exported by Ray's own Prometheus endpoint on every node.

Each process records with ``ray.util.metrics``; Ray's metrics agent on the process's node
serves them at ``http://<node>:<MetricsExportPort>/metrics`` (with the prefix ``ray_``,
the labels given here plus Ray's own: ``SessionName``, ``NodeAddress``, ``WorkerId``...),
every ``metrics_report_interval_ms`` (10 s by default). The same endpoints feed Ray's
Prometheus/Grafana integration, so `clusters/grafana/tripost_dashboard.json` works on any
cluster whose Prometheus scrapes Ray.

**Where each number is recorded, and why there.** Counters that must add up exactly
(teacher requests, tokens, USD, cache hits, call outcomes) are recorded on the *driver*
as each edited rollout comes back (:class:`EditingMetrics`): the editing actors are
killed at the end of a stage, and a killed process loses what it had not flushed yet.
The per-request facts the driver cannot see (the error of each retried attempt, the
time spent waiting on the rate limiter) travel back in the call records' ``extra``.
Gauges that only make sense where the work happens (requests in flight, training loss
and tokens/s) and the rollout counters are recorded in the actors and train workers.

Names follow Prometheus conventions: snake_case, a unit suffix, ``_total`` on counters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("tripost")

#: What Ray puts in front of every application metric's name on export.
EXPORT_PREFIX = "ray_"

TEACHER_TAGS = ("provider", "model", "role")


@dataclass(frozen=True)
class MetricSpec:
    kind: Literal["counter", "gauge"]
    description: str
    tag_keys: tuple[str, ...] = ()


#: Every metric this package records (the Grafana dashboard may only query these).
METRICS: dict[str, MetricSpec] = {
    "tripost_teacher_requests_total": MetricSpec(
        "counter", "HTTP requests to an FBK/IMP teacher, by outcome (ok, or the error kind of a failed attempt: "
        "rate_limited, server, timeout, connection, client, auth).", (*TEACHER_TAGS, "outcome")),
    "tripost_teacher_calls_total": MetricSpec(
        "counter", "FBK/IMP calls by final status (ok, parse_error, api_error, timeout, refused, over_budget); a "
        "call is one or more requests, or a cache hit.", (*TEACHER_TAGS, "status")),
    "tripost_teacher_cache_hits_total": MetricSpec(
        "counter", "FBK/IMP calls answered from the response cache (no request, no cost).", TEACHER_TAGS),
    "tripost_teacher_input_tokens_total": MetricSpec(
        "counter", "Prompt tokens the teacher reported (every paid attempt).", TEACHER_TAGS),
    "tripost_teacher_output_tokens_total": MetricSpec(
        "counter", "Completion tokens the teacher reported (every paid attempt).", TEACHER_TAGS),
    "tripost_teacher_cost_usd_total": MetricSpec(
        "counter", "USD spent on teacher calls, from editing.prices.", TEACHER_TAGS),
    "tripost_teacher_rate_limit_wait_seconds_total": MetricSpec(
        "counter", "Time calls spent waiting for a lease from the cluster-wide rate limiter.", TEACHER_TAGS),
    "tripost_teacher_requests_in_flight": MetricSpec(
        "gauge", "Teacher requests sent and not yet answered, per editing actor (sum over WorkerId).",
        ("provider", "model")),
    "tripost_budget_remaining_usd": MetricSpec(
        "gauge", "What is left of editing.max_usd in the running editing stage (absent without a budget).", ("run",)),
    "tripost_rollout_problems_total": MetricSpec(
        "counter", "Problems the small model attempted (rollouts and evaluation).", ("self_improve",)),
    "tripost_rollout_generated_tokens_total": MetricSpec(
        "counter", "Tokens the small model generated.", ("self_improve",)),
    "tripost_rollout_self_improvement_rounds_total": MetricSpec(
        "counter", "'Updated Answer' rounds of self-improving inference.", ("self_improve",)),
    "tripost_train_steps_total": MetricSpec("counter", "Optimizer steps taken (rank 0).", ("run",)),
    "tripost_train_tokens_per_second": MetricSpec(
        "gauge", "Training throughput of the latest logged step, tokens of one rank's micro-batches.", ("run",)),
    "tripost_train_loss": MetricSpec("gauge", "Weighted training loss of the latest logged step.", ("run",)),
}

_instances: dict[str, Any] = {}


def exported_names() -> set[str]:
    """The names under which Prometheus sees this package's metrics."""
    return {EXPORT_PREFIX + name for name in METRICS}


def _metric(name: str):
    """The process's ``ray.util.metrics`` object for ``name`` (created on first use), or
    None outside Ray: recording is never a reason for a stage to fail."""
    if name not in _instances:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Counter, Gauge

        spec = METRICS[name]
        cls = Counter if spec.kind == "counter" else Gauge
        _instances[name] = cls(name, description=spec.description, tag_keys=spec.tag_keys)
    return _instances[name]


def inc(name: str, value: float, **tags: Any) -> None:
    """Add ``value`` (> 0) to a counter."""
    metric = _metric(name)
    if metric is not None and value > 0:
        metric.inc(value, tags={k: str(v) for k, v in tags.items()})


def set_gauge(name: str, value: float, **tags: Any) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.set(value, tags={k: str(v) for k, v in tags.items()})


# --------------------------------------------------------------------- editing


class EditingMetrics:
    """Records each edited rollout's teacher calls as it reaches the driver."""

    def __init__(self, run: str, max_usd: float | None):
        self.run, self.max_usd, self.spent = run, max_usd, 0.0
        if max_usd is not None:
            set_gauge("tripost_budget_remaining_usd", max_usd, run=run)

    def record(self, result: dict) -> None:
        """``result`` is one :meth:`EditingWorker.edit` return value (its call records)."""
        for call in result["calls"]:
            if call["provider"] == "scripted":
                continue
            tags = {"provider": call["provider"], "model": call["model"], "role": call["role"]}
            extra = call.get("extra") or {}
            errors = extra.get("request_errors") or {}
            inc("tripost_teacher_calls_total", 1, status=call["status"], **tags)
            for kind, n in errors.items():
                inc("tripost_teacher_requests_total", n, outcome=kind, **tags)
            inc("tripost_teacher_requests_total", call["attempts"] - sum(errors.values()), outcome="ok", **tags)
            inc("tripost_teacher_cache_hits_total", int(bool(call["cached"])), **tags)
            inc("tripost_teacher_input_tokens_total", call["input_tokens"], **tags)
            inc("tripost_teacher_output_tokens_total", call["output_tokens"], **tags)
            inc("tripost_teacher_cost_usd_total", call["cost_usd"], **tags)
            inc("tripost_teacher_rate_limit_wait_seconds_total", extra.get("limiter_wait_s", 0.0), **tags)
            self.spent += call["cost_usd"]
        if self.max_usd is not None:
            set_gauge("tripost_budget_remaining_usd", max(0.0, self.max_usd - self.spent), run=self.run)


_in_flight: dict[tuple[str, str], int] = {}


class InFlight:
    """Counts a process's requests in flight to one provider + model (the FBK and IMP
    teachers of one actor may share an endpoint, so the count is per process)."""

    def __init__(self, provider: str, model: str):
        self.key = (provider, model)

    def _set(self, delta: int) -> None:
        n = _in_flight[self.key] = _in_flight.get(self.key, 0) + delta
        set_gauge("tripost_teacher_requests_in_flight", n, provider=self.key[0], model=self.key[1])

    def __enter__(self) -> "InFlight":
        self._set(1)
        return self

    def __exit__(self, *exc) -> None:
        self._set(-1)


# ------------------------------------------------------------- rollouts, training


def record_rollout_batch(rows: list[dict], self_improve: bool) -> None:
    """One generator actor's batch: problems, generated tokens, self-improvement rounds."""
    inc("tripost_rollout_problems_total", len(rows), self_improve=self_improve)
    inc("tripost_rollout_generated_tokens_total", sum(r["generated_tokens"] for r in rows), self_improve=self_improve)
    inc("tripost_rollout_self_improvement_rounds_total", sum(r["rounds"] for r in rows), self_improve=self_improve)


_train_steps: dict[str, int] = {}


def record_training_step(run: str, step: int, loss: float, tokens_per_s: float) -> None:
    """Rank 0 at a logged step (``step`` counts from 1; a restored worker starts over)."""
    inc("tripost_train_steps_total", step - _train_steps.get(run, 0), run=run)
    _train_steps[run] = step
    set_gauge("tripost_train_loss", loss, run=run)
    set_gauge("tripost_train_tokens_per_second", tokens_per_s, run=run)


# ------------------------------------------------------------------- endpoints


def metrics_endpoints() -> list[str]:
    """The Prometheus endpoint of every alive node of the connected cluster."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
