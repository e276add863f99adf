"""The async editing pool: Ray actors that run each rollout's FBK/IMP conversation.

``run_editing`` feeds rollout rows (the rollout stage's Parquet, or a list of dicts) to
``editing.num_actors`` actors. Each actor is an *async* Ray actor with
``max_concurrency = editing.concurrency_per_actor``: one editing conversation
(:func:`tripost_ray.editing.edit_trajectory`) per coroutine, so a single actor keeps
many teacher calls in flight while it waits on the network. The scripted provider runs
through the same pool (its calls are in-process function calls).

Everything shared lives outside the actors:

* one named rate limiter per provider + model (:mod:`tripost_ray.feedback.ratelimit`),
  so N actors together stay under RPM / TPM / max in flight and honour Retry-After;
* one budget actor per stage, holding what is left of the job's ``max_usd`` (the pipeline
  carries the money spent across passes, iterations and resumes), so the limit holds across
  actors (calls past it end as ``over_budget``);
* the response cache on fsspec storage, so a re-run (or a run killed midway and
  started again) only pays for calls that never completed.

Outputs under ``out_uri``: ``trajectories/part-00000.jsonl`` (one
:meth:`Trajectory.to_dict` per line), ``failures/part-00000.jsonl`` (one row per
discarded rollout: the failed call's role, status and detail, or the editing rule that
discarded it) and ``summary.json`` (:class:`EditingSummary`, written last). JSONL keeps
the nested, free-form trajectory records exact; :func:`read_trajectories` and
:func:`read_failures` read them back.

API keys go from the driver's environment to the actors through a key holder actor,
in memory (:mod:`tripost_ray.feedback.keys`: not a ``runtime_env``, which Ray logs);
they are never actor creation arguments, records, cache keys or log lines.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import ray

from tripost_ray import storage
from tripost_ray.feedback.costs import price_for, require_price
from tripost_ray.feedback.keys import fetch_keys, start_key_holder
from tripost_ray.feedback.providers import check_credentials, key_env
from tripost_ray.metrics import EditingMetrics
from tripost_ray.specs import EditingSpec
from tripost_ray.trajectory import Trajectory

REQUIRED_COLUMNS = ("problem_id", "question", "target", "output")


class RolloutFormatError(ValueError):
    """Rollout rows the pool cannot use; the message names the row and column."""


@dataclass
class EditingSummary:
    """What an editing run did, spent and saved."""

    rows: int = 0
    trajectories: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    discarded: int = 0
    discard_reasons: dict[str, int] = field(default_factory=dict)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> status -> count
    http_requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    usage: dict[str, dict[str, float]] = field(default_factory=dict)  # "provider/model" -> tokens, cost
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    unpriced_models: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    out_uri: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A short human summary (printed at the end of a run)."""
        lines = [
            f"editing: {self.rows} rollouts -> {self.trajectories} trajectories {dict(self.kinds)}, "
            f"{self.discarded} discarded {dict(self.discard_reasons)}",
            f"  calls: {json.dumps(self.calls, sort_keys=True)}; HTTP requests {self.http_requests}; "
            f"cache {self.cache_hits} hits / {self.cache_misses} misses",
        ]
        for name, u in sorted(self.usage.items()):
            lines.append(
                f"  {name}: {int(u['calls'])} calls, {int(u['input_tokens'])} in / {int(u['output_tokens'])} out "
                f"tokens, ${u['cost_usd']:.4f}"
            )
        lines.append(f"  cost ${self.cost_usd:.4f} (cache saved ${self.saved_usd:.4f}); {self.wall_s:.1f} s")
        if self.unpriced_models:
            lines.append(f"  no price in editing.prices for {self.unpriced_models}: their cost is counted as 0")
        return "\n".join(lines)


# ---------------------------------------------------------------------- the actor


class EditingWorker:
    """Runs editing conversations concurrently (an async Ray actor; see ``run_editing``).

    It receives its stage's :class:`~tripost_ray.specs.EditingSpec` and the shared
    helpers (rate limiters, budget, response cache location, key holder) as handles."""

    def __init__(self, spec: EditingSpec, seed: int, cache_uri: str | None, limiters: dict, budget: Any,
                 keys: Any = None):
        from tripost_ray.editing import scripted_fbk, scripted_imp
        from tripost_ray.feedback.cache import ResponseCache
        from tripost_ray.feedback.calls import LLMTeacher

        self.task = spec.task.build()
        self.max_rounds = spec.editing.max_improve_rounds
        self.verify_direct_correct = spec.editing.verify_direct_correct
        cache = ResponseCache(cache_uri) if cache_uri else None
        roles = {"fbk": spec.feedback, "imp": spec.improve}
        api_keys = fetch_keys(keys, sorted({n for n in map(key_env, roles.values()) if n}))
        calls = {}
        for role, cfg in roles.items():
            if cfg.provider == "scripted":
                calls[role] = scripted_fbk(self.task) if role == "fbk" else scripted_imp(self.task)
            else:
                teacher = LLMTeacher(self.task, cfg, price_for(spec.editing.prices, cfg), limiter=limiters.get(role),
                                     budget=budget, cache=cache, seed=seed, api_key=api_keys[key_env(cfg)])
                calls[role] = teacher.fbk if role == "fbk" else teacher.imp
        self.fbk, self.imp = calls["fbk"], calls["imp"]

    async def edit(self, index: int, row: dict) -> dict:
        from tripost_ray.editing import edit_trajectory
        from tripost_ray.tasks.base import Problem

        problem = Problem(id=str(row["problem_id"]), question=row["question"], target=str(row["target"]),
                          split=row.get("split") or "train")
        result = await edit_trajectory(self.task, problem, row["output"] or "", self.fbk, self.imp,
                                       max_rounds=self.max_rounds, verify_direct_correct=self.verify_direct_correct)
        calls = []
        for c in result.calls:
            rec = c.record()
            if c.ok:
                rec["raw"] = None  # kept in the trajectory; failures keep theirs for diagnosis
            calls.append(rec)
        return {
            "index": index,
            "problem_id": problem.id,
            "trajectory": result.trajectory.to_dict() if result.trajectory else None,
            "discard_reason": result.discard_reason,
            "rounds": result.rounds,
            "calls": calls,
        }

    def ready(self) -> bool:
        return True


# ------------------------------------------------------------------------ inputs


def load_rollouts(rollouts: list[dict] | str) -> list[dict]:
    """Rows from a list or a Parquet file/folder URL; every row needs REQUIRED_COLUMNS."""
    if isinstance(rollouts, str):
        if not storage.exists(rollouts):
            raise RolloutFormatError(f"rollouts not found: {rollouts}")
        rows = storage.read_table(rollouts)
    else:
        rows = list(rollouts)
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise RolloutFormatError(f"rollout row {i} lacks column(s) {missing}; needed: {list(REQUIRED_COLUMNS)}")
    return rows


def _failure_row(result: dict) -> dict:
    from tripost_ray.editing import DISCARD_REASONS

    reason = result["discard_reason"]
    failed = next((c for c in result["calls"] if c["status"] != "ok"), None)
    row = {"problem_id": result["problem_id"], "index": result["index"], "reason": reason,
           "explanation": DISCARD_REASONS.get(reason, "")}
    if failed is not None:
        row.update(role=failed["role"], status=failed["status"], detail=failed["detail"],
                   provider=failed["provider"], model=failed["model"], attempts=failed["attempts"],
                   raw=failed["raw"])
    else:
        role = reason.split("_", 1)[0] if reason.startswith(("fbk_", "imp_")) else "editing"
        row.update(role=role, status="discarded", detail=DISCARD_REASONS.get(reason, reason), provider=None,
                   model=None, attempts=0, raw=None)
    return row


def _write_jsonl(url: str, rows: list[dict]) -> None:
    storage.write_text_atomic(url, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def _read_jsonl(url: str) -> list[dict]:
    import fsspec

    with fsspec.open(url, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_trajectories(out_uri: str) -> list[Trajectory]:
    """The trajectories an editing run wrote under ``out_uri``."""
    return [Trajectory.from_dict(d) for d in _read_jsonl(storage.join(out_uri, "trajectories", "part-00000.jsonl"))]


def read_failures(out_uri: str) -> list[dict]:
    """The failure rows an editing run wrote under ``out_uri``."""
    return _read_jsonl(storage.join(out_uri, "failures", "part-00000.jsonl"))


# ----------------------------------------------------------------------- summary


def summarize(results: list[dict], wall_s: float, out_uri: str, unpriced: list[str]) -> EditingSummary:
    s = EditingSummary(rows=len(results), wall_s=wall_s, out_uri=out_uri, unpriced_models=unpriced)
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    calls: dict[str, Counter] = defaultdict(Counter)
    usage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in results:
        if r["trajectory"] is not None:
            kinds[r["trajectory"]["kind"]] += 1
        else:
            reasons[r["discard_reason"]] += 1
        for c in r["calls"]:
            calls[c["role"]][c["status"]] += 1
            if c["provider"] == "scripted":
                continue
            u = usage[f"{c['provider']}/{c['model']}"]
            u["calls"] += 1
            u["input_tokens"] += c["input_tokens"]
            u["output_tokens"] += c["output_tokens"]
            u["cost_usd"] += c["cost_usd"]
            u["http_requests"] += c["attempts"]
            s.http_requests += c["attempts"]
            s.cost_usd += c["cost_usd"]
            if c["cached"]:
                s.cache_hits += 1
                u["cache_hits"] += 1
                s.saved_usd += c["extra"].get("saved_usd", 0.0)
            elif c["attempts"] > 0:
                s.cache_misses += 1
    s.trajectories = sum(kinds.values())
    s.kinds = dict(kinds)
    s.discarded = sum(reasons.values())
    s.discard_reasons = dict(reasons)
    s.calls = {role: dict(c) for role, c in calls.items()}
    s.usage = {k: dict(v) for k, v in usage.items()}
    return s


# ------------------------------------------------------------------------ driver


def run_editing(
    rollouts: list[dict] | str,
    spec: EditingSpec,
    out_uri: str,
    *,
    cache_uri: str | None = None,
    budget_usd: float | None = None,
) -> EditingSummary:
    """Edit every rollout row into a trajectory or a recorded failure; write them to ``out_uri``.

    ``spec`` supplies the task, ``feedback`` and ``improve`` (providers) and ``editing``
    (actors, concurrency, rounds, prices, ``verify_direct_correct``). ``cache_uri`` is the
    response cache (None: no cache). ``budget_usd`` is the money this call may spend (a
    pipeline passes what is left of the job's ``editing.max_usd``; None: no limit).
    Missing API keys and unpriced models under a budget are errors raised before any actor
    starts or any request is made. Needs a running Ray (:func:`tripost_ray.ray_setup.init_ray`).
    """
    start = time.monotonic()
    rows = load_rollouts(rollouts)
    needed_env = check_credentials(spec)
    editing = spec.editing
    llm_sections = [(n, c) for n, c in (("feedback", spec.feedback), ("improve", spec.improve))
                    if c.provider != "scripted"]
    if budget_usd is not None:
        for name, cfg in llm_sections:
            require_price(editing.prices, cfg, name)
    unpriced = sorted({c.model for _, c in llm_sections if price_for(editing.prices, c) is None})
    if cache_uri is not None and "://" not in cache_uri:
        cache_uri = storage.normalize(cache_uri)
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call tripost_ray.ray_setup.init_ray() first")

    from tripost_ray.feedback.ratelimit import get_limiter, new_budget

    limiters = {}
    for role, cfg in (("fbk", spec.feedback), ("imp", spec.improve)):
        if cfg.provider != "scripted":
            limiters[role] = get_limiter(cfg)
    budget = new_budget(budget_usd) if budget_usd is not None and llm_sections else None
    keys = start_key_holder(needed_env) if needed_env else None
    # A crashed worker is restarted and its in-flight edits retried: an edit is idempotent
    # (replies already paid for come from the cache), so a retry never pays twice.
    options: dict[str, Any] = {"num_cpus": editing.num_cpus_per_actor, "max_concurrency": editing.concurrency_per_actor,
                               "max_restarts": editing.max_actor_restarts,
                               "max_task_retries": editing.max_actor_restarts}
    worker_cls = ray.remote(EditingWorker)
    actors = [worker_cls.options(**options).remote(spec, spec.seed + i, cache_uri, limiters, budget, keys)
              for i in range(min(editing.num_actors, max(1, len(rows))))]
    results: list[dict] = []
    try:
        results = _dispatch(actors, rows, editing.concurrency_per_actor,
                            EditingMetrics(spec.run_name, budget_usd if llm_sections else None).record)
    finally:
        for actor in actors:
            ray.kill(actor)
        for helper in (budget, keys):
            if helper is not None:
                ray.kill(helper)

    results.sort(key=lambda r: r["index"])
    trajectories = [r["trajectory"] for r in results if r["trajectory"] is not None]
    failures = [_failure_row(r) for r in results if r["trajectory"] is None]
    summary = summarize(results, time.monotonic() - start, out_uri, unpriced)
    _write_jsonl(storage.join(out_uri, "trajectories", "part-00000.jsonl"), trajectories)
    _write_jsonl(storage.join(out_uri, "failures", "part-00000.jsonl"), failures)
    storage.write_json(storage.join(out_uri, "summary.json"), summary.to_dict())
    return summary


def _dispatch(actors: list, rows: list[dict], concurrency: int,
              on_result: Callable[[dict], None]) -> list[dict]:
    """Keep each actor ``concurrency`` (+ a small queue) rows busy; collect results with
    progress, handing each to ``on_result`` (the live metrics) as it arrives."""
    from tripost_ray import progress

    cap = concurrency + max(2, concurrency // 4)
    load = [0] * len(actors)
    owner: dict[Any, int] = {}
    pending: list = []
    results: list[dict] = []
    failed = 0
    next_row = 0
    with progress.track("editing", len(rows), "rollouts") as bar:
        while next_row < len(rows) or pending:
            while next_row < len(rows):
                i = min(range(len(actors)), key=load.__getitem__)
                if load[i] >= cap:
                    break
                ref = actors[i].edit.remote(next_row, rows[next_row])
                owner[ref] = i
                load[i] += 1
                pending.append(ref)
                next_row += 1
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                load[owner.pop(ref)] -= 1
                result = ray.get(ref)
                results.append(result)
                on_result(result)
                failed += result["trajectory"] is None
                bar.update(1)
                bar.set_postfix(kept=len(results) - failed, discarded=failed)
    return results
