"""Stage manifests: completion, skipping, chained config hashes, and --force."""

from __future__ import annotations

import uuid

import pytest

from tripost_ray import storage
from tripost_ray.stages import MANIFEST, Run, StageConfigChanged


@pytest.fixture
def root() -> str:
    return f"memory://runs/{uuid.uuid4().hex}"


def test_stage_runs_once_and_is_skipped_on_rerun(root):
    calls = []

    def body(url: str) -> dict:
        calls.append(url)
        storage.write_json(storage.join(url, "out.json"), {"x": 1})
        return {"count": 3}

    first = Run(root).stage("a", "h1", body)
    second = Run(root).stage("a", "h1", body)
    assert len(calls) == 1
    assert first["count"] == second["count"] == 3
    assert first["skipped"] is False and second["skipped"] is True
    assert storage.exists(storage.join(root, "a", MANIFEST))


def test_failed_stage_leaves_no_manifest_and_reruns(root):
    def broken(url: str) -> dict:
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        Run(root).stage("a", "h1", broken)
    assert not storage.exists(storage.join(root, "a", MANIFEST))
    assert Run(root).stage("a", "h1", lambda url: {"ok": True})["ok"] is True


def test_changed_config_is_an_error_unless_forced(root):
    Run(root).stage("a", "h1", lambda url: {"v": 1})
    with pytest.raises(StageConfigChanged, match="'a'.*different config"):
        Run(root).stage("a", "h2", lambda url: {"v": 2})
    assert Run(root, force=True).stage("a", "h2", lambda url: {"v": 2})["v"] == 2


def test_upstream_change_invalidates_downstream(root):
    run = Run(root)
    run.stage("up", "u1", lambda url: {})
    run.stage("down", "d1", lambda url: {}, inputs=("up",))
    rerun = Run(root, force=True)
    rerun.stage("up", "u2", lambda url: {})
    calls = []
    rerun.stage("down", "d1", lambda url: calls.append(1) or {}, inputs=("up",))
    assert calls == [1]
    with pytest.raises(StageConfigChanged):
        again = Run(root)
        again.stage("up", "u1", lambda url: {})
