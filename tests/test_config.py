"""The one typed job config: defaults, YAML, dotted overrides, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tripost_ray.config import ConfigError, JobConfig, build_config, load_config
from tripost_ray.tasks import TASKS

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_defaults_are_valid_and_match_the_method():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg == build_config()
    assert cfg.iterations == 3
    assert cfg.postprocess.feedback_weight == 1.5
    assert cfg.postprocess.rebalance_ratio == 1.5
    assert cfg.editing.max_improve_rounds == 5
    assert cfg.rollout.max_passes == 5
    assert cfg.task.name in TASKS


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_job_files_load(path):
    cfg = load_config(path)
    assert cfg.task.name in TASKS


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "run_name: exp-1\n"
        "iterations: 2\n"
        "task: {name: word_sorting, n_train: 50, difficulty: {seen_sizes: [2, 3]}}\n"
        "rollout: {batch_size: 8, temperature: 0.7}\n"
    )
    cfg = load_config(
        path,
        [
            "rollout.batch_size=16",  # int, overriding the file
            "train.learning_rate=2.5e-4",  # float
            "eval.every_iteration=false",  # bool
            "rollout.target_trajectories=null",  # null
            'feedback.stop=["Q:", "\\n\\n"]',  # list (YAML rules: quotes and escapes)
            "model.tiny.num_layers=3",  # nested section
            "task.difficulty.vocab_size=100",  # into a free-form dict
            "storage.path=memory://runs/x=y",  # only the first '=' splits
        ],
    )
    assert cfg.run_name == "exp-1" and cfg.iterations == 2
    assert (cfg.task.name, cfg.task.n_train) == ("word_sorting", 50)
    assert cfg.task.difficulty == {"seen_sizes": [2, 3], "vocab_size": 100}
    assert cfg.rollout.batch_size == 16 and cfg.rollout.temperature == 0.7
    assert cfg.train.learning_rate == 2.5e-4
    assert cfg.eval.every_iteration is False
    assert cfg.rollout.target_trajectories is None
    assert cfg.feedback.stop == ["Q:", "\n\n"]
    assert cfg.model.tiny.num_layers == 3
    assert cfg.storage.path == "memory://runs/x=y"


def test_overrides_leave_the_callers_mapping_alone():
    data = {"rollout": {"batch_size": 8}}
    cfg = build_config(data, ["rollout.batch_size=4", "rollout.seed=3"])
    assert cfg.rollout.batch_size == 4
    assert data == {"rollout": {"batch_size": 8}}


def _error(overrides: list[str], data: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(data, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("rollout.bogus=1", "rollout.bogus", "allowed: batch_size"),
        ("bogus=1", "bogus", "allowed: editing"),
        ("model.tiny.depth=2", "model.tiny.depth", "num_layers"),
        ("editing.prices.gpt-4o.per_token=1", "editing.prices.gpt-4o.per_token", "input_per_mtok"),
        ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3 (got 4)"),
        ("model.tiny.tokenizer=word", "model.tiny.tokenizer", "'numeric', 'numeric_spaced', 'char' or 'bpe'"),
        ("feedback.provider=gemini", "feedback.provider", "'scripted', 'openai' or 'anthropic'"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio", "less than or equal to 1"),
        ("rollout.top_p=0", "rollout.top_p", "greater than 0"),
        ("task.n_train=0", "task.n_train", "greater than or equal to 1"),
        ("ray.num_gpus=-1", "ray.num_gpus", "greater than or equal to 0"),
        ("rollout.batch_size=many", "rollout.batch_size", "valid integer"),
        ("run_name=has space", "run_name", "pattern"),
        ("task.name=chess", "task", "allowed: ['date_understanding', 'logical_deduction', 'multistep_arithmetic', 'word_sorting']"),
        ("rollout.min_actors=3", "rollout", "min_actors (3) must be <= max_actors (1)"),
        ("model.tiny.num_heads=3", "model.tiny", "hidden_size (128) must be divisible by num_heads (3)"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override, field, allowed):
    message = _error([override])
    assert f"  {field}: " in message
    assert allowed in message


def test_every_error_is_reported_at_once():
    message = _error(["rollout.bogus=1", "train.zero_stage=9"])
    assert "rollout.bogus" in message and "train.zero_stage" in message


@pytest.mark.parametrize(
    "override, words",
    [("rollout.batch_size", "not of the form"), ("=3", "names no field"), ("run_name.sub=1", "'run_name' is not a section")],
)
def test_malformed_overrides(override, words):
    assert words in _error([override], {"run_name": "x"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: {batch_size: 8\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: a job config must be a mapping, got list"):
        load_config(listy)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00rollout")
    with pytest.raises(ConfigError, match="cannot read config file .*binary.yaml"):
        load_config(binary)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rollout: {batch_size: 8, colour: red}\n")
    with pytest.raises(ConfigError, match="rollout.colour: unknown field"):
        load_config(unknown)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config()


def test_to_yaml_round_trips_through_load(tmp_path):
    cfg = build_config(
        None,
        ["task.name=word_sorting", "task.difficulty={vocab_size: 80}", "train.adam_betas=[0.9, 0.95]",
         "feedback.stop=[x]", "train.learning_rate=1.0e-6", "editing.max_usd=2.5"],
    )
    text = cfg.to_yaml()
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(text)["train"]["adam_betas"] == [0.9, 0.95]


def test_quiet_sets_progress_lines_and_user_overrides_still_win(capsys):
    from tripost_ray import cli

    quickstart = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    resolved = lambda out: yaml.safe_load(out.split("# resolved config\n", 1)[1].split("\n#", 1)[0])  # noqa: E731
    assert cli.main(["run", quickstart, "--quiet", "--dry-run"]) == 0
    assert resolved(capsys.readouterr().out)["progress"] == "lines"
    assert cli.main(["run", quickstart, "--quiet", "--dry-run", "-o", "progress=bars"]) == 0
    assert resolved(capsys.readouterr().out)["progress"] == "bars"


def test_progress_is_in_no_stage_hash_and_the_replaced_fields_say_what_replaces_them():
    from tripost_ray.specs import JobSpecs

    def hashes(cfg):
        s = JobSpecs(cfg)
        return [spec.config_hash() for spec in (s.problems(), s.model_init(), s.sft(), s.train(), s.rollouts(1, 0),
                                                  s.eval(), s.editing(), s.postprocess(1))]

    assert hashes(build_config({}, ["progress=lines"])) == hashes(build_config({})), "--quiet on resume would be refused"
    for old in ("editing.progress=false", "ray.data_progress_bars=false"):
        with pytest.raises(ConfigError, match=re.escape(old.split("=")[0]) + r": replaced by progress \(top level\)"):
            build_config({}, [old])


def test_experiment_variants_apply_their_overrides_and_nothing_else():
    cfg = build_config(None, ["experiment.variants={w1: {postprocess.feedback_weight: 1.0}, "
                              "no_wrong: {postprocess.first_attempt_weight: 0, train.learning_rate: 0.001}}"])
    assert cfg.variant("w1").postprocess.feedback_weight == 1.0
    no_wrong = cfg.variant("no_wrong")
    assert (no_wrong.postprocess.first_attempt_weight, no_wrong.train.learning_rate) == (0.0, 0.001)
    assert no_wrong.experiment.variants == {}
    untouched = lambda c: c.model_dump(exclude={"postprocess", "train", "experiment"})  # noqa: E731
    assert untouched(no_wrong) == untouched(cfg)


@pytest.mark.parametrize(
    "variants, words",
    [
        ("{w1: {postprocess.feedbak_weight: 1.0}}", "experiment.variants.w1: postprocess.feedbak_weight: Extra inputs"),
        ("{w1: {postprocess.feedback_weight: -1}}", "experiment.variants.w1: postprocess.feedback_weight: Input should be greater"),
        ("{w1: {sft.epochs: 1}}", "'sft.epochs' is not a setting a variant may change; allowed: rollout, feedback"),
        ("{w1: {task.n_train: 5}}", "the SFT model and the evaluation"),
        ("{'a b': {train.seed: 1}}", "variant name 'a b': use letters, digits and '_'"),
        ("{w1: {}}", "variant 'w1' overrides nothing"),
    ],
)
def test_bad_experiment_variants_are_refused_naming_the_variant(variants, words):
    assert words in _error([f"experiment.variants={variants}"])


def test_variant_seeds_are_a_subset_of_the_seeds():
    assert "variant_seeds [3] must be a non-empty subset of seeds [0, 1]" in _error(
        ["experiment.seeds=[0,1]", "experiment.variant_seeds=[3]"])
    assert build_config(None, ["experiment.seeds=[0,1]", "experiment.variant_seeds=[1]"]).experiment.variant_seeds == [1]
