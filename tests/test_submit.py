"""``tripost submit``: unit tests of what goes into a request, and a real Ray job on a
real head started with ``ray start --head`` (token authentication on, as Ray 2.60 does
by default), followed to SUCCEEDED.

The head is this test's own: it runs ``ray start --block`` in its own process group and
temp dir, and is stopped by signalling that process only. ``ray stop`` is never used: it
would stop every Ray process of the user, the test session's own cluster included.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tripost_ray.config import ConfigError
from tripost_ray.submit import (
    JOB_CONFIG_NAME,
    SubmitError,
    entrypoint,
    ray_auth_headers,
    runtime_env,
    submit_job,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
#: The reduced quickstart the submitted job runs (storage.path and run_name are added).
REDUCED = [
    "iterations=1",
    "task.n_train=24",
    "task.n_test_seen=8",
    "task.n_test_unseen=8",
    "sft.n_examples=24",
    "sft.epochs=1",
    "rollout.max_passes=1",
    "train.epochs=1",
    "postprocess.min_new_examples=0",
    "progress=lines",
    # the job's model is barely trained and writes to its token limit: short attempts, one
    # evaluation round and no verification probe keep the submitted job to what this tests
    "rollout.max_new_tokens=64",
    "eval.max_new_tokens=64",
    "eval.self_improve_rounds=0",
    "eval.verification_per_split=0",
]


# ------------------------------------------------------------------ unit tests


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(body)
    return path


def test_reduced_overrides_name_real_fields():
    from tripost_ray.config import load_config

    cfg = load_config(None, REDUCED + ["teacher.port=8124"])
    assert (cfg.iterations, cfg.task.n_train, cfg.train.epochs) == (1, 24, 1)


def test_the_job_needs_only_the_keys_its_config_names(tmp_path):
    from tripost_ray.config import load_config
    from tripost_ray.feedback.providers import needed_key_names

    cfg = load_config(_config(tmp_path, "improve:\n  provider: openai\n  api_key_env: MY_IMP_KEY\n"))
    assert needed_key_names(cfg) == ["MY_IMP_KEY"]  # feedback is scripted: no key, and never HF_TOKEN & co
    # the job's own teacher answers providers without a base_url: its key is minted by the job
    assert needed_key_names(load_config(QUICKSTART)) == []
    served_elsewhere = load_config(QUICKSTART, ["feedback.provider=anthropic", "feedback.base_url=http://h:1"])
    assert needed_key_names(served_elsewhere) == ["ANTHROPIC_API_KEY"]


def test_entrypoint_and_runtime_env_carry_no_secret(tmp_path):
    env = runtime_env(tmp_path, pip=["s3fs"])
    assert entrypoint() == f"python -m tripost_ray.submit --driver {JOB_CONFIG_NAME}"
    assert env["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["s3fs"]
    assert Path(env["py_modules"][0]).name == "tripost_ray"
    assert "pip" not in runtime_env(tmp_path)  # pip only when asked


def test_ray_auth_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"}) == {}
    assert ray_auth_headers({}) == {}
    assert ray_auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    (tmp_path / "tok").write_text("fromfile\n")
    assert ray_auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == {"Authorization": "Bearer fromfile"}
    assert ray_auth_headers({"RAY_AUTH_MODE": "token"}) == {}  # no default token file yet
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    assert ray_auth_headers({"RAY_AUTH_MODE": "token"}) == {"Authorization": "Bearer default"}
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        ray_auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_submission_is_retried_only_while_the_job_agent_is_not_up():
    from tripost_ray.submit import NO_AGENT_YET, submit_when_agent_ready

    class JobsApi:
        """Answers like a head whose job agent comes up after ``not_ready`` requests."""

        def __init__(self, not_ready: int, other_error: str | None = None):
            self.not_ready, self.other_error, self.requests = not_ready, other_error, 0

        def submit_job(self, **submission) -> str:
            self.requests += 1
            if self.other_error:
                raise RuntimeError(self.other_error)
            if self.requests <= self.not_ready:
                raise RuntimeError(f"Request failed with status code 500: {NO_AGENT_YET}, please try again later..")
            return submission["submission_id"]

    api = JobsApi(not_ready=2)
    assert submit_when_agent_ready(api, 5.0, retry_every_s=0.01, submission_id="s1") == "s1" and api.requests == 3
    with pytest.raises(RuntimeError, match=NO_AGENT_YET):
        submit_when_agent_ready(JobsApi(not_ready=10**6), 0.05, retry_every_s=0.01, submission_id="s2")
    other = JobsApi(not_ready=0, other_error="Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit_when_agent_ready(other, 5.0, retry_every_s=0.01, submission_id="s3")
    assert other.requests == 1


def test_relative_storage_path_is_refused_before_contacting_the_cluster(tmp_path):
    path = _config(tmp_path, "storage:\n  path: ./runs\n")
    # Port 9 (discard) has no job server: reaching it would be a different error.
    with pytest.raises(ConfigError, match="storage.path './runs' is relative"):
        submit_job(path, "http://127.0.0.1:9")


@pytest.mark.parametrize("override, error", [
    ("task.train_file=problems.jsonl", "task.train_file 'problems.jsonl' is relative"),
    ("model.source=./models/m", "model.source './models/m' is relative"),
    ("editing.cache_uri=cache", "editing.cache_uri 'cache' is relative"),
    ("task.test_file=s4://bucket/test.jsonl", r"task.test_file: 's4://bucket/test.jsonl' has a storage protocol fsspec "
                                              r"does not know \(s4://\)"),
])
def test_submission_preflight_refuses_what_the_cluster_could_not_open(tmp_path, override, error):
    with pytest.raises(ConfigError, match=error):  # before the (unreachable) cluster is contacted
        submit_job(QUICKSTART, "http://127.0.0.1:9", ["storage.path=" + str(tmp_path), override])


@pytest.mark.parametrize("override", ["model.source=org/model-name", "task.train_file=s3://bucket/train.jsonl",
                                      "task.test_file=" + str(Path(__file__))])
def test_submission_preflight_leaves_hub_names_known_urls_and_absolute_paths_to_the_cluster(tmp_path, override):
    with pytest.raises(SubmitError, match="cannot reach the Ray job server"):  # the preflight passed
        submit_job(QUICKSTART, "http://127.0.0.1:9", ["storage.path=" + str(tmp_path), override])


def test_bad_config_is_refused_before_contacting_the_cluster(tmp_path):
    path = _config(tmp_path, "train:\n  zero_stage: 7\n")
    with pytest.raises(ConfigError, match="train.zero_stage"):
        submit_job(path, "http://127.0.0.1:9", ["storage.path=" + str(tmp_path)])


def test_cli_submit_reports_an_unreachable_cluster_and_a_bad_config(tmp_path, capsys):
    from tripost_ray import cli

    path = _config(tmp_path, f"storage:\n  path: {tmp_path / 'runs'}\n")
    assert cli.main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err
    assert cli.main(["submit", str(path), "--address", "http://127.0.0.1:9", "-o", "train.epochs=-1"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_cli_submit_flags_reach_submit_job(tmp_path, monkeypatch):
    from tripost_ray import cli, submit

    seen = {}

    def record(config, address, overrides, wait, *, pip):
        seen.update(config=config, address=address, overrides=overrides, wait=wait, pip=pip)
        return "id-1", "FAILED"

    monkeypatch.setattr(submit, "submit_job", record)
    rc = cli.main(["submit", "c.yaml", "--address", "http://h:8265", "-o", "a.b=1", "--runtime-env-pip", "s3fs",
                   "--runtime-env-pip", "gcsfs"])
    assert rc == 1  # a FAILED job is a failing exit code
    assert seen == {"config": "c.yaml", "address": "http://h:8265", "overrides": ["a.b=1"], "wait": True,
                    "pip": ["s3fs", "gcsfs"]}
    monkeypatch.setattr(submit, "submit_job", lambda *a, **k: ("id-2", "PENDING"))
    assert cli.main(["submit", "c.yaml", "--address", "http://h:8265", "--no-wait"]) == 0


# ----------------------------------------------------------- a real Ray head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_containing(root: Path, needle: str) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_socket():
            try:
                if needle.encode() in p.read_bytes():
                    hits.append(p)
            except OSError:
                continue
    return hits


@pytest.fixture(scope="module")
def ray_head():
    """A real head: ``ray start --head --block`` on 127.0.0.1 with token auth, its own
    ports and temp dir, the project venv first on PATH (the job's ``python``), and no
    API key in its environment (so a job that needs one must fail, and say so)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="trs"))  # short: unix socket paths are limited
    port, dash, agent, client = (_free_port() for _ in range(4))
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, TOKENIZERS_PARALLELISM="false")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
           f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent}",
           f"--ray-client-server-port={client}"]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    died = None
    try:
        _wait_for_job_server(address, token, proc, temp_dir)
        yield {"address": address, "token": token, "temp_dir": temp_dir, "pid": proc.pid}
        if proc.poll() is not None:  # the head died under a test: say why before its logs go
            died = _head_logs(temp_dir)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    if died:
        pytest.fail("the Ray head exited during the tests:\n" + died, pytrace=False)


def _head_logs(temp_dir: Path) -> str:
    """The tails of ``ray start``'s output and of the head's own logs."""
    logs = temp_dir / "session_latest" / "logs"
    files = [temp_dir / "head.log", *sorted(logs.glob("*.err")), *sorted(logs.glob("dashboard*.log")),
             logs / "raylet.out", logs / "gcs_server.out"]
    return "\n".join(f"===== {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in files if f.is_file())


def _wait_for_job_server(address: str, token: str, proc: subprocess.Popen, temp_dir: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 240
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("ray start --head exited:\n" + (temp_dir / "head.log").read_text()[-3000:])
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            return
        except (ConnectionError, RuntimeError) as err:
            last = err
            time.sleep(2)
    raise AssertionError(f"the job server at {address} did not come up: {last}")


@pytest.mark.integration
def test_submit_without_the_token_is_refused_with_a_clear_error(ray_head, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    path = _config(tmp_path, "run_name: refused\n")
    with pytest.raises(SubmitError, match="refused the request .*set RAY_AUTH_TOKEN"):
        submit_job(path, ray_head["address"], ["storage.path=" + str(tmp_path / "runs")], wait=False)


def _job_info(ray_head: dict, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {ray_head['token']}"}
    return JobSubmissionClient(ray_head["address"], headers=headers).get_job_info(submission_id)


def _assert_nowhere_on_the_cluster(ray_head: dict, submission_id: str, secret: str) -> None:
    """The value is in no file of the head's session folders (logs included) and not in
    the job table (entrypoint, metadata, runtime_env)."""
    assert _files_containing(ray_head["temp_dir"], secret) == []
    info = _job_info(ray_head, submission_id)
    assert secret not in json.dumps([info.entrypoint, info.metadata, info.runtime_env], default=str)


@pytest.mark.integration
def test_a_key_the_cluster_lacks_fails_the_job_in_one_line_and_is_never_sent(ray_head, tmp_path, monkeypatch):
    secret = "tripost-test-secret-" + secrets.token_hex(12)
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # in the submitter's shell only
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    logs = io.StringIO()
    overrides = REDUCED + [f"storage.path={tmp_path / 'runs'}", "run_name=keyless",
                           "feedback.base_url=http://127.0.0.1:9/v1"]  # a hosted LLM: its key is needed
    submission_id, status = submit_job(QUICKSTART, ray_head["address"], overrides, wait=True,
                                       stage_dir=tmp_path / "stage", log_stream=logs, timeout_s=300)
    out = logs.getvalue()
    assert status == "FAILED", out[-3000:]
    assert "the job reads from the cluster's environment (none is sent): OPENAI_API_KEY" in out
    assert "[tripost job] the config needs OPENAI_API_KEY in the environment of the job's driver" in out
    assert "Traceback" not in out
    assert secret not in out and _files_containing(tmp_path, secret) == []
    _assert_nowhere_on_the_cluster(ray_head, submission_id, secret)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_submit_reduced_quickstart_to_a_real_head(ray_head, tmp_path, monkeypatch):
    assert QUICKSTART.is_file(), f"{QUICKSTART} is missing: the submit test runs the quickstart job"
    secret = "tripost-test-secret-" + secrets.token_hex(12)
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # not needed by the quickstart: must not travel
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    storage = tmp_path / "runs"
    stage = tmp_path / "stage"
    logs = io.StringIO()
    overrides = REDUCED + [f"storage.path={storage}", "run_name=submitted", f"teacher.port={_free_port()}"]

    submission_id, status = submit_job(QUICKSTART, ray_head["address"], overrides, wait=True,
                                       stage_dir=stage, log_stream=logs, timeout_s=1200)
    out = logs.getvalue()
    assert status == "SUCCEEDED", out[-5000:]

    # The quickstart's teacher key is minted by the job; the submitter sent no key ...
    assert "(none is sent): none" in out and "[tripost job] API keys in the environment: none needed" in out
    # ... and the job's outputs are in the storage the submitter named.
    run = storage / "submitted"
    assert (run / "config.yaml").is_file() and (run / "report.json").is_file(), sorted(run.rglob("*"))
    report = json.loads((run / "report.json").read_text())
    assert report, "empty report"

    # The submitter's key is in no file it wrote or uploaded, not in the logs, the run's
    # outputs, or anywhere on the cluster (its session folders, the job table).
    assert secret not in out
    assert (stage / JOB_CONFIG_NAME).is_file()
    assert _files_containing(stage, secret) == []
    assert _files_containing(ROOT / "tripost_ray", secret) == []
    assert _files_containing(run, secret) == []
    _assert_nowhere_on_the_cluster(ray_head, submission_id, secret)
