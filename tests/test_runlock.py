"""One writer per run folder: a second run is refused, a dead holder's lock is taken over.

Local folders use a real second process holding the real lock (flock), killed with
SIGKILL; object stores are exercised on fsspec's memory:// with an injected clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tripost_ray import storage
from tripost_ray.cli import main
from tripost_ray.config import StorageConfig
from tripost_ray.runlock import LOCK, RunLockedError, run_lock

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"

HOLDER = """
import sys
from tripost_ray.config import StorageConfig
from tripost_ray.runlock import run_lock
with run_lock(sys.argv[1], StorageConfig()):
    print("locked", flush=True)
    sys.stdin.read()  # hold until killed (or stdin closes)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process that holds the lock of ``tmp_path / 'run'``."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_writer_is_refused_naming_the_holder(holder):
    run, proc = holder
    with pytest.raises(RunLockedError) as err:
        with run_lock(str(run), StorageConfig()):
            pytest.fail("two writers held one run folder")
    assert f"pid {proc.pid} on host {socket.gethostname()}" in str(err.value) and "\n" not in str(err.value)


def test_tripost_run_on_a_locked_folder_exits_2_before_any_work(holder, monkeypatch, capsys):
    run, proc = holder
    monkeypatch.setattr("tripost_ray.pipeline.init_ray", lambda *a, **k: pytest.fail("work started"))
    before = sorted(p.name for p in run.iterdir())
    code = main(["run", str(QUICKSTART), "-o", f"storage.path={run.parent}", "-o", "run_name=run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tripost run: run folder") and str(proc.pid) in err
    assert sorted(p.name for p in run.iterdir()) == before == [LOCK]


def test_lock_of_a_killed_process_is_taken_over(holder, caplog):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = run / LOCK
    assert json.loads(lock.read_text())["pid"] == proc.pid, "the dead holder's lock file is still there"
    with run_lock(str(run), StorageConfig()) as mine:
        assert json.loads(lock.read_text())["pid"] == os.getpid() == mine["pid"]
    assert f"pid {proc.pid}" in caplog.text and "taking over" in caplog.text
    assert not lock.exists(), "the lock file leaves with its holder"


def test_object_store_lock_heartbeat_refusal_and_takeover(caplog):
    root = f"memory://runs/{uuid.uuid4().hex}"
    cfg = StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)
    url = storage.join(root, LOCK)
    now = [1_000_000.0]
    with run_lock(root, cfg, clock=lambda: now[0]):
        assert storage.read_json(url)["pid"] == os.getpid()
        now[0] += 60  # a live holder: refused
        with pytest.raises(RunLockedError, match="last heartbeat 60s ago"):
            with run_lock(root, cfg, clock=lambda: now[0]):
                pytest.fail("two writers held one run folder")
    assert not storage.exists(url)

    # a holder on another host whose heartbeat stopped longer ago than lock_stale_s: stale
    storage.write_json(url, {"host": "elsewhere", "pid": 1, "heartbeat_at": now[0] - 10_001, "started_at": 0})
    with run_lock(root, cfg, clock=lambda: now[0]):
        assert storage.read_json(url)["pid"] == os.getpid()
    assert "taking over the stale lock of pid 1 on host elsewhere" in caplog.text

    # a holder on this host whose process is gone: stale at once, whatever its heartbeat says
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.write_json(url, {"host": socket.gethostname(), "pid": dead.pid, "heartbeat_at": now[0], "started_at": 0})
    with run_lock(root, cfg, clock=lambda: now[0]):
        assert storage.read_json(url)["pid"] == os.getpid()


def test_object_store_lock_renews_its_heartbeat():
    import threading

    root = f"memory://runs/{uuid.uuid4().hex}"
    url = storage.join(root, LOCK)
    ticks = iter(range(1_000_000))
    with run_lock(root, StorageConfig(lock_heartbeat_s=0.01, lock_stale_s=1.0), clock=lambda: float(next(ticks))):
        first = storage.read_json(url)["heartbeat_at"]
        renewed = threading.Event()
        for _ in range(3000):  # the heartbeat thread rewrites the file; wait for it
            if storage.read_json(url)["heartbeat_at"] > first:
                renewed.set()
                break
            renewed.wait(0.01)
        assert renewed.is_set()
        assert storage.read_json(url)["pid"] == os.getpid()
    assert not storage.exists(url)
