"""One writer per run folder: a second run is refused, a dead holder's lock is taken over.

Local folders use a real second process holding the real lock (flock), killed with
SIGKILL; object stores are exercised on fsspec's memory:// with an injected clock, and with
threads released together for takers at the same moment (memory:// is one process's store).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

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


@pytest.fixture
def fast_thread_switches():
    """Switch threads every microsecond (CPython's default is 5 ms), so that threads released
    together interleave inside the lock code instead of running one after another."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _race(root: str, takers: int, cfg: StorageConfig) -> tuple[list[dict], list[str]]:
    """``takers`` threads released at once all try to lock ``root``; each winner holds the lock
    until every taker has tried. Returns the winners' holder records and the refusals."""
    import threading

    start, tried = threading.Barrier(takers), threading.Barrier(takers)
    won: list[dict] = []
    refused: list[str] = []

    def take() -> None:
        start.wait()
        try:
            with run_lock(root, cfg) as mine:
                won.append(mine)
                tried.wait()
        except RunLockedError as err:
            refused.append(str(err))
            tried.wait()

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_object_store_lock_taken_at_the_same_moment_has_one_holder(fast_thread_switches):
    cfg = StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)
    for _ in range(10):  # each round a fresh folder; any round with two holders fails
        root = f"memory://runs/{uuid.uuid4().hex}"
        won, refused = _race(root, 8, cfg)
        assert len(won) == 1 and len(refused) == 7, f"{len(won)} holders at once"
        assert all(f"is being written by pid {os.getpid()}" in message for message in refused), refused
        assert not storage.exists(storage.join(root, LOCK))


def test_stale_object_store_lock_taken_over_by_two_at_once_has_one_holder(fast_thread_switches, caplog):
    cfg = StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)
    for _ in range(10):
        root = f"memory://runs/{uuid.uuid4().hex}"
        url = storage.join(root, LOCK)
        storage.write_json(url, {"host": "elsewhere", "pid": 1, "token": "stale", "heartbeat_at": 0, "started_at": 0})
        won, refused = _race(root, 2, cfg)
        assert len(won) == 1 and len(refused) == 1, f"{len(won)} holders at once"
        assert f"is being written by pid {os.getpid()}" in refused[0], "the loser names the winner, not the stale one"
        assert not storage.exists(url)
        assert storage.file_sizes(root) == {}, "no takeover claim is left behind"
    assert "taking over the stale lock of pid 1 on host elsewhere" in caplog.text


def test_takeover_claim_of_a_dead_claimant_is_claimed_in_turn(caplog):
    """A process that died between claiming a stale lock and replacing it leaves its claim; the
    claim names it, so a live claimant refuses the next taker and a stale one is claimed over."""
    cfg = StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)
    root = f"memory://runs/{uuid.uuid4().hex}"
    url = storage.join(root, LOCK)
    storage.write_json(url, {"host": "elsewhere", "pid": 1, "token": "stale", "heartbeat_at": 0, "started_at": 0})
    claimant = {"host": "claimant-host", "pid": 2, "token": "claimant", "heartbeat_at": time.time(), "started_at": 0}
    storage.write_json(f"{url}.takeover-stale", claimant)
    with pytest.raises(RunLockedError, match="being written by pid 2 on host claimant-host"):
        with run_lock(root, cfg):
            pytest.fail("took a lock that a live process is taking over")

    storage.write_json(f"{url}.takeover-stale", {**claimant, "heartbeat_at": 0})
    with run_lock(root, cfg):
        assert storage.read_json(url)["pid"] == os.getpid()
        assert sorted(storage.file_sizes(root)) == [LOCK], "the claims leave once the lock is taken"
    assert "taking over the stale lock of pid 1 on host elsewhere" in caplog.text


class NoExclusiveCreateFileSystem(MemoryFileSystem):
    """Stand-in for a storage backend without an atomic create-if-absent (pyarrow's HDFS, FTP, ...):
    fsspec's in-memory store under its own protocol, refusing the "xb" mode as pyarrow's does."""

    protocol = "noxmemory"
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("noxmemory://"))

    def _open(self, path, mode="rb", **kwargs):
        if "x" in mode:
            raise ValueError(f"unsupported file mode for {type(self).__name__}: {mode!r}")
        return super()._open(path, mode, **kwargs)


def test_lock_without_exclusive_create_is_best_effort_and_says_so(caplog):
    fsspec.register_implementation("noxmemory", NoExclusiveCreateFileSystem, clobber=True)
    root = f"noxmemory://runs/{uuid.uuid4().hex}"
    url = storage.join(root, LOCK)
    assert not storage.has_exclusive_create(url)
    cfg = StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)
    with run_lock(root, cfg):
        assert storage.read_json(url)["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"being written by pid {os.getpid()}"):
            with run_lock(root, cfg):
                pytest.fail("two writers held one run folder")
    assert not storage.exists(url)
    assert "no atomic create-if-absent, so the run lock is best-effort" in caplog.text

    storage.write_json(url, {"host": "elsewhere", "pid": 1, "token": "stale", "heartbeat_at": 0, "started_at": 0})
    with run_lock(root, cfg):
        assert storage.read_json(url)["pid"] == os.getpid()
    assert "taking over the stale lock of pid 1 on host elsewhere" in caplog.text


def test_unreadable_object_store_lock_and_claim_are_taken_over():
    root = f"memory://runs/{uuid.uuid4().hex}"
    url = storage.join(root, LOCK)
    fs, path = storage.fs_for(url)
    fs.pipe_file(path, b'{"host": ')  # a lock and a claim cut short: no holder can be read from them
    fs.pipe_file(f"{path}.takeover-unreadable-0", b"")
    with run_lock(root, StorageConfig(lock_heartbeat_s=3600, lock_stale_s=10_000)):
        assert storage.read_json(url)["pid"] == os.getpid()
        assert sorted(storage.file_sizes(root)) == [LOCK]
