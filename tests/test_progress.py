"""The driver's progress: one style for every long stage, bars or (``--quiet``) lines.

Rollouts and editing are the real stages on the session's Ray, run through the real stage
bookkeeping (which names them); training steps travel the real path from a Ray worker
through the step reporter actor to the driver (the Ray Train loop itself reports through
it in tests/test_training_deepspeed.py).
"""

from __future__ import annotations

import logging
import re

import pytest

from tripost_ray import progress
from tripost_ray.config import RolloutConfig, build_config
from tripost_ray.feedback.pool import run_editing
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.rollout import run_rollouts
from tripost_ray.specs import GenerationSpec, JobSpecs, TaskSpec
from tripost_ray.stages import Run
from tripost_ray.tasks import get_task

pytestmark = pytest.mark.integration

TASK = "multistep_arithmetic"
N_PROBLEMS, N_ROLLOUTS, N_STEPS = 6, 10, 5
#: (description, total, unit) of each stage the test runs
STAGES = [("iter 1 · pass 0 · rollouts", N_PROBLEMS, "problems"), ("iter 1 · pass 0 · editing", N_ROLLOUTS, "rollouts"),
          ("iter 1 · train", N_STEPS, "steps")]


@pytest.fixture
def mode():
    """Set the progress mode for one test, and restore the default afterwards."""
    yield progress.configure
    progress.configure("bars")


def _run_stages(tmp_path, tiny_model_dir) -> None:
    import ray

    run = Run(str(tmp_path / "run"))
    problems = get_task(TASK).generate(N_PROBLEMS, "train", seed=1)
    cfg = RolloutConfig(min_actors=1, max_actors=1, num_cpus_per_actor=0.5, torch_threads_per_actor=1, batch_size=4,
                        max_new_tokens=4, self_improve_rounds=0)
    generation = GenerationSpec.build(cfg, TaskSpec(name=TASK), self_improve=False, temperature=0.0, seed=0)
    run.stage("iter_1/pass_0/rollouts", "h",
              lambda url: run_rollouts(problems, tiny_model_dir, generation, url).to_dict())
    job = build_config({"task": {"name": TASK}, "editing": {"num_actors": 1, "concurrency_per_actor": 4}})
    rows = corrupted_rollouts(get_task(TASK), N_ROLLOUTS, seed=2)
    run.stage("iter_1/pass_0/editing", "h", lambda url: run_editing(rows, JobSpecs(job).editing(), url).to_dict())

    def steps(url: str) -> dict:
        reporter = progress.step_reporter()
        report = ray.remote(num_cpus=0)(progress.report_step)  # as rank 0 does, from another process
        fit = lambda: [ray.get(report.remote(reporter, i, N_STEPS)) for i in range(1, N_STEPS + 1)]  # noqa: E731
        return {"steps": len(progress.follow_steps(reporter, fit, poll_s=0.05))}

    run.stage("iter_1/train", "h", steps)


def test_quiet_mode_logs_one_start_and_one_end_line_per_stage_and_no_bar(
        ray_cluster, tiny_model_dir, tmp_path, mode, caplog, capsys):
    mode("lines")
    caplog.set_level(logging.INFO, logger="tripost")
    _run_stages(tmp_path, tiny_model_dir)

    lines = [r.getMessage() for r in caplog.records]
    for desc, total, unit in STAGES:
        mine = [line for line in lines if line.startswith(f"{desc}: ")]
        assert len(mine) == 2, mine
        start = f"{desc}: started" + (f", {total} {unit}" if unit != "steps" else "")  # steps: total unknown at start
        assert mine[0] == start
        assert re.fullmatch(rf"{re.escape(desc)}: done, {total}/{total} {unit} in \d+\.\d s.*", mine[1]), mine[1]
    editing_end = next(line for line in lines if line.startswith("iter 1 · pass 0 · editing: done"))
    assert re.search(r"kept=\d+, discarded=\d+$", editing_end)
    err = capsys.readouterr().err
    assert "%|" not in err, "a progress bar was drawn in quiet mode"


def test_bar_mode_counts_reach_each_stages_total(ray_cluster, tiny_model_dir, tmp_path, mode, caplog, capsys):
    mode("bars")
    caplog.set_level(logging.INFO, logger="tripost")
    _run_stages(tmp_path, tiny_model_dir)

    err = capsys.readouterr().err
    for desc, total, unit in STAGES:
        final = rf"{re.escape(desc)}: 100%\|[^|\n\r]*\| {total}/{total} \["
        assert re.search(final, err), f"no finished bar for {desc!r}"
        assert re.search(rf"{re.escape(desc)}: 100%.*{unit}", err), f"the bar of {desc!r} does not name {unit}"
    assert not [r for r in caplog.records if r.getMessage().startswith("iter 1 · ")], "bars mode also logged lines"
