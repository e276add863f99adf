"""The strict step-by-step verifier and improver the multiple-choice tasks share.

Both compare an attempt with the task's gold steps: the earliest step that is not the
gold step is the wrong one, and a task-specific ``diagnose`` says which part of it is
wrong and why. The improver keeps the steps before that one verbatim and writes the
rest as the gold steps.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable, Sequence

from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import FINAL_LABEL, Feedback, Step, parse_attempt

Diagnose = Callable[[Step, object], tuple[str, str]]


class StepwiseTask(Task):
    """A task whose gold rationale is a sequence of gold steps and whose scripted teacher is
    the strict step-by-step comparison below: subclasses give the steps and the diagnosis."""

    @abstractmethod
    def gold_steps(self, problem: Problem) -> Sequence:
        """The gold rationale's steps (each with ``label`` and ``text``)."""

    @abstractmethod
    def diagnoser(self, problem: Problem, gold: Sequence) -> Diagnose:
        """``diagnose(step, gold_step) -> (segment, reason)`` for a wrong step of ``problem``."""

    def gold_rationale(self, problem: Problem) -> str:
        return "\n".join([self.attempt_prefix, *(s.text for s in self.gold_steps(problem))])

    def verify(self, problem: Problem, attempt: str) -> Feedback:
        """The earliest step that differs from the gold rationale, explained; never raises."""
        gold = self.gold_steps(problem)
        return verify_steps(gold, parse_attempt(attempt if isinstance(attempt, str) else "").steps,
                            self.diagnoser(problem, gold))

    def improve(self, problem: Problem, attempt: str, feedback: Feedback) -> str:
        """Keep the steps before ``feedback.step`` verbatim and write the rest correctly."""
        return improve_steps(self.attempt_prefix, self.gold_steps(problem), attempt, feedback)


def verify_steps(gold: Sequence, steps: Sequence[Step], diagnose: Diagnose) -> Feedback:
    """The strict step-by-step comparison both multiple-choice tasks use: the earliest step
    that is not the gold step, explained by ``diagnose(step, gold_step) -> (segment, reason)``."""
    for i, step in enumerate(steps):
        before = steps[i - 1].label if i else None
        if i >= len(gold):
            return Feedback(step.label, one_line(step.text), "the attempt must end with the final response, "
                            "and this step comes after it", before)
        if step.text != gold[i].text:
            if step.label != gold[i].label:
                if step.label == FINAL_LABEL:
                    segment, reason = step.text, (f"the final response comes too early: step ({gold[i].label}) and "
                                                  "the steps after it are missing")
                elif gold[i].label == FINAL_LABEL:
                    segment, reason = f"({step.label})", "all steps are done, so the final response comes next"
                else:
                    segment, reason = f"({step.label})", f"this should be step ({gold[i].label})"
            else:
                segment, reason = diagnose(step, gold[i])
                if not segment or segment not in step.text:
                    segment, reason = first_difference(step.text, gold[i].text), f"this step should read: {gold[i].body}"
            return Feedback(step.label, one_line(segment) or one_line(step.text), reason, before)
    if len(steps) < len(gold):
        missing = gold[len(steps)]
        where = f"step ({missing.label})" if missing.label != FINAL_LABEL else "the final response"
        last = steps[-1].label if steps else None
        after = f"after step ({last})" if last else "before step (1)"
        return Feedback(FINAL_LABEL, "", f"the attempt stops {after}: {where} and what follows are missing", last)
    return Feedback.all_correct(gold[-2].label)


def improve_steps(prefix: str, gold: Sequence, attempt: str, feedback: Feedback) -> str:
    """Keep the attempt's steps before the feedback's step (or before its first divergence
    from the gold rationale, when that comes first) and write the rest as the gold steps."""
    if feedback.is_correct:
        return attempt
    steps = parse_attempt(attempt if isinstance(attempt, str) else "").steps
    diverge = next((i for i, (s, g) in enumerate(zip(steps, gold)) if s.text != g.text), min(len(steps), len(gold)))
    at = [i for i, s in enumerate(steps) if s.label == feedback.step]
    cut = at[0] if at and at[0] < diverge else diverge
    return "\n".join([prefix, *(s.text for s in steps[:cut]), *(g.text for g in gold[cut:])])


def one_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def first_difference(actual: str, expected: str) -> str:
    """The whitespace-delimited part of ``actual`` where it first departs from ``expected``."""
    i = next((k for k, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
    if i >= len(actual):
        i = max(len(actual) - 1, 0)
    start = actual.rfind(" ", 0, i) + 1
    end = actual.find(" ", i)
    seg = actual[start : end if end >= 0 else len(actual)]
    return seg if seg.strip() else actual
