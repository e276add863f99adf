"""Joining or starting Ray: the one place the package calls ``ray.init``.

Entry points (``tripost run``, ``experiment``, ``eval``, ``serve``, and the benchmark
scripts) call :func:`init_ray` with a :class:`~tripost_ray.config.RayConfig` (a job's ``ray``
section); library functions that need Ray (the trainer, the teacher)
call it without one, which uses a running Ray as it is and otherwise starts a local Ray
with the defaults. Stages that are only ever run by an entry point (rollouts, editing)
require a running Ray instead of starting one behind the caller's back.
"""

from __future__ import annotations

import os

from tripost_ray.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the configured cluster, or start a local Ray sized by ``cfg.num_cpus`` and
    ``cfg.num_gpus``.

    Inside ``ray job submit`` (``RAY_ADDRESS`` set) the job joins its cluster and never
    resizes it. Ray Data's no-progress timeout follows the config; its progress bars are
    off, since the driver shows every stage's progress in one style (:mod:`tripost_ray.progress`).
    """
    import ray
    from ray.data import DataContext

    if cfg is None and ray.is_initialized():
        return  # a library call under a running Ray: the entry point has configured it
    cfg = cfg or RayConfig()
    # Serve marks its HTTP proxy dead if it is not ready within 5 s, which a busy 2-core
    # machine misses; a local cluster started here inherits this more patient limit.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # Workers of a local cluster inherit the driver's environment. No runtime_env is
    # passed: inside `ray job submit` it would conflict with the job's own.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not ray.is_initialized():
        if cfg.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
            ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=cfg.include_dashboard,
                     log_to_driver=cfg.log_to_driver)
        else:
            ray.init(address=None if cfg.address in (None, "local") else cfg.address, log_to_driver=cfg.log_to_driver)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if cfg.no_progress_timeout_s:
        ctx.execution_no_progress_timeout_s = cfg.no_progress_timeout_s
