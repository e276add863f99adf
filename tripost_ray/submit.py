"""``tripost submit``: run a TriPosT job on a Ray cluster as a Ray job.

What is sent (``ray job submit`` semantics, through the Ray Jobs REST API):

* the job config, resolved and validated here first (with :func:`check_submission`),
  as ``job.yaml`` in a small working dir of its own (so a bad field fails before
  anything is uploaded, and the cluster runs exactly the config that was checked);
* this package as a ``py_modules`` entry, so the cluster runs the submitter's code;
  pip requirements only when asked (a cluster image normally has them installed);
* no secret. Everything a submission carries (entrypoint, metadata, runtime_env with
  its ``env_vars``) lands in the cluster's job table, readable by anyone who can reach
  the dashboard / Jobs API, and a runtime_env is also written in plain text into every
  node's ``runtime_env_agent.log`` (ray-project/ray#39502). The Jobs API has no other
  channel to the driver, so API keys are not sent at all: the job's driver reads the
  keys its config names from *its own* environment, which the cluster provides (KubeRay:
  a Secret in the head pod's env; ``ray start``: the environment it was started in; see
  docs/DEPLOY.md). The submitter prints the names the job will need, and the driver
  checks them before any work and fails in one line naming what is missing. Inside the
  job the keys reach the editing actors in memory (:mod:`tripost_ray.feedback.keys`).

Ray 2.60 token authentication: the token is sent as a bearer header when
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is set, or when ``RAY_AUTH_MODE=token``
and Ray's default token file (``~/.ray/auth_token``) exists.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TextIO

from tripost_ray.config import JobConfig, load_config

#: The job's config inside its working dir.
JOB_CONFIG_NAME = "job.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: What the Jobs API answers while the head's job agent is not up yet (just after
#: ``ray start``, or on a loaded head); a submission then is worth retrying.
NO_AGENT_YET = "No available agent to submit job"
PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGE_EXCLUDES = ["__pycache__", "*.pyc", "*.egg-info"]


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says what to do."""


# ------------------------------------------------------------------------- auth


def ray_auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The bearer header for a token-authenticated Ray 2.60 cluster, or ``{}``.

    Passed explicitly to the client so the token that is used is the one the
    environment names, not whatever Ray's own default token file holds.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror})") from None
    if not token and mode == "token":
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------ the request


def runtime_env(work_dir: Path, pip: list[str] | None = None) -> dict:
    """The job's runtime_env: its own working dir, this package, optional pip; no secret."""
    env: dict = {
        "working_dir": str(work_dir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": list(_PACKAGE_EXCLUDES),
        "env_vars": {"TOKENIZERS_PARALLELISM": "false"},
    }
    if pip:
        env["pip"] = list(pip)
    return env


def entrypoint(force: bool = False) -> str:
    """The job's shell command: the job driver of this module on ``job.yaml``."""
    cmd = ["python", "-m", "tripost_ray.submit", "--driver", JOB_CONFIG_NAME]
    if force:
        cmd.append("--force")
    return shlex.join(cmd)


#: The fields that name something the job's driver opens on the cluster (files, folders, URLs).
LOCATIONS = ("storage.path", "editing.cache_uri", "task.train_file", "task.test_file", "model.source")


def check_submission(cfg: JobConfig) -> None:
    """The preflight of a submission: what can be known on the submitting machine about
    what the job will open on the cluster, checked before anything is sent. Raises
    :class:`~tripost_ray.preflight.PreflightError` naming the field.

    * A relative local path in :data:`LOCATIONS` is refused: on the cluster it would point
      into the job's temporary working dir (storage lost, files not found). A
      ``model.source`` that does not look like a path (``org/name``) is a hub name.
    * A URL whose protocol fsspec does not know (``s4://``) is refused; a known protocol
      passes even when its backend is not installed here, since it is the cluster's image
      that needs it.
    * Not checked here, by design: absolute paths (this machine's filesystem may not be the
      cluster's) and API keys (the job's driver reads them from the cluster's environment,
      never from the submitter's, and none is sent). The job's driver runs the full
      preflight (:func:`~tripost_ray.preflight.check_job`) on the cluster before any work,
      and fails in one line.
    """
    from fsspec.registry import known_implementations, registry

    from tripost_ray.preflight import PreflightError

    for field in LOCATIONS:
        section, name = field.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or (field == "model.source" and value == "tiny"):
            continue
        if "://" in value:
            protocol = value.split("://", 1)[0]
            if protocol not in known_implementations and protocol not in registry:
                raise PreflightError(f"{field}: {value!r} has a storage protocol fsspec does not know ({protocol}://)")
            continue
        hub_name = field == "model.source" and not value.startswith((".", "~")) and not Path(value).exists()
        if not hub_name and not Path(value).expanduser().is_absolute():
            raise PreflightError(
                f"{field} {value!r} is relative: on the cluster it would point inside the job's temporary working "
                f"dir; pass -o {field}=s3://bucket/... (or gs://..., or an absolute path on a filesystem the "
                "cluster shares)")


def submit_job(
    config_path: str | Path,
    address: str,
    overrides: list[str] | None = None,
    wait: bool = True,
    *,
    pip: list[str] | None = None,
    force: bool = False,
    stage_dir: str | Path | None = None,
    log_stream: TextIO | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
    agent_wait_s: float = 60.0,
) -> tuple[str, str]:
    """Submit a job config to the Ray cluster at ``address``; returns (submission_id, status).

    ``wait``: follow the job's logs to ``log_stream`` (default stdout) until it ends, and
    return its final status; otherwise return right after submission. ``stage_dir``: where
    the job's working dir is built (default: a temporary dir removed after upload).
    ``timeout_s``: give up waiting (the job keeps running) with a :class:`SubmitError`.
    ``agent_wait_s``: how long to retry while the head's job agent is not up yet.
    """
    from ray.exceptions import AuthenticationError

    from tripost_ray.feedback.providers import needed_key_names

    cfg = load_config(config_path, overrides)
    check_submission(cfg)
    keys = needed_key_names(cfg)
    client = _client(address)
    submission_id = f"tripost-{cfg.run_name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="tripost-submit-") as tmp:
        work = Path(stage_dir) if stage_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / JOB_CONFIG_NAME).write_text(cfg.to_yaml())
        try:
            submit_when_agent_ready(
                client, agent_wait_s,
                entrypoint=entrypoint(force),
                runtime_env=runtime_env(work, pip),
                submission_id=submission_id,
                metadata={"tripost_run_name": cfg.run_name, "tripost_config": str(config_path)},
            )
        except AuthenticationError as err:
            raise SubmitError(_auth_help(address, err)) from None
    out = log_stream or sys.stdout
    print(f"submitted {submission_id} to {address}; API keys the job reads from the cluster's environment "
          f"(none is sent): {', '.join(keys) or 'none'}", file=out, flush=True)
    if not wait:
        return submission_id, str(client.get_job_status(submission_id).value)
    return submission_id, follow_job(client, submission_id, out, timeout_s=timeout_s, poll_s=poll_s)


def submit_when_agent_ready(client, wait_s: float, retry_every_s: float = 2.0, **submission) -> str:
    """``client.submit_job(**submission)``, retried while the Jobs API says its agent is not
    up yet (nothing was submitted then); any other error, or the same one after
    ``wait_s``, is raised."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**submission)
        except RuntimeError as err:
            if NO_AGENT_YET not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(retry_every_s)


def _auth_help(address: str, err: Exception) -> str:
    first = str(err).splitlines()[0]
    return (f"the Ray job server at {address} refused the request ({first}): the cluster uses Ray token "
            "authentication; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")


def _client(address: str):
    """A Jobs API client with this environment's Ray auth token, or a clear error."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=ray_auth_headers())
    except AuthenticationError as err:
        raise SubmitError(_auth_help(address, err)) from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"cannot reach the Ray job server at {address} ({err})") from None


def follow_job(client, submission_id: str, out: TextIO, *, timeout_s: float | None = None,
               poll_s: float = 2.0) -> str:
    """Stream a job's logs to ``out`` until it ends; returns its final status."""
    import aiohttp

    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        raise SubmitError(f"job {submission_id} still running after {timeout_s} s (it keeps running)") from None
    except (OSError, aiohttp.ClientError, RuntimeError) as err:  # the stream broke: poll the status instead
        print(f"[tripost submit] log stream ended ({type(err).__name__}); polling the status", file=out)
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {submission_id} still {status} after {timeout_s} s (it keeps running)")
        time.sleep(poll_s)


# ------------------------------------------------------------------------- CLI


def _driver(argv: list[str]) -> int:
    """The job's entrypoint on the cluster: check that the cluster's environment holds
    the API keys the config needs (names only are printed), then run the config like
    ``tripost run``."""
    import argparse

    from tripost_ray import cli

    parser = argparse.ArgumentParser(prog="python -m tripost_ray.submit")
    parser.add_argument("--driver", required=True, metavar="CONFIG")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    from tripost_ray.feedback.providers import needed_key_names

    cfg = load_config(args.driver)
    needed = needed_key_names(cfg)
    missing = [n for n in needed if not os.environ.get(n)]
    if missing:
        print(f"[tripost job] the config needs {', '.join(missing)} in the environment of the job's driver "
              "(the cluster's head); set it there (KubeRay: a secretKeyRef env of the head pod; ray start: "
              "export it first), see docs/DEPLOY.md", file=sys.stderr, flush=True)
        return 2
    print(f"[tripost job] API keys in the environment: {', '.join(needed) or 'none needed'} (values not shown)",
          flush=True)
    return cli.main(["run", args.driver] + (["--force"] if args.force else []))


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1:]))
