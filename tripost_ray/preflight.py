"""Everything a job needs, checked before any work starts.

A run that fails after its first hour because the storage backend is not installed, the
output folder is read-only, a problem file has a syntax error, a model folder's
``config.json`` is broken, the generation engine is not installed or an API key is unset
loses that hour. These checks take
seconds, write nothing, and run for ``tripost run`` (``--dry-run`` included) and every run
of ``tripost experiment``; ``tripost eval`` checks its ``--out`` with
:func:`check_output_file` and its engine with :func:`check_engine`. Each failure is a :class:`PreflightError` naming the field.

What cannot be checked without side effects is checked by the first write instead: on an
object store, credentials and the bucket are proven by the run lock's file, written right
after these checks and before Ray starts; a hub model name is checked when it is fetched.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from tripost_ray import storage
from tripost_ray.config import ConfigError, JobConfig, ProviderConfig


class PreflightError(ConfigError):
    """Something a job needs is missing or unusable; the message names the field."""


def check_job(cfg: JobConfig) -> None:
    """Storage, problem files, the model source and API keys of a job; raises
    :class:`PreflightError` (or :class:`~tripost_ray.feedback.providers.MissingCredentialsError`)."""
    check_folder(storage.join(storage.normalize(cfg.storage.path), cfg.run_name), "storage.path")
    if cfg.editing.cache_uri:
        check_folder(cfg.editing.cache_uri, "editing.cache_uri")
    check_problem_files(cfg)
    check_model(cfg)
    check_engine(cfg.rollout.engine)
    check_keys(cfg)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _local_path(url: str, what: str) -> Path | None:
    """The local path of ``url``; None for a remote URL whose backend is installed."""
    try:
        local = storage.is_local(url)
    except storage.StorageError as err:
        raise PreflightError(f"{what}: {err}") from None
    return Path(storage.local_path(url)) if local else None


def check_folder(url: str, what: str) -> None:
    """A folder that can be created or written: the backend is installed and, for a local
    path, the nearest existing ancestor is a writable folder."""
    path = _local_path(url, what)
    if path is None:
        return
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise PreflightError(f"{what}: {url} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{what}: {url} cannot be written: {existing} is not writable")


def check_output_file(url: str, what: str) -> None:
    """A file that can be written (its folder can be created or written; it is not a folder)."""
    path = _local_path(url, what)
    if path is None:
        return
    if path.is_dir():
        raise PreflightError(f"{what}: {url} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise PreflightError(f"{what}: {url} cannot be written: the file is read-only")
    check_folder(str(path.parent), what)


def check_problem_files(cfg: JobConfig) -> None:
    """Load ``task.train_file`` / ``task.test_file`` (every record parsed), when set."""
    from tripost_ray.tasks import ProblemFormatError, UnknownTaskError, get_task, load_problems

    files = {name: getattr(cfg.task, name) for name in ("train_file", "test_file") if getattr(cfg.task, name)}
    if not files:
        return
    try:
        task = get_task(cfg.task.name, **cfg.task.difficulty)
    except UnknownTaskError as err:
        raise PreflightError(f"task.name: {err}") from None
    for name, url in files.items():
        try:
            problems = load_problems(task, url)
        except ProblemFormatError as err:
            raise PreflightError(f"task.{name}: {err}") from None
        if not problems:
            raise PreflightError(f"task.{name}: {url} holds no problems")


def check_model(cfg: JobConfig) -> None:
    """The model source is a readable Hugging Face model folder (nothing is copied or
    downloaded); a source that needs the local model cache needs it writable."""
    from tripost_ray.models import ModelSourceError, check_model_source

    source = cfg.model.source
    try:
        check_model_source(source)
    except ModelSourceError as err:
        raise PreflightError(f"model.source: {err}") from None
    if source != "tiny" and not Path(source).expanduser().exists() and not source.startswith("file://"):
        check_folder(cfg.model.cache_dir, "model.cache_dir")


def check_engine(engine: str, setting: str = "rollout.engine") -> None:
    """The generation engine ``setting`` names is installed here (the driver's
    environment; a cluster's image must have it too)."""
    from tripost_ray.vllm_engine import INSTALL_HINT, vllm_installed

    if engine == "vllm" and not vllm_installed():
        raise PreflightError(f"{setting}: vllm is not installed; {INSTALL_HINT}")


def check_keys(cfg: JobConfig) -> None:
    """Every FBK/IMP provider the job calls has its API key in the environment (sections
    answered by the job's own teacher server need none)."""
    from tripost_ray.feedback.providers import check_credentials, served_by_job_teacher

    scripted = ProviderConfig()
    check_credentials(SimpleNamespace(
        feedback=scripted if served_by_job_teacher(cfg, cfg.feedback) else cfg.feedback,
        improve=scripted if served_by_job_teacher(cfg, cfg.improve) else cfg.improve,
    ))
