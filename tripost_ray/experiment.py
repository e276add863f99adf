"""Does it self-improve? TriPosT against an equal-token gold-SFT baseline, over seeds.

``tripost experiment CONFIG`` runs, under ``<storage.path>/<run_name>/``:

1. ``sft/``: one job with ``iterations=0``: the problems, the tiny model, the gold-rationale
   warm-up, and the evaluation of that starting model (iteration 0 of every arm);
2. per seed ``s``, ``tripost-seed<s>/``: a TriPosT job of ``iterations`` iterations that
   starts from the SFT model (``sft.epochs=0``), with the rollout, rebalancing and
   training seeds set to ``s``;
3. per seed ``s``, ``gold_sft-seed<s>/``: the baseline. From the same SFT model it keeps
   fine-tuning on gold rationales of the train problems, iteration by iteration, for as
   many training tokens as the TriPosT run of the same seed trained on in that iteration
   (same trainer, learning rate and epochs); then evaluates exactly like TriPosT.
4. per variant ``v`` of ``experiment.variants`` (the ablations) and seed ``s``,
   ``tripost_<v>-seed<s>/``: a TriPosT job like 2. with the variant's overrides.

Every run is an ordinary resumable run (stages, manifests, ``tripost report``); the
experiment adds ``experiment.json``, ``experiment.md`` and ``accuracy.png`` that summarise
all of them: accuracy per iteration and arm as mean and standard deviation over seeds,
the self-improvement metrics, LLM calls, training tokens and time per stage.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from tripost_ray import storage
from tripost_ray.config import JobConfig, set_dotted
from tripost_ray.pipeline import check_existing_stages, gold_sft_stages, run_job
from tripost_ray.preflight import check_job
from tripost_ray.ray_setup import init_ray
from tripost_ray.runlock import run_lock
from tripost_ray.specs import ModelOutput, TrainOutput
from tripost_ray.tracking import Tracker, child_config

log = logging.getLogger("tripost")

METRIC_KEYS = ("seen", "unseen", "total")
# pooled over the test splits, like the paper; the model-as-verifier rates on the seen split
# only, where its outputs are well-formed enough for "flagged" to mean something
POOLED_SI_KEYS = ("attempt_rate", "fixed_rate", "broken_correct_rate")
SEEN_SI_KEYS = ("wrong_flagged_rate", "right_flagged_rate")
SI_KEYS = POOLED_SI_KEYS + tuple(f"{k}_seen" for k in SEEN_SI_KEYS)
SI_HEADERS = ("SI attempted", "SI fixed", "correct->wrong", "wrong flagged (seen)", "right flagged (seen)")
COUNT_KEYS = ("train_tokens", "train_examples", "llm_calls")


# ------------------------------------------------------------------ run configs


def _derived(cfg: JobConfig, run_name: str, **updates: Any) -> JobConfig:
    """A child job config stored under the experiment's folder."""
    data = cfg.model_dump(mode="json")
    data["run_name"] = run_name
    data["storage"]["path"] = storage.join(storage.normalize(cfg.storage.path), cfg.run_name)
    for dotted, value in updates.items():
        set_dotted(data, dotted, value)
    return JobConfig.model_validate(data)


def sft_config(cfg: JobConfig) -> JobConfig:
    """The shared starting point: SFT warm-up plus its evaluation, no iteration, no teacher."""
    return _derived(cfg, "sft", iterations=0, **{"eval.initial": True, "teacher.enabled": False,
                                                  "feedback.provider": "scripted", "improve.provider": "scripted"})


def tripost_arms(cfg: JobConfig, seed: int) -> list[str]:
    """The TriPosT arms of ``seed``: the job's own settings, then one per variant
    (``tripost_<name>``) where ``experiment.variant_seeds`` includes the seed."""
    variant_seeds = cfg.experiment.variant_seeds
    variants = cfg.experiment.variants if variant_seeds is None or seed in variant_seeds else {}
    return ["tripost", *(f"tripost_{name}" for name in variants)]


def arm_config(cfg: JobConfig, arm: str, seed: int, sft_model: str) -> JobConfig:
    """One arm and seed, starting from the SFT model (its iteration 0 is the SFT run's)."""
    updates: dict[str, Any] = {"model.source": sft_model, "sft.epochs": 0, "eval.initial": False,
                               "seed": seed, "rollout.seed": seed, "postprocess.seed": seed, "train.seed": seed}
    if arm == "gold_sft":
        updates.update({"teacher.enabled": False, "feedback.provider": "scripted", "improve.provider": "scripted"})
    elif arm != "tripost":
        cfg = cfg.variant(arm.removeprefix("tripost_"))
    return _derived(cfg, f"{arm}-seed{seed}", **updates)


# --------------------------------------------------------------------- driver


def run_experiment(cfg: JobConfig, *, force: bool = False) -> dict:
    """Run (or resume) the whole experiment; returns the aggregate written to experiment.json."""
    root = storage.join(storage.normalize(cfg.storage.path), cfg.run_name)
    check_job(cfg)  # storage, problem files, starting model, keys of the TriPosT arms
    with run_lock(root, cfg.storage):
        return _experiment_runs(cfg, root, force=force)


def check_sub_runs(cfg: JobConfig, *, force: bool) -> None:
    """Walk every sub-run's stages already on disk, running and writing nothing, so a
    refused experiment (a changed config, a damaged stage in any arm) changes nothing on
    disk. The arms are checked from the model the shared SFT run's manifest names (or, before
    it has run, the folder its stage will write), the baseline with the token targets of its
    seed's finished TriPosT iterations (the rest of it is checked again when it runs)."""
    sft = check_existing_stages(sft_config(cfg), force=force)
    model_stage = "sft" if cfg.sft.epochs > 0 else "model_init"
    if model_stage in sft.run.manifests:
        sft_model = sft.output(model_stage, ModelOutput).model
    else:
        sft_model = sft.model_url(model_stage)
    for seed in cfg.experiment.seeds:
        arms = {arm: check_existing_stages(arm_config(cfg, arm, seed, sft_model), force=force)
                for arm in tripost_arms(cfg, seed)}
        if cfg.experiment.baseline:
            tripost = arms["tripost"]
            targets = [int(tripost.output(f"iter_{t}/train", TrainOutput).train["tokens_trained"])
                       for t in range(1, cfg.iterations + 1) if f"iter_{t}/train" in tripost.run.manifests]
            check_existing_stages(arm_config(cfg, "gold_sft", seed, sft_model), force=force,
                                  stages=gold_sft_stages(targets))


def _experiment_runs(cfg: JobConfig, root: str, *, force: bool) -> dict:
    check_sub_runs(cfg, force=force)
    storage.write_text_atomic(storage.join(root, "config.yaml"), cfg.to_yaml())  # only once no sub-run refused
    started = time.time()
    init_ray(cfg.ray)
    tracker = Tracker(cfg, root)  # the parent MLflow run; every arm and seed is a child run
    log.info("experiment %s: shared SFT model", root)
    sft = run_job(child_config(sft_config(cfg), tracker, arm="sft"), force=force)
    sft_model = sft["model"]
    arms = ["tripost", *(f"tripost_{name}" for name in cfg.experiment.variants), "gold_sft"]
    summaries: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in cfg.experiment.seeds:
        for arm in tripost_arms(cfg, seed):
            log.info("experiment: %s, seed %d", arm, seed)
            summaries[arm][seed] = run_job(child_config(arm_config(cfg, arm, seed, sft_model), tracker,
                                                        arm=arm, seed=seed), force=force)
        if cfg.experiment.baseline:
            targets = [int(it["train"]["tokens_trained"]) for it in summaries["tripost"][seed]["iterations"]
                       if it.get("train")]
            log.info("experiment: gold-SFT baseline, seed %d, token targets %s", seed, targets)
            arm = child_config(arm_config(cfg, "gold_sft", seed, sft_model), tracker, arm="gold_sft", seed=seed)
            summaries["gold_sft"][seed] = run_job(arm, force=force, stages=gold_sft_stages(targets))
    result = aggregate(sft, summaries, cfg)
    result["wall_s_this_invocation"] = round(time.time() - started, 1)
    write_experiment(root, result)
    tracker.finish(None)  # experiment.{json,md} and accuracy.png as the parent run's artifacts
    return result


# ------------------------------------------------------------------ aggregate


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _self_improvement(it: dict, run_root: str) -> dict[str, float | None]:
    """The iteration's ``SI_KEYS``; runs evaluated before a metric existed get it
    recomputed from their stored evaluation outputs (the same function, exact)."""
    from tripost_ray.evaluate import compute_metrics
    from tripost_ray.rollout import read_rollouts

    metrics = it.get("metrics") or {}
    outputs = (metrics.get("rollout") or {}).get("output_uri")  # where the eval stage wrote them
    if "self_improvement_by_split" not in metrics and outputs and storage.exists(outputs):
        metrics = compute_metrics(read_rollouts(outputs))
    pooled = metrics.get("self_improvement") or {}
    seen = (metrics.get("self_improvement_by_split") or {}).get("seen") or {}
    return {**{k: pooled.get(k) for k in POOLED_SI_KEYS}, **{f"{k}_seen": seen.get(k) for k in SEEN_SI_KEYS}}


def _iteration_metrics(it: dict, run_root: str) -> dict[str, float | None]:
    """The flat per-iteration numbers of one run's summary row."""
    m = it.get("metrics") or {}
    out: dict[str, float | None] = {k: (m.get("accuracy") or {}).get(k) for k in METRIC_KEYS}
    out.update(_self_improvement(it, run_root))
    for name, extra in (it.get("extra") or {}).items():
        out[name] = (extra.get("accuracy") or {}).get("seen")
    train = it.get("train") or {}
    out["train_tokens"] = train.get("tokens_trained")
    out["train_examples"] = it.get("examples")
    out["llm_calls"] = it["llm"]["calls"]
    return out


def aggregate(sft: dict, summaries: dict[str, dict[int, dict]], cfg: JobConfig) -> dict:
    """Mean and standard deviation over seeds, per arm and iteration (iteration 0 = SFT)."""
    start = next((_iteration_metrics(it, sft["run"]) for it in sft["iterations"] if it["iteration"] == 0), {})
    arms: dict[str, Any] = {}
    for arm, by_seed in summaries.items():
        if not by_seed:
            continue
        per_seed = {seed: {it["iteration"]: _iteration_metrics(it, s["run"]) for it in s["iterations"]
                           if it.get("metrics")}
                    for seed, s in by_seed.items()}
        iterations = sorted({t for runs in per_seed.values() for t in runs})
        keys = sorted({k for runs in per_seed.values() for m in runs.values() for k in m})
        table = [{"iteration": 0, **{k: _mean_std([start.get(k)]) for k in keys}}]
        for t in iterations:
            table.append({"iteration": t, **{k: _mean_std([runs[t].get(k) for runs in per_seed.values() if t in runs])
                                             for k in keys}})
        stage_times: dict[str, list[float]] = {}
        for s in by_seed.values():
            for stage, secs in s["stage_times_s"].items():
                stage_times.setdefault(stage, []).append(secs)
        arms[arm] = {"per_seed": per_seed, "table": table,
                     "stage_times_s": {k: round(statistics.fmean(v), 1) for k, v in stage_times.items()},
                     "run_time_s": _mean_std([s["total_stage_time_s"] for s in by_seed.values()])}
    return {"seeds": list(cfg.experiment.seeds), "variants": cfg.experiment.variants, "start": start, "arms": arms,
            "sft_stage_times_s": sft["stage_times_s"], "sft_time_s": sft["total_stage_time_s"],
            "total_stage_time_s": round(sft["total_stage_time_s"] + sum(
                s["total_stage_time_s"] for by_seed in summaries.values() for s in by_seed.values()), 1)}


def _cell(stat: dict, pct: bool = True) -> str:
    if stat["mean"] is None:
        return "-"
    if pct:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:,.0f}"


def _accuracy_keys(row: dict) -> list[str]:
    """seen, unseen, total, then the extra test sets, of a table row."""
    extra = sorted(k for k in row if k not in ("iteration", *METRIC_KEYS, *SI_KEYS, *COUNT_KEYS))
    return [k for k in METRIC_KEYS if k in row] + extra


def format_experiment(result: dict) -> str:
    """Markdown tables: accuracy per arm and iteration, self-improvement, tokens, calls, times."""
    lines = [f"Seeds: {result['seeds']}; mean ± standard deviation over seeds (iteration 0 is the shared SFT model).", ""]
    for arm, data in result["arms"].items():
        acc_keys = _accuracy_keys(data["table"][0])
        head = ["iter", *acc_keys, *SI_HEADERS, "train tokens", "train ex.", "LLM calls"]
        lines += [f"### {arm}", ""]
        overrides = result.get("variants", {}).get(arm.removeprefix("tripost_")) if arm.startswith("tripost_") else None
        if overrides:
            lines += ["Variant of tripost: " + ", ".join(f"`{k}={v}`" for k, v in overrides.items()), ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in data["table"]:
            cells = [str(row["iteration"]), *(_cell(row[k]) for k in acc_keys), *(_cell(row[k]) for k in SI_KEYS),
                     *(_cell(row[k], pct=False) for k in COUNT_KEYS)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Mean time per stage (s): " + ", ".join(f"{k} {v}" for k, v in data["stage_times_s"].items()),
                  ""]
    lines.append(f"Shared SFT: {result['sft_time_s']:.0f} s of stage time. All stages of all runs: "
                 f"{result['total_stage_time_s']:.0f} s.")
    return "\n".join(lines)


def plot_accuracy(result: dict, path: str) -> None:
    """Accuracy per iteration for every arm, error bars = standard deviation over seeds."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _accuracy_keys(next(iter(result["arms"].values()))["table"][0])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, data in result["arms"].items():
            rows = [r for r in data["table"] if r[key]["mean"] is not None]
            ax.errorbar([r["iteration"] for r in rows], [100 * r[key]["mean"] for r in rows],
                        yerr=[100 * r[key]["std"] for r in rows], marker="o", capsize=3, label=arm)
        ax.set_title(f"accuracy: {key}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("%")
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


def write_experiment(root: str, result: dict) -> None:
    storage.write_json(storage.join(root, "experiment.json"), result)
    storage.write_text_atomic(storage.join(root, "experiment.md"), "# TriPosT experiment\n\n" + format_experiment(result)
                              + "\n\n![accuracy per iteration](accuracy.png)\n")
    plot_accuracy(result, storage.join(root, "accuracy.png"))
