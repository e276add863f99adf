"""The small interface every task implements, and problem loading through fsspec.

A task knows how to make problems, write the gold rationale, read an answer, and play
both scripted teachers: the verifier (FBK) and the improver (IMP). All of it is plain
Python: the Ray stages only call these methods.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Literal

from tripost_ray.trajectory import ANSWER_PREFIX, Feedback, extract_final_answer, prompt_for

Split = Literal["train", "test_seen", "test_unseen"]
SPLITS: tuple[Split, ...] = ("train", "test_seen", "test_unseen")


class ProblemFormatError(ValueError):
    """A problem record or file that cannot be read; the message names the record."""


@dataclass(frozen=True)
class Problem:
    """One question with its target answer. ``split`` is train / test_seen / test_unseen."""

    id: str
    question: str
    target: str
    split: Split = "train"
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(id=str(d["id"]), question=d["question"], target=str(d["target"]), split=d.get("split", "train"),
                   meta=dict(d.get("meta") or {}))


class Task(ABC):
    """A TriPosT task: problems, gold rationales, answers, scripted FBK and IMP."""

    name: str = ""
    #: Text appended to "Let's think step by step." in every attempt (may be empty).
    hint: str = ""

    # ---------------------------------------------------------------- problems

    @abstractmethod
    def generate(self, n: int, split: Split, seed: int = 0) -> list[Problem]:
        """``n`` seeded problems of a split (train and test_seen share the seen difficulty)."""

    @abstractmethod
    def problem_from_record(self, record: dict, index: int, split: Split) -> Problem:
        """Build a problem from a file record (BIG-Bench ``{"input", "target"}`` included)."""

    # --------------------------------------------------------------- rationales

    @property
    def attempt_prefix(self) -> str:
        """The start of every attempt: ``Let's think step by step.<hint>``."""
        return ANSWER_PREFIX + self.hint

    def prompt(self, problem: Problem) -> str:
        """The inference prompt for a problem."""
        return prompt_for(problem.question, self.hint)

    @abstractmethod
    def gold_rationale(self, problem: Problem) -> str:
        """The correct attempt (preamble, numbered steps, final response)."""

    # ------------------------------------------------------------------ answers

    def extract_answer(self, attempt: str) -> str | None:
        """The final answer of an attempt, or None when it has none."""
        return extract_final_answer(attempt)

    def normalize_answer(self, answer: str) -> str:
        return " ".join(answer.split())

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        return answer is not None and self.normalize_answer(answer) == self.normalize_answer(problem.target)

    # -------------------------------------------------------- scripted teachers

    @abstractmethod
    def verify(self, problem: Problem, attempt: str) -> Feedback:
        """Scripted FBK: the earliest wrong step of ``attempt`` or all-correct. Never raises."""

    @abstractmethod
    def improve(self, problem: Problem, attempt: str, feedback: Feedback) -> str:
        """Scripted IMP: a correct attempt keeping the steps before ``feedback.step`` verbatim."""


def _is_json_line(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _records_from_text(text: str, url: str) -> list[dict]:
    """JSON (a list, or BIG-Bench's ``{"examples": [...]}``) or JSONL records."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped[0] in "[{":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            if not _is_json_line(stripped.splitlines()[0]):  # one JSON document, not JSONL: say where it breaks
                line = err.lineno + text[: len(text) - len(text.lstrip())].count("\n")
                raise ProblemFormatError(f"{url}: not valid JSON at line {line}, column {err.colno} ({err.msg})") from None
            data = None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            if isinstance(data.get("examples"), list):
                return data["examples"]
            return [data]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ProblemFormatError(f"{url}: line {lineno} is not valid JSON ({err.msg})") from None
    return records


def load_problems(task: Task, url: str, split: Split = "test_seen") -> list[Problem]:
    """Load problems from a JSON or JSONL file at any fsspec URL.

    Records are BIG-Bench ``{"input", "target"}`` or ``{"question", "target"}``; a
    record may carry its own ``split`` and ``id``.
    """
    from tripost_ray import storage

    try:
        fs, path = storage.fs_for(url)
    except storage.StorageError as err:
        raise ProblemFormatError(f"cannot read problem file {err}") from None
    try:
        with fs.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise ProblemFormatError(f"problem file not found: {url}") from None
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as err:  # a directory, not text, unknown protocol
        raise ProblemFormatError(f"cannot read problem file {url}: {err}") from None
    problems = []
    first_of: dict[str, int] = {}
    for i, record in enumerate(_records_from_text(text, url)):
        if not isinstance(record, dict):
            raise ProblemFormatError(f"{url}: record {i} is not an object")
        try:
            problem = task.problem_from_record(record, i, record.get("split", split))
        except (KeyError, ValueError) as err:
            raise ProblemFormatError(f"{url}: record {i} is not a {task.name} problem: {err}") from None
        if problem.id in first_of:  # every later stage keys its records by problem id
            raise ProblemFormatError(f"{url}: record {i} repeats the id {problem.id!r} of record {first_of[problem.id]}")
        first_of[problem.id] = i
        problems.append(problem)
    return problems
