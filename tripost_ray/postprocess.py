"""Post-processing: edited trajectories -> weighted single-turn training examples.

TRIPOST.md, "The loop", step 2, as pure functions:

1. **Filter trajectories** (each drop counts one trajectory; a gold rationale counts as
   one item too): a failure marker (``fbk_error``), a broken format (``broken_format``),
   an attempt over ``max_attempt_words`` words (``attempt_too_long``).
2. **Split** each trajectory (:func:`split_trajectory`) into
   *self-improvement* examples ``Q / Answer: a_i / Feedback: f_i / Updated Answer: a_{i+1}``
   (no feedback after the update: the next example teaches that) and one *terminal*
   example ``Q / Answer: a_n / Feedback: <all correct>``. A ``bad_improvement``
   trajectory yields the one example ``Q / Answer: a_1 / Feedback: f_1``: it teaches the
   model to recognise its own mistake, the first half of self-improvement, so it is
   counted with the self-improvement examples (kind ``self_improve``).
   Gold-rationale examples are ``Q / Answer: <gold> / Feedback: <all correct>``: the
   same shape as a terminal example, so they also teach when to stop, never to
   "improve" a right answer.
3. **Filter examples** (each drop counts one example): over ``max_example_tokens``
   (``too_many_tokens``; with no tokenizer, whitespace-separated words are counted
   instead, and :attr:`PostprocessResult.length_unit` says ``words``), and exact
   duplicates of an earlier example's text (``duplicate``; trajectories come first, then
   gold, so a gold rationale the model reproduced is kept once).
4. **Rebalance** (:func:`rebalance`) with ratio r: all n_SI self-improvement examples,
   plus ceil(n_SI / r) terminal examples and as many gold examples, sampled with a seed
   (all of them, and a recorded shortfall, when fewer exist). The self-improvement share
   is then n_SI / (n_SI + 2 ceil(n_SI / r)), 0.43 for r = 1.5. r <= 0 turns it off:
   every self-improvement and terminal example is kept and no gold is added. With no
   self-improvement example at all, rebalancing keeps nothing: the iteration has
   nothing to teach and the loop's early stop (``min_new_examples``) takes over.

Loss weights come from :func:`tripost_ray.trajectory.weighted_example`: weight 1 before
the first ``Feedback:``, ``feedback_weight`` from it to the end. ``first_attempt_weight``
(1 in the paper) re-weights the wrong attempt that opens a self-improvement example.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, get_args

from tripost_ray.config import PostprocessConfig
from tripost_ray.editing import all_correct_text, parse_valid_attempt
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import (
    TrainingExample,
    Trajectory,
    Turn,
    parse_feedback,
    render_trajectory,
    weighted_example,
)

DropReason = Literal["fbk_error", "broken_format", "attempt_too_long", "too_many_tokens", "duplicate"]

#: Every reason an item is dropped, and what it means.
DROP_REASONS: dict[str, str] = {
    "fbk_error": "the trajectory carries a failure marker (meta 'failure', 'discard_reason' or 'error'): a failed "
    "teacher call never becomes training data",
    "broken_format": "an attempt is not well formed (numbered steps, a one-line final response with an answer), a "
    "feedback is missing or does not parse, an error feedback names a step its attempt lacks, or the feedbacks "
    "do not fit the trajectory's kind",
    "attempt_too_long": "an attempt (or gold rationale) is longer than max_attempt_words words",
    "too_many_tokens": "the example is longer than max_example_tokens (tokens, or words without a tokenizer)",
    "duplicate": "the example's text equals an earlier example's",
}
assert set(DROP_REASONS) == set(get_args(DropReason)), "DROP_REASONS and DropReason must agree"

#: Keys of ``Trajectory.meta`` that mark a trajectory built from a failed call.
FAILURE_MARKERS = ("failure", "discard_reason", "error")

_KINDS = ("self_improve", "terminal", "gold")


@dataclass
class PostprocessResult:
    """The training examples of one iteration and the bookkeeping of how they were made."""

    examples: list[TrainingExample]
    dropped: Counter[str] = field(default_factory=Counter)  # DropReason -> items dropped
    counts: dict[str, int] = field(default_factory=dict)  # per kind before/after rebalancing, shortfalls
    length_unit: Literal["tokens", "words"] = "tokens"  # what max_example_tokens was measured in


# ------------------------------------------------------------------------ filters


def trajectory_problem(traj: Trajectory, max_attempt_words: int) -> DropReason | None:
    """Why a trajectory cannot be used (the first reason found), or None."""
    if any(traj.meta.get(key) for key in FAILURE_MARKERS):
        return "fbk_error"
    if traj.kind not in ("direct_correct", "edited", "bad_improvement") or not traj.turns:
        return "broken_format"
    feedbacks = []
    for turn in traj.turns:
        attempt = parse_valid_attempt(None, turn.attempt)
        feedback = parse_feedback(turn.feedback) if turn.feedback is not None else None
        if attempt is None or feedback is None:
            return "broken_format"
        if not feedback.is_correct and attempt.index_of(feedback.step) is None:
            return "broken_format"
        feedbacks.append(feedback)
    if traj.kind == "bad_improvement":
        shape_ok = len(feedbacks) == 1 and not feedbacks[0].is_correct
    else:
        shape_ok = feedbacks[-1].is_correct and not any(f.is_correct for f in feedbacks[:-1])
    if not shape_ok:
        return "broken_format"
    if any(len(turn.attempt.split()) > max_attempt_words for turn in traj.turns):
        return "attempt_too_long"
    return None


# -------------------------------------------------------------------------- split


def split_trajectory(traj: Trajectory, feedback_weight: float, first_attempt_weight: float = 1.0) -> list[TrainingExample]:
    """Single-turn examples of a trajectory (see the module docstring for the shapes); the
    wrong attempt that opens each self-improvement example is weighted ``first_attempt_weight``."""
    q, turns, pid = traj.question, traj.turns, traj.problem_id

    def self_improve(text: str) -> TrainingExample:
        return weighted_example(text, "self_improve", feedback_weight, pid, first_attempt_weight)

    if traj.kind == "bad_improvement":
        return [self_improve(render_trajectory(q, turns[:1]))]
    examples = [self_improve(render_trajectory(q, [turn, Turn(nxt.attempt, None)])) for turn, nxt in zip(turns, turns[1:])]
    examples.append(weighted_example(render_trajectory(q, [turns[-1]]), "terminal", feedback_weight, pid))
    return examples


def gold_example(problem: Problem, rationale: str, feedback_weight: float) -> TrainingExample:
    """``Q / Answer: <gold rationale> / Feedback: <all correct>``."""
    parsed = parse_valid_attempt(None, rationale)
    if parsed is None:
        raise ValueError(f"gold rationale of problem {problem.id!r} is not a well-formed attempt: {rationale!r}")
    text = render_trajectory(problem.question, [Turn(rationale, all_correct_text(parsed))])
    return weighted_example(text, "gold", feedback_weight, problem.id)


def gold_examples(task: Task, problems: Sequence[Problem], feedback_weight: float) -> list[TrainingExample]:
    """Gold-rationale examples of ``problems`` written by ``task``."""
    return [gold_example(p, task.gold_rationale(p), feedback_weight) for p in problems]


# ---------------------------------------------------------------------- rebalance


def _sample(items: list[TrainingExample], k: int, rng: random.Random) -> list[TrainingExample]:
    """``k`` items (all when fewer), in their input order."""
    if k >= len(items):
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _rebalance(si, non_si, gold, ratio: float, seed: int) -> tuple[list[TrainingExample], dict[str, int]]:
    if ratio <= 0:
        chosen, info = list(si) + list(non_si), {"rebalanced": 0}
    else:
        k = math.ceil(len(si) / ratio)
        # separate streams: which terminal examples are drawn does not depend on the gold pool
        terminal = _sample(list(non_si), k, random.Random(f"{seed}/terminal"))
        golds = _sample(list(gold), k, random.Random(f"{seed}/gold"))
        chosen = list(si) + terminal + golds
        info = {
            "rebalanced": 1,
            "sample_target": k,
            "terminal_shortfall": k - len(terminal),
            "gold_shortfall": k - len(golds),
        }
    random.Random(f"{seed}/order").shuffle(chosen)  # mixed kinds, whatever the trainer's sampler does
    return chosen, info


def rebalance(
    si: list[TrainingExample], non_si: list[TrainingExample], gold: list[TrainingExample], ratio: float, seed: int
) -> list[TrainingExample]:
    """All ``si`` plus ceil(len(si) / ratio) of ``non_si`` and of ``gold``, seeded and shuffled.

    ``ratio <= 0``: ``si + non_si`` (shuffled), no gold.
    """
    return _rebalance(si, non_si, gold, ratio, seed)[0]


# ---------------------------------------------------------------------- the stage


def _words(text: str) -> int:
    return len(text.split())


def postprocess(
    trajectories: list[Trajectory],
    gold: list[tuple[Problem, str]],
    cfg: PostprocessConfig,
    count_tokens: Callable[[str], int] | None = None,
    *,
    seed: int = 0,
) -> PostprocessResult:
    """Filter, split, deduplicate and rebalance one iteration's trajectories into examples
    weighted with ``cfg.feedback_weight``.

    ``gold`` holds (problem, gold rationale) pairs to draw gold examples from.
    ``count_tokens`` measures an example for ``max_example_tokens``; without one,
    whitespace-separated words are counted (``length_unit == "words"``).
    """
    dropped: Counter[str] = Counter()
    counts: dict[str, int] = {"trajectories": len(trajectories)}
    candidates: list[TrainingExample] = []
    kept_trajectories = bad_improvement = 0
    for traj in trajectories:
        problem = trajectory_problem(traj, cfg.max_attempt_words)
        if problem:
            dropped[problem] += 1
            continue
        kept_trajectories += 1
        examples = split_trajectory(traj, cfg.feedback_weight, cfg.first_attempt_weight)
        bad_improvement += len(examples) if traj.kind == "bad_improvement" else 0
        candidates += examples
    counts["trajectories_kept"] = kept_trajectories
    counts["bad_improvement"] = bad_improvement

    for problem, rationale in gold:
        if parse_valid_attempt(None, rationale) is None:
            dropped["broken_format"] += 1
        elif _words(rationale) > cfg.max_attempt_words:
            dropped["attempt_too_long"] += 1
        else:
            candidates.append(gold_example(problem, rationale, cfg.feedback_weight))

    measure = count_tokens or _words
    seen: set[str] = set()
    by_kind: dict[str, list[TrainingExample]] = {kind: [] for kind in _KINDS}
    for example in candidates:
        if measure(example.text) > cfg.max_example_tokens:
            dropped["too_many_tokens"] += 1
        elif example.text in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(example.text)
            by_kind[example.kind].append(example)

    chosen, info = _rebalance(by_kind["self_improve"], by_kind["terminal"], by_kind["gold"], cfg.rebalance_ratio, seed)
    after = Counter(e.kind for e in chosen)
    for kind in _KINDS:
        counts[f"{kind}_before"] = len(by_kind[kind])
        counts[f"{kind}_after"] = after[kind]
    counts.update(info)
    counts["examples"] = len(chosen)
    return PostprocessResult(chosen, dropped, counts, "tokens" if count_tokens else "words")


__all__ = [
    "DROP_REASONS", "FAILURE_MARKERS", "DropReason", "PostprocessResult", "gold_example", "gold_examples",
    "postprocess", "rebalance", "split_trajectory", "trajectory_problem",
]
