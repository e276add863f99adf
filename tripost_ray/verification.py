"""The verification probe: can the model tell a wrong attempt from a right one?

Accuracy and the self-improvement rates mix two failures: a model that never writes an
error feedback may be unable to *verify* (it cannot see the mistake), or may not *try*
(it learnt to end every answer with "all correct"). The probe separates them by
teacher-forcing attempts whose verdict is known and reading the feedback the model writes
after each (greedy, one line):

- **the model's own wrong attempts** (its first attempts on the test problems that the
  scripted verifier rejects): flagged at the verifier's step (``right_step``), flagged at
  another step (``wrong_step``), called correct (``missed``), or answered with a line that
  does not parse as feedback (``malformed``);
- **gold attempts** of the same problems: ``accepted``, ``false_alarm``, or ``malformed``.

Rates are per split (seen / unseen) and per kind. Plain Python over a
:class:`~tripost_ray.generation.GenerationEngine`, testable without Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from tripost_ray.generation import GenerationEngine, SamplingParams
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import FEEDBACK_TAG, Feedback, parse_feedback, parse_model_output

Verdict = Literal["right_step", "wrong_step", "missed", "accepted", "false_alarm", "malformed"]
WRONG_VERDICTS: tuple[Verdict, ...] = ("right_step", "wrong_step", "missed", "malformed")
GOLD_VERDICTS: tuple[Verdict, ...] = ("accepted", "false_alarm", "malformed")
SEEN_SPLITS = ("train", "test_seen")
#: A feedback line is one sentence naming a step, a segment and a reason.
FEEDBACK_MAX_TOKENS = 128


@dataclass(frozen=True)
class ProbeItem:
    """An attempt with its known verdict (``truth``, from the task's scripted verifier)."""

    problem: Problem
    attempt: str  # the whole attempt, beginning with the task's attempt prefix
    truth: Feedback

    @property
    def kind(self) -> Literal["wrong", "gold"]:
        return "gold" if self.truth.is_correct else "wrong"

    @property
    def split(self) -> Literal["seen", "unseen"]:
        return "seen" if self.problem.split in SEEN_SPLITS else "unseen"


def probe_items(task: Task, problems: list[Problem], outputs: dict[str, str], per_split: int) -> list[ProbeItem]:
    """Up to ``per_split`` wrong and ``per_split`` gold attempts per split, in problem order.

    ``outputs`` maps a problem id to the model's output on it (an evaluation's rollout
    ``output``); its first attempt counts as wrong when the scripted verifier flags it.
    Gold attempts are the task's gold rationales of the same problems.
    """
    items: list[ProbeItem] = []
    taken: Counter = Counter()
    for p in problems:
        split = "seen" if p.split in SEEN_SPLITS else "unseen"
        turns = parse_model_output(outputs[p.id]).turns if p.id in outputs else []
        if turns and turns[0].attempt.strip() and taken[(split, "wrong")] < per_split:
            truth = task.verify(p, turns[0].attempt)
            if not truth.is_correct:
                items.append(ProbeItem(p, turns[0].attempt, truth))
                taken[(split, "wrong")] += 1
        if taken[(split, "gold")] < per_split:
            items.append(ProbeItem(p, task.gold_rationale(p), Feedback(step=None)))
            taken[(split, "gold")] += 1
    return items


def probe_prompt(task: Task, item: ProbeItem) -> str:
    """The inference prompt with ``item``'s attempt forced in, up to the feedback tag (the
    model writes the feedback sentence; the tag's trailing space is the sentence's first
    token's, as in training text)."""
    body = item.attempt[len(task.attempt_prefix):] if item.attempt.startswith(task.attempt_prefix) else item.attempt
    return task.prompt(item.problem) + body.rstrip() + "\n" + FEEDBACK_TAG.rstrip()


def verdict(item: ProbeItem, feedback_text: str) -> Verdict:
    """How the model's feedback on ``item`` compares with its known verdict."""
    said = parse_feedback(feedback_text)
    if said is None:
        return "malformed"
    if item.truth.is_correct:
        return "accepted" if said.is_correct else "false_alarm"
    if said.is_correct:
        return "missed"
    return "right_step" if said.step == item.truth.step else "wrong_step"


def run_probe(engine: GenerationEngine, task: Task, items: list[ProbeItem]) -> list[Verdict]:
    """The model's greedy feedback line on every item, judged; in the order of ``items``."""
    if not items:
        return []
    params = SamplingParams(max_new_tokens=FEEDBACK_MAX_TOKENS, temperature=0.0, stop=("\n",))
    gens = engine.generate([probe_prompt(task, it) for it in items], params)
    return [verdict(it, g.text) for it, g in zip(items, gens)]


def probe_metrics(items: list[ProbeItem], verdicts: list[Verdict]) -> dict[str, Any]:
    """Counts and rates per split and kind: ``{"seen": {"wrong": {"n": .., "right_step": ..},
    "gold": {...}}, "unseen": {...}}`` (rates are None where there is nothing to count)."""
    out: dict[str, Any] = {}
    for split in ("seen", "unseen"):
        out[split] = {}
        for kind, names in (("wrong", WRONG_VERDICTS), ("gold", GOLD_VERDICTS)):
            mine = [v for it, v in zip(items, verdicts) if it.split == split and it.kind == kind]
            counts = Counter(mine)
            out[split][kind] = {"n": len(mine),
                                **{name: (counts[name] / len(mine) if mine else None) for name in names}}
    return out


def format_probe(metrics: dict[str, Any]) -> str:
    """One line per split: how wrong attempts and gold attempts were judged."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = []
    for split in ("seen", "unseen"):
        w, g = metrics[split]["wrong"], metrics[split]["gold"]
        lines.append(f"verification ({split}): {w['n']} wrong attempts: flagged at the right step {pct(w['right_step'])}, "
                     f"at another {pct(w['wrong_step'])}, called correct {pct(w['missed'])}, "
                     f"malformed {pct(w['malformed'])}; {g['n']} gold: accepted {pct(g['accepted'])}, "
                     f"false alarm {pct(g['false_alarm'])}, malformed {pct(g['malformed'])}")
    return "\n".join(lines)
