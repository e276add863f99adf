"""Damaged and refused runs on a real (small) run folder, through the ``tripost run`` command.

The run makes real stages (problems as Parquet, a tiny model built from scratch) and
stops there (no iteration), so each invocation takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tripost_ray import storage
from tripost_ray.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")


def _run(tmp_path: Path, *extra: str) -> int:
    overrides = {"storage.path": str(tmp_path), "run_name": "small", "iterations": 0, "sft.epochs": 0,
                 "eval.initial": False, "teacher.enabled": False, "feedback.provider": "scripted",
                 "improve.provider": "scripted", "task.n_train": 20, "task.n_test_seen": 5, "task.n_test_unseen": 5,
                 "sft.n_examples": 20, "progress": "lines"}
    args = ["run", QUICKSTART] + sum((["-o", f"{k}={v}"] for k, v in overrides.items()), [])
    return main(args + [a for o in extra for a in (["-o", o] if "=" in o else [o])])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tripost run: "), err
    return err


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_refused_damaged_and_forced_runs(ray_cluster, tmp_path, capsys):
    run = tmp_path / "small"
    assert _run(tmp_path) == 0
    capsys.readouterr()
    done = _snapshot(run)
    assert {"config.yaml", "problems/train.parquet", "problems/_MANIFEST.json", "model_init/_MANIFEST.json"} <= set(done)

    # a changed config is refused, and the folder is byte-identical afterwards (config.yaml included)
    assert _run(tmp_path, "task.n_train=21") == 2
    assert "stage 'problems'" in _one_line(capsys)
    assert _snapshot(run) == done

    # a truncated Parquet file: one line naming it, nothing else touched; --force recomputes the stage
    parquet = run / "problems" / "train.parquet"
    _truncate(parquet, 100)
    assert _run(tmp_path) == 2
    assert f"output {parquet} is damaged (100 bytes" in _one_line(capsys)
    assert {k: v for k, v in _snapshot(run).items() if k != "problems/train.parquet"} == {
        k: v for k, v in done.items() if k != "problems/train.parquet"}
    assert _run(tmp_path, "--force") == 0
    assert len(storage.read_table(str(parquet))) == 20
    assert _snapshot(run)["model_init/_MANIFEST.json"] == done["model_init/_MANIFEST.json"], \
        "the stage downstream of a recomputed one with the same config is kept"

    # a truncated manifest: one line naming it; --force recomputes the stage
    manifest = run / "problems" / "_MANIFEST.json"
    _truncate(manifest, 20)
    assert _run(tmp_path) == 2
    assert f"{manifest} is damaged: not valid JSON" in _one_line(capsys)
    assert _run(tmp_path, "--force") == 0
    recovered = {k: v for k, v in _snapshot(run).items() if k.endswith("_MANIFEST.json")}
    assert _run(tmp_path) == 0
    assert {k: v for k, v in _snapshot(run).items() if k.endswith("_MANIFEST.json")} == recovered, \
        "after recovery a resume recomputes nothing"
