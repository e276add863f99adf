"""Stage manifests: completion, skipping, chained config hashes, and --force."""

from __future__ import annotations

import uuid
from typing import Callable

import pytest

from tripost_ray import storage
from tripost_ray.stages import MANIFEST, Run, StageConfigChanged, StageDamaged, StageNotRun
from tripost_ray.storage import DamagedFileError


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


# ------------------------------------------------------------------ damaged runs


def _truncate(url: str, keep: int = 10) -> None:
    fs, path = storage.fs_for(url)
    data = fs.cat_file(path)
    with fs.open(path, "wb") as f:
        f.write(data[:keep])


def _table_stage(calls: list) -> Callable[[str], dict]:
    def body(url: str) -> dict:
        calls.append(url)
        storage.write_table(storage.join(url, "data.parquet"), [{"x": i} for i in range(100)])
        return {"data": storage.join(url, "data.parquet")}

    return body


def test_truncated_manifest_is_one_line_naming_it_then_force_recomputes(root):
    calls = []
    Run(root).stage("a", "h1", _table_stage(calls))
    manifest = storage.join(root, "a", MANIFEST)
    _truncate(manifest)
    with pytest.raises(StageDamaged) as err:
        Run(root).stage("a", "h1", _table_stage(calls))
    message = str(err.value)
    assert "\n" not in message and manifest in message and "not valid JSON" in message and "--force" in message
    assert len(calls) == 1, "nothing recomputed without --force"
    rerun = Run(root, force=True).stage("a", "h1", _table_stage(calls))
    assert len(calls) == 2 and rerun["skipped"] is False
    assert storage.read_json(manifest)["config_hash"] == rerun["config_hash"]
    assert Run(root).stage("a", "h1", _table_stage(calls))["skipped"] is True


def test_truncated_parquet_output_is_one_line_naming_it_then_force_recomputes(root):
    calls = []
    data = Run(root).stage("a", "h1", _table_stage(calls))["data"]
    _truncate(data, keep=200)
    with pytest.raises(StageDamaged) as err:
        Run(root).stage("a", "h1", _table_stage(calls))
    assert "\n" not in str(err.value) and data in str(err.value) and "200 bytes" in str(err.value)
    with pytest.raises(DamagedFileError, match=f"^{data} is damaged: not a readable Parquet file"):
        storage.read_table(data)  # a reader that bypasses the manifest gets the same kind of line
    Run(root, force=True).stage("a", "h1", _table_stage(calls))
    assert len(calls) == 2 and len(storage.read_table(data)) == 100


def test_force_clears_the_stage_folder_before_recomputing(root):
    Run(root).stage("a", "h1", lambda url: storage.write_json(storage.join(url, "old.json"), {}) or {})
    Run(root, force=True).stage("a", "h2", lambda url: storage.write_json(storage.join(url, "new.json"), {}) or {})
    assert not storage.exists(storage.join(root, "a", "old.json"))
    assert Run(root).stage("a", "h2", lambda url: {})["files"] == {"new.json": 2}


def test_check_only_runs_nothing_and_refuses_like_a_run(root):
    Run(root).stage("a", "h1", lambda url: {"v": 1})
    check = Run(root, check_only=True)
    assert check.stage("a", "h1", lambda url: pytest.fail("ran"))["v"] == 1
    with pytest.raises(StageNotRun):
        check.stage("b", "h1", lambda url: pytest.fail("ran"))
    with pytest.raises(StageConfigChanged):
        Run(root, check_only=True).stage("a", "h2", lambda url: pytest.fail("ran"))
    with pytest.raises(StageNotRun):  # forced: it would recompute, so checking stops there
        Run(root, force=True, check_only=True).stage("a", "h2", lambda url: pytest.fail("ran"))
    assert storage.read_json(storage.join(root, "a", MANIFEST))["config_hash"] == check.manifests["a"]["config_hash"]


def test_a_manifest_of_an_older_format_is_refused_in_one_line_and_force_recomputes(root):
    """Run folders written before stage specs hashed their stages another way: a resume
    says so (and what to do) instead of comparing incomparable hashes."""
    Run(root).stage("a", "h1", lambda url: {"v": 1})
    manifest = storage.join(root, "a", MANIFEST)
    old = storage.read_json(manifest)
    del old["format"]
    storage.write_json(manifest, old)
    with pytest.raises(StageConfigChanged) as err:
        Run(root).stage("a", "h1", lambda url: pytest.fail("ran"))
    assert "written by an older tripost-ray" in str(err.value) and "--force" in str(err.value)
    assert "\n" not in str(err.value)
    assert Run(root, force=True).stage("a", "h1", lambda url: {"v": 2})["v"] == 2
