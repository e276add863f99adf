"""The experiment's child job configs: where they live and what each one overrides."""

from __future__ import annotations

import pytest

from tripost_ray.config import ConfigError, JobConfig, set_dotted
from tripost_ray.experiment import arm_config, sft_config


@pytest.fixture
def parent() -> JobConfig:
    return JobConfig.model_validate({
        "run_name": "exp", "storage": {"path": "memory://runs"}, "iterations": 3, "seed": 7,
        "feedback": {"provider": "openai"}, "improve": {"provider": "anthropic"}, "teacher": {"enabled": True},
    })


def test_sft_config_is_the_shared_warm_up_without_iterations_or_teacher(parent):
    cfg = sft_config(parent)
    assert (cfg.run_name, cfg.storage.path) == ("sft", "memory://runs/exp")
    assert cfg.iterations == 0 and cfg.eval.initial
    assert not cfg.teacher.enabled
    assert (cfg.feedback.provider, cfg.improve.provider) == ("scripted", "scripted")
    assert parent.iterations == 3 and parent.run_name == "exp"  # the parent is not touched


def test_arms_start_from_the_sft_model_with_every_seed_set(parent):
    tripost, gold = (arm_config(parent, arm, 2, "memory://runs/exp/sft/model") for arm in ("tripost", "gold_sft"))
    for cfg in (tripost, gold):
        assert cfg.model.source == "memory://runs/exp/sft/model" and cfg.sft.epochs == 0
        assert (cfg.seed, cfg.rollout.seed, cfg.postprocess.seed, cfg.train.seed) == (2, 2, 2, 2)
        assert not cfg.eval.initial and cfg.iterations == 3
    assert (tripost.run_name, gold.run_name) == ("tripost-seed2", "gold_sft-seed2")
    assert tripost.feedback.provider == "openai" and tripost.teacher.enabled  # TriPosT keeps its teacher
    assert gold.feedback.provider == "scripted" and not gold.teacher.enabled


def test_set_dotted_creates_sections_and_refuses_to_descend_into_a_value():
    data: dict = {"train": {"seed": 1}}
    set_dotted(data, "train.seed", 3)
    set_dotted(data, "eval.initial", True)
    assert data == {"train": {"seed": 3}, "eval": {"initial": True}}
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        set_dotted(data, "train.seed.x", 1)
    with pytest.raises(ConfigError, match="names no field"):
        set_dotted(data, " . ", 1)
