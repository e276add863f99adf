"""One writer per run folder: a lock file, ``<run>/_LOCK.json``, held while a run writes.

Two ``tripost run`` processes on one folder would interleave stage outputs and manifests,
so the second is refused with the holder's host and pid.

* **Local folders** (and network file systems that support it): the lock is an
  ``flock(2)`` on the file. The kernel drops it when the holder dies, however it dies, so a
  lock left by a killed process is stale by construction and is taken over (with a
  warning naming the dead holder); nothing depends on clocks or pids.
* **Object stores** (s3://, gs://, memory://) have no locks. The lock file holds host, pid
  and a heartbeat that the holder rewrites every ``storage.lock_heartbeat_s``; a lock whose
  heartbeat is older than ``storage.lock_stale_s``, or whose holder is a dead pid on this host,
  is stale and taken over. Where the backend has an atomic create-if-absent
  (:data:`tripost_ray.storage.EXCLUSIVE_CREATE`: s3fs on AWS S3, gcsfs, fsspec's memory://),
  the lock file is created only if absent and a stale lock is replaced only by the one process
  that first creates its takeover claim, so of any number of takers starting at once exactly
  one holds the lock. On other backends the lock is read, checked and written (best-effort,
  with a warning): two processes that start within the same moment can both win, and the one
  whose lock was overwritten logs an error at its next heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from tripost_ray import storage
from tripost_ray.config import ConfigError, StorageConfig

log = logging.getLogger("tripost")

LOCK = "_LOCK.json"


class RunLockedError(ConfigError):
    """Another process is writing this run folder."""


def _holder() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "started_at": now, "heartbeat_at": now, "command": " ".join(sys.argv)}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(root: str, cfg: StorageConfig, clock: Callable[[], float] = time.time) -> Iterator[dict]:
    """Hold the lock of run folder ``root`` for the duration of the block; yields the holder
    record. Raises :class:`RunLockedError` when another live process holds it, and
    :class:`~tripost_ray.storage.StorageError` when the folder cannot be written."""
    url = storage.join(root, LOCK)
    if storage.is_local(root):
        with _local_lock(storage.local_path(url)) as holder:
            yield holder
    else:
        with _store_lock(url, cfg, clock) as holder:
            yield holder


@contextmanager
def _local_lock(path: str) -> Iterator[dict]:
    import fcntl

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                previous = _read_fd(fd)
                os.close(fd)
                raise RunLockedError(f"run folder {os.path.dirname(path)} is being written by {_describe(previous)}; "
                                     "wait for that run to finish, or use another run_name") from None
            try:  # the previous holder removes the file as it leaves: lock the file that is there now
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as err:
        raise storage.StorageError(f"cannot write the run folder {os.path.dirname(path)}: {err}") from None
    previous = _read_fd(fd)
    if previous:
        log.warning("run folder %s: taking over the lock left by %s, which no longer holds it (killed?)",
                    os.path.dirname(path), _describe(previous))
    holder = _holder()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    try:
        yield holder
    finally:
        os.remove(path)  # before unlocking, so a waiter that opened this file retries on a new one
        os.close(fd)


def _read_fd(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"pid": "?", "host": "? (unreadable lock file)"}
    return data if isinstance(data, dict) else {}


def _read_store_lock(url: str) -> dict | None:
    try:
        data = storage.read_json(url)
    except FileNotFoundError:
        return None
    except storage.DamagedFileError:
        return {}  # a half-written lock from a killed process: stale
    return data if isinstance(data, dict) else {}


def _stale(holder: dict, cfg: StorageConfig, now: float) -> bool:
    if not holder:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return True
    return now - float(holder.get("heartbeat_at", 0)) > cfg.lock_stale_s


def _locked(root: str, holder: dict, cfg: StorageConfig, now: float) -> RunLockedError:
    return RunLockedError(f"run folder {root} is being written by {_describe(holder)}, last heartbeat "
                          f"{now - float(holder.get('heartbeat_at', 0)):.0f}s ago; wait for that run to finish "
                          f"(a lock without heartbeat for {cfg.lock_stale_s:.0f}s is taken over), "
                          "or use another run_name")


def _take_exclusive(url: str, holder: dict, cfg: StorageConfig, clock: Callable[[], float]) -> None:
    """Take the lock with the store's atomic create-if-absent, or raise :class:`RunLockedError`.

    A stale lock is not deleted and re-created (a taker could delete the lock another had just
    created). It is replaced by whoever first creates its claim, ``<lock>.takeover-<its token>``:
    the claim holds the claimant's record, so a claimant that dies mid-takeover leaves a claim
    that goes stale in turn and is claimed the same way (``<lock>.takeover-<claimant's token>``).
    """
    root = url.rsplit("/", 1)[0]
    data = json.dumps(holder).encode()
    while True:
        if storage.create_exclusive(url, data):
            return
        stale = current = _read_store_lock(url)
        claims: list[str] = []
        while current is not None:
            if not _stale(current, cfg, clock()):
                raise _locked(root, current, cfg, clock())
            # an unreadable record has no token: name its claim by its place, so the chain moves on
            claims.append(f"{url}.takeover-{current.get('token', f'unreadable-{len(claims)}')}")
            if storage.create_exclusive(claims[-1], data):
                break
            current = _read_store_lock(claims[-1])
        else:
            continue  # the lock or a claim went away meanwhile: look again
        again = _read_store_lock(url)
        if again is not None and again.get("token") == stale.get("token"):  # nobody replaced it first
            storage.write_json(url, holder)
            log.warning("run folder %s: taking over the stale lock of %s", root, _describe(stale))
            for claim in claims:
                storage.remove(claim)
            return
        storage.remove(claims[-1])  # a late claim on a lock already replaced: look again


def _take_best_effort(url: str, holder: dict, cfg: StorageConfig, clock: Callable[[], float]) -> None:
    """Read, check, write, read back: two takers at the same moment can both pass."""
    root = url.rsplit("/", 1)[0]
    previous = _read_store_lock(url)
    if previous is not None:
        if not _stale(previous, cfg, clock()):
            raise _locked(root, previous, cfg, clock())
        log.warning("run folder %s: taking over the stale lock of %s", root, _describe(previous))
    storage.write_json(url, holder)
    if (_read_store_lock(url) or {}).get("token") != holder["token"]:
        raise RunLockedError(f"run folder {root}: another process took the lock at the same moment")


@contextmanager
def _store_lock(url: str, cfg: StorageConfig, clock: Callable[[], float]) -> Iterator[dict]:
    root = url.rsplit("/", 1)[0]
    holder = _holder()
    holder["started_at"] = holder["heartbeat_at"] = clock()
    try:
        if storage.has_exclusive_create(url):
            _take_exclusive(url, holder, cfg, clock)
        else:
            log.warning("run folder %s: this storage backend has no atomic create-if-absent, so the run lock is "
                        "best-effort: two runs started at the same moment can both take it", root)
            _take_best_effort(url, holder, cfg, clock)
    except OSError as err:
        raise storage.StorageError(f"cannot write the run folder {root}: {err}") from None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(cfg.lock_heartbeat_s):
            try:
                current = _read_store_lock(url) or {}
                if current.get("token") != holder["token"]:
                    log.error("run folder %s: the lock was taken over by %s", root, _describe(current))
                    return
                storage.write_json(url, {**holder, "heartbeat_at": clock()})
            except OSError as err:  # a store hiccup: the next beat tries again
                log.warning("run folder %s: could not renew the lock's heartbeat (%s)", root, err)

    thread = threading.Thread(target=beat, name="tripost-run-lock", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        if (_read_store_lock(url) or {}).get("token") == holder["token"]:
            storage.remove(url)
