"""BIG-Bench-Hard word sorting: problems, gold rationales, and the scripted FBK and IMP.

Question and target (as in BIG-Bench)::

    Sort the following words alphabetically: List: oven costume counterpart
    costume counterpart oven

The gold rationale buckets the words by their first letter (with its alphabet index),
then sorts every bucket of tied words by the next letter in nested steps, so each step
is one small, checkable claim that a scripted verifier can point at::

    Let's think step by step.
    (1) The first letter: "oven": "o" (15). "costume": "c" (3). "counterpart": "c" (3).
    (2) We now have: (3) ["costume" ? "counterpart"] < (15) "oven". Now sort this subpart ["costume" ? "counterpart"] by looking at their second letters.
    (2.1) The second letter: "costume": "o" (15). "counterpart": "o" (15).
    (2.2) We now have: (15) ["costume" ? "counterpart"]. Now sort this subpart ["costume" ? "counterpart"] by looking at their third letters.
    (2.2.1) The third letter: "costume": "s" (19). "counterpart": "u" (21).
    (2.2.2) We now have: (19) "costume" < (21) "counterpart".
    (3) Hence, we have "costume" < "counterpart" < "oven".
    (Final response) So the answer is costume counterpart oven.

Numbering: a sort of a list is two steps, ``(k)`` the letters and ``(k+1)`` the groups;
each tied group of step ``(k+1)`` is sorted, in order, by a nested pair of steps
``(k+1.1)``/``(k+1.2)``, the next tied group by ``(k+1.3)``/``(k+1.4)``, and so on. A word
without a letter at that place (a prefix of a tied word) gets ``none (0)`` and comes
first. Repeated words (possible only in loaded problems) are written ``"x" = "x"``.

The verifier is strict: a step is correct when it is exactly the gold step, because the
small model learns this one canonical format. When a step differs it names the earliest
wrong part and why (wrong letter, wrong alphabet index, wrong order, a missing or a
repeated word, a word not in the list, a wrong final list), falling back to "this step
should read ..." for text that is not in the format at all.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

from tripost_ray.tasks.base import SPLITS, Problem, Split, Task
from tripost_ray.trajectory import FINAL_LABEL, FINAL_RESPONSE_TAG, Feedback, Step, parse_attempt

QUESTION_PREFIX = "Sort the following words alphabetically: List: "
_WORD_RE = re.compile(r"^[a-z]+$")
#: One problem in this many (by a hash of its set of words) belongs to the test splits.
_TEST_BUCKETS = 5
_ORDINALS = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()


@lru_cache(maxsize=1)
def load_vocabulary() -> tuple[str, ...]:
    """The shipped vocabulary (``tripost_ray/data/words.txt``), in file order."""
    text = resources.files("tripost_ray").joinpath("data/words.txt").read_text(encoding="utf-8")
    words = tuple(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))
    bad = [w for w in words if not _WORD_RE.match(w)]
    if bad or len(set(words)) != len(words):
        raise RuntimeError(f"corrupt word-sorting vocabulary: non a-z words {bad[:5]} or duplicates")
    return words


def ordinal(n: int) -> str:
    """``1 -> "first"``; past twenty ``21 -> "21th"`` (words that long are rare)."""
    return _ORDINALS[n - 1] if 1 <= n <= len(_ORDINALS) else f"{n}th"


def _letter(word: str, pos: int) -> tuple[str | None, int]:
    """The letter at ``pos`` and its alphabet index; (None, 0) past the end of the word."""
    if pos < len(word):
        return word[pos], ord(word[pos]) - ord("a") + 1
    return None, 0


def _q(word: str) -> str:
    return f'"{word}"'


def _letter_item(word: str, pos: int) -> str:
    letter, idx = _letter(word, pos)
    return f"{_q(word)}: {_q(letter) if letter else 'none'} ({idx})."


def _group_text(words: Sequence[str]) -> str:
    """A group of one ``"w"``, of equal words ``"w" = "w"``, or of tied words ``["a" ? "b"]``."""
    if len(set(words)) == 1:
        return " = ".join(_q(w) for w in words)
    return "[" + " ? ".join(_q(w) for w in words) + "]"


def _is_tie(words: Sequence[str]) -> bool:
    return len(set(words)) > 1


def _chain(sorted_words: Sequence[str]) -> str:
    """``"a" < "b" = "b" < "c"`` for a sorted list."""
    out = _q(sorted_words[0]) if sorted_words else ""
    for prev, word in zip(sorted_words, sorted_words[1:]):
        out += (" = " if word == prev else " < ") + _q(word)
    return out


@dataclass(frozen=True)
class _GoldStep:
    """One gold step and what it claims, so a wrong attempt step can be explained."""

    label: str
    kind: str  # letters | groups | hence | final
    text: str
    words: tuple[str, ...]  # letters/groups: this sub-list in listing order; hence/final: sorted
    pos: int = 0
    groups: tuple[tuple[int, tuple[str, ...]], ...] = ()
    sentences: tuple[str, ...] = ()

    @property
    def body(self) -> str:
        return Step(self.label, self.text).body


def _sort_block(words: list[str], pos: int, parent: str, num: int, out: list[_GoldStep]) -> int:
    """Append the steps that sort ``words`` by the letter at ``pos``; return the next number."""
    label = f"{parent}{num}"
    items = " ".join(_letter_item(w, pos) for w in words)
    out.append(_GoldStep(label, "letters", f"({label}) The {ordinal(pos + 1)} letter: {items}", tuple(words), pos))
    by_index: dict[int, list[str]] = {}
    for w in words:
        by_index.setdefault(_letter(w, pos)[1], []).append(w)
    groups = tuple((idx, tuple(by_index[idx])) for idx in sorted(by_index))
    glabel = f"{parent}{num + 1}"
    sentences = tuple(
        f"Now sort this subpart {_group_text(g)} by looking at their {ordinal(pos + 2)} letters."
        for _, g in groups
        if _is_tie(g)
    )
    chain = " < ".join(f"({idx}) {_group_text(g)}" for idx, g in groups)
    text = " ".join([f"({glabel}) We now have: {chain}.", *sentences])
    out.append(_GoldStep(glabel, "groups", text, tuple(words), pos, groups, sentences))
    sub = 1
    for _, g in groups:
        if _is_tie(g):
            sub = _sort_block(list(g), pos + 1, glabel + ".", sub, out)
    return num + 2


def _gold_steps(words: Sequence[str]) -> tuple[_GoldStep, ...]:
    out: list[_GoldStep] = []
    hence_num = _sort_block(list(words), 0, "", 1, out)
    ordered = tuple(sorted(words))
    label = str(hence_num)
    out.append(_GoldStep(label, "hence", f"({label}) Hence, we have {_chain(ordered)}.", ordered))
    answer = " ".join(ordered)
    out.append(_GoldStep(FINAL_LABEL, "final", f"{FINAL_RESPONSE_TAG} So the answer is {answer}.", ordered))
    return tuple(out)


def parse_question(question: str) -> list[str]:
    """The words of a word-sorting question; ValueError naming what is wrong."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    text = question.strip()
    if not text.startswith(QUESTION_PREFIX.strip()):
        raise ValueError(f"question must start with {QUESTION_PREFIX.strip()!r}, got {text[:60]!r}")
    words = text[len(QUESTION_PREFIX.strip()) :].split()
    if not words:
        raise ValueError("question lists no words")
    bad = [w for w in words if not _WORD_RE.match(w)]
    if bad:
        raise ValueError(f"words must be lowercase a-z only; got {bad[:3]}")
    return words


def _question(words: Sequence[str]) -> str:
    return QUESTION_PREFIX + " ".join(words)


def _is_test_bucket(words: Sequence[str]) -> bool:
    """Train/test membership by a hash of the *set* of words, so no seed can leak a test
    problem (or a reordering of it) into training."""
    digest = hashlib.sha256("\n".join(sorted(words)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0


def _check_sizes(name: str, sizes: object) -> tuple[int, int]:
    if (
        not isinstance(sizes, (tuple, list))
        or len(sizes) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
    ):
        raise ValueError(f"word_sorting {name} must be two integers (min, max), got {sizes!r}")
    lo, hi = sizes
    if not 1 <= lo <= hi:
        raise ValueError(f"word_sorting {name} must satisfy 1 <= min <= max, got {sizes!r}")
    return lo, hi


class WordSortingTask(Task):
    """Sort 2-7 words (seen) or 8-20 words (unseen) drawn from the shipped vocabulary.

    ``vocab_size`` restricts the vocabulary to its first N words (the file's order is a
    fixed shuffle, so a small vocabulary still spreads over the alphabet).
    """

    name = "word_sorting"
    hint = ""

    def __init__(
        self,
        seen_sizes: Sequence[int] = (2, 7),
        unseen_sizes: Sequence[int] = (8, 20),
        vocab_size: int | None = None,
    ) -> None:
        self.seen_sizes = _check_sizes("seen_sizes", seen_sizes)
        self.unseen_sizes = _check_sizes("unseen_sizes", unseen_sizes)
        vocab = load_vocabulary()
        if vocab_size is not None:
            if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
                raise ValueError(f"word_sorting vocab_size must be an integer or None, got {vocab_size!r}")
            largest = max(self.seen_sizes[1], self.unseen_sizes[1])
            if not largest <= vocab_size <= len(vocab):
                raise ValueError(
                    f"word_sorting vocab_size must be between {largest} (the largest list) and "
                    f"{len(vocab)} (the shipped vocabulary), got {vocab_size}"
                )
            vocab = vocab[:vocab_size]
        self.vocab: tuple[str, ...] = vocab

    # ---------------------------------------------------------------- problems

    def generate(self, n: int, split: Split, seed: int = 0) -> list[Problem]:
        """``n`` distinct seeded problems; train never shares a set of words with a test split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        lo, hi = self.unseen_sizes if split == "test_unseen" else self.seen_sizes
        want_test = split != "train"
        rng = random.Random(f"word_sorting:{split}:{seed}")
        problems: list[Problem] = []
        seen: set[tuple[str, ...]] = set()
        tries = 0
        while len(problems) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(
                    f"could only make {len(problems)} of {n} distinct {split} word-sorting problems from "
                    f"{len(self.vocab)} words with sizes {lo}-{hi}; raise vocab_size or the sizes"
                )
            words = rng.sample(self.vocab, rng.randint(lo, hi))
            key = tuple(sorted(words))
            if key in seen or _is_test_bucket(words) != want_test:
                continue
            seen.add(key)
            question = _question(words)
            digest = hashlib.sha256(question.encode()).hexdigest()[:12]
            problems.append(
                Problem(f"{self.name}-{split}-{digest}", question, " ".join(key), split, {"n_words": len(words)})
            )
        return problems

    def problem_from_record(self, record: dict, index: int, split: Split) -> Problem:
        """BIG-Bench ``{"input", "target"}`` or ``{"question", "target"}``; the target must be
        the sorted list."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        question = record.get("input", record.get("question"))
        if question is None:
            raise ValueError('record needs an "input" (or "question") field')
        words = parse_question(question)
        target = record.get("target")
        if not isinstance(target, str):
            raise ValueError(f'record needs a string "target", got {target!r}')
        expected = " ".join(sorted(words))
        if " ".join(target.split()) != expected:
            raise ValueError(f"target {target!r} is not the list in alphabetical order ({expected!r})")
        pid = str(record["id"]) if record.get("id") is not None else f"{self.name}-{split}-{index}"
        return Problem(pid, _question(words), expected, split, {"n_words": len(words)})

    # --------------------------------------------------------------- rationales

    def gold_steps(self, problem: Problem) -> tuple[_GoldStep, ...]:
        return _gold_steps(parse_question(problem.question))

    def gold_rationale(self, problem: Problem) -> str:
        return "\n".join([self.attempt_prefix, *(s.text for s in self.gold_steps(problem))])

    # -------------------------------------------------------- scripted teachers

    def verify(self, problem: Problem, attempt: str) -> Feedback:
        """The earliest step that differs from the gold rationale, explained; never raises
        on any attempt text. The preamble is the prompt's text and is not judged."""
        gold = self.gold_steps(problem)
        steps = parse_attempt(attempt if isinstance(attempt, str) else "").steps
        for i, step in enumerate(steps):
            before = steps[i - 1].label if i else None
            if i >= len(gold):
                return Feedback(step.label, _one_line(step.text), "the attempt must end with the final response, "
                                "and this step comes after it", before)
            if step.text != gold[i].text:
                segment, reason = _diagnose(step, gold[i], gold)
                return Feedback(step.label, _one_line(segment) or _one_line(step.text), reason, before)
        if len(steps) < len(gold):
            missing = gold[len(steps)]
            where = f"step ({missing.label})" if missing.kind != "final" else "the final response"
            last = steps[-1].label if steps else None
            after = f"after step ({last})" if last else "before step (1)"
            return Feedback(FINAL_LABEL, "", f"the attempt stops {after}: {where} and what follows are missing", last)
        return Feedback.all_correct(gold[-2].label)

    def improve(self, problem: Problem, attempt: str, feedback: Feedback) -> str:
        """Keep the steps before ``feedback.step`` verbatim and write the rest correctly."""
        if feedback.is_correct:
            return attempt
        gold = self.gold_steps(problem)
        steps = parse_attempt(attempt if isinstance(attempt, str) else "").steps
        diverge = next((i for i, (s, g) in enumerate(zip(steps, gold)) if s.text != g.text), min(len(steps), len(gold)))
        at = [i for i, s in enumerate(steps) if s.label == feedback.step]
        if diverge in at or not at:
            cut = diverge
        else:
            cut = at[0]
        kept = [s.text for s in steps[:cut]]
        return "\n".join([self.attempt_prefix, *kept, *(g.text for g in gold[cut:])])


# ------------------------------------------------------------------ diagnosis

_ITEM_RE = re.compile(r'"([^"\n]*)": (?:"([^"\n]*)"|none) \((\d+)\)\.')
_GROUP_RE = re.compile(r'\((\d+)\) (\["[^"\n]*"(?: \? "[^"\n]*")*\]|"[^"\n]*"(?: = "[^"\n]*")*)')
_QUOTED_RE = re.compile(r'"([^"\n]*)"')


def _one_line(text: str) -> str:
    """Feedback is one line of text: keep the first non-empty line of a segment."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def _short(word: str) -> str:
    return word if len(word) <= 40 else word[:37] + "..."


def _first_difference(actual: str, expected: str) -> str:
    """The whitespace-delimited part of ``actual`` where it first departs from ``expected``."""
    i = next((k for k, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
    if i >= len(actual):  # actual is a prefix of expected: blame its last word
        i = max(len(actual) - 1, 0)
    start = actual.rfind(" ", 0, i) + 1
    end = actual.find(" ", i)
    seg = actual[start : end if end >= 0 else len(actual)]
    return seg if seg.strip() else actual


def _order_reason(first: str, second: str) -> str:
    """Why ``first`` comes before ``second`` alphabetically."""
    k = next((k for k, (a, b) in enumerate(zip(first, second)) if a != b), None)
    if k is None:
        return f'"{_short(first)}" is the start of "{_short(second)}", so it comes first'
    return (
        f'"{_short(first)}" comes before "{_short(second)}": their {ordinal(k + 1)} letters are '
        f'"{first[k]}" ({_letter(first, k)[1]}) and "{second[k]}" ({_letter(second, k)[1]})'
    )


def _word_reason(
    actual: str, expected: str, listed: list[str], written: Sequence[str], allowed: Sequence[str], where: str
) -> str:
    """Why ``actual`` stands where ``expected`` belongs, or "" when it is only misplaced.

    ``listed``: the words before it; ``written``: every word the step writes."""
    if actual not in allowed:
        return f'"{_short(actual)}" is not one of the words {where}'
    if listed.count(actual) >= allowed.count(actual):
        return f'"{actual}" is written twice'
    if expected and expected not in written:
        return f'"{expected}" is missing: it comes here'
    return ""


def _diagnose(step: Step, gold: _GoldStep, all_gold: Sequence[_GoldStep]) -> tuple[str, str]:
    """(wrong segment of ``step``, reason) for a step that differs from ``gold``."""
    if step.label != gold.label:
        if step.label == FINAL_LABEL:
            return step.text, f"the final response comes too early: step ({gold.label}) and the steps after it are missing"
        if gold.label == FINAL_LABEL:
            return f"({step.label})", "all steps are done, so the final response comes next, not another step"
        return f"({step.label})", f"this should be step ({gold.label})"
    if gold.text.startswith(step.text) and not step.text.endswith("."):  # cut off mid-sentence
        return _first_difference(step.text, gold.text), f"the step stops before it is complete; it should read: {gold.body}"
    diagnose = {"letters": _diagnose_letters, "groups": _diagnose_groups}.get(gold.kind, _diagnose_list)
    found = diagnose(step.body, gold, all_gold)
    if found and found[0] and found[0] in step.text:
        return found
    return _first_difference(step.text, gold.text), f"this step should read: {gold.body}"


def _diagnose_letters(body: str, gold: _GoldStep, _: Sequence[_GoldStep]) -> tuple[str, str] | None:
    nth = ordinal(gold.pos + 1)
    header = f"The {nth} letter: "
    if not body.startswith(header):
        m = re.match(r"The (\S+) letter:", body)
        if m and m.group(1) != nth:
            return m.group(0), f"these words are compared by their {nth} letters, not by their {m.group(1)} letters"
        return None
    where = "of this subpart" if gold.pos else "in the list"
    written = [m.group(1) for m in _ITEM_RE.finditer(body)]
    listed: list[str] = []
    last_item = body
    pos = len(header)
    for word in gold.words:
        if pos < len(body) and body[pos] == " " and listed:
            pos += 1
        m = _ITEM_RE.match(body, pos)
        if m is None:
            if pos >= len(body):
                return last_item, f'"{word}" is missing after it'
            rest = body[pos:]
            return (rest.split(" ")[0] or rest), f'this is not of the form "word": "letter" (index); "{word}" comes here'
        got, letter, idx, seg = m.group(1), m.group(2), int(m.group(3)), m.group(0)[:-1]
        if got != word:
            return seg, _word_reason(got, word, listed, written, gold.words, where) or (
                f'the words are listed in the order of the {"list" if not gold.pos else "subpart"}, so "{word}" comes next'
            )
        want_letter, want_idx = _letter(word, gold.pos)
        if letter != want_letter:
            if want_letter is None:
                return seg, f'"{word}" has no {nth} letter, so it is none (0)'
            return seg, f'the {nth} letter of "{word}" is "{want_letter}", not "{_short(letter or "none")}"'
        if idx != want_idx:
            what = f'"{letter}" is letter {want_idx} of the alphabet' if letter else "a missing letter counts as 0"
            return seg, f"{what}, not {idx}"
        listed.append(got)
        last_item = seg
        pos = m.end()
    rest = body[pos:].strip()
    if rest:
        m = _ITEM_RE.match(rest)
        if m:
            return m.group(0), _word_reason(m.group(1), "", listed, written, gold.words, where) or "every word is listed once"
        return rest.split(" ")[0] or rest, "the step should end after the last word"
    return None


def _diagnose_groups(body: str, gold: _GoldStep, all_gold: Sequence[_GoldStep]) -> tuple[str, str] | None:
    header = "We now have: "
    if not body.startswith(header):
        return None
    nth = ordinal(gold.pos + 1)
    where = "in the list" if not gold.pos else "of this subpart"
    letters_label = next((g.label for g in all_gold if g.kind == "letters" and g.words == gold.words and g.pos == gold.pos), "")
    listed: list[str] = []
    pos = len(header)
    for k, (want_idx, want_words) in enumerate(gold.groups):
        if k:
            if not body.startswith(" < ", pos):
                seg = body[pos:].split(" ")[0] or body[max(pos - 1, 0) :]
                return seg, f"the groups are joined by \"<\"; the group of {nth} letter index {want_idx} comes next"
            pos += 3
        m = _GROUP_RE.match(body, pos)
        if m is None:
            rest = body[pos:]
            if not rest or rest.startswith("."):
                return body[: pos + 1].split(" ")[-1] or body, f"the group ({want_idx}) {_group_text(want_words)} is missing"
            return rest.split(" ")[0] or rest, f"the group ({want_idx}) {_group_text(want_words)} comes here"
        idx, words = int(m.group(1)), _QUOTED_RE.findall(m.group(2))
        seg = m.group(0)
        for w in words:
            if w not in gold.words:
                return seg, f'"{_short(w)}" is not one of the words {where}'
            if listed.count(w) >= gold.words.count(w):
                return seg, f'"{w}" is written twice'
            listed.append(w)
        real = {w: _letter(w, gold.pos)[1] for w in words}
        wrong = [w for w in words if real[w] != idx]
        if wrong and all(real[w] == real[wrong[0]] for w in words):
            return seg, f'in step ({letters_label}) "{wrong[0]}" has index {real[wrong[0]]}, not {idx}'
        if tuple(words) != want_words or idx != want_idx:
            missing = [w for w in want_words if w not in words]
            if wrong:
                other = wrong[0]
                return seg, f'"{other}" has index {real[other]} and does not belong to the group ({idx})'
            if idx > want_idx and missing:
                return seg, (
                    f"the groups go in increasing order: ({want_idx}) {_group_text(want_words)} comes before ({idx})"
                )
            if missing:
                return seg, f'"{missing[0]}" also has index {want_idx} and belongs to this group'
            return seg, f"this group should be ({want_idx}) {_group_text(want_words)}"
        pos = m.end()
    if not body.startswith(".", pos):
        rest = body[pos:]
        if rest.startswith(" < "):
            return rest.split(" ")[2] if len(rest.split(" ")) > 2 else rest, "every word is already in a group"
        return (rest.split(" ")[0] or body.split(" ")[-1]), "the groups end with a period"
    sentences = re.findall(r"Now sort this subpart .*? letters\.", body[pos + 1 :])
    for k, want in enumerate(gold.sentences):
        if k >= len(sentences):
            return body.split(" ")[-1] or body, f'the step should go on with: "{want}"'
        if sentences[k] != want:
            return sentences[k], f'the next subpart to sort is: "{want}"'
    if len(sentences) > len(gold.sentences):
        extra = sentences[len(gold.sentences)]
        return extra, "only groups of words that share this letter need sorting by the next letter"
    return None


def _diagnose_list(body: str, gold: _GoldStep, _: Sequence[_GoldStep]) -> tuple[str, str] | None:
    """The Hence step (``"a" < "b"``) and the final response (``a b``): missing, repeated,
    foreign or misordered words."""
    if gold.kind == "hence":
        header = "Hence, we have "
        if not body.startswith(header):
            return None
        words = _QUOTED_RE.findall(body[len(header) :])
        chunks = [f'"{w}"' for w in words]
        where = "in the list"
    else:
        m = re.match(r"So the answer is (.*?)\.?$", body)
        if not m:
            return None
        words = m.group(1).split()
        chunks = words
        where = "in the list"
    want = list(gold.words)
    listed: list[str] = []
    for k, w in enumerate(words):
        if k >= len(want) or w != want[k]:
            expected = want[k] if k < len(want) else ""
            reason = _word_reason(w, expected, listed, words, want, where)
            if not reason:
                reason = _order_reason(expected, w)
            return chunks[k], reason
        listed.append(w)
    if len(words) < len(want):
        seg = chunks[-1] if chunks else body
        return seg, f'"{want[len(words)]}" is missing after it' if chunks else f'"{want[0]}" is missing'
    return None
