"""Experiment tracking with MLflow: one MLflow run per job run, fed from the stage manifests.

The tracker is an observer of :class:`tripost_ray.stages.Run`: every stage that finishes
(or is found finished) is handed to :meth:`Tracker.on_stage`, which logs the numbers of
its manifest (throughput, LLM calls by status, tokens, cache hits, USD, accuracy and the
self-improvement rates, with the iteration as the MLflow step) and, for training stages,
the per-step loss and tokens/s of ``history.json``. :meth:`Tracker.finish` logs the
report, plots and ``experiment.json`` as artifacts and ends the MLflow run. The flattened
config is the run's parameters; the latest trained model's path is the tag
``tripost.model``.

**Backend.** Without ``tracking.tracking_uri`` a local run folder gets an embedded SQLite
backend, ``<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts/`` (no server; `mlflow ui
--backend-store-uri sqlite:///<run>/mlflow.db` opens it). That needs SQLAlchemy and alembic
but not MLflow's server, UI or ML-framework dependencies, so the project depends on
``mlflow-skinny`` plus those two; the full ``mlflow`` (only needed to *view* runs) would
also pin pyarrow below the version the project runs on. A run folder on object storage
needs a ``tracking_uri`` (a tracking server); without one tracking is off, with a warning.

**Resume.** ``<run>/_TRACKING.json`` keeps the MLflow run id and the stages already logged:
a resumed job continues the same MLflow run and logs only stages it has not logged yet.

**Failures never fail the job.** Every MLflow call is guarded: the first error is a
warning, and the job goes on with tracking off (requests to a remote server are bounded
by ``http_timeout_s`` and ``http_retries``).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import tempfile
import time
from typing import Any, Callable

from tripost_ray import storage
from tripost_ray.config import JobConfig

log = logging.getLogger("tripost")

STATE_FILE = "_TRACKING.json"
#: Manifest fields that are bookkeeping, not measurements.
NOT_METRICS = ("config_hash", "started_at", "skipped", "format")  # bookkeeping, not measurements
#: Files of a run folder logged as artifacts when present.
ARTIFACTS = ("report.md", "report.html", "report.json", "config.yaml", "experiment.json", "experiment.md",
             "accuracy.png")


def default_tracking_uri(run_root: str) -> str | None:
    """The embedded backend inside a local run folder; None on object storage."""
    if "://" in run_root and not run_root.startswith("file://"):
        return None
    path = run_root.removeprefix("file://")
    return f"sqlite:///{os.path.abspath(path)}/mlflow.db"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _key(text: str) -> str:
    """An MLflow-valid metric key (alphanumerics, _ - . / : and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", text)


def stage_metrics(name: str, manifest: dict, history: list[dict] | None = None) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` for every number of a stage manifest, and a training history.

    Keys drop the ``iter_<t>/`` prefix and use the iteration as the step, so each stage's
    numbers form a curve over iterations (``eval/metrics.accuracy.seen``,
    ``pass_0/editing/summary.cost_usd``); a training history is logged per optimizer step
    under ``<stage>/step/...`` (``iter_1/train/step/loss``).
    """
    match = re.match(r"iter_(\d+)/(.*)", name)
    iteration, base = (int(match.group(1)), match.group(2)) if match else (0, name)
    out = []
    for field, value in flatten({k: v for k, v in manifest.items() if k not in NOT_METRICS}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((_key(f"{base}/{field}"), float(value), iteration))
    for row in history or []:
        for field in ("loss", "tokens_per_s", "lr"):
            if isinstance(row.get(field), (int, float)):
                out.append((_key(f"{name}/step/{field}"), float(row[field]), int(row["step"])))
    return out


class Tracker:
    """Logs one job run to MLflow; every method is safe to call when tracking is off."""

    def __init__(self, cfg: JobConfig, run_root: str):
        self.cfg, self.root = cfg, run_root
        self.client: Any = None
        self.run_id: str | None = None
        self.state: dict[str, Any] = {}
        tc = cfg.tracking
        if not tc.mlflow:
            return
        self.uri = tc.tracking_uri or default_tracking_uri(run_root)
        if self.uri is None:
            log.warning("MLflow tracking is off: run folder %s is not local and tracking.tracking_uri is unset", run_root)
            return
        self._guard("start", self._start)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _guard(self, what: str, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # an observer: nothing it does may fail the job
            log.warning("MLflow tracking (%s) failed, the run goes on without it: %s: %s", what,
                        type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            self.run_id = None

    # ----------------------------------------------------------------- start

    def _start(self) -> None:
        tc = self.cfg.tracking
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(tc.http_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(tc.http_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri.removeprefix("sqlite:///")), exist_ok=True)
        self.client = MlflowClient(self.uri)
        state_url = storage.join(self.root, STATE_FILE)
        state = storage.read_json(state_url) if storage.exists(state_url) else {}
        run = None
        if state.get("tracking_uri") == self.uri:
            run = self.client.get_run(state["run_id"])
            if run.info.lifecycle_stage != "active":
                run, state = None, {}
        if run is None:
            experiment = self.client.get_experiment_by_name(tc.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            elif tc.tracking_uri is None:  # embedded: artifacts next to the database
                experiment_id = self.client.create_experiment(
                    tc.experiment, artifact_location="file://" + os.path.join(
                        os.path.dirname(self.uri.removeprefix("sqlite:///")), "mlartifacts"))
            else:
                experiment_id = self.client.create_experiment(tc.experiment)
            run = self.client.create_run(experiment_id, run_name=self.cfg.run_name,
                                         tags={"tripost.run_folder": self.root, **tc.tags})
            state = {"tracking_uri": self.uri, "run_id": run.info.run_id, "logged_stages": []}
            log.info("MLflow: new run %s (experiment %r) at %s", run.info.run_id, tc.experiment, self.uri)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s at %s", run.info.run_id, self.uri)
        # params are immutable in MLflow: a resumed run adds the ones it lacks (new fields)
        have = set(run.data.params)
        params = [Param(k, str(v)[:6000]) for k, v in flatten(self.cfg.model_dump(mode="json")).items() if k not in have]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        self.state, self.run_id = state, run.info.run_id
        self._save_state()

    def _save_state(self) -> None:
        storage.write_json(storage.join(self.root, STATE_FILE), self.state)

    # ---------------------------------------------------------------- stages

    def on_stage(self, name: str, manifest: dict) -> None:
        """Log a finished stage once (a resumed job skips stages logged before)."""
        if self.active and name not in self.state["logged_stages"]:
            self._guard(f"stage {name}", self._log_stage, name, manifest)

    def _log_stage(self, name: str, manifest: dict) -> None:
        from mlflow.entities import Metric

        history_url = storage.join(self.root, name, "history.json")
        history = storage.read_json(history_url) if "train" in manifest and storage.exists(history_url) else None
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in stage_metrics(name, manifest, history)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if "train" in manifest and "model" in manifest:
            self.client.set_tag(self.run_id, "tripost.model", manifest["model"])
        self.state["logged_stages"].append(name)
        self._save_state()

    # ---------------------------------------------------------------- finish

    def finish(self, summary: dict | None, status: str = "FINISHED") -> None:
        """Log the run folder's report, plots and experiment files; end the MLflow run."""
        if self.active:
            self._guard("finish", self._finish, summary, status)

    def _finish(self, summary: dict | None, status: str) -> None:
        with tempfile.TemporaryDirectory(prefix="tripost-mlflow-") as tmp:
            for name in ARTIFACTS:
                url = storage.join(self.root, name)
                if storage.exists(url):
                    local = os.path.join(tmp, name)
                    fs, path = storage.fs_for(url)
                    fs.get_file(path, local)
                    self.client.log_artifact(self.run_id, local)
            if summary is not None:
                from tripost_ray.report import plots_png

                for label, png in zip(("accuracy", "time_per_stage"), plots_png(summary)):
                    local = os.path.join(tmp, f"{label}.png")
                    with open(local, "wb") as f:
                        f.write(base64.b64decode(png))
                    self.client.log_artifact(self.run_id, local, artifact_path="plots")
        self.client.set_terminated(self.run_id, status=status)


def child_config(cfg: JobConfig, parent: Tracker, **tags: Any) -> JobConfig:
    """An experiment's arm or seed, logged as a child run of ``parent`` in its backend
    (tagged ``tripost.<key>``), so one MLflow experiment view compares them all."""
    if not parent.active:
        return cfg
    extra = {"mlflow.parentRunId": parent.run_id, **{f"tripost.{k}": str(v) for k, v in tags.items()}}
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"tracking_uri": parent.uri, "tags": {**cfg.tracking.tags, **extra}})})
