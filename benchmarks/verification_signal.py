"""How likely is a run's model to call its own wrong attempts correct? The verification
probe's probabilities, per evaluated iteration.

The pipeline's verification probe (``eval.verification_per_split``) judges the feedback
line the model writes *greedily* after each of its own wrong first attempts and after
gold attempts. Greedy decoding shows only the sentence the model ranks first; this script
reads the probability behind it, on the same probe items, with
:func:`tripost_ray.verification.all_correct_logprob` (docs/results.md, "Is there a
signal under the greedy verdict?"):

- ``mean_p_correct`` of wrong attempts: sampled at temperature 1, the model flags a wrong
  attempt with probability at most ``1 - p`` (what sampled feedback could fix at best);
- ``auroc``: how well that probability ranks gold attempts above wrong ones (0.5: the
  model holds no verification signal that a threshold or sampling could use).

    python benchmarks/verification_signal.py runs/reproduce_cpu_word_sorting/sft \\
        runs/reproduce_cpu_word_sorting/tripost-seed0

It prints one line per evaluated iteration and split and writes
``verification_signal.json`` into each run folder (a finished, local run folder).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

from tripost_ray.stages import MANIFEST
from tripost_ray.storage import read_json


def iteration_models(run: str) -> dict[int, str]:
    """Each evaluated iteration of ``run`` and the model it evaluated: iteration 0 is the
    warm-up's model (or the initial one), iteration t the model ``iter_<t>/train`` left."""
    def model_of(stage: str) -> str:
        return read_json(os.path.join(run, stage, MANIFEST))["model"]

    models = {}
    for path in glob.glob(os.path.join(run, "iter_*", "eval", MANIFEST)):
        t = int(re.search(r"iter_(\d+)", path).group(1))
        if t > 0:
            models[t] = model_of(f"iter_{t}/train")
        else:
            models[t] = model_of("sft" if os.path.exists(os.path.join(run, "sft", MANIFEST)) else "model_init")
    return dict(sorted(models.items()))


def run_signal(run: str) -> list[dict]:
    """One row per evaluated iteration: :func:`~tripost_ray.verification.signal_metrics`
    beside the greedy probe the evaluation recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tripost_ray.config import load_config
    from tripost_ray.rollout import read_rollouts
    from tripost_ray.specs import JobSpecs
    from tripost_ray.tasks.datasets import read_problems
    from tripost_ray.verification import all_correct_logprob, probe_items, signal_metrics

    cfg = load_config(os.path.join(run, "config.yaml"))
    task = JobSpecs(cfg).task.build()
    test = read_problems(os.path.join(run, "problems"), "test")
    models = iteration_models(run)
    if not models:
        raise SystemExit(f"no evaluated iteration under {run}")
    rows = []
    for t, model_path in models.items():
        outputs = {r["problem_id"]: r["output"] for r in read_rollouts(os.path.join(run, f"iter_{t}", "eval", "outputs"))}
        items = probe_items(task, test, outputs, cfg.eval.verification_per_split)
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        signal = signal_metrics(items, all_correct_logprob(model, AutoTokenizer.from_pretrained(model_path), task, items))
        greedy = read_json(os.path.join(run, f"iter_{t}", "eval", MANIFEST))["metrics"].get("verification")
        rows.append({"iteration": t, "signal": signal, "greedy": greedy})
        for split in ("seen", "unseen"):
            s = signal[split]
            called = greedy[split]["wrong"]["missed"] if greedy else None
            auc = "-" if s["auroc"] is None else f"{s['auroc']:.2f}"
            print(f"{run} iter {t} {split}: {s['wrong']['n']} wrong attempts, p(correct) {_pct(s['wrong']['mean_p_correct'])} "
                  f"(greedy: called correct {_pct(called)}); {s['gold']['n']} gold, "
                  f"p(correct) {_pct(s['gold']['mean_p_correct'])}; AUROC {auc}", flush=True)
    with open(os.path.join(run, "verification_signal.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (local) with evaluated iterations")
    for run in parser.parse_args().runs:
        run_signal(run)


if __name__ == "__main__":
    main()
