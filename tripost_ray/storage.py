"""Run storage on any fsspec URL: atomic JSON, Parquet tables, and model folders.

Every stage writes through these helpers so a run can live in a local directory, in
object storage (s3://, gs://) or in memory:// for tests, with the same code. Writes
are atomic (write to a temporary name, then move) so a killed job never leaves a
half-written manifest that a re-run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations

from tripost_ray.config import ConfigError

#: fsspec backends this project installs through an extra of its own (``pip install 'tripost-ray[s3]'``).
BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

#: Filesystems whose create-if-absent (``pipe_file(..., mode="create")``) is one atomic step at
#: the store: s3fs sends a PUT with ``If-None-Match: *`` (AWS S3, and S3-compatible stores that
#: honour it), gcsfs an upload with ``ifGenerationMatch=0`` (marked experimental by gcsfs), and
#: fsspec's in-memory store checks and sets under :data:`_CREATE`. Other backends cannot be
#: trusted with it: fsspec's fallback checks, then writes; some refuse the ``"xb"`` mode
#: (ValueError for pyarrow's, NotImplementedError for HTTP) and some take it and overwrite.
EXCLUSIVE_CREATE = frozenset({"s3fs.core.S3FileSystem", "gcsfs.core.GCSFileSystem",
                              "fsspec.implementations.memory.MemoryFileSystem"})
#: The in-memory store's create is a check, then a set, which two threads can both pass; one
#: process's creates go one at a time (rare, cheap calls, so the other backends lose nothing).
_CREATE = threading.Lock()


class StorageError(ConfigError):
    """A storage URL that cannot be used (no backend, not writable); the message names it."""


class DamagedFileError(StorageError):
    """A file of a run that exists but cannot be read (truncated, overwritten, not the format)."""


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normalize(url: str) -> str:
    """Expand ``~`` and make local paths absolute (Ray workers may run elsewhere)."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url``; a missing backend package or an unknown protocol is a
    :class:`StorageError` that names the package and the extra that installs it."""
    try:
        return url_to_fs(url)
    except ImportError:
        protocol = url.split("://", 1)[0]
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        extra = BACKEND_EXTRAS.get(protocol)
        how = f"pip install 'tripost-ray[{extra}]'" if extra else f"pip install {package}"
        raise StorageError(f"{url}: the {protocol}:// protocol needs the package {package}, "
                           f"which is not installed ({how})") from None
    except ValueError as err:  # "Protocol not known: foo"
        raise StorageError(f"{url}: not a storage URL fsspec can open ({err})") from None


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    return fs.exists(path)


def remove(url: str) -> None:
    fs, path = fs_for(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def has_exclusive_create(url: str) -> bool:
    """Whether :func:`create_exclusive` works on ``url``'s backend (see :data:`EXCLUSIVE_CREATE`)."""
    fs, _ = fs_for(url)
    return f"{type(fs).__module__}.{type(fs).__qualname__}" in EXCLUSIVE_CREATE


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` holding ``data`` if no file is there, in one atomic step: of several
    processes creating the same file at once exactly one gets True, the others False.
    Raises ``NotImplementedError`` on a backend without it (:func:`has_exclusive_create`)."""
    if not has_exclusive_create(url):
        raise NotImplementedError(f"{url}: this storage backend has no atomic create-if-absent")
    fs, path = fs_for(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    try:
        with _CREATE:
            fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name beside ``url``, then rename: readers never see half a file."""
    fs, path = fs_for(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode())


def write_json(url: str, data: Any) -> None:
    write_text_atomic(url, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(url: str) -> Any:
    """Parse a JSON file; a damaged one is a :class:`DamagedFileError` naming it."""
    fs, path = fs_for(url)
    data = fs.cat_file(path)  # not open().read(): the in-memory store hands every reader one shared file position
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{url} is damaged: not valid JSON ({err})") from None


def write_table(url: str, rows: list[dict], schema: pa.Schema | None = None) -> None:
    """Write rows as one Parquet file (atomic)."""
    fs, path = fs_for(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}.parquet"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def read_table(url: str) -> list[dict]:
    """Read a Parquet file or a directory of Parquet files into rows."""
    fs, path = fs_for(url)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/.tmp-" not in p)
    else:
        files = [path]
    rows: list[dict] = []
    for file in files:
        with fs.open(file, "rb") as f:
            # use_threads=False: a threaded Parquet read leaves Arrow's thread pool in a
            # state that aborts the interpreter at exit about one run in three
            # (pyarrow 26, "terminate called without an active exception").
            try:
                table = pq.read_table(pa.BufferReader(f.read()), use_threads=False)
            except pa.ArrowException as err:  # truncated, overwritten, not Parquet
                shown = url if file == path else join(url, file[len(path.rstrip("/")):])
                raise DamagedFileError(f"{shown} is damaged: not a readable Parquet file "
                                       f"({str(err).splitlines()[0]})") from None
            rows.extend(table.to_pylist())
    return rows


def file_sizes(url: str) -> dict[str, int]:
    """Size of every file under a folder, keyed by path relative to it (empty if absent)."""
    fs, path = fs_for(url)
    if not fs.exists(path):
        return {}
    base = path.rstrip("/") + "/"
    return {p[len(base):]: int(info["size"]) for p, info in fs.find(path, detail=True).items()
            if info.get("type") == "file"}


def publish_dir(src: str, dst_url: str) -> None:
    """Copy a local folder to ``dst_url``, replacing what is there; a local destination
    is swapped in with a rename, so a reader never sees a half-written folder."""
    if is_local(dst_url):
        dst = local_path(dst_url)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        staging = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, staging)
        if os.path.exists(dst):
            old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
        return
    fs, path = url_to_fs(dst_url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    for name in sorted(os.listdir(src)):
        fs.put(os.path.join(src, name), f"{path.rstrip('/')}/{name}", recursive=True)


@contextmanager
def local_copy_dir(url: str, what: str = "folder") -> Iterator[str]:
    """A local folder holding the contents of ``url``: the folder itself if it is local,
    else a temporary copy that is removed when the block ends (libraries such as
    transformers load a model or tokenizer only from a local path). A missing folder is a
    ``FileNotFoundError`` that says ``what`` was looked for."""
    fs, path = fs_for(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{what} not found: {url}")
    if is_local(url):
        yield local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="tripost-") as tmp:
        download_dir(url, tmp)
        yield tmp


def download_dir(url: str, dest: str) -> None:
    """Copy every file under the folder at ``url`` into the local folder ``dest``, at the
    same relative paths: the one copy of a remote model folder to local disk, behind both
    :func:`local_copy_dir` (a temporary copy) and ``models.resolve_model_source`` (a cached
    one). One ``get`` of explicit file lists: the same result on every fsspec backend, and
    concurrent on the async ones (S3, GCS)."""
    fs, path = fs_for(url)
    root = path.rstrip("/")
    remote = sorted(fs.find(root))
    local = [os.path.join(dest, r[len(root):].lstrip("/")) for r in remote]
    for file in local:
        os.makedirs(os.path.dirname(file), exist_ok=True)
    fs.get(remote, local)


def is_local(url: str) -> bool:
    fs, _ = fs_for(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def local_path(url: str) -> str:
    """The filesystem path of a local URL; raises for remote storage."""
    if not is_local(url):
        raise ValueError(f"{url} is not on the local filesystem")
    return fs_for(url)[1] if "://" in url else os.path.abspath(os.path.expanduser(url))
