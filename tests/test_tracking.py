"""MLflow tracking on the real MLflow client and the embedded SQLite backend (no Ray).

The reduced quickstart in tests/test_pipeline.py checks the same against a whole job."""

from __future__ import annotations

import logging
import socket

from tripost_ray.config import build_config
from tripost_ray.stages import Run
from tripost_ray.tracking import Tracker, default_tracking_uri, stage_metrics


def test_stage_metrics_use_the_iteration_as_step_and_history_steps():
    manifest = {"stage": "iter_2/eval", "config_hash": "abc", "started_at": 1.0, "wall_s": 3.5, "skipped": False, "format": 2,
                "metrics": {"accuracy": {"seen": 0.5, "unseen": None}, "n": 10, "ok": True}}
    got = stage_metrics("iter_2/eval", manifest)
    assert sorted(got) == [("eval/metrics.accuracy.seen", 0.5, 2), ("eval/metrics.n", 10.0, 2),
                           ("eval/wall_s", 3.5, 2)]
    history = [{"step": 1, "loss": 2.0, "tokens_per_s": 100.0, "lr": 0.1}, {"step": 2, "loss": None}]
    got = stage_metrics("sft", {"train": {"final_loss": 1.5}, "model": "x"}, history)
    assert ("sft/train.final_loss", 1.5, 0) in got and ("sft/step/loss", 2.0, 1) in got
    assert not [k for k, _, step in got if step == 2], "a missing loss is not logged"
    usage = stage_metrics("iter_1/pass_0/editing", {"summary": {"usage": {"openai/gpt-4o": {"cost_usd": 0.1}}}})
    assert usage == [("pass_0/editing/summary.usage.openai/gpt-4o.cost_usd", 0.1, 1)]


def _job_stages(run: Run, wall: dict) -> None:
    run.stage("problems", "h1", lambda url: {"counts": {"train": 4}})
    run.stage("iter_1/eval", "h2", lambda url: {"metrics": {"accuracy": {"total": wall["acc"]}}}, inputs=("problems",))


def test_embedded_backend_one_run_resumed_without_duplicates(tmp_path):
    from mlflow import MlflowClient

    root = str(tmp_path / "run")
    cfg = build_config(None, ["run_name=unit", "tracking.tags.team=platform"])
    tracker = Tracker(cfg, root)
    run = Run(root, on_stage=tracker.on_stage)
    _job_stages(run, {"acc": 0.25})
    (tmp_path / "run" / "report.md").write_text("# report\n")
    tracker.finish(None)

    again = Tracker(cfg, root)  # a resumed job: every stage is found finished
    _job_stages(Run(root, on_stage=again.on_stage), {"acc": 0.25})
    again.finish(None)
    assert again.run_id == tracker.run_id

    client = MlflowClient(default_tracking_uri(root))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    logged = runs[0]
    assert logged.info.status == "FINISHED" and logged.data.tags["team"] == "platform"
    assert logged.data.params["run_name"] == "unit" and logged.data.params["task.n_train"] == "1000"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "eval/metrics.accuracy.total")] \
        == [(1, 0.25)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.md"]


def test_an_unreachable_tracking_server_only_warns(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = build_config(None, [f"tracking.tracking_uri=http://127.0.0.1:{port}", "tracking.http_retries=0"])
    root = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="tripost"):
        tracker = Tracker(cfg, root)
        run = Run(root, on_stage=tracker.on_stage)
        _job_stages(run, {"acc": 0.5})
        tracker.finish(None)
    assert not tracker.active
    assert run.manifests["iter_1/eval"]["metrics"]["accuracy"]["total"] == 0.5  # the stages ran
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MLflow tracking (start) failed, the run goes on without it" in warnings[0]


def test_tracking_settings_change_no_stage_hash():
    """No stage spec carries the tracking section (tripost_ray/specs.py)."""
    from tripost_ray.specs import JobSpecs

    def hashes(cfg):
        s = JobSpecs(cfg)
        return [spec.config_hash() for spec in (s.problems(), s.model_init(), s.sft(), s.train(), s.rollouts(1, 0),
                                                  s.eval(), s.editing(), s.postprocess(1))]

    a, b = build_config(), build_config(None, ["tracking.mlflow=false", "tracking.experiment=other"])
    assert hashes(a) == hashes(b)
