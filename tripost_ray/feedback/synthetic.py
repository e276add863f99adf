"""Rollout rows without a trained model: gold rationales with corrupted numbers.

Used by tests and the feedback-pool benchmark to drive the editing pool with the same
columns the rollout stage writes (``problem_id, question, target, split, output``).
Deterministic for a seed. Every ``correct_every``-th row is left correct (a
``direct_correct`` trajectory, no calls); the others get one to ``max_errors`` numbers
changed in random steps, so FBK finds an error and IMP has to repair it.
"""

from __future__ import annotations

import random
import re

from tripost_ray.feedback.prompts import _INT_RE
from tripost_ray.tasks.base import Task
from tripost_ray.trajectory import FINAL_LABEL, ParsedAttempt, Step, parse_attempt

_ANSWER_RE = re.compile(r"So the answer is (.+?)\.?$")


def corrupt_numbers(attempt: str, rng: random.Random, n: int = 1) -> str:
    """Change ``n`` numbers in the reasoning steps of an attempt (labels are never touched)."""
    parsed = parse_attempt(attempt)
    steps = list(parsed.steps)
    candidates = [(i, m) for i, s in enumerate(steps) if s.label != FINAL_LABEL
                  for m in _INT_RE.finditer(s.text, len(s.text) - len(s.body))]
    for i, m in sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda c: -c[1].start()):
        text = steps[i].text
        new = str(int(m.group()) + rng.choice([-3, -2, -1, 1, 2, 3]))
        steps[i] = Step(steps[i].label, text[: m.start()] + new + text[m.end() :])
    return ParsedAttempt(parsed.preamble, tuple(steps)).render()


def wrong_final_answer(attempt: str, rng: random.Random) -> str:
    """Make the final response's answer wrong (a number shifted, another option letter among
    (A)-(C), or two words swapped), as a small model's wrong attempt would be; a right
    answer would make the rollout direct-correct."""
    parsed = parse_attempt(attempt)
    steps = list(parsed.steps)
    final = parsed.final_response
    if final is None:
        return attempt
    m = _ANSWER_RE.search(final.text)
    if m is None:
        return attempt
    answer = m.group(1)
    if _INT_RE.fullmatch(answer):
        wrong = str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    elif re.fullmatch(r"\([A-J]\)", answer):  # an option letter: another option
        wrong = f"({'ABCDEFGHIJ'[('ABCDEFGHIJ'.index(answer[1]) + rng.randint(1, 2)) % 3]})"
    else:
        words = answer.split()
        if len(words) < 2:
            return attempt
        j = rng.randrange(len(words) - 1)
        words[j], words[j + 1] = words[j + 1], words[j]
        wrong = " ".join(words)
    k = steps.index(final)
    steps[k] = Step(final.label, final.text[: m.start(1)] + wrong + final.text[m.end(1) :])
    return ParsedAttempt(parsed.preamble, tuple(steps)).render()


def corrupted_rollouts(task: Task, n: int, seed: int = 0, correct_every: int = 5, max_errors: int = 2) -> list[dict]:
    """``n`` rollout rows over ``n`` generated training problems."""
    rng = random.Random(seed)
    rows = []
    for i, problem in enumerate(task.generate(n, "train", seed=seed)):
        gold = task.gold_rationale(problem)
        if correct_every and i % correct_every == 0:
            output = gold
        else:
            output = wrong_final_answer(corrupt_numbers(gold, rng, rng.randint(1, max_errors)), rng)
        rows.append({"problem_id": problem.id, "question": problem.question, "target": problem.target,
                     "split": problem.split, "output": output})
    return rows
