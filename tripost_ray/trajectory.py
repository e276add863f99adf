"""Attempts, feedbacks and trajectories: the text format of TriPosT and its parsers.

The format (TRIPOST.md) is the contract between every part of the system: the small
model reads and writes it, the teacher's feedback is rendered into it, and the trainer
weights its spans. Everything here is pure Python so it can be tested without Ray.

An *attempt* is the text after ``Answer:`` / ``Updated Answer:``::

    Let's think step by step.<hint>
    (1) ...
    (2) ...
    (Final response) So the answer is X.

A *feedback* names the earliest wrong step (by its label, e.g. ``2`` or ``2.1``, or
``final`` for the final response), the wrong segment and the reason, or says that all
steps and the final response are correct (the stop signal).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

ANSWER_PREFIX = "Let's think step by step."
QUESTION_TAG = "Q: "
ANSWER_TAG = "Answer: "
UPDATED_TAG = "Updated Answer: "
FEEDBACK_TAG = "Feedback: "
FINAL_LABEL = "final"
FINAL_RESPONSE_TAG = "(Final response)"

_STEP_RE = re.compile(r"^\((\d+(?:\.\d+)*|Final response)\)\s?")
_ANSWER_RE = re.compile(r"So the answer is (.*?)\.?\s*$")


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One labelled step of an attempt; ``text`` is the whole line(s), label included."""

    label: str  # "1", "2.1", or FINAL_LABEL
    text: str

    @property
    def body(self) -> str:
        """The step's text without its ``(label)`` prefix."""
        return _STEP_RE.sub("", self.text, count=1)


@dataclass(frozen=True)
class ParsedAttempt:
    """An attempt split into its preamble (``Let's think step by step.<hint>``) and steps."""

    preamble: str
    steps: tuple[Step, ...]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.steps]

    @property
    def reasoning_steps(self) -> tuple[Step, ...]:
        """All steps except the final response."""
        return tuple(s for s in self.steps if s.label != FINAL_LABEL)

    @property
    def final_response(self) -> Step | None:
        finals = [s for s in self.steps if s.label == FINAL_LABEL]
        return finals[-1] if finals else None

    def index_of(self, label: str) -> int | None:
        """Position of the step with ``label`` (the first one), or None."""
        for i, step in enumerate(self.steps):
            if step.label == label:
                return i
        return None

    def render(self) -> str:
        return "\n".join([self.preamble, *[s.text for s in self.steps]])


def parse_attempt(text: str) -> ParsedAttempt:
    """Split an attempt into preamble and labelled steps; never raises.

    Lines that start with ``(label)`` open a step; other lines are appended to the open
    step (or to the preamble before the first step). Blank trailing lines are dropped.
    """
    preamble_lines: list[str] = []
    steps: list[list[str]] = []
    labels: list[str] = []
    for line in text.strip("\n").split("\n"):
        m = _STEP_RE.match(line)
        if m:
            label = m.group(1)
            labels.append(FINAL_LABEL if label == "Final response" else label)
            steps.append([line])
        elif steps:
            steps[-1].append(line)
        else:
            preamble_lines.append(line)
    return ParsedAttempt(
        preamble="\n".join(preamble_lines).strip(),
        steps=tuple(Step(label, "\n".join(lines).rstrip()) for label, lines in zip(labels, steps)),
    )


def extract_final_answer(attempt: str) -> str | None:
    """The answer of the attempt's last ``(Final response)`` line, or None."""
    final = parse_attempt(attempt).final_response
    if final is None:
        return None
    m = _ANSWER_RE.search(final.body.strip().split("\n")[0])
    return m.group(1).strip() if m else None


# ------------------------------------------------------------------------ feedback


@dataclass(frozen=True)
class Feedback:
    """Structured feedback on one attempt.

    ``step`` is the label of the earliest wrong step (``FINAL_LABEL`` for the final
    response) or None when everything is correct. ``last_correct`` is the label of the
    last step before it that is correct (None when the very first step is wrong).
    """

    step: str | None
    segment: str = ""
    reason: str = ""
    last_correct: str | None = None

    @property
    def is_correct(self) -> bool:
        return self.step is None

    @property
    def text(self) -> str:
        return render_feedback(self)

    @classmethod
    def all_correct(cls, last_step: str | None) -> "Feedback":
        return cls(step=None, last_correct=last_step)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_line(text: str) -> str:
    """Join the lines of a teacher's segment or reason: a feedback is one line of a trajectory."""
    return re.sub(r"[ \t\r]*\n\s*", " ", text)


def render_feedback(fb: Feedback) -> str:
    """Render a feedback sentence in the format of TRIPOST.md (always one line)."""
    prefix = f"Step (1) to step ({fb.last_correct}) are correct. " if fb.last_correct else ""
    if fb.step is None:
        return prefix + "The final response is also correct."
    reason = _one_line(fb.reason.strip()) or "it is wrong"
    if not reason.endswith("."):
        reason += "."
    where = "the final response" if fb.step == FINAL_LABEL else f"step ({fb.step})"
    return f'{prefix}In {where} the part "{_one_line(fb.segment)}" is incorrect. This is because {reason}'


_FB_PREFIX_RE = re.compile(r"^Step \(1\) to step \(([\d.]+)\) are correct\.\s*")
_FB_CORRECT_RE = re.compile(r"^The final response is also correct\.?\s*$")
_FB_ERROR_RE = re.compile(
    r'^In (?:step \((?P<step>[\d.]+)\)|(?P<final>the final response)) the part "(?P<seg>.*)" is incorrect\.'
    r"\s*(?:This is because (?P<reason>.*))?$",
    re.DOTALL,
)


def parse_feedback(text: str) -> Feedback | None:
    """Parse a rendered feedback sentence back into a :class:`Feedback`; None if malformed."""
    text = text.strip()
    last_correct = None
    m = _FB_PREFIX_RE.match(text)
    if m:
        last_correct = m.group(1)
        text = text[m.end() :]
    if _FB_CORRECT_RE.match(text):
        return Feedback(step=None, last_correct=last_correct)
    m = _FB_ERROR_RE.match(text)
    if not m:
        return None
    step = FINAL_LABEL if m.group("final") else m.group("step")
    reason = (m.group("reason") or "").strip()
    return Feedback(step=step, segment=m.group("seg"), reason=reason, last_correct=last_correct)


# -------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Turn:
    """One attempt and the feedback on it (None when the output ended without one)."""

    attempt: str
    feedback: str | None = None


@dataclass
class ParsedOutput:
    """A small model's raw output split into turns (the last may lack a feedback)."""

    turns: list[Turn]

    @property
    def ends_with_feedback(self) -> bool:
        return bool(self.turns) and self.turns[-1].feedback is not None


def prompt_for(question: str, hint: str = "") -> str:
    """The inference prompt: ``Q: ...\\nAnswer: Let's think step by step.<hint>``."""
    return f"{QUESTION_TAG}{question}\n{ANSWER_TAG}{ANSWER_PREFIX}{hint}"


def parse_model_output(continuation: str, prefix: str = "") -> ParsedOutput:
    """Split a model's output into (attempt, feedback) turns; never raises.

    ``continuation`` is what the model generated after the prompt, and ``prefix`` the
    part of the first attempt that was in the prompt (``Let's think step by step.<hint>``).
    """
    text = prefix + continuation
    turns: list[Turn] = []
    attempt_lines: list[str] = []
    for line in text.split("\n"):
        if line.startswith(FEEDBACK_TAG.strip()):
            feedback = line[len(FEEDBACK_TAG.strip()) :].strip()
            turns.append(Turn("\n".join(attempt_lines).strip(), feedback))
            attempt_lines = []
        elif line.startswith(UPDATED_TAG.strip()):
            pending = "\n".join(attempt_lines).strip()
            if pending:  # an update with no feedback before it: keep the attempt, unjudged
                turns.append(Turn(pending, None))
            attempt_lines = [line[len(UPDATED_TAG.strip()) :].lstrip()]
        else:
            attempt_lines.append(line)
    rest = "\n".join(attempt_lines).strip()
    if rest:
        turns.append(Turn(rest, None))
    return ParsedOutput(turns=turns)


def render_trajectory(question: str, turns: list[Turn]) -> str:
    """Render a trajectory as training/inference text (TRIPOST.md, "Text formats")."""
    lines = [f"{QUESTION_TAG}{question}"]
    for i, turn in enumerate(turns):
        tag = ANSWER_TAG if i == 0 else UPDATED_TAG
        lines.append(f"{tag}{turn.attempt}")
        if turn.feedback is not None:
            lines.append(f"{FEEDBACK_TAG}{turn.feedback}")
    return "\n".join(lines)


TrajectoryKind = Literal["direct_correct", "edited", "bad_improvement"]


@dataclass
class Trajectory:
    """An edited trajectory ready for post-processing.

    ``kind``: ``direct_correct`` (the model was right; all-correct feedback appended),
    ``edited`` (ends with an all-correct feedback after FBK/IMP edits) or
    ``bad_improvement`` (only question + first attempt + first FBK feedback are kept).
    """

    problem_id: str
    question: str
    turns: list[Turn]
    kind: TrajectoryKind
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return render_trajectory(self.question, self.turns)

    def to_dict(self) -> dict:
        return {
            "problem_id": self.problem_id,
            "question": self.question,
            "turns": [asdict(t) for t in self.turns],
            "kind": self.kind,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(
            problem_id=d["problem_id"],
            question=d["question"],
            turns=[Turn(**t) for t in d["turns"]],
            kind=d["kind"],
            meta=dict(d.get("meta") or {}),
        )


# ------------------------------------------------------------- training examples


ExampleKind = Literal["self_improve", "terminal", "gold"]


@dataclass(frozen=True)
class TrainingExample:
    """A single-turn training text and its loss-weighted character spans.

    ``spans`` are ``(start, end, weight)`` character ranges covering the text; the
    trainer maps them onto tokens with the tokenizer's offset mapping.
    """

    text: str
    spans: tuple[tuple[int, int, float], ...]
    kind: ExampleKind
    problem_id: str = ""

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "span_starts": [s for s, _, _ in self.spans],
            "span_ends": [e for _, e, _ in self.spans],
            "span_weights": [w for _, _, w in self.spans],
            "kind": self.kind,
            "problem_id": self.problem_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingExample":
        spans = tuple(zip(d["span_starts"], d["span_ends"], d["span_weights"]))
        return cls(text=d["text"], spans=spans, kind=d["kind"], problem_id=d.get("problem_id", ""))


def weighted_example(text: str, kind: ExampleKind, feedback_weight: float, problem_id: str = "",
                     first_attempt_weight: float = 1.0) -> TrainingExample:
    """Weight 1 before the first ``Feedback:`` and ``feedback_weight`` from it to the end;
    with ``first_attempt_weight`` != 1 the first attempt (after ``Answer:``, up to that
    feedback) gets its own span and weight, the question keeping weight 1."""
    cut = text.find("\n" + FEEDBACK_TAG.strip())
    if cut < 0:
        return TrainingExample(text=text, spans=((0, len(text), 1.0),), kind=kind, problem_id=problem_id)
    cut += 1  # the newline belongs to the answer; "Feedback:" starts the weighted span
    feedback = (cut, len(text), float(feedback_weight))
    if first_attempt_weight == 1.0:
        spans: tuple[tuple[int, int, float], ...] = ((0, cut, 1.0), feedback)
    else:
        attempt = text.find("\n" + ANSWER_TAG, 0, cut) + 1 + len(ANSWER_TAG)
        if attempt == len(ANSWER_TAG):
            raise ValueError(f"no {ANSWER_TAG.strip()!r} line before the first feedback: {text[:200]!r}")
        spans = ((0, attempt, 1.0), (attempt, cut, float(first_attempt_weight)), feedback)
    return TrainingExample(text=text, spans=spans, kind=kind, problem_id=problem_id)
