"""A job's problem splits, its gold SFT examples, and the text a tiny tokenizer learns from.

These live with the tasks, not with the pipeline: tests, the experiment and the
benchmarks build the same data without running a job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from tripost_ray import storage
from tripost_ray.config import TaskConfig
from tripost_ray.tasks.base import Problem, Task, load_problems
from tripost_ray.trajectory import TrainingExample, Turn, render_trajectory


@dataclass
class Problems:
    """The problems of one job: ``sft`` is a superset of ``train``; ``test`` holds both test splits."""

    train: list[Problem]
    sft: list[Problem]
    test: list[Problem]

    def write(self, url: str) -> dict[str, int]:
        """Write each split to ``<url>/<split>.parquet`` (the problems stage's output);
        returns the count per split."""
        counts = {}
        for split in fields(self):
            problems = getattr(self, split.name)
            storage.write_table(storage.join(url, f"{split.name}.parquet"), [p.to_dict() for p in problems])
            counts[split.name] = len(problems)
        return counts

    @classmethod
    def read(cls, url: str) -> "Problems":
        """All splits written by :meth:`write`."""
        return cls(**{split.name: read_problems(url, split.name) for split in fields(cls)})


def read_problems(url: str, split: str) -> list[Problem]:
    """One split written by :meth:`Problems.write`, e.g. the test problems an offline
    analysis of a finished run needs, without loading the SFT pool."""
    return [Problem.from_dict(r) for r in storage.read_table(storage.join(url, f"{split}.parquet"))]


def make_problems(task: Task, cfg: TaskConfig, n_sft: int) -> Problems:
    """Generate (or load) the problems of a job; deterministic under ``cfg.seed``.

    The SFT pool (a superset of the train problems) also supplies the gold examples of
    rebalancing, so it exists even when the warm-up is skipped (a model fine-tuned
    elsewhere): drawn only from the train problems, most gold examples would duplicate
    terminal examples and be dropped.
    """
    if cfg.train_file:
        pool = load_problems(task, cfg.train_file, split="train")
    else:
        pool = task.generate(max(cfg.n_train, n_sft), "train", seed=cfg.seed)
    if cfg.test_file:
        test = load_problems(task, cfg.test_file, split="test_seen")
    else:
        test = (task.generate(cfg.n_test_seen, "test_seen", seed=cfg.seed)
                + task.generate(cfg.n_test_unseen, "test_unseen", seed=cfg.seed))
    return Problems(train=pool[: cfg.n_train], sft=pool[:n_sft], test=test)


def tokenizer_corpus(task: Task, problems: list[Problem], n_trajectories: int = 200, seed: int = 0) -> list[str]:
    """Text a tiny model's tokenizer is trained on: prompts, gold rationales, and whole
    self-improvement trajectories (a corrupted attempt, its scripted feedback, the update,
    the all-correct feedback), so the words of feedback sentences are single tokens too.
    Without them the model has to learn "Feedback" letter by letter in iteration 1."""
    from tripost_ray.feedback.synthetic import corrupt_numbers

    rng = random.Random(seed)
    corpus = [task.prompt(p) for p in problems] + [task.gold_rationale(p) for p in problems]
    for p in problems[:n_trajectories]:
        gold = task.gold_rationale(p)
        wrong = corrupt_numbers(gold, rng)
        fb = task.verify(p, wrong)
        fixed = task.improve(p, wrong, fb)
        turns = [Turn(wrong, fb.text), Turn(fixed, task.verify(p, fixed).text)]
        corpus.append(render_trajectory(p.question, turns))
    return corpus


def gold_sft_examples(task: Task, problems: list[Problem]) -> list[dict]:
    """Gold rationales without feedback, all tokens weight 1 (the SFT warm-up data)."""
    rows = []
    for p in problems:
        text = render_trajectory(p.question, [Turn(task.gold_rationale(p))])
        rows.append(TrainingExample(text=text, spans=((0, len(text), 1.0),), kind="gold", problem_id=p.id).to_dict())
    return rows


def gold_rows_for_tokens(task: Task, problems: list[Problem], tokens_per_epoch: int, seed: int,
                         count_tokens) -> list[dict]:
    """Gold-rationale rows (the SFT format) in a seeded order, cycling, until their tokens
    reach ``tokens_per_epoch``: the gold-SFT baseline's data for one iteration."""
    rows = gold_sft_examples(task, problems)
    random.Random(seed).shuffle(rows)
    out, tokens = [], 0
    while tokens < tokens_per_epoch:
        row = rows[len(out) % len(rows)]
        out.append(row)
        tokens += count_tokens(row["text"]) + 1  # + the EOS the trainer appends
    return out
