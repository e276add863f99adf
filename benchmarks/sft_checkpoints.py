"""Accuracy along a run's SFT warm-up: evaluate each of its intermediate checkpoints.

A learnability probe (docs/results.md, "Learnability of the other tasks"): a job with
``iterations: 0`` and ``train.checkpoint_every_steps`` set (see jobs/probe_sft_*.yaml)
trains the warm-up once and evaluates only its end (iteration 0). This script takes the
DeepSpeed checkpoints that run left under ``ray_train/`` and evaluates each the way the
pipeline evaluates a model (same test problems, same greedy self-improving inference), so
one training run gives the accuracy after 1/3, 2/3, ... of its tokens. The checkpoints
are taken mid-schedule, with the learning rate not yet decayed.

    python benchmarks/sft_checkpoints.py runs/probe-sft-date-understanding

It prints one line per checkpoint and writes ``sft_checkpoints.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import torch


def checkpoint_model(init_model: str, checkpoint: str, out: str) -> dict:
    """Write the checkpoint's weights as a Hugging Face model into ``out``; its trainer state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    weights = os.path.join(checkpoint, state["tag"], "mp_rank_00_model_states.pt")
    model = AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["module"])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(init_model).save_pretrained(out)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run folder (local) whose SFT kept checkpoints")
    args = parser.parse_args()

    from tripost_ray.config import load_config
    from tripost_ray.evaluate import evaluate_model
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.specs import JobSpecs
    from tripost_ray.tasks import get_task
    from tripost_ray.tasks.datasets import make_problems

    cfg = load_config(os.path.join(args.run, "config.yaml"))
    test = make_problems(get_task(cfg.task.name, **cfg.task.difficulty), cfg.task, cfg.sft.n_examples).test
    generation = JobSpecs(cfg).eval().generation
    checkpoints = sorted(p for p in glob.glob(os.path.join(args.run, "ray_train", "*-sft-*", "checkpoint_*"))
                         if os.path.isfile(os.path.join(p, "trainer_state.json")))
    if not checkpoints:
        raise SystemExit(f"no SFT checkpoints under {args.run}/ray_train (set train.checkpoint_every_steps)")
    init_ray(cfg.ray)
    rows = []
    for checkpoint in checkpoints:
        with tempfile.TemporaryDirectory(prefix="tripost-ckpt-model-") as tmp:
            state = checkpoint_model(os.path.join(args.run, "model_init", "model"), checkpoint, tmp)
            metrics = evaluate_model(tmp, test, generation)
        train_s = sum(h["step_time_s"] for h in state["history"])
        row = {"step": state["step"], "tokens": state["tokens_trained"], "train_s": round(train_s, 1),
               "accuracy": metrics["accuracy"]}
        rows.append(row)
        acc = row["accuracy"]
        print(f"step {row['step']}: {row['tokens']:,} tokens in {train_s / 60:.1f} min of steps, seen {acc['seen']:.1%}, unseen {acc['unseen']:.1%}",
              flush=True)
    with open(os.path.join(args.run, "sft_checkpoints.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
