"""Few-shot FBK and IMP prompts for LLM teachers, their parsers, and the reader the teacher server uses.

**Shape.** A prompt is a system prompt (the task's checking rules and the reply format)
and chat turns: few-shot examples as user/assistant pairs, then the query. Every user
turn has the same layout, the project's own text format::

    Q: <question>
    Answer: <attempt>
    Feedback: <feedback sentence>        (IMP prompts only)

* FBK's answer is one feedback sentence in the format of
  :func:`tripost_ray.trajectory.render_feedback`: the earliest wrong step, the wrong
  segment and the reason, or "... The final response is also correct."
* IMP's answer continues the updated attempt *from the wrong step on* (the steps before
  it are kept verbatim, so asking the model to repeat them would only cost tokens and
  invite changes). :func:`parse_imp_reply` rebuilds the full updated attempt as the
  kept steps + the continuation; a reply that restates the whole answer is accepted too.

**Few-shot examples are built from the task itself, deterministically**: gold
rationales of seeded problems, corrupted by changing one number in one step, judged by
the task's own verifier and repaired by its own improver. They are therefore always
in the task's exact format and always right, and they change only when the task or
:data:`PROMPT_VERSION` changes.

**Versions.** :func:`prompt_version` (task, role, template version) is part of the
response-cache key: editing a template means bumping :data:`PROMPT_VERSION`, which
makes old cached replies unreachable instead of silently reused.

The parsers are lenient about what LLMs add (code fences, "Feedback:" labels, bold
markers, chatter before or after) and strict about content: a reply that does not
contain a well-formed feedback, or an attempt continuation that cannot be placed, is
None (the caller turns it into a ``parse_error`` outcome).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from tripost_ray.feedback.providers import Prompt
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import (
    ANSWER_PREFIX,
    ANSWER_TAG,
    FEEDBACK_TAG,
    FINAL_LABEL,
    QUESTION_TAG,
    Feedback,
    ParsedAttempt,
    parse_attempt,
    parse_feedback,
)

PROMPT_VERSION = "v1"
EXAMPLE_SEED = 2310_13522  # the paper's arXiv id: fixed, and unrelated to any job's seed

TASK_DESCRIPTIONS = {
    "multistep_arithmetic": (
        "multistep arithmetic problems (integer expressions with +, - and *)",
        "Check, in order: that the letters of the partition substitute back to the original expression; every "
        "'=' link of each calculation (the same value, one operation at a time); the combination of the parts; "
        "and the final answer.",
    ),
    "word_sorting": (
        "word sorting problems (sort a list of words alphabetically)",
        "Check, in order: each word's first letter and its index in the alphabet; the order of the buckets and of "
        "the words inside each bucket (nested steps compare later letters); missing or repeated words; and the "
        "final sorted list.",
    ),
    "date_understanding": (
        "date understanding problems (multiple choice: find a date relative to today, in MM/DD/YYYY)",
        "Check, in order: each step's reference date against the question and the earlier steps; each date "
        "computation in real calendar arithmetic (month lengths, leap years; a month or year later keeps the day); "
        "that the date found is the option named; and the final letter.",
    ),
    "logical_deduction": (
        "logical deduction problems (multiple choice: objects in a fixed order, from statements about them)",
        "Check, in order: the numbering of the places; for each step, that it applies the next statement that "
        "changes the arrangement and that the places it leaves each object follow from that statement and from "
        "no two objects sharing a place; the final order; the option that matches; and the final letter.",
    ),
}

FBK_FORMAT = (
    "Find the EARLIEST wrong step. Reply with one line and nothing else, in one of these forms:\n"
    'Step (1) to step (k) are correct. In step (n) the part "<the wrong text, copied exactly>" is incorrect. '
    "This is because <reason>.\n"
    "Step (1) to step (n) are correct. The final response is also correct.\n"
    'Leave out "Step (1) to step (k) are correct." when step (1) is wrong; write "In the final response" when '
    "only the final response is wrong."
)

IMP_FORMAT = (
    "The feedback names the earliest wrong step. Rewrite the answer from that step on: begin your reply with "
    'the wrong step\'s label, e.g. "(3)", fix that step, redo every later step in the same format, and end with '
    'the line "(Final response) So the answer is <answer>." Do not repeat the steps before the wrong step and '
    "write nothing else."
)


def prompt_version(task: Task, role: str) -> str:
    return f"{task.name}/{role}/{PROMPT_VERSION}"


def _describe(task: Task) -> tuple[str, str]:
    return TASK_DESCRIPTIONS.get(task.name, (f"{task.name} problems", "Check every step and the final answer."))


def fbk_system(task: Task) -> str:
    what, rules = _describe(task)
    return f"You check step-by-step answers to {what}. {rules}\n{FBK_FORMAT}"


def imp_system(task: Task) -> str:
    what, _ = _describe(task)
    return f"You improve step-by-step answers to {what} using feedback on them. {IMP_FORMAT}"


def query_text(question: str, attempt: str, feedback: Feedback | str | None = None) -> str:
    """The user turn: ``Q: ...\\nAnswer: ...`` (+ ``\\nFeedback: ...`` for IMP)."""
    text = f"{QUESTION_TAG}{question}\n{ANSWER_TAG}{attempt}"
    if feedback is not None:
        text += f"\n{FEEDBACK_TAG}{feedback.text if isinstance(feedback, Feedback) else feedback}"
    return text


@dataclass(frozen=True)
class Query:
    """What the teacher server reads back out of a rendered prompt's last user turn."""

    question: str
    attempt: str
    feedback: str | None  # the feedback sentence (IMP) or None (FBK)

    @property
    def role(self) -> str:
        return "fbk" if self.feedback is None else "imp"


def read_query(text: str) -> Query | None:
    """Parse a user turn made by :func:`query_text`; None when it is not one."""
    if not text.startswith(QUESTION_TAG):
        return None
    cut = text.find("\n" + ANSWER_TAG)
    if cut < 0:
        return None
    question = text[len(QUESTION_TAG) : cut]
    rest = text[cut + 1 + len(ANSWER_TAG) :]
    fb_cut = rest.rfind("\n" + FEEDBACK_TAG)
    if fb_cut < 0:
        return Query(question, rest, None)
    return Query(question, rest[:fb_cut], rest[fb_cut + 1 + len(FEEDBACK_TAG) :].strip())


# ------------------------------------------------------------------ continuations


def continuation(original: str, feedback: Feedback, updated: str) -> str:
    """IMP's reply for ``updated``: its steps from the error step on, or the whole attempt
    when the update does not keep the original's earlier steps (then nothing is lost)."""
    orig, new = parse_attempt(original), parse_attempt(updated)
    k = orig.index_of(feedback.step) if feedback.step is not None else None
    if k is None or new.preamble != orig.preamble or new.steps[:k] != orig.steps[:k] or len(new.steps) <= k:
        return updated.strip()
    return "\n".join(step.text for step in new.steps[k:])


# --------------------------------------------------------------------- few-shot

_INT_RE = re.compile(r"(?<![\d.])-?\d+(?!\d)")


@dataclass(frozen=True)
class Example:
    question: str
    attempt: str
    feedback: Feedback
    updated: str | None  # the improver's repair (None for a correct attempt)


def _corrupt(task: Task, problem: Problem, gold: str, rng: random.Random) -> Example | None:
    """Change one number in one reasoning step; keep it when the verifier catches it."""
    parsed = parse_attempt(gold)
    positions = [i for i, s in enumerate(parsed.steps) if s.label != FINAL_LABEL]
    rng.shuffle(positions)
    positions.sort(key=lambda i: i == 0)  # prefer a later step: the example then shows the "correct up to" prefix
    for i in positions:
        step = parsed.steps[i]
        head = len(step.text) - len(step.body)
        numbers = list(_INT_RE.finditer(step.text, head))
        rng.shuffle(numbers)
        for m in numbers:
            value = int(m.group())
            new = str(value + rng.choice([-3, -2, -1, 1, 2, 3]))
            text = step.text[: m.start()] + new + step.text[m.end() :]
            steps = list(parsed.steps)
            steps[i] = type(step)(step.label, text)
            attempt = ParsedAttempt(parsed.preamble, tuple(steps)).render()
            feedback = task.verify(problem, attempt)
            if feedback.is_correct or parsed.index_of(feedback.step or "") is None:
                continue
            updated = task.improve(problem, attempt, feedback)
            if task.is_correct(problem, task.extract_answer(updated)):
                return Example(problem.question, attempt, feedback, updated)
    return None


@lru_cache(maxsize=32)
def examples(task_name: str, n: int, task_key: str = "") -> tuple[Example, ...]:
    """``n`` deterministic worked examples for a task (cached per process).

    The first ``n - n // 3`` are corrupted attempts with the verifier's feedback and the
    improver's repair; every third slot (from the second on) is a correct gold attempt,
    so FBK also sees what "all correct" looks like.
    """
    from tripost_ray.tasks import get_task

    task = get_task(task_name)
    out: list[Example] = []
    rng = random.Random(EXAMPLE_SEED)
    problems = task.generate(max(4, 3 * n), "train", seed=EXAMPLE_SEED)
    for slot, problem in enumerate(problems):
        if len(out) >= n:
            break
        gold = task.gold_rationale(problem)
        if len(out) % 3 == 1:
            out.append(Example(problem.question, gold, task.verify(problem, gold), None))
            continue
        example = _corrupt(task, problem, gold, rng)
        if example is not None:
            out.append(example)
    return tuple(out)


# ---------------------------------------------------------------------- prompts


def fbk_prompt(task: Task, question: str, attempt: str, shots: int) -> Prompt:
    """The FBK prompt for one attempt."""
    messages: list[dict] = []
    for ex in examples(task.name, shots):
        messages.append({"role": "user", "content": query_text(ex.question, ex.attempt)})
        messages.append({"role": "assistant", "content": ex.feedback.text})
    messages.append({"role": "user", "content": query_text(question, attempt)})
    return Prompt(fbk_system(task), tuple(messages), "fbk", prompt_version(task, "fbk"))


def imp_prompt(task: Task, question: str, attempt: str, feedback: Feedback, shots: int) -> Prompt:
    """The IMP prompt for one attempt and the feedback on it."""
    messages: list[dict] = []
    repairs = [ex for ex in examples(task.name, max(shots, shots + shots // 2 + 1)) if ex.updated is not None]
    for ex in repairs[:shots]:
        messages.append({"role": "user", "content": query_text(ex.question, ex.attempt, ex.feedback)})
        messages.append({"role": "assistant", "content": continuation(ex.attempt, ex.feedback, ex.updated)})
    messages.append({"role": "user", "content": query_text(question, attempt, feedback)})
    return Prompt(imp_system(task), tuple(messages), "imp", prompt_version(task, "imp"))


# ----------------------------------------------------------------------- parsers

_FENCE_RE = re.compile(r"^\s*```[\w-]*\s*$")
_MARKER_RE = re.compile(r"Step \(1\) to step \(|In step \(|In the final response|The final response is also correct")
_PREFIX_ONLY_RE = re.compile(r"Step \(1\) to step \([\d.]+\) are correct\.?")
_DECOR_RE = re.compile(r"^(?:[>*_`\s]|Feedback:|\*\*Feedback:?\*\*:?)+")


def _clean_lines(text: str) -> list[str]:
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if _FENCE_RE.match(line):
            continue
        line = _DECOR_RE.sub("", line).rstrip().rstrip("*`_").rstrip()
        if line:
            lines.append(line)
    return lines


def parse_fbk_reply(text: str) -> Feedback | None:
    """The first well-formed feedback sentence in an LLM reply, or None."""
    lines = _clean_lines(text or "")
    for i, line in enumerate(lines):
        m = _MARKER_RE.search(line)
        if not m:
            continue
        candidate = line[m.start() :]
        if _PREFIX_ONLY_RE.fullmatch(candidate) and i + 1 < len(lines):
            candidate = candidate.rstrip(".") + ". " + lines[i + 1]
        feedback = parse_feedback(candidate)
        if feedback is not None:
            return feedback
    return None


_STEP_LINE_RE = re.compile(r"^\((\d+(?:\.\d+)*|Final response)\)")


def parse_imp_reply(attempt: str, feedback: Feedback, text: str) -> str | None:
    """The full updated attempt from IMP's reply (a continuation or a whole answer), or None.

    Chatter before the first step is dropped unless it is the attempt preamble (then the
    reply is a whole answer); anything after the first ``(Final response)`` line is dropped.
    """
    lines = [line for line in (text or "").replace("\r\n", "\n").split("\n") if not _FENCE_RE.match(line)]
    lines = [line[len("Updated Answer:"):].lstrip() if line.startswith("Updated Answer:") else line for line in lines]
    start = next((i for i, line in enumerate(lines) if _STEP_LINE_RE.match(line.strip())), None)
    if start is None:
        return None
    head = [line.strip() for line in lines[:start] if line.strip()]
    body: list[str] = []
    for line in lines[start:]:
        body.append(line.rstrip())
        if line.strip().startswith("(Final response)"):
            break
    reply = parse_attempt("\n".join(body))
    if not reply.steps:
        return None
    original = parse_attempt(attempt)
    preamble_lines = [line for line in head if line.startswith(ANSWER_PREFIX)]
    if preamble_lines:  # a whole answer, preamble included
        whole = "\n".join(head[head.index(preamble_lines[0]) :] + [s.text for s in reply.steps])
        return parse_attempt(whole).render()
    k = original.index_of(reply.steps[0].label)
    if k is None and feedback.step is not None:
        k = original.index_of(feedback.step)
    if k is None:
        return None
    return ParsedAttempt(original.preamble, original.steps[:k] + reply.steps).render()
