"""Multistep arithmetic (BIG-Bench Hard): problems, gold rationales, scripted FBK and IMP.

Questions look like ``((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =`` with target ``24``:
*groups* of operands in ``-R..R`` joined by ``+ - *`` (usual precedence), combined by a
*nesting* of parenthesized pairs.

Difficulty
    ``group_size`` is the number of operands in every group of a question (one size per
    question, as in BIG-Bench). ``nesting`` is a comma-separated list of branching
    factors, one per level from the outermost inwards; the groups are the leaves:

    - ``"2"``: ``(A op B)``, two groups;
    - ``"2,2"``: ``((A op B) op (C op D))``, four groups in two levels;
    - ``"2,2,2"``: ``(((A op B) op (C op D)) op ((E op F) op (G op H)))``, eight groups.

    A factor above 2 puts that many sub-expressions side by side (``"3"``:
    ``(A op B op C)``, precedence applies). At most 26 groups (one letter each).

    Seen problems (train and test_seen) draw a size from ``seen_group_sizes`` and a
    nesting from ``seen_nestings``. An unseen problem (test_unseen) is harder in exactly
    one way: either its groups have an unseen size (``unseen_group_sizes``, with a seen
    nesting) or its nesting is unseen (``unseen_nestings``, with seen group sizes); each
    kind with equal probability. Defaults follow the paper: seen 3-4 operands with
    nesting 2 or 2,2; unseen 5-6 operands, or nesting 2,2,2.

Splits
    Whether a seen question belongs to train or to test_seen is a fixed function of its
    text (a hash bucket, one fifth for test), so the two never share a question whatever
    the seeds and sizes. Unseen questions differ from seen ones by construction.

Rationale (the attempt; the task hint is empty, so it starts "Let's think step by step.")::

    (1) This equation can be written as "(A - B)", where A = (7 - -1 + -1 + -4) and B = (-7 + 7 * 3 * -9).
    (2) Let's calculate A = (7 - -1 + -1 + -4) = (((7 - -1) + -1) + -4) = ((8 + -1) + -4) = (7 + -4) = 3.
    (3) Let's calculate B = (-7 + 7 * 3 * -9) = (-7 + ((7 * 3) * -9)) = (-7 + (21 * -9)) = (-7 + -189) = -196.
    (4) Then, the final equation is (A - B) = (3 - -196) = 199.
    (Final response) So the answer is 199.

Every group gets a letter, in order; a calculation first writes the group fully
parenthesized (when that changes the text), then computes one operation per ``=``,
multiplications first, left to right. The final equation substitutes the letters'
values into the template of step (1) and reduces it the same way.

Verifier (scripted FBK)
    It reads the steps in order and reports the first failure, else all-correct:

    1. the partition: template and definitions parse, every letter is defined once and
       used, and substituting the definitions back gives the question's expression
       (any such partition is accepted, not only the gold one);
    2. one calculation per letter, in the order of the definitions, starting from the
       letter's definition as written in step (1); every link must be the same tree
       (re-parenthesizing) or the same tree with one operation on two numbers replaced
       by its value; the chain must end in a number;
    3. the final equation: the template of step (1), then the template with every letter
       replaced by the value computed for it, then links as in 2;
    4. the final response ``So the answer is X.`` with X the final equation's value.

    Text must be in the canonical spelling (see :mod:`arith_expr`), one line per step,
    labels ``(1)``, ``(2)``, ... then ``(Final response)`` last. The preamble before
    ``(1)`` is not checked (at inference it is part of the prompt).

    Segments are single lines that occur in the attempt. For a wrong content they name
    the wrong text so that it cannot reappear in a corrected attempt: the wrong link
    ``"((8 + -1) + -4) = (6 + -4)"``, a last link with its period ``"(7 + -4) = 2."``
    (``= 2`` alone would also match a right ``= 21``), a definition, the quoted template,
    or the final response's sentence. A step that does not have the expected form gets
    its whole first line as written. A *structural* failure has the empty segment,
    because no text of the attempt is wrong in itself: a missing step (the text stops,
    or another label comes where it should be) is reported at the label that should come
    next with reason "step (k) is missing ..." (or "the final response is missing"); text
    on a continuation line and steps after the final response likewise. Consumers that
    check "the update still contains the flagged segment" must skip an empty segment.

Improver (scripted IMP)
    Keeps the steps before the flagged step verbatim and writes the rest from the gold
    procedure. When step (1) is kept (it verified, but may use other letters or groups)
    the remaining steps follow *its* partition; otherwise the gold partition. If the
    feedback points later than the attempt's actual first error, the improver keeps only
    the steps before that error, so its output always verifies as all-correct.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Any

from tripost_ray.tasks import arith_expr as ex
from tripost_ray.tasks.base import SPLITS, Problem, Split, Task
from tripost_ray.trajectory import FINAL_LABEL, FINAL_RESPONSE_TAG, Feedback, ParsedAttempt, parse_attempt

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TEST_BUCKETS = 5  # one bucket of five seen questions goes to test_seen

_PARTITION_RE = re.compile(r'This equation can be written as "([^"]*)"(?:, where (.*))?\.')
_DEF_SPLIT_RE = re.compile(r"(?:^|, | and )([A-Z]) = ")
_CALC_RE = re.compile(r"Let's calculate ([A-Z]) = (.*)\.")
_FINAL_EQ_RE = re.compile(r"Then, the final equation is (.*)\.")
_ANSWER_RE = re.compile(r"So the answer is (.*)\.")
_INT_RE = re.compile(r"[+-]?[0-9]+")


# ------------------------------------------------------------------ partitions


@dataclass(frozen=True)
class Partition:
    """Step (1): the template with letters and each letter's definition text."""

    template: str
    letters: tuple[str, ...]
    definitions: tuple[str, ...]

    @property
    def sentence(self) -> str:
        defs = [f"{x} = {d}" for x, d in zip(self.letters, self.definitions)]
        if not defs:
            where = ""
        elif len(defs) == 1:
            where = f", where {defs[0]}"
        else:
            where = ", where " + ", ".join(defs[:-1]) + " and " + defs[-1]
        return f'This equation can be written as "{self.template}"{where}.'


@lru_cache(maxsize=8192)
def _question_info(question: str) -> tuple[str, ex.Node, Partition]:
    """Expression text, tree and gold partition of a question ``"<expr> ="``.

    Raises :class:`ValueError` when the question is not an arithmetic expression.
    """
    text = question.strip()
    if text.startswith("Q:"):
        text = text[2:].strip()
    if text.endswith("="):
        text = text[:-1].rstrip()
    tokens = ex.tokenize(text)
    tree = ex.parse_tokens(tokens)
    if ex.letters(tree):
        raise ex.ExprError("the equation contains letters")
    spans = ex.leaf_groups(tokens)
    if len(spans) > len(_LETTERS):
        raise ex.ExprError(f"the equation has {len(spans)} groups; at most {len(_LETTERS)} are supported")
    template_tokens: list[str] = []
    definitions = []
    pos = 0
    for letter, (start, end) in zip(_LETTERS, spans):
        template_tokens += tokens[pos:start] + [letter]
        definitions.append(ex.render_tokens(tokens[start : end + 1]))
        pos = end + 1
    template_tokens += tokens[pos:]
    partition = Partition(ex.render_tokens(template_tokens), tuple(_LETTERS[: len(spans)]), tuple(definitions))
    return ex.render_tokens(tokens), tree, partition


@lru_cache(maxsize=1 << 14)
def _chain(text: str) -> tuple[str, ...]:
    """Gold chain of an expression: as written, fully parenthesized, one operation a link."""
    tree = _parsed(text)[1]
    chain = [text]
    if ex.render_full(tree) != text:
        chain.append(ex.render_full(tree))
    while not isinstance(tree, int):
        tree = ex.reduce_once(tree)
        chain.append(ex.render_full(tree))
    return tuple(chain)


def _substitute_text(template: str, values: dict[str, int]) -> str:
    tokens = [str(values[t]) if t in values else t for t in ex.tokenize(template)]
    return ex.render_tokens(tokens)


@lru_cache(maxsize=4096)
def _step_lines(partition: Partition) -> tuple[str, ...]:
    """All steps (labels included) of the gold procedure for a partition."""
    lines = [f"(1) {partition.sentence}"]
    values: dict[str, int] = {}
    for i, (letter, definition) in enumerate(zip(partition.letters, partition.definitions)):
        chain = _chain(definition)
        values[letter] = int(chain[-1])
        lines.append(f"({i + 2}) Let's calculate {letter} = {' = '.join(chain)}.")
    if partition.letters:
        final_chain = [partition.template, *_chain(_substitute_text(partition.template, values))]
    else:
        final_chain = _chain(partition.template)
    lines.append(f"({len(partition.letters) + 2}) Then, the final equation is {' = '.join(final_chain)}.")
    lines.append(f"{FINAL_RESPONSE_TAG} So the answer is {final_chain[-1]}.")
    return tuple(lines)


# ------------------------------------------------------------------ verification


class _Wrong(Exception):
    """The first failure found while checking a step (internal control flow).

    ``segment`` None stands for the step's whole first line as written.
    """

    def __init__(self, segment: str | None, reason: str):
        super().__init__(reason)
        self.segment = segment
        self.reason = reason if reason.endswith(".") else reason + "."


@dataclass
class _Result:
    parsed: ParsedAttempt
    feedback: Feedback
    position: int  # index of the first wrong step == number of leading correct steps
    partition: Partition | None  # the attempt's own partition, when step (1) verified


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def _wrapped(text: str) -> bool:
    """Whether one pair of parentheses encloses the whole text."""
    if not text.startswith("("):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i == len(text) - 1
    return False


def _piece(texts: list[str], i: int) -> str:
    """Chain element ``i`` as a segment, closed so that it is not a prefix of a right one.

    ``= -1`` would also occur in a corrected ``= -16``; the segment takes the step's
    final period (or the next ``=`` after an unparenthesized element) to rule that out.
    """
    if i == len(texts) - 1:
        return texts[i] + "."
    return texts[i] if _wrapped(texts[i]) else texts[i] + " ="


@lru_cache(maxsize=1 << 16)
def _parsed(text: str) -> tuple[str, ex.Node]:
    """Canonical spelling and tree of an expression (cached: chains repeat across calls)."""
    tokens = ex.tokenize(text)
    return ex.render_tokens(tokens), ex.parse_tokens(tokens)


def _read(text: str, segment: str, allow_letters: bool = False) -> ex.Node:
    """Parse one expression of an attempt, requiring canonical spelling."""
    try:
        spelling, tree = _parsed(text)
    except ex.ExprError as err:
        raise _Wrong(segment, f'"{text}" is not a valid expression ({err})') from None
    if spelling != text:
        raise _Wrong(segment, f'"{text}" should be written as "{spelling}"')
    if not allow_letters and ex.letters(tree):
        raise _Wrong(segment, f'"{text}" still contains letters; use their values')
    return tree


def _check_link(prev: ex.Node, prev_text: str, tree: ex.Node, text: str, segment: str) -> None:
    """One ``=`` link: same tree, or the same tree with one operation computed."""
    if tree == prev:
        return
    differences = ex.diff(prev, tree)
    if len(differences) == 1:
        before, after = differences[0]
        if ex.is_reducible(before) and isinstance(after, int):
            value = ex.evaluate(before)
            if after == value:
                return
            op, a, b = before
            raise _Wrong(segment, f"{ex.render_full(before)} = {after} is wrong; {a} {op} {b} = {value}")
    if ex.evaluate(prev) != ex.evaluate(tree):
        raise _Wrong(segment, f"{text} is not equal to {prev_text}")
    raise _Wrong(
        segment,
        f'{prev_text} = {text} is not a single operation; each "=" must compute exactly one operation on two numbers',
    )


def _check_chain(texts: list[str], start: ex.Node) -> int:
    """Check the links of a chain whose first element (``texts[0]``) has tree ``start``."""
    prev, prev_text = start, texts[0]
    for i in range(1, len(texts)):
        text = texts[i]
        segment = f"{prev_text} = {_piece(texts, i)}"
        if not text:
            raise _Wrong(segment, 'an expression is missing after "="')
        tree = _read(text, segment)
        _check_link(prev, prev_text, tree, text, segment)
        prev, prev_text = tree, text
    if not isinstance(prev, int):
        raise _Wrong(_piece(texts, len(texts) - 1), f"the calculation stops at {prev_text} before reaching a single number")
    return prev


def _extend(line: str, segment: str) -> str:
    """``segment`` and the character after it in ``line`` (closes a prefix, see _piece)."""
    i = line.find(segment)
    return line[i : i + len(segment) + 1] if i >= 0 else segment


_DEFS_FORMAT = 'the letters should be defined as "A = (...), B = (...) and C = (...)"'


def _check_partition(body: str, question_tree: ex.Node) -> Partition:
    m = _PARTITION_RE.fullmatch(body)
    if not m:
        raise _Wrong(
            None, 'step (1) should be: This equation can be written as "<template>", where A = (...) and B = (...)'
        )
    template, defs_text = m.group(1), m.group(2)
    quoted = f'"{template}"'
    template_tree = _read(template, quoted, allow_letters=True)
    letters: list[str] = []
    definitions: list[str] = []
    if defs_text is not None:
        parts = _DEF_SPLIT_RE.split(defs_text)
        if parts[0] != "" or len(parts) < 3:
            raise _Wrong(defs_text + ".", _DEFS_FORMAT)
        letters, definitions = parts[1::2], parts[2::2]
        if Partition(template, tuple(letters), tuple(definitions)).sentence != body:
            raise _Wrong(defs_text + ".", _DEFS_FORMAT)
    seen: set[str] = set()
    for letter in letters:
        if letter in seen:
            raise _Wrong(f"{letter} = ", f"{letter} is defined twice")
        seen.add(letter)
    used = ex.letters(template_tree)
    for letter in used:
        if letter not in seen:
            raise _Wrong(quoted, f"{letter} is used in {template} but not defined")
    for letter in letters:
        if letter not in used:
            raise _Wrong(f"{letter} = ", f"{letter} is defined but not used in {template}")
    trees = {x: _read(d, _extend(body, f"{x} = {d}")) for x, d in zip(letters, definitions)}
    bindings = ex.match(template_tree, question_tree)
    if bindings is None:
        raise _Wrong(quoted, f"the equation does not have the form {template}")
    for letter, definition in zip(letters, definitions):
        if trees[letter] != bindings[letter]:
            raise _Wrong(
                _extend(body, f"{letter} = {definition}"),
                f"in the place of {letter} the equation has {ex.render_full(bindings[letter])}, not {definition}",
            )
    return Partition(template, tuple(letters), tuple(definitions))


def _check_calculation(body: str, letter: str, definition: str) -> int:
    m = _CALC_RE.fullmatch(body)
    if not m:
        raise _Wrong(None, f"this step should be: Let's calculate {letter} = {definition} = ... = <number>.")
    if m.group(1) != letter:
        raise _Wrong(f"Let's calculate {m.group(1)}", f"this step should calculate {letter}, the next letter of step (1)")
    texts = m.group(2).split(" = ")
    if texts[0] != definition:
        raise _Wrong(f"{letter} = {_piece(texts, 0)}", f"{letter} was defined in step (1) as {definition}, not {texts[0]}")
    return _check_chain(texts, _parsed(definition)[1])


def _check_final_equation(body: str, partition: Partition, values: dict[str, int]) -> int:
    m = _FINAL_EQ_RE.fullmatch(body)
    if not m:
        raise _Wrong(None, f"this step should be: Then, the final equation is {partition.template} = ... = <number>.")
    texts = m.group(1).split(" = ")
    if texts[0] != partition.template:
        raise _Wrong(f"is {_piece(texts, 0)}", f"the final equation is {partition.template} (step (1)), not {texts[0]}")
    template_tree = _parsed(partition.template)[1]
    if not partition.letters:
        return _check_chain(texts, template_tree)
    expected = _substitute_text(partition.template, values)
    if len(texts) < 2:
        raise _Wrong(_piece(texts, 0), f"the letters should be replaced by their values: {expected}")
    segment = f"{texts[0]} = {_piece(texts, 1)}"
    tree = _read(texts[1], segment)
    if tree != ex.substitute(template_tree, dict(values)):
        known = ", ".join(f"{x} = {v}" for x, v in values.items())
        raise _Wrong(segment, f"with {known}, {texts[0]} becomes {expected}, not {texts[1]}")
    return _check_chain(texts[1:], tree)


# ------------------------------------------------------------------ the task


def _as_int_tuple(name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {value!r}") from None
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 2:
            raise ValueError(f"{name} must hold integers >= 2 (operands per group), got {item!r}")
    return tuple(sorted(set(items)))


def _as_nestings(name: str, value: Any, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of nestings like \"2\" or \"2,2\", got {value!r}") from None
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    out = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else list(item) if isinstance(item, (list, tuple)) else [item]
        try:
            factors = [int(p) for p in parts]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: {item!r} is not a nesting like \"2\" or \"2,2\"") from None
        if not factors or any(f < 2 for f in factors):
            raise ValueError(f"{name}: {item!r} must be branching factors >= 2, like \"2\" or \"2,2\"")
        if prod(factors) > len(_LETTERS):
            raise ValueError(f"{name}: {item!r} makes {prod(factors)} groups; at most {len(_LETTERS)} are supported")
        out.append(",".join(str(f) for f in factors))
    return tuple(dict.fromkeys(out))


class ArithmeticTask(Task):
    """BIG-Bench-Hard multistep arithmetic with a scripted verifier and improver."""

    name = "multistep_arithmetic"
    hint = ""

    def __init__(
        self,
        *,
        seen_group_sizes: Any = (3, 4),
        seen_nestings: Any = ("2", "2,2"),
        unseen_group_sizes: Any = (5, 6),
        unseen_nestings: Any = ("2,2,2",),
        operand_range: int = 9,
        operators: Any = ex.OPERATORS,
        **unknown: Any,
    ) -> None:
        if unknown:
            allowed = "seen_group_sizes, seen_nestings, unseen_group_sizes, unseen_nestings, operand_range, operators"
            raise ValueError(f"unknown {self.name} difficulty option(s) {sorted(unknown)}; allowed: {allowed}")
        self.seen_group_sizes = _as_int_tuple("seen_group_sizes", seen_group_sizes, allow_empty=False)
        self.unseen_group_sizes = _as_int_tuple("unseen_group_sizes", unseen_group_sizes, allow_empty=True)
        self.seen_nestings = _as_nestings("seen_nestings", seen_nestings, allow_empty=False)
        self.unseen_nestings = _as_nestings("unseen_nestings", unseen_nestings, allow_empty=True)
        if not self.unseen_group_sizes and not self.unseen_nestings:
            raise ValueError("unseen_group_sizes and unseen_nestings are both empty; test_unseen needs one of them")
        if overlap := set(self.seen_group_sizes) & set(self.unseen_group_sizes):
            raise ValueError(f"unseen_group_sizes must differ from seen_group_sizes; both hold {sorted(overlap)}")
        if overlap := set(self.seen_nestings) & set(self.unseen_nestings):
            raise ValueError(f"unseen_nestings must differ from seen_nestings; both hold {sorted(overlap)}")
        if isinstance(operand_range, bool) or not isinstance(operand_range, int) or operand_range < 1:
            raise ValueError(f"operand_range must be an integer >= 1 (operands -R..R), got {operand_range!r}")
        self.operand_range = operand_range
        ops = tuple(dict.fromkeys(operators if not isinstance(operators, str) else list(operators)))
        if not ops or any(op not in ex.OPERATORS for op in ops):
            raise ValueError(f"operators must be a non-empty subset of {list(ex.OPERATORS)}, got {operators!r}")
        self.operators = ops

    # ---------------------------------------------------------------- problems

    def _config(self, rng: random.Random, split: Split) -> tuple[int, str]:
        if split != "test_unseen":
            return rng.choice(self.seen_group_sizes), rng.choice(self.seen_nestings)
        kinds = [k for k, v in (("sizes", self.unseen_group_sizes), ("nesting", self.unseen_nestings)) if v]
        if rng.choice(kinds) == "sizes":
            return rng.choice(self.unseen_group_sizes), rng.choice(self.seen_nestings)
        return rng.choice(self.seen_group_sizes), rng.choice(self.unseen_nestings)

    def _expression(self, rng: random.Random, factors: list[int], size: int) -> str:
        if factors:
            items = [self._expression(rng, factors[1:], size) for _ in range(factors[0])]
        else:
            items = [str(rng.randint(-self.operand_range, self.operand_range)) for _ in range(size)]
        parts = [items[0]]
        for item in items[1:]:
            parts += [rng.choice(self.operators), item]
        return "(" + " ".join(parts) + ")"

    @staticmethod
    def _in_test_bucket(question: str) -> bool:
        digest = hashlib.sha256(question.encode()).digest()
        return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0

    def generate(self, n: int, split: Split = "train", seed: int = 0) -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        problems: list[Problem] = []
        seen: set[str] = set()
        tries, max_tries = 0, 200 * n + 1000
        while len(problems) < n:
            tries += 1
            if tries > max_tries:
                raise ValueError(
                    f"only {len(problems)} distinct {split} questions found in {max_tries} draws; "
                    f"the difficulty settings allow too few questions for n={n}"
                )
            size, nesting = self._config(rng, split)
            question = self._expression(rng, [int(f) for f in nesting.split(",")], size) + " ="
            if question in seen:
                continue
            if split != "test_unseen" and self._in_test_bucket(question) != (split == "test_seen"):
                continue
            seen.add(question)
            _, tree, _ = _question_info(question)
            meta = {"group_size": size, "nesting": nesting, "difficulty": "unseen" if split == "test_unseen" else "seen"}
            problems.append(
                Problem(f"arith-{split}-{seed}-{len(problems)}", question, str(ex.evaluate(tree)), split, meta)
            )
        return problems

    def problem_from_record(self, record: dict, index: int, split: Split) -> Problem:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        key = "input" if "input" in record else "question" if "question" in record else None
        if key is None:
            raise ValueError("the record has neither an 'input' nor a 'question' field")
        if "target" not in record:
            raise ValueError("the record has no 'target' field")
        text = record[key]
        if not isinstance(text, str):
            raise ValueError(f"{key} must be a string, got {type(text).__name__}")
        try:
            expression, tree, _ = _question_info(text)
        except ex.ExprError as err:
            raise ValueError(f"{key} {text!r} is not an arithmetic expression: {err}") from None
        value = ex.evaluate(tree)
        target = str(record["target"]).strip()
        if not _INT_RE.fullmatch(target):
            raise ValueError(f"target {target!r} is not an integer")
        if int(target) != value:
            raise ValueError(f"target {target} does not match the value {value} of {expression}")
        problem_id = str(record.get("id") or f"arith-{split}-record-{index}")
        return Problem(problem_id, f"{expression} =", str(value), split, {"source": "record"})

    # --------------------------------------------------------------- rationales

    def gold_rationale(self, problem: Problem) -> str:
        _, _, partition = _question_info(problem.question)
        return "\n".join([self.attempt_prefix, *_step_lines(partition)])

    def normalize_answer(self, answer: str) -> str:
        """Integers compare by value ("+5" == "5", "-0" == "0"); anything else by text."""
        text = " ".join(answer.split()).rstrip(".")
        return str(int(text)) if _INT_RE.fullmatch(text) and len(text) <= ex.MAX_DIGITS else text

    # -------------------------------------------------------- scripted teachers

    def _check(self, problem: Problem, attempt: str) -> _Result:
        """Verify an attempt step by step; the first failure ends the check."""
        _, question_tree, _ = _question_info(problem.question)
        parsed = parse_attempt(attempt)
        steps = parsed.steps
        partition: Partition | None = None
        values: dict[str, int] = {}
        final_value: int | None = None
        pos = 0

        def fail(label: str, segment: str, reason: str) -> _Result:
            last = steps[pos - 1].label if pos > 0 else None
            # A feedback is one line of a trajectory: cut the segment at any line break
            # (what is left still occurs in the attempt) and join the reason's lines.
            segment = segment.splitlines()[0] if segment.splitlines() else ""
            reason = " ".join(reason.splitlines())
            reason = reason if reason.endswith(".") else reason + "."
            return _Result(parsed, Feedback(label, segment, reason, last), pos, partition)

        def body_of(label: str) -> str:
            """The body of the step at ``pos`` after its ``(label) ``; raises _Wrong."""
            step = steps[pos]
            prefix = f"{FINAL_RESPONSE_TAG} " if label == FINAL_LABEL else f"({label}) "
            first, *rest = step.text.split("\n")
            if _first_line("\n".join(rest)):
                raise _Wrong("", "the step continues on another line with text that is not a step")
            if not first.startswith(prefix):
                raise _Wrong(None, f'the step should start with "{prefix}"')
            return first[len(prefix) :]

        while True:
            if pos == 0:
                label, what = "1", "it should write the equation with letters"
            elif partition is not None and pos <= len(partition.letters):
                label, what = str(pos + 1), f"it should calculate {partition.letters[pos - 1]}"
            elif partition is not None and pos == len(partition.letters) + 1:
                label, what = str(pos + 1), "it should compute the final equation"
            else:
                label, what = FINAL_LABEL, ""
            if pos >= len(steps):
                if label == FINAL_LABEL:
                    return fail(label, "", "the final response is missing")
                return fail(label, "", f"step ({label}) is missing; {what}")
            if steps[pos].label != label:
                found = "the final response" if steps[pos].label == FINAL_LABEL else f"step ({steps[pos].label})"
                if label == FINAL_LABEL:
                    return fail(label, "", f"the final response should follow step ({steps[pos - 1].label}), not {found}")
                return fail(label, "", f"step ({label}) is missing ({found} comes instead); {what}")
            try:
                body = body_of(label)
                if pos == 0:
                    partition = _check_partition(body, question_tree)
                elif label == FINAL_LABEL:
                    m = _ANSWER_RE.fullmatch(body)
                    if not m:
                        raise _Wrong(None, f'the final response should be "So the answer is {final_value}."')
                    if m.group(1) != str(final_value):
                        raise _Wrong(
                            body,
                            f"the final equation gives {final_value}, so the answer is {final_value}",
                        )
                elif pos <= len(partition.letters):
                    letter = partition.letters[pos - 1]
                    values[letter] = _check_calculation(body, letter, partition.definitions[pos - 1])
                else:
                    final_value = _check_final_equation(body, partition, values)
            except _Wrong as wrong:
                segment = steps[pos].text.split("\n")[0] if wrong.segment is None else wrong.segment
                return fail(label, segment, wrong.reason)
            pos += 1
            if label == FINAL_LABEL:
                break
        if pos < len(steps):  # something after the final response
            pos -= 1
            found = "another final response" if steps[pos + 1].label == FINAL_LABEL else f"step ({steps[pos + 1].label})"
            return fail(FINAL_LABEL, "", f"the final response must be the last step, but {found} follows it")
        return _Result(parsed, Feedback.all_correct(steps[pos - 2].label), pos, partition)

    def verify(self, problem: Problem, attempt: str) -> Feedback:
        """Scripted FBK (see the module docstring); never raises on any attempt text."""
        return self._check(problem, attempt).feedback

    def improve(self, problem: Problem, attempt: str, feedback: Feedback) -> str:
        """Scripted IMP: steps before the flagged one verbatim, the rest written correctly.

        The output always verifies as all-correct: when ``feedback`` points later than
        the attempt's first actual error (or not at a step), the kept prefix ends there.
        """
        result = self._check(problem, attempt)
        keep = result.position
        if feedback.step is not None:
            if feedback.step == FINAL_LABEL:
                flagged = len(result.partition.letters) + 2 if result.partition else 0
            else:
                try:
                    flagged = max(int(feedback.step) - 1, 0)
                except ValueError:
                    flagged = 0
            keep = min(keep, flagged)
        partition = result.partition if keep >= 1 and result.partition else _question_info(problem.question)[2]
        lines = _step_lines(partition)
        kept = [step.text for step in result.parsed.steps[:keep]]
        return "\n".join([self.attempt_prefix, *kept, *lines[keep:]])
