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

Greedy decoding shows only the feedback the model ranks first. :func:`all_correct_logprob`
reads the probability behind it: how likely the model is to call each attempt correct.
Sampled at temperature 1, the model flags a wrong attempt with at most ``1 - p``, and how
well ``p`` ranks gold attempts above wrong ones (:func:`signal_metrics`) says whether the
model holds any verification signal that sampling or a threshold could use.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from tripost_ray.editing import all_correct_text
from tripost_ray.generation import GenerationEngine, SamplingParams
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import FEEDBACK_TAG, Feedback, parse_attempt, parse_feedback, parse_model_output

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


def all_correct_logprob(model, tokenizer, task: Task, items: list[ProbeItem]) -> list[float]:
    """Per item, the log-probability that the model's feedback line on it begins with the
    all-correct sentence naming the attempt's last step (teacher-forced; the sentence the
    scripted verifier writes for a right attempt of that shape). Its exponential is a lower
    bound on the probability of calling the attempt correct: a sentence naming another last step also
    parses as all-correct. ``model`` and ``tokenizer`` are a Hugging Face causal LM and its
    tokenizer; one forward pass per item, in the order of ``items``.
    """
    import torch

    space = FEEDBACK_TAG[len(FEEDBACK_TAG.rstrip()):]  # the sentence's first token carries the tag's space
    device = next(model.parameters()).device
    logprobs = []
    for it in items:
        prompt = probe_prompt(task, it)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + space + all_correct_text(parse_attempt(it.attempt)))["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            raise ValueError(f"problem {it.problem.id}: the tokenizer does not split the feedback sentence from "
                             "the prompt at the feedback tag, so its probability cannot be read off")
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=device)).logits[0, len(prompt_ids) - 1:-1].float()
        targets = torch.tensor(ids[len(prompt_ids):], device=device)
        logprobs.append(float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()))
    return logprobs


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """The probability that a positive scores above a negative (ties count half): 0.5 is no
    signal, 1.0 a perfect threshold. None when either side is empty."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def signal_metrics(items: list[ProbeItem], logprob_correct: list[float]) -> dict[str, Any]:
    """Per split, from :func:`all_correct_logprob`: the mean probability of calling the
    model's own wrong attempts and the gold attempts correct, and the AUROC of ranking gold
    above wrong by it: ``{"seen": {"wrong": {"n", "mean_p_correct"}, "gold": {...}, "auroc"},
    "unseen": {...}}``."""
    out: dict[str, Any] = {}
    for split in ("seen", "unseen"):
        side = {kind: [lp for it, lp in zip(items, logprob_correct) if it.split == split and it.kind == kind]
                for kind in ("wrong", "gold")}
        out[split] = {kind: {"n": len(lps), "mean_p_correct": sum(map(math.exp, lps)) / len(lps) if lps else None}
                      for kind, lps in side.items()}
        out[split]["auroc"] = auroc(side["gold"], side["wrong"])
    return out
