"""BIG-Bench-Hard logical deduction: problems, gold rationales, and the scripted FBK and IMP.

A question (as in BIG-Bench) describes N objects in a fixed order, states N-1 or so
constraints, and asks which option holds; the target is a letter::

    The following paragraphs each describe a set of three objects arranged in a fixed order. The statements
    are logically consistent within each paragraph. On a branch, there are three birds: a blue jay, a quail,
    and a falcon. The falcon is to the right of the blue jay. The blue jay is to the right of the quail.
    Options:
    (A) The blue jay is the second from the left
    (B) The quail is the second from the left
    (C) The falcon is the second from the left
    (A)

The gold rationale numbers the places, then applies one constraint per step and writes
the arrangement it yields: the places each object can still take (an object that may
take any place is left out). A step applies its constraint and then the rule that two
objects never share a place, until nothing changes. Steps go through the constraints in
the question's order, again and again, writing only the ones that change something,
until every object has one place; then it reads the order and checks the option::

    Let's think step by step.
    (1) Number the places from 1 (the leftmost) to 3 (the rightmost).
    (2) Apply "The falcon is to the right of the blue jay." Now: blue jay 1 or 2, falcon 2 or 3.
    (3) Apply "The blue jay is to the right of the quail." Now: blue jay 2, quail 1, falcon 3.
    (4) So the order is: quail, blue jay, falcon.
    (5) Place 2 holds the blue jay, so option (A) "The blue jay is the second from the left" is right.
    (Final response) So the answer is (A).

Seen problems have 3 or 5 objects, unseen 7 (the paper's split). The generator only
keeps puzzles this propagation solves, so the rationale is complete and the answer
unique; BIG-Bench's own puzzles are solved by it too (checked over its 750 published
test problems). The verifier is strict (a step is right when it is the gold step) and
explains the earliest wrong step: a constraint that is not the next one, a place that a
named constraint rules out, a place taken by another object, a wrong order, or an option
that does not match.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from tripost_ray.tasks.base import SPLITS, Problem, Split
from tripost_ray.tasks.steps import Diagnose, StepwiseTask
from tripost_ray.trajectory import FINAL_LABEL, FINAL_RESPONSE_TAG, Step

PREAMBLE = (
    "The following paragraphs each describe a set of {n} objects arranged in a fixed order. The statements are "
    "logically consistent within each paragraph."
)
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten").split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth").split()
LETTERS = "ABCDEFGHIJ"
#: One problem in this many (by a hash of its objects and their order) belongs to the test splits.
_TEST_BUCKETS = 5


@dataclass(frozen=True)
class Scene:
    """One BIG-Bench setting: how it is introduced, how its objects are named, and its axis.

    Place 1 is the ``low`` end (leftmost, oldest, first, cheapest)."""

    key: str
    intro: str  # "On a branch, there are {n} birds: {names}."
    article: bool  # "a blue jay" / "the blue jay" vs "Ana" / "apples"
    plural: bool  # "The apples are" vs "The quail is"
    low: str  # name of place 1
    high: str  # name of place N
    names: tuple[str, ...]


SCENES: dict[str, Scene] = {
    s.key: s
    for s in (
        Scene("branch", "On a branch, there are {n} birds: {names}.", True, False, "the leftmost", "the rightmost",
              ("blue jay", "quail", "falcon", "raven", "cardinal", "hummingbird", "owl", "crow", "robin",
               "hawk")),
        Scene("shelf", "On a shelf, there are {n} books: {names}.", True, False, "the leftmost", "the rightmost",
              ("blue book", "orange book", "red book", "green book", "white book", "black book", "brown book",
               "gray book", "purple book", "yellow book")),
        Scene("cars", "In an antique car show, there are {n} vehicles: {names}.", True, False, "the oldest",
              "the newest", ("motorcyle", "limousine", "convertible", "bus", "truck", "sedan", "minivan",
                             "station wagon", "tractor", "hatchback")),
        Scene("golf", "In a golf tournament, there were {n} golfers: {names}.", False, False, "first", "last",
              ("Ana", "Eve", "Ada", "Dan", "Rob", "Amy", "Joe", "Mel", "Mya", "Eli")),
        Scene("fruit", "A fruit stand sells {n} fruits: {names}.", False, True, "the cheapest", "the most expensive",
              ("apples", "peaches", "mangoes", "plums", "pears", "kiwis", "loquats", "oranges", "watermelons",
               "cantaloupes")),
    )
}


# ----------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Constraint:
    """``a`` is at place ``place`` (absolute), or ``a`` is at a lower place than ``b``."""

    text: str  # the sentence as in the question, with its period
    a: str
    b: str | None = None
    place: int | None = None

    def holds(self, places: dict[str, int]) -> bool:
        if self.b is None:
            return places[self.a] == self.place
        return places[self.a] < places[self.b]


def _the(scene: Scene, name: str) -> str:
    return f"The {name}" if scene.article or scene.plural else name


def _ref(scene: Scene, name: str) -> str:
    """How a rationale refers to an object: ``the blue jay``, ``the apples``, ``Ana``."""
    return f"the {name}" if scene.article or scene.plural else name


def _be(scene: Scene) -> str:
    return "are" if scene.plural else "is"


def place_phrase(scene: Scene, place: int, n: int) -> str:
    """The canonical phrase for a place: ``the second from the left``, ``the third-newest``..."""
    k_low, k_high = place, n + 1 - place
    if scene.key in ("branch", "shelf"):
        if place == 1:
            return "the leftmost"
        if place == n:
            return "the rightmost"
        return f"the {ORDINALS[k_low - 1]} from the left" if k_low <= k_high else f"the {ORDINALS[k_high - 1]} from the right"
    if scene.key == "cars":
        if place == 1:
            return "the oldest"
        if place == n:
            return "the newest"
        return f"the {ORDINALS[k_low - 1]}-oldest" if k_low <= k_high else f"the {ORDINALS[k_high - 1]}-newest"
    if scene.key == "golf":
        if place == n:
            return "last"
        if k_high <= 3 and k_high < k_low:
            return f"{ORDINALS[k_high - 1]}-to-last"
        return ORDINALS[k_low - 1]
    if place == 1:
        return "the cheapest"
    if place == n:
        return "the most expensive"
    return f"the {ORDINALS[k_low - 1]}-cheapest" if k_low <= k_high else f"the {ORDINALS[k_high - 1]}-most expensive"


def _place_from_phrase(scene: Scene, phrase: str, n: int) -> int:
    """Inverse of :func:`place_phrase`, for every phrasing BIG-Bench uses; ValueError otherwise."""
    fixed = {"the leftmost": 1, "the rightmost": n, "the oldest": 1, "the newest": n, "first": 1, "last": n,
             "the cheapest": 1, "the most expensive": n}
    if phrase in fixed:
        return fixed[phrase]
    m = re.fullmatch(r"(?:the )?(\w+?)(?: from the |-to-|-most |-)(left|right|last|oldest|newest|expensive|cheapest)",
                     phrase)
    if m and m.group(1) in ORDINALS:
        k = ORDINALS.index(m.group(1)) + 1
        return k if m.group(2) in ("left", "oldest", "cheapest") else n + 1 - k
    if phrase in ORDINALS:
        return ORDINALS.index(phrase) + 1
    raise ValueError(f"unknown place {phrase!r}")


def _relation_words(scene: Scene) -> tuple[str, str]:
    """(lower-place relation, higher-place relation)."""
    return {
        "branch": ("to the left of", "to the right of"),
        "shelf": ("to the left of", "to the right of"),
        "cars": ("older than", "newer than"),
        "golf": ("above", "below"),
        "fruit": ("less expensive than", "more expensive than"),
    }[scene.key]


def absolute_sentence(scene: Scene, name: str, place: int, n: int) -> str:
    if scene.key == "golf":
        return f"{name} finished {place_phrase(scene, place, n)}."
    return f"{_the(scene, name)} {_be(scene)} {place_phrase(scene, place, n)}."


def relation_sentence(scene: Scene, a: str, b: str, lower: bool) -> str:
    """``a`` relative to ``b``; ``lower``: a is at a lower place than b."""
    word = _relation_words(scene)[0 if lower else 1]
    if scene.key == "golf":
        return f"{a} finished {word} {b}."
    return f"{_the(scene, a)} {_be(scene)} {word} {_the(scene, b).lower() if scene.article or scene.plural else b}."


def _option_text(scene: Scene, name: str, place: int, n: int) -> str:
    return absolute_sentence(scene, name, place, n)[:-1]


# ------------------------------------------------------------------ puzzles


@dataclass(frozen=True)
class Puzzle:
    scene: Scene
    names: tuple[str, ...]
    constraints: tuple[Constraint, ...]
    place: int  # the place the options ask about
    options: tuple[str, ...] = ()  # option texts, one per object in listing order (canonical when empty)

    @property
    def n(self) -> int:
        return len(self.names)

    def __post_init__(self) -> None:
        if not self.options:
            object.__setattr__(self, "options", tuple(_option_text(self.scene, nm, self.place, self.n) for nm in self.names))


def render_question(p: Puzzle) -> str:
    def listed(names: Sequence[str]) -> str:
        items = [(("an " if nm[0] in "aeiou" else "a ") + nm) if p.scene.article else nm for nm in names]
        return ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 2 else " and ".join(items)

    intro = p.scene.intro.format(n=NUMBER_WORDS[p.n], names=listed(p.names))
    body = " ".join([PREAMBLE.format(n=NUMBER_WORDS[p.n]), intro, *(c.text for c in p.constraints)])
    options = [f"({LETTERS[i]}) {text}" for i, text in enumerate(p.options)]
    return body + "\nOptions:\n" + "\n".join(options)


_INTRO_RE = re.compile(
    r"^(?P<head>.*?)(?:there are|there were|sells) (?P<count>\w+) (?P<kind>birds|books|vehicles|golfers|fruits): "
    r"(?P<names>.*?)\.(?: |$)"
)
_KIND_SCENE = {"birds": "branch", "books": "shelf", "vehicles": "cars", "golfers": "golf", "fruits": "fruit"}


def parse_question(question: str) -> Puzzle:
    """The puzzle of a (BIG-Bench or generated) question; ValueError naming what is wrong."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    text, sep, options = question.strip().partition("\nOptions:\n")
    if not sep:
        raise ValueError('question has no "Options:" list')
    m = _INTRO_RE.search(text)
    if not m or m.group("count") not in NUMBER_WORDS:
        raise ValueError(f"question does not introduce its objects as BIG-Bench does: {text[:80]!r}")
    n = NUMBER_WORDS.index(m.group("count"))
    scene = SCENES[_KIND_SCENE[m.group("kind")]]
    names = tuple(re.sub(r"^(?:an?|the) ", "", x.strip()) for x in re.split(r",? and |, ", m.group("names")))
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"expected {n} distinct objects, got {list(names)}")
    by_len = sorted(names, key=len, reverse=True)
    name_re = "|".join(re.escape(x) for x in by_len)
    lower, higher = _relation_words(scene)
    rel_re = re.compile(rf"^(?:The )?(?P<a>{name_re}) (?:is |are |finished )(?P<rel>{lower}|{higher}) (?:the )?(?P<b>{name_re})\.$")
    abs_re = re.compile(rf"^(?:The )?(?P<a>{name_re}) (?:is |are |finished )(?P<place>.+)\.$")
    constraints = []
    for sentence in re.split(r"(?<=\.) ", text[m.end():].strip()):
        if not sentence:
            continue
        r = rel_re.match(sentence)
        if r:
            a, b = r.group("a"), r.group("b")
            constraints.append(Constraint(sentence, a, b) if r.group("rel") == lower else Constraint(sentence, b, a))
            continue
        r = abs_re.match(sentence)
        if not r:
            raise ValueError(f"cannot read the statement {sentence!r}")
        constraints.append(Constraint(sentence, r.group("a"), place=_place_from_phrase(scene, r.group("place"), n)))
    lines = options.strip().split("\n")
    places, texts = set(), []
    for i, line in enumerate(lines):
        o = re.fullmatch(rf"\({LETTERS[i]}\) (?:The )?({name_re}) (?:is |are |finished )(.+)", line.strip())
        if not o or o.group(1) != names[i]:
            raise ValueError(f"option {i + 1} is not about {names[i]!r} in order: {line!r}")
        places.add(_place_from_phrase(scene, o.group(2), n))
        texts.append(line.strip()[4:])
    if len(lines) != n or len(places) != 1:
        raise ValueError("the options must ask about one place, one option per object")
    return Puzzle(scene, names, tuple(constraints), places.pop(), tuple(texts))


# -------------------------------------------------------------- propagation


Domains = tuple[frozenset[int], ...]


def _apply(domains: list[set[int]], idx: dict[str, int], c: Constraint) -> None:
    """Narrow the domains by one constraint (bounds reasoning), then by all-different."""
    if c.b is None:
        domains[idx[c.a]] &= {c.place}
    else:
        da, db = domains[idx[c.a]], domains[idx[c.b]]
        if db:
            da -= {v for v in da if v >= max(db)}
        if da:
            db -= {v for v in db if v <= min(da)}
    _all_different(domains)


def _all_different(domains: list[set[int]]) -> None:
    n = len(domains)
    changed = True
    while changed:
        changed = False
        for i, d in enumerate(domains):
            if len(d) == 1:
                (v,) = d
                for j, e in enumerate(domains):
                    if j != i and v in e:
                        e.discard(v)
                        changed = True
        for v in range(1, n + 1):
            holders = [i for i, d in enumerate(domains) if v in d]
            if len(holders) == 1 and len(domains[holders[0]]) > 1:
                domains[holders[0]].intersection_update({v})
                changed = True


def render_domain(d: frozenset[int] | set[int]) -> str:
    """``{1, 2, 3, 5}`` -> ``1 to 3 or 5``: runs of three or more places as a range."""
    values, pieces = sorted(d), []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            pieces.append(f"{values[i]} to {values[j]}")
        else:
            pieces.extend(str(v) for v in values[i : j + 1])
        i = j + 1
    return " or ".join(pieces)


def parse_domain(text: str) -> set[int]:
    out: set[int] = set()
    for piece in text.split(" or "):
        lo, _, hi = piece.partition(" to ")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def render_state(names: Sequence[str], domains: Sequence[frozenset[int]], n: int) -> str:
    """The arrangement: every object that cannot take every place, with its places."""
    return ", ".join(f"{nm} {render_domain(d)}" for nm, d in zip(names, domains) if len(d) < n)


@dataclass(frozen=True)
class _GoldStep:
    label: str
    kind: str  # setup | apply | order | option | final
    text: str
    constraint: Constraint | None = None
    domains: Domains = ()

    @property
    def body(self) -> str:
        return Step(self.label, self.text).body


class UnsolvedPuzzle(ValueError):
    """A puzzle that propagation does not solve (the generator rejects it)."""


def _propagate(names: Sequence[str], constraints: Sequence[Constraint]) -> list[tuple[Constraint, Domains]] | None:
    """The constraint applications that change the arrangement, each with the arrangement it
    yields, until every place is fixed; None when propagation gets stuck or contradicts."""
    n = len(names)
    idx = {nm: i for i, nm in enumerate(names)}
    domains = [set(range(1, n + 1)) for _ in names]
    out: list[tuple[Constraint, Domains]] = []
    progress = True
    while progress:
        progress = False
        for c in constraints:
            before = [len(d) for d in domains]
            _apply(domains, idx, c)
            if not all(domains):
                return None
            if [len(d) for d in domains] != before:
                progress = True
                out.append((c, tuple(frozenset(d) for d in domains)))
                if all(len(d) == 1 for d in domains):
                    return out
    return None


def _setup_text(scene: Scene, n: int) -> str:
    high = scene.high.replace("the ", "")
    low = scene.low.replace("the ", "")
    return f"Number the places from 1 (the {low}) to {n} (the {high})."


@lru_cache(maxsize=4096)
def gold_steps_of(question: str) -> tuple[_GoldStep, ...]:
    return _gold_steps(parse_question(question))


def _gold_steps(p: Puzzle) -> tuple[_GoldStep, ...]:
    n = p.n
    applied = _propagate(p.names, p.constraints)
    if applied is None:
        raise UnsolvedPuzzle("the statements do not fix every place by propagation")
    out = [_GoldStep("1", "setup", f"(1) {_setup_text(p.scene, n)}")]
    for c, domains in applied:
        label = str(len(out) + 1)
        out.append(_GoldStep(label, "apply", f'({label}) Apply "{c.text}" Now: {render_state(p.names, domains, n)}.',
                             c, domains))
    final_domains = applied[-1][1]
    places = {nm: min(d) for nm, d in zip(p.names, final_domains)}
    order = sorted(p.names, key=places.__getitem__)
    label = str(len(out) + 1)
    out.append(_GoldStep(label, "order", f"({label}) So the order is: {', '.join(order)}.", domains=final_domains))
    winner = order[p.place - 1]
    i = p.names.index(winner)
    label = str(len(out) + 1)
    out.append(_GoldStep(label, "option", f'({label}) Place {p.place} holds {_ref(p.scene, winner)}, so option ({LETTERS[i]}) '
                                          f'"{p.options[i]}" is right.', domains=final_domains))
    out.append(_GoldStep(FINAL_LABEL, "final", f"{FINAL_RESPONSE_TAG} So the answer is ({LETTERS[i]})."))
    return tuple(out)


# --------------------------------------------------------------------- task


def _check_counts(name: str, value: object) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and 3 <= v <= 7 for v in value)):
        raise ValueError(f"logical_deduction {name} must be a non-empty list of object counts between 3 and 7, got {value!r}")
    return tuple(sorted(set(value)))


class LogicalDeductionTask(StepwiseTask):
    """Order 3 or 5 objects (seen) or 7 objects (unseen) from BIG-Bench-style statements."""

    name = "logical_deduction"
    hint = ""

    def __init__(self, seen_objects: Sequence[int] = (3, 5), unseen_objects: Sequence[int] = (7,)) -> None:
        self.seen_objects = _check_counts("seen_objects", seen_objects)
        self.unseen_objects = _check_counts("unseen_objects", unseen_objects)
        if set(self.seen_objects) & set(self.unseen_objects):
            raise ValueError(
                f"logical_deduction seen_objects {list(self.seen_objects)} and unseen_objects "
                f"{list(self.unseen_objects)} must not share a count"
            )

    # ---------------------------------------------------------------- problems

    def _puzzle(self, rng: random.Random, n: int, want_test: bool) -> Puzzle | None:
        """A puzzle of ``n`` objects, or None when the draw belongs to the other side of the
        train/test split or leans on too many absolute statements."""
        scene = SCENES[rng.choice(sorted(SCENES))]
        names = tuple(rng.sample(scene.names, n))
        arrangement = list(names)
        rng.shuffle(arrangement)
        if _is_test_bucket("\n".join([scene.key, *names, "", *arrangement])) != want_test:
            return None
        place = {nm: i + 1 for i, nm in enumerate(arrangement)}
        pool: list[Constraint] = []
        for nm in names:
            pool.append(Constraint(absolute_sentence(scene, nm, place[nm], n), nm, place=place[nm]))
        for a in names:
            for b in names:
                if place[a] < place[b]:
                    lower = rng.random() < 0.5
                    text = relation_sentence(scene, a, b, True) if lower else relation_sentence(scene, b, a, False)
                    pool.append(Constraint(text, a, b))
        rng.shuffle(pool)
        chosen: list[Constraint] = []
        for c in pool:  # add true statements until they fix the order, then drop the redundant ones
            chosen.append(c)
            if _solved(names, chosen):
                break
        for c in list(chosen):
            rest = [x for x in chosen if x is not c]
            if _solved(names, rest):
                chosen = rest
        absolutes = sum(c.b is None for c in chosen)
        if absolutes > (n + 1) // 2:  # BIG-Bench puzzles lean on relations
            return None
        return Puzzle(scene, names, tuple(chosen), rng.randint(1, n))

    def generate(self, n: int, split: Split, seed: int = 0) -> list[Problem]:
        """``n`` distinct seeded problems; train never shares a question with a test split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        counts = self.unseen_objects if split == "test_unseen" else self.seen_objects
        want_test = split != "train"
        rng = random.Random(f"logical_deduction:{split}:{seed}")
        problems: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(problems) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"could only make {len(problems)} of {n} distinct {split} logical-deduction problems")
            puzzle = self._puzzle(rng, rng.choice(counts), want_test)
            if puzzle is None:
                continue
            question = render_question(puzzle)
            if question in seen:
                continue
            seen.add(question)
            problems.append(self._problem(question, puzzle, split, f"{self.name}-{split}-{_digest(question)}"))
        return problems

    def _problem(self, question: str, puzzle: Puzzle, split: Split, pid: str) -> Problem:
        steps = gold_steps_of(question)
        return Problem(pid, question, steps[-1].body.removeprefix("So the answer is ").rstrip("."), split,
                       {"n_objects": puzzle.n, "unseen": puzzle.n in self.unseen_objects})

    def problem_from_record(self, record: dict, index: int, split: Split) -> Problem:
        """BIG-Bench ``{"input", "target"}`` or ``{"question", "target"}``; the target must be
        the option the statements make true. A count of objects among ``unseen_objects``
        makes the problem unseen whatever the file's split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        question = record.get("input", record.get("question"))
        if question is None:
            raise ValueError('record needs an "input" (or "question") field')
        puzzle = parse_question(question)
        question = question.strip()
        target = record.get("target")
        if not isinstance(target, str):
            raise ValueError(f'record needs a string "target", got {target!r}')
        try:
            gold = gold_steps_of(question)
        except UnsolvedPuzzle as err:
            raise ValueError(str(err)) from None
        expected = gold[-1].body.removeprefix("So the answer is ").rstrip(".")
        if target.strip() != expected:
            raise ValueError(f"target {target!r} is not the option the statements make true ({expected!r})")
        if split != "train":
            split = "test_unseen" if puzzle.n in self.unseen_objects else "test_seen"
        pid = str(record["id"]) if record.get("id") is not None else f"{self.name}-{split}-{index}"
        return self._problem(question, puzzle, split, pid)

    # --------------------------------------------------------------- rationales

    def gold_steps(self, problem: Problem) -> tuple[_GoldStep, ...]:
        return gold_steps_of(problem.question)

    # -------------------------------------------------------- scripted teachers

    def diagnoser(self, problem: Problem, gold: Sequence) -> Diagnose:
        puzzle = parse_question(problem.question)
        return lambda step, g: _diagnose(step, g, gold, puzzle)


# ------------------------------------------------------------------ diagnosis

_APPLY_RE = re.compile(r'^Apply "(?P<c>[^"]*)" Now: (?P<state>.*)\.$')
_DOMAIN_RE = re.compile(r"\d+(?: to \d+)?(?: or \d+(?: to \d+)?)*")


def _diagnose(step: Step, gold: _GoldStep, all_gold: Sequence[_GoldStep], p: Puzzle) -> tuple[str, str]:
    body = step.body
    if gold.kind == "apply":
        m = _APPLY_RE.match(body)
        if not m:
            return "", ""
        if m.group("c") != gold.constraint.text:
            if m.group("c") not in {c.text for c in p.constraints}:
                return m.group("c"), "this is not one of the statements of the question"
            return m.group("c"), f'the next statement that changes the arrangement is "{gold.constraint.text}"'
        return _diagnose_state(m.group("state"), gold, all_gold, p)
    if gold.kind == "order":
        m = re.match(r"So the order is: (.*)\.$", body)
        if not m:
            return "", ""
        got = [x.strip() for x in m.group(1).split(",")]
        places = {nm: min(d) for nm, d in zip(p.names, gold.domains)}
        for k, nm in enumerate(got):
            if nm not in places:
                return nm, f"{nm} is not one of the objects"
            if places[nm] != k + 1:
                return nm, f"{_ref(p.scene, nm)} is at place {places[nm]}, not {k + 1}"
        return body, "every object must be listed once"
    if gold.kind == "option":
        m = re.match(r'Place (\d+) holds (?:the )?(.+?), so option \(([A-J])\) "(.*)" is right\.$', body)
        if not m:
            return "", ""
        places = {nm: min(d) for nm, d in zip(p.names, gold.domains)}
        want = int(gold.body.split()[1])
        holder = next(nm for nm, v in places.items() if v == want)
        if int(m.group(1)) != want:
            return f"Place {m.group(1)}", f"the options ask about {place_phrase(p.scene, want, p.n)}, which is place {want}"
        if m.group(2) != holder:
            return m.group(2), f"place {want} holds {_ref(p.scene, holder)}, not {_ref(p.scene, m.group(2))}"
        letter = LETTERS[p.names.index(holder)]
        if m.group(3) != letter:
            return f"option ({m.group(3)})", f"the option about {_ref(p.scene, holder)} is ({letter}), not ({m.group(3)})"
        return m.group(4), f'option ({letter}) reads "{p.options[LETTERS.index(letter)]}"'
    if gold.kind == "final":
        m = re.match(r"So the answer is (.*?)\.?$", body)
        if m:
            return m.group(1) or body, f"the option that step ({all_gold[-2].label}) finds right is {gold.body[17:-1]}"
    return "", ""


def _diagnose_state(state: str, gold: _GoldStep, all_gold: Sequence[_GoldStep], p: Puzzle) -> tuple[str, str]:
    """The first entry of the arrangement that differs from the gold one, and why."""
    n = p.n
    idx = {nm: i for i, nm in enumerate(p.names)}
    got: dict[str, tuple[str, set[int]]] = {}
    for chunk in state.split(", "):
        name = next((nm for nm in sorted(p.names, key=len, reverse=True) if chunk.startswith(nm + " ")), None)
        m = _DOMAIN_RE.fullmatch(chunk[len(name) + 1 :]) if name else None
        if name is None:
            return chunk, f"the arrangement lists objects of the question, each with its places; {chunk!r} is not one"
        if m is None:
            return chunk, f"the places of {_ref(p.scene, name)} are numbers from 1 to {n}, like \"2 or 3\" or \"1 to 4\""
        values = parse_domain(m.group(0))
        if not values <= set(range(1, n + 1)):
            return chunk, f"the places go from 1 to {n}"
        if name in got:
            return chunk, f"{_ref(p.scene, name)} is listed twice"
        got[name] = (chunk, values)
    k = next(i for i, s in enumerate(all_gold) if s is gold)
    prev = next((s.domains for s in reversed(all_gold[:k]) if s.kind == "apply"),
                tuple(frozenset(range(1, n + 1)) for _ in p.names))
    c = gold.constraint
    for nm in p.names:
        want = set(gold.domains[idx[nm]])
        seg, have = got.get(nm, ("", set(range(1, n + 1))))
        if have == want:
            continue
        if not seg:
            return state.split(", ")[0], f"{_ref(p.scene, nm)} is missing: it can only be at {render_domain(want)}"
        extra = sorted(have - want)
        if extra:
            v = extra[0]
            if v not in prev[idx[nm]]:
                return seg, f"an earlier step already ruled out place {v} for {_ref(p.scene, nm)}"
            if c.b is None and c.a == nm:
                return seg, f'"{c.text}" puts {_ref(p.scene, nm)} at place {c.place}, so place {v} violates it'
            if c.b is not None and nm in (c.a, c.b):
                return seg, f'{_ref(p.scene, nm)} at place {v} violates "{c.text}"'
            taker = next((o for o in p.names if o != nm and gold.domains[idx[o]] == {v}), None)
            if taker:
                return seg, f"place {v} is taken by {_ref(p.scene, taker)}"
            return seg, f"place {v} is no longer possible for {_ref(p.scene, nm)}"
        v = sorted(want - have)[0]
        return seg, f'nothing rules out place {v} for {_ref(p.scene, nm)} yet: "{c.text}" allows it'
    return "", ""


def _is_test_bucket(key: str) -> bool:
    """Train/test membership by a hash of the scene, the listed objects and their true order:
    a question determines all three (its answer is unique), so no seed can put the same
    question on both sides."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _solved(names: Sequence[str], constraints: Sequence[Constraint]) -> bool:
    return _propagate(names, constraints) is not None
