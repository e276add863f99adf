"""Evaluation: accuracy and the self-improvement metrics of TRIPOST.md, and ``tripost eval``.

:func:`compute_metrics` is pure: it reads rollout records (``split``, ``correct``,
``first_correct``, ``n_turns``). :func:`evaluate_model` produces those records with greedy
self-improving inference through the Ray Data rollout stage.

Metrics (``None`` where a denominator is zero):

* ``accuracy.{seen,unseen,total}``: final answer correct. ``seen`` is the ``test_seen``
  (and ``train``) split, ``unseen`` the ``test_unseen`` split.
* ``self_improvement.attempt_rate``: share of questions where the model attempted
  self-improvement (more than one attempt).
* ``self_improvement.fixed_rate``: of those, the share whose final answer is correct.
* ``self_improvement.broken_correct_rate``: of those, the share whose first attempt was
  correct but whose final answer is wrong (a correct answer changed into a wrong one).
  ``n_*`` fields hold the counts behind every rate.
"""

from __future__ import annotations

import tempfile
from typing import Any

from tripost_ray.specs import GenerationSpec

SEEN_SPLITS = ("train", "test_seen")
UNSEEN_SPLITS = ("test_unseen",)
REQUIRED = ("split", "correct", "first_correct", "n_turns")


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def self_improvement_metrics(records: list[dict]) -> dict[str, Any]:
    """How the model's own feedback and updates changed its first attempts in ``records``."""
    attempted = [r for r in records if int(r["n_turns"]) > 1]
    fixed = [r for r in attempted if r["correct"]]
    broken = [r for r in attempted if r["first_correct"] and not r["correct"]]
    repaired = [r for r in attempted if not r["first_correct"] and r["correct"]]
    first_wrong = [r for r in records if not r["first_correct"]]
    first_right = [r for r in records if r["first_correct"]]
    return {
        "n_attempted": len(attempted),
        "attempt_rate": _rate(len(attempted), len(records)),
        "n_fixed": len(fixed),
        "fixed_rate": _rate(len(fixed), len(attempted)),
        "n_broken_correct": len(broken),
        "broken_correct_rate": _rate(len(broken), len(attempted)),
        "n_wrong_to_correct": len(repaired),
        # the model as its own verifier: how often its feedback flags a wrong first
        # attempt (and so tries again), and how often it flags a right one
        "wrong_flagged_rate": _rate(sum(int(r["n_turns"]) > 1 for r in first_wrong), len(first_wrong)),
        "right_flagged_rate": _rate(sum(int(r["n_turns"]) > 1 for r in first_right), len(first_right)),
    }


def compute_metrics(records: list[dict]) -> dict[str, Any]:
    """Accuracy (seen / unseen / total) and self-improvement metrics of rollout records.

    ``self_improvement`` pools both splits, as the paper's tables do; ``self_improvement_by_split``
    keeps them apart, because on unseen problems a weak model's garbled output is "flagged"
    by equally garbled feedback, which can hide that it never flags its seen mistakes.
    """
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ValueError(f"record {i} ({r.get('problem_id', '?')}) lacks {missing}")
        if r["split"] not in SEEN_SPLITS + UNSEEN_SPLITS:
            raise ValueError(f"record {i} ({r.get('problem_id', '?')}) has unknown split {r['split']!r}")
    groups = {
        "seen": [r for r in records if r["split"] in SEEN_SPLITS],
        "unseen": [r for r in records if r["split"] in UNSEEN_SPLITS],
        "total": list(records),
    }
    n = {k: len(v) for k, v in groups.items()}
    n_correct = {k: sum(bool(r["correct"]) for r in v) for k, v in groups.items()}
    return {
        "n": n,
        "n_correct": n_correct,
        "accuracy": {k: _rate(n_correct[k], n[k]) for k in groups},
        "self_improvement": self_improvement_metrics(records),
        "self_improvement_by_split": {k: self_improvement_metrics(groups[k]) for k in ("seen", "unseen")},
    }


def evaluate_model(model_path: str, problems: list, spec: GenerationSpec,
                   output_uri: str | None = None, verification_per_split: int = 0) -> dict[str, Any]:
    """Self-improving inference on ``problems`` through the rollout stage; metrics.

    ``spec`` is an evaluation's generation (greedy, the eval section's limits:
    :meth:`tripost_ray.specs.JobSpecs.eval`). Outputs go to ``output_uri`` (Parquet) or a
    temporary folder that is removed afterwards. Returns :func:`compute_metrics` plus
    ``rollout`` (counts, tokens, throughput) and, when ``verification_per_split`` > 0,
    ``verification`` (:func:`verification_probe` on the model's own first attempts).
    """
    from tripost_ray.rollout import read_rollouts, run_rollouts

    def run(out: str) -> dict[str, Any]:
        summary = run_rollouts(problems, model_path, spec, out)
        records = read_rollouts(out)
        metrics = compute_metrics(records)
        metrics["rollout"] = summary.to_dict()
        if verification_per_split:
            outputs = {r["problem_id"]: r["output"] for r in records}
            metrics["verification"] = verification_probe(model_path, problems, outputs, spec, verification_per_split)
        return metrics

    if output_uri is not None:
        return run(output_uri)
    with tempfile.TemporaryDirectory(prefix="tripost-eval-") as tmp:
        metrics = run(tmp)
        metrics["rollout"]["output_uri"] = None
        return metrics


def verification_probe(model_path: str, problems: list, outputs: dict[str, str], spec: GenerationSpec,
                       per_split: int) -> dict[str, Any]:
    """:mod:`tripost_ray.verification` on one Ray worker shaped like a rollout actor (the
    probe is a few hundred one-line generations: one worker, no pool); its metrics."""
    import ray

    from tripost_ray.verification import probe_items, probe_metrics

    items = probe_items(spec.task.build(), problems, outputs, per_split)
    pool = spec.pool
    worker = ray.remote(num_cpus=pool.num_cpus_per_actor, num_gpus=pool.num_gpus_per_actor,
                        resources=pool.resources_per_actor or None)(_probe_worker)
    return probe_metrics(items, ray.get(worker.remote(spec, model_path, items)))


def _probe_worker(spec: GenerationSpec, model_path: str, items: list) -> list[str]:
    from tripost_ray.models import resolve_model_source
    from tripost_ray.rollout import build_engine
    from tripost_ray.verification import run_probe

    engine = build_engine(spec, resolve_model_source(model_path, spec.cache_dir))
    return run_probe(engine, spec.task.build(), items)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short table of accuracy and self-improvement metrics."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    acc, si, n = metrics["accuracy"], metrics["self_improvement"], metrics["n"]
    rows = [
        ("accuracy seen", pct(acc["seen"]), f"{metrics['n_correct']['seen']}/{n['seen']}"),
        ("accuracy unseen", pct(acc["unseen"]), f"{metrics['n_correct']['unseen']}/{n['unseen']}"),
        ("accuracy total", pct(acc["total"]), f"{metrics['n_correct']['total']}/{n['total']}"),
        ("SI attempted", pct(si["attempt_rate"]), f"{si['n_attempted']}/{n['total']}"),
        ("SI ended correct", pct(si["fixed_rate"]), f"{si['n_fixed']}/{si['n_attempted']}"),
        ("correct -> wrong", pct(si["broken_correct_rate"]), f"{si['n_broken_correct']}/{si['n_attempted']}"),
    ]
    w = max(len(r[0]) for r in rows)
    table = "\n".join(f"{a:<{w}}  {b:>7}  {c}" for a, b, c in rows)
    if metrics.get("verification"):
        from tripost_ray.verification import format_probe

        table += "\n" + format_probe(metrics["verification"])
    return table
