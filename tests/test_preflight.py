"""Late checks made early: everything a command needs is checked before any work starts.

Each case runs the real ``tripost`` command in process. "Before any work" is observed, not
assumed: Ray's start-up (the first work every command does) is replaced by a tripwire, and
nothing may be written. Each failure is exit 2 with one line naming what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tripost_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """A tripwire on every way a command starts work."""
    def tripwire(*args, **kwargs):
        pytest.fail("work started before the checks")

    for target in ("tripost_ray.pipeline.init_ray", "tripost_ray.ray_setup.init_ray",
                   "tripost_ray.evaluate.evaluate_model"):
        monkeypatch.setattr(target, tripwire)


def _one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"tripost {command}: ")
    assert "# resource plan" not in captured.out, "the plan of a job that cannot run"
    return captured.err


def _run(tmp_path: Path, *overrides: str, dry_run: bool = False) -> int:
    args = ["run", QUICKSTART, "-o", f"storage.path={tmp_path / 'runs'}", *sum((["-o", o] for o in overrides), [])]
    return main(args + (["--dry-run"] if dry_run else []))


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_missing_api_key(tmp_path, monkeypatch, capsys, dry_run):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert _run(tmp_path, "teacher.enabled=false", dry_run=dry_run) == 2
    assert "feedback.provider=openai needs the environment variable OPENAI_API_KEY" in _one_line_error(capsys, "run")
    assert not (tmp_path / "runs").exists()


def test_the_jobs_own_teacher_needs_no_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert _run(tmp_path, dry_run=True) == 0
    assert "# resource plan" in capsys.readouterr().out


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_storage_backend_not_installed_names_package_and_extra(tmp_path, capsys, dry_run, without_s3fs):
    assert main(["run", QUICKSTART, "-o", "storage.path=s3://bucket/runs"] + (["--dry-run"] if dry_run else [])) == 2
    err = _one_line_error(capsys, "run")
    assert "storage.path" in err and "s3fs" in err and "pip install 'tripost-ray[s3]'" in err


def test_unknown_protocol_and_unwritable_storage(tmp_path, capsys):
    assert main(["run", QUICKSTART, "-o", "storage.path=nosuchproto://x/runs", "--dry-run"]) == 2
    assert "not a storage URL" in _one_line_error(capsys, "run")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["run", QUICKSTART, "-o", f"storage.path={blocker / 'runs'}"]) == 2
    assert f"{blocker} is a file" in _one_line_error(capsys, "run")


def test_problem_file_syntax_error_at_its_line(tmp_path, capsys):
    bad = tmp_path / "test.json"
    bad.write_text('{\n  "examples": [\n    {"input": "((1 + 2) * 3) =", "target": "9"},\n    {"input": }\n  ]\n}\n')
    assert _run(tmp_path, f"task.test_file={bad}", dry_run=True) == 2
    err = _one_line_error(capsys, "run")
    assert f"task.test_file: {bad}: not valid JSON at line 4, column 15" in err
    assert not (tmp_path / "runs").exists()


def test_model_folder_with_a_broken_config_json(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",')
    assert _run(tmp_path, f"model.source={model}") == 2
    assert "model.source" in (err := _one_line_error(capsys, "run")) and "config.json is not valid JSON" in err
    assert main(["eval", "--model", str(model), "--task", "multistep_arithmetic", "--out", str(tmp_path / "m.json")]) == 2
    assert "config.json is not valid JSON" in _one_line_error(capsys, "eval")


def test_eval_out_unwritable_fails_before_evaluating(tmp_path, tiny_model_dir, capsys, without_s3fs):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(blocker / "metrics.json", "is a file"), (tmp_path, "is a folder"), ("nosuchproto://m.json", "not a storage URL"),
             ("s3://bucket/metrics.json", "tripost-ray[s3]")]
    for out, words in cases:
        assert main(["eval", "--model", tiny_model_dir, "--task", "multistep_arithmetic", "--out", str(out)]) == 2
        err = _one_line_error(capsys, "eval")
        assert err.startswith("tripost eval: --out: ") and words in err


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["report", str(folder)]) == 2
    assert "not a run folder" in _one_line_error(capsys, "report")
    assert [p.name for p in folder.iterdir()] == ["cat.jpg"]
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no run at" in _one_line_error(capsys, "report")


def test_report_names_a_damaged_manifest(tmp_path, capsys):
    stage = tmp_path / "run" / "problems"
    stage.mkdir(parents=True)
    (stage / "_MANIFEST.json").write_text(json.dumps({"stage": "problems"})[:9])
    assert main(["report", str(tmp_path / "run")]) == 2
    assert f"{stage / '_MANIFEST.json'} is damaged: not valid JSON" in _one_line_error(capsys, "report")


@pytest.mark.parametrize("command", ["run", "eval"])
def test_vllm_engine_where_vllm_is_not_installed(tmp_path, tiny_model_dir, monkeypatch, capsys, command):
    # stands in for a machine without vLLM (the test environment installs it)
    monkeypatch.setattr("tripost_ray.vllm_engine.vllm_installed", lambda: False)
    if command == "run":
        assert _run(tmp_path, "rollout.engine=vllm", dry_run=True) == 2
    else:
        assert main(["eval", "--model", tiny_model_dir, "--task", "multistep_arithmetic", "--out",
                     str(tmp_path / "m.json"), "-o", "rollout.engine=vllm"]) == 2
    err = _one_line_error(capsys, command)
    assert "rollout.engine: vllm is not installed" in err and "scripts/setup_env.sh" in err
    assert not (tmp_path / "runs").exists()
