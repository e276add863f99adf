"""Every setting reaches its code: stage specs, their hashes, and a walk over every config leaf."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from tripost_ray.config import JobConfig, build_config
from tripost_ray.specs import JobSpecs

PACKAGE = Path(__file__).resolve().parents[1] / "tripost_ray"

#: Settings that no stage spec carries, with the code that reads them. Each is a run-level
#: decision (how many iterations, where the run lives, how Ray is reached, what is tracked),
#: not an input of one stage's computation.
RUN_LEVEL: dict[str, str] = {
    "run_name": "the run folder (pipeline.Job) and the live metrics' run label",
    "iterations": "pipeline.tripost_stages: how many iterations",
    "seed": "specs.JobSpecs.editing: the editing actors' seeds (JobConfig.seed + actor)",
    "model.source": "specs.JobSpecs.model_init",
    "rollout.max_passes": "pipeline.tripost_stages: passes per iteration",
    "rollout.target_trajectories": "pipeline.tripost_stages: when to stop passing",
    "sft.epochs": "specs.JobSpecs.sft (and pipeline.Job.sft: 0 skips the warm-up)",
    "postprocess.min_new_examples": "pipeline.tripost_stages: early stop",
    "eval.initial": "pipeline.tripost_stages: evaluate the starting model",
    "eval.every_iteration": "pipeline.tripost_stages: evaluate every iteration",
    "teacher": "pipeline._start_teacher_if_enabled",
    "serve": "serve.model.start_model_server (tripost serve model): serving, not a stage of a run",
    "storage": "pipeline.Job (the run root) and runlock.run_lock",
    "ray": "ray_setup.init_ray",
    "experiment": "experiment.run_experiment",
    "tracking": "tracking.Tracker",
    "progress": "progress.configure, called by the entry points",
    "editing.cache": "pipeline.Job.editing_cache",
    "editing.cache_uri": "pipeline.Job.editing_cache",
    "editing.max_usd": "pipeline.Job.budget_left",
}
#: Purely descriptive settings that no code needs to act on. None today.
DESCRIPTIVE: frozenset[str] = frozenset()


def _all_specs(cfg: JobConfig) -> dict[str, Any]:
    """Every stage spec of ``cfg``, dumped whole (runtime-only fields included: they are given too)."""
    s = JobSpecs(cfg)
    specs = {"problems": s.problems(), "model_init": s.model_init(), "sft": s.sft(), "train": s.train(),
             "rollouts": s.rollouts(1, 0), "eval": s.eval(), "editing": s.editing(), "postprocess": s.postprocess(1)}
    return {name: spec.model_dump(mode="json") for name, spec in specs.items()}


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _other_value(dotted: str, field, value: Any) -> Any:
    """A valid value different from ``value`` for the leaf at ``dotted``."""
    special = {"task.name": "word_sorting", "task.difficulty": {"operand_range": 5}, "model.source": "gpt2",
               "eval.extra_sets": {"extra": {"operand_range": 5}}, "experiment.seeds": [7],
               "experiment.variants": {"w1": {"postprocess.feedback_weight": 1.0}}, "experiment.variant_seeds": [0],
               "train.adam_betas": [0.8, 0.9], "storage.lock_stale_s": 1000.0, "storage.lock_heartbeat_s": 10.0,
               "ray.address": "auto", "train.precision": "fp32",
               "model.tiny.hidden_size": 256, "model.tiny.num_heads": 8}
    if dotted in special:
        return special[dotted]
    ann = field.annotation
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) is Literal:
        return next(a for a in get_args(ann) if a != value)
    if get_origin(ann) in (typing.Union, types.UnionType):  # Optional[X]: perturb as an X
        ann = args[0]
        if get_origin(ann) is Literal:
            return next(a for a in get_args(ann) if a != value)
    if ann is bool:
        return not value
    if ann is int:
        return (value or 0) + 1
    if ann is float:  # inside (0, 1] ranges too (top_p, warmup_ratio)
        return value / 2 if value else 0.25
    if ann is str:
        return (value or "x") + "-other"
    if get_origin(ann) is list:
        return (value or []) + ["x"]
    if get_origin(ann) is dict:
        key_type, value_type = get_args(ann)
        sample = {"Price": {"input_per_mtok": 1.0}, "float": 1.0, "str": "x"}[getattr(value_type, "__name__", "")]
        return {**(value or {}), "other": sample}
    raise AssertionError(f"no perturbation for {dotted} ({ann})")


def _with(cfg: JobConfig, dotted: str, value: Any) -> JobConfig:
    data = cfg.model_dump(mode="json")
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node[key]
    node[last] = value
    return JobConfig.model_validate(data)


def _attributes_read_by_the_package() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def test_every_config_leaf_is_consumed_by_a_stage_or_a_named_run_level_reader():
    """Each leaf either changes some stage's spec, or is a documented run-level setting; and
    in both cases code of the package reads it by name (config.py itself does not count)."""
    base = build_config(None, ["rollout.max_actors=3"])  # room to move min_actors
    base_specs = _all_specs(base)
    read = _attributes_read_by_the_package()
    unconsumed, unread = [], []
    for dotted, field in _leaves(JobConfig):
        node = base
        for key in dotted.split("."):
            node = getattr(node, key)
        other = _with(base, dotted, _other_value(dotted, field, node))
        in_a_spec = _all_specs(other) != base_specs
        run_level = any(dotted == k or dotted.startswith(k + ".") for k in RUN_LEVEL)
        if not (in_a_spec or run_level or dotted in DESCRIPTIVE):
            unconsumed.append(dotted)
        if dotted not in DESCRIPTIVE and dotted.rsplit(".", 1)[-1] not in read:
            unread.append(dotted)
    assert not unconsumed, f"config leaves no stage consumes: {unconsumed}"
    assert not unread, f"config leaves no code reads by name: {unread}"


def test_a_stage_hash_changes_with_its_own_settings_only():
    base = JobSpecs(build_config())
    hashes = lambda s: {k: getattr(s, k)().config_hash() for k in ("problems", "model_init", "sft", "train", "eval",  # noqa: E731
                                                                  "editing")}
    before = hashes(base)

    def changed(*overrides: str) -> set[str]:
        after = hashes(JobSpecs(build_config(None, list(overrides))))
        return {k for k in before if after[k] != before[k]}

    # the warm-up brings its own learning rate and epochs: retuning the iterations' keeps it
    assert changed("train.learning_rate=0.5", "train.epochs=7") == {"train"}
    assert changed("sft.learning_rate=0.5") == {"sft"}
    assert changed("train.micro_batch_size=3") == {"sft", "train"}
    assert changed("sft.n_examples=5") == {"problems"}
    assert changed("postprocess.feedback_weight=1.0") == set()  # post-processing's own spec (per iteration)
    assert changed("eval.batch_size=3") == {"eval"}
    assert changed("model.dtype=float32") == {"eval"}  # and the rollouts': how the actors load the model
    # where things are cached, the budget, progress display, tracking: never a stage's result
    assert changed("editing.max_usd=1", "editing.cache_uri=/elsewhere", "progress=lines",
                   "model.cache_dir=/elsewhere", "tracking.mlflow=false", "ray.num_cpus=1") == set()
    assert changed("editing.verify_direct_correct=true") == {"editing"}


def test_spec_hashes_are_stable_across_processes():
    """No dict-order or hash-seed dependence, so manifests match on resume."""
    code = ("from tripost_ray.config import build_config; from tripost_ray.specs import JobSpecs; "
            "print(JobSpecs(build_config()).rollouts(2, 1).config_hash())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == JobSpecs(build_config()).rollouts(2, 1).config_hash()


def test_the_moved_feedback_weight_says_where_it_went():
    from tripost_ray.config import ConfigError

    with pytest.raises(ConfigError, match="feedback_weight moved to postprocess.feedback_weight"):
        build_config({"train": {"feedback_weight": 1.0}})
    assert build_config(None, ["postprocess.feedback_weight=1.0"]).postprocess.feedback_weight == 1.0




def test_a_field_added_at_its_default_leaves_older_runs_hashes_alone():
    """``postprocess.first_attempt_weight`` came after run folders were written: at its
    default the postprocess hash is the one computed without the field (those runs resume);
    any other value is a different stage."""
    import hashlib
    import json

    spec = JobSpecs(build_config()).postprocess(1)
    older = spec.model_dump(mode="json")
    del older["postprocess"]["first_attempt_weight"]
    assert spec.config_hash() == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    changed = JobSpecs(build_config(None, ["postprocess.first_attempt_weight=0"])).postprocess(1)
    assert changed.config_hash() != spec.config_hash()
