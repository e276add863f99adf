"""The experiment of jobs/reproduce_cpu.yaml, shrunk: shared SFT, TriPosT, one ablation
variant and the equal-token gold-SFT baseline over two seeds, aggregated; then a rerun
that does no work.

Everything is real (Ray Data rollouts, the editing pool with the scripted teacher,
DeepSpeed ZeRO-2 in Ray Train); only the sizes are cut so the code path cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tripost_ray import storage
from tripost_ray.config import load_config


ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "reproduce_cpu.yaml"

REDUCED = {
    "iterations": 1, "experiment.seeds": "[0,1]",
    "task.n_train": 16, "task.n_test_seen": 6, "task.n_test_unseen": 6, "eval.n_extra": 4,
    # the SFT stage runs, briefly and gently, on the session's pre-fine-tuned model: a random
    # model's output is all unparsable and gives editing nothing to do
    "sft.n_examples": 32, "sft.epochs": 1, "sft.learning_rate": 1e-5,
    "rollout.min_actors": 1, "rollout.max_actors": 1, "rollout.batch_size": 16, "rollout.max_new_tokens": 200,
    "eval.batch_size": 16, "eval.max_new_tokens": 200, "eval.self_improve_rounds": 1, "eval.verification_per_split": 0,
    "train.epochs": 1, "train.micro_batch_size": 8, "train.cpus_per_worker": 0.5,
    "postprocess.min_new_examples": 1, "progress": "lines", "ray.include_dashboard": False,
    # the ablation beyond the paper: the wrong first attempt is not trained on; screened on seed 0
    "experiment.variants": "{no_wrong: {postprocess.first_attempt_weight: 0}}", "experiment.variant_seeds": "[0]",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sub_run", ["sft", "tripost-seed1", "tripost_no_wrong-seed0", "gold_sft-seed0"])
def test_an_experiment_refused_by_any_sub_run_changes_nothing_on_disk(tmp_path, sub_run):
    from tripost_ray.experiment import run_experiment
    from tripost_ray.stages import StageConfigChanged

    root = tmp_path / "reproduce_cpu"
    storage.write_json(str(root / sub_run / "problems" / "_MANIFEST.json"), {"stage": "problems", "config_hash": "0"})
    before = _files(root)
    with pytest.raises(StageConfigChanged, match=f"stage 'problems' of run .*{sub_run}"):
        run_experiment(load_config(JOB, [f"{k}={v}" for k, v in {**REDUCED, "storage.path": str(tmp_path)}.items()]))
    assert _files(root) == before, "the refused experiment wrote its config.yaml or ran a sub-run"


@pytest.mark.integration
@pytest.mark.slow
def test_reduced_experiment_runs_both_arms_with_equal_tokens_and_resumes(ray_cluster, sft_model_dir, tmp_path):
    from tripost_ray.experiment import run_experiment

    overrides = [f"{k}={v}" for k, v in {**REDUCED, "storage.path": str(tmp_path), "model.source": sft_model_dir}.items()]
    cfg = load_config(JOB, overrides)
    result = run_experiment(cfg)
    root = tmp_path / "reproduce_cpu"

    assert set(result["arms"]) == {"tripost", "tripost_no_wrong", "gold_sft"}
    for arm, data in result["arms"].items():
        seeds = {0} if arm == "tripost_no_wrong" else {0, 1}  # the variant runs on variant_seeds only
        assert [row["iteration"] for row in data["table"]] == [0, 1]
        assert set(data["per_seed"]) == seeds
        first = data["table"][1]
        for key in ("seen", "unseen", "total", "bbh_style"):
            assert first[key]["n"] == len(seeds) and 0.0 <= first[key]["mean"] <= 1.0
        # iteration 0 is the one shared SFT model, evaluated once
        assert data["table"][0]["seen"]["mean"] == result["start"]["seen"]

    # the baseline trained on as many tokens as TriPosT did, seed by seed (within one example)
    for seed in (0, 1):
        tri = result["arms"]["tripost"]["per_seed"][seed][1]
        gold = result["arms"]["gold_sft"]["per_seed"][seed][1]
        assert tri["train_tokens"] > 0 and tri["llm_calls"] > 0 and gold["llm_calls"] == 0
        assert abs(gold["train_tokens"] - tri["train_tokens"]) <= 0.1 * tri["train_tokens"]
        assert tri["train_examples"] > 0 and gold["train_examples"] > 0
        assert all(key in tri for key in ("fixed_rate", "wrong_flagged_rate_seen", "right_flagged_rate_seen"))

    # every arm started from the SFT run's model, with the seed applied to every sampler
    assert not (root / "tripost_no_wrong-seed1").exists()
    for arm in ("tripost", "tripost_no_wrong", "gold_sft"):
        seed = 0 if arm == "tripost_no_wrong" else 1
        run_cfg = load_config(str(root / f"{arm}-seed{seed}" / "config.yaml"), [])
        assert run_cfg.model.source == str(root / "sft" / "sft" / "model")
        assert (run_cfg.rollout.seed, run_cfg.train.seed, run_cfg.postprocess.seed) == (seed, seed, seed)
    assert not (root / "tripost-seed0" / "iter_0").exists(), "the starting model is evaluated once, in sft/"

    for name in ("experiment.json", "experiment.md", "accuracy.png"):
        assert (root / name).stat().st_size > 0
    assert "### tripost" in (root / "experiment.md").read_text()

    # the variant is TriPosT with its override: its self-improvement examples (and only
    # theirs) give the wrong first attempt weight 0, the question and the feedback keep theirs
    variant_cfg = load_config(str(root / "tripost_no_wrong-seed0" / "config.yaml"), [])
    assert variant_cfg.postprocess.first_attempt_weight == 0 and variant_cfg.experiment.variants == {}
    for arm, first_attempt in (("tripost", 1.0), ("tripost_no_wrong", 0.0)):
        rows = pq.read_table(root / f"{arm}-seed0" / "iter_1" / "postprocess" / "train.parquet").to_pylist()
        si = [r for r in rows if r["kind"] == "self_improve"]
        assert si, f"{arm}: no self-improvement example to check"
        expected = [1.0, 0.0, variant_cfg.postprocess.feedback_weight] if first_attempt == 0 else \
            [1.0, variant_cfg.postprocess.feedback_weight]
        assert all(r["span_weights"] == expected for r in si), arm
    assert "Variant of tripost: `postprocess.first_attempt_weight=0`" in (root / "experiment.md").read_text()

    again = run_experiment(cfg)  # resumes: every stage is skipped, the aggregate is the same
    assert again["arms"]["tripost"]["table"] == result["arms"]["tripost"]["table"]

    # one MLflow parent run for the experiment, a child run per arm and seed, none added by the rerun
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and "experiment.json" in {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    children = {(r.data.tags["tripost.arm"], r.data.tags.get("tripost.seed")) for r in runs
                if r.info.run_id != parent[0].info.run_id}
    assert children == {("sft", None), ("tripost_no_wrong", "0"), *((arm, seed) for arm in ("tripost", "gold_sft")
                                                                   for seed in ("0", "1"))}
    assert len(runs) == 7 and {r.data.tags.get("mlflow.parentRunId") for r in runs} == {None, parent[0].info.run_id}
    manifests = storage.read_json(str(root / "gold_sft-seed0" / "iter_1" / "train" / "_MANIFEST.json"))
    assert manifests["target_tokens"] == result["arms"]["tripost"]["per_seed"][0][1]["train_tokens"]


def test_experiment_md_names_overrides_only_under_their_variants_heading():
    """A variant's overrides label its own ``tripost_<name>`` section and no other, even one
    whose name matches after the prefix (a variant called ``gold_sft`` must not label the
    baseline). Uses the committed ablation screening's aggregate."""
    import json

    from tripost_ray.experiment import format_experiment

    result = json.loads((Path(__file__).resolve().parents[1] / "docs/results/ablations_cpu.json").read_text())
    result["variants"]["gold_sft"] = {"postprocess.feedback_weight": 2.0}
    sections = {s.split("\n", 1)[0]: s for s in format_experiment(result).split("### ")[1:]}
    assert "Variant of tripost: `postprocess.feedback_weight=1.0`" in sections["tripost_w1"]
    assert "Variant of tripost: `postprocess.rebalance_ratio=0`" in sections["tripost_r0"]
    for arm in ("tripost", "gold_sft"):
        assert "Variant of tripost" not in sections[arm]
