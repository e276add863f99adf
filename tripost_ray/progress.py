"""Progress of the driver's long stages, in one style.

Every long stage (rollouts, editing, training steps, evaluation) reports through
:func:`track` (or :func:`iterate`): a tqdm bar described by the stage's name
("iter 1 · pass 0 · rollouts", "sft", "iter 2 · eval") and the unit it counts
(problems, rollouts, steps), or, with the job's ``progress: lines`` (``--quiet``), one log
line when the stage starts and one when it ends (count and elapsed time) and no bar, so CI
logs stay readable. Ray Data's own bars stay off (:func:`tripost_ray.ray_setup.init_ray`):
the rollout and evaluation stages count their problems as the driver writes them.

The stage's name comes from :func:`stage`, which the run's stage bookkeeping sets around
each stage's body; the mode from :func:`configure`, called once by each entry point.

Training runs on Ray Train workers while ``trainer.fit()`` blocks the driver: rank 0
reports each finished step to a small actor (:func:`step_reporter`, :func:`report_step`)
that the driver polls from a thread (:func:`follow_steps`). Ray Train's own metric reports
reach the driver only at ``ray.train.report`` calls (every ``train.log_every_steps``
steps, each a sync of all ranks), too coarse and too dear for a per-step count.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

log = logging.getLogger("tripost")

Mode = Literal["bars", "lines"]
T = TypeVar("T")

_mode: Mode = "bars"
_stage: ContextVar[str | None] = ContextVar("tripost_progress_stage", default=None)


def configure(mode: Mode) -> None:
    """Set how the driver shows progress (the job's ``progress`` setting)."""
    global _mode
    _mode = mode


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage whose progress is tracked inside this block (e.g. ``iter_1/pass_0/rollouts``)."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


def describe(what: str) -> str:
    """The description of a bar or line: the current stage's name (``iter_1/eval`` ->
    ``iter 1 · eval``), or ``what`` outside any stage (``tripost eval``, benchmarks)."""
    name = _stage.get() or what
    return " · ".join(part.replace("_", " ") for part in name.split("/"))


class Progress:
    """The progress of one stage: a tqdm bar, or a start line now and an end line at :meth:`close`."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._started = time.monotonic()
        self._bar = None
        if _mode == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}")
        else:
            log.info("%s: started%s", desc, f", {total} {unit}" if total is not None else "")

    def update(self, n: int = 1) -> None:
        self.set(self.n + n, self.total)

    def set(self, n: int, total: int | None) -> None:
        """Absolute count (and total, once known): what a remote reporter says."""
        if self._bar is not None:
            if total != self.total:
                self._bar.total = total
            self._bar.update(n - self.n)
        self.n, self.total = n, total

    def set_postfix(self, **values: Any) -> None:
        """Running counts shown beside the bar (and in the end line)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        log.info("%s: %s %s %s in %.1f s%s", self.desc, "failed at" if failed else "done,", count, self.unit,
                 time.monotonic() - self._started, extra)


@contextmanager
def track(what: str, total: int | None, unit: str) -> Iterator[Progress]:
    """The progress of one stage's work (see :func:`describe` for its name)."""
    progress = Progress(describe(what), total, unit)
    try:
        yield progress
    except BaseException:
        progress.close(failed=True)
        raise
    progress.close()


def iterate(items: Iterable[T], what: str, total: int, unit: str,
            count: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """``items``, counting ``count(item)`` once the consumer has handled each item."""
    with track(what, total, unit) as progress:
        for item in items:
            yield item
            progress.update(count(item))


# ----------------------------------------------------------------- training steps


class StepCounter:
    """The latest (finished steps, total steps) reported by training rank 0 (a Ray actor)."""

    def __init__(self) -> None:
        self.done, self.total = 0, None

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def get(self) -> tuple[int, int | None]:
        return self.done, self.total


def step_reporter():
    """A fresh :class:`StepCounter` actor for one training run (no CPU: workers hold them all)."""
    import ray

    return ray.remote(num_cpus=0)(StepCounter).remote()


def report_step(reporter, done: int, total: int) -> None:
    """On a training worker: tell the driver a step finished (fire and forget, except the
    last step, which is recorded before training ends: the driver's final count is exact)."""
    if reporter is None:
        return
    ref = reporter.report.remote(done, total)
    if done == total:
        import ray

        ray.get(ref)


def follow_steps(reporter, fit: Callable[[], T], what: str = "train", poll_s: float = 0.5) -> T:
    """Run ``fit()`` (blocking) while the driver polls ``reporter`` into a progress bar of
    steps; the reporter is killed afterwards. Progress never fails the training: a poll
    that fails only stops the polling."""
    import ray

    stop = threading.Event()
    with track(what, None, "steps") as progress:
        def follow() -> None:
            try:
                while not stop.wait(poll_s):
                    progress.set(*ray.get(reporter.get.remote()))
            except Exception as err:  # noqa: BLE001 - a progress display is not worth a failed run
                log.warning("%s: step progress unavailable (%s)", progress.desc, err)

        thread = threading.Thread(target=follow, name="tripost-train-progress", daemon=True)
        thread.start()
        try:
            result = fit()
            stop.set()
            thread.join()
            progress.set(*ray.get(reporter.get.remote()))  # the last steps, reported after the latest poll
        finally:
            stop.set()
            ray.kill(reporter)
    return result
