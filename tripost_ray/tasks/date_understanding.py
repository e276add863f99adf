"""BIG-Bench-Hard date understanding: problems, gold rationales, and the scripted FBK and IMP.

A question states a date through a chain of facts and asks for a date relative to today,
with six lettered options in MM/DD/YYYY; the target is a letter::

    The concert is on Mar 2, 1966. The party is 3 days after the concert. Today is 7 days after the party.
    What is the date a month ago in MM/DD/YYYY?
    Options:
    (A) 02/12/1966
    ...

The gold rationale makes one date computation per step, in real calendar arithmetic
(month lengths, leap years; a month or year later keeps the day, or takes the month's
last day when that day does not exist), then matches the option::

    Let's think step by step.
    (1) The party = the concert + 3 days = 03/02/1966 + 3 days = 03/05/1966.
    (2) Today = the party + 7 days = 03/05/1966 + 7 days = 03/12/1966.
    (3) The date a month ago = today - 1 month = 03/12/1966 - 1 month = 02/12/1966.
    (4) 02/12/1966 is option (A).
    (Final response) So the answer is (A).

A date the question names in words ("Christmas Eve of 1937") is read in a step of its
own: ``(1) Today = Christmas Eve of 1937 = 12/24/1937.``

Difficulty is the number of date steps (every step but the option match): seen 1-2,
unseen 3 or more (the paper's split). BIG-Bench's published questions are read by the
same parser: its context rules cover the statements they use ("Yesterday was", "N days
have passed since then", "their golden wedding anniversary", ...), so a loaded question
gets its own rationale and its difficulty. Where no rule reads the context, or the
published target disagrees with the calendar (a few do, e.g. a "5-year anniversary" of
1958 answered in 1961), the rationale takes today's date from the target in one step:
``(1) Today = the date the question describes = 01/02/1961.`` (20 of the 250 published
questions; the problem's ``meta["today"]`` records it).

The verifier is strict (a step is right when it is the gold step) and explains the
earliest wrong step: a date that is off by a number of days, a date that does not exist,
a wrong reference date, or an option that does not match.
"""

from __future__ import annotations

import calendar
import hashlib
import random
import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from typing import Callable, Sequence

from tripost_ray.tasks.base import SPLITS, Problem, Split
from tripost_ray.tasks.steps import Diagnose, StepwiseTask
from tripost_ray.trajectory import FINAL_LABEL, FINAL_RESPONSE_TAG, Step

LETTERS = "ABCDEF"
MONTHS = ("January February March April May June July August September October November December").split()
_MONTH_ABBR = {m[:3].lower(): i + 1 for i, m in enumerate(MONTHS)}
_TEST_BUCKETS = 5
EVENTS = ("concert", "meeting", "party", "exam", "wedding", "flight", "game", "trip", "interview", "deadline")
#: the question's offsets: phrase -> (amount, unit)
QUESTION_OFFSETS: dict[str, tuple[int, str]] = {
    "today": (0, "day"),
    "tomorrow": (1, "day"),
    "yesterday": (-1, "day"),
    "24 hours later": (1, "day"),
    "one week from today": (7, "day"),
    "one week ago from today": (-7, "day"),
    "10 days ago": (-10, "day"),
    "a month ago": (-1, "month"),
    "one year ago from today": (-1, "year"),
}


# ------------------------------------------------------------------- calendar


def fmt(d: date) -> str:
    return f"{d.month:02d}/{d.day:02d}/{d.year:04d}"


def shift(d: date, amount: int, unit: str) -> date:
    """``d`` moved by ``amount`` days, months or years; a month or year move keeps the day or
    takes the last day of the month when that day does not exist (03/31 - 1 month = 02/28)."""
    if unit == "day":
        return d + timedelta(days=amount)
    months = amount * (12 if unit == "year" else 1)
    y, m = divmod(d.year * 12 + d.month - 1 + months, 12)
    return date(y, m + 1, min(d.day, calendar.monthrange(y, m + 1)[1]))


def units(amount: int, unit: str) -> str:
    return f"{abs(amount)} {unit}{'' if abs(amount) == 1 else 's'}"


def _parse_date(text: str, year: int | None = None) -> date:
    """``7/9/1972``, ``06/01/1943``, ``Jan 2, 1958``, ``May 9th, 2017``, ``Sept. 1st, 2021``,
    or a month and day (``Mar 12``, ``9/7``) with ``year``."""
    text = text.strip()
    m = re.fullmatch(r"(\d{1,2})/(\d{1,2})(?:/(\d{4}))?", text)
    if m:
        return date(int(m.group(3) or year), int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"([A-Z][a-z]+)\.? (\d{1,2})(?:st|nd|rd|th)?(?:,? (\d{4}))?", text)
    if m and m.group(1)[:3].lower() in _MONTH_ABBR:
        return date(int(m.group(3) or year), _MONTH_ABBR[m.group(1)[:3].lower()], int(m.group(2)))
    raise ValueError(f"cannot read the date {text!r}")


_D = r"(?:\d{1,2}/\d{1,2}/\d{4}|[A-Z][a-z]+\.? \d{1,2}(?:st|nd|rd|th)?, \d{4})"
_MD = r"(?:\d{1,2}/\d{1,2}|[A-Z][a-z]{2,8}\.? \d{1,2})"


# ----------------------------------------------------------------- the chain


@dataclass(frozen=True)
class Calc:
    """``subject = ref + amount unit`` (ref_date known), or a read (``description``)."""

    subject: str
    ref: str
    ref_date: date | None
    amount: int
    unit: str
    result: date
    description: str = ""

    def text(self) -> str:
        subj = self.subject[0].upper() + self.subject[1:]
        if self.ref_date is None:
            return f"{subj} = {self.description} = {fmt(self.result)}."
        op = "+" if self.amount >= 0 else "-"
        off = units(self.amount, self.unit)
        return f"{subj} = {self.ref} {op} {off} = {fmt(self.ref_date)} {op} {off} = {fmt(self.result)}."


def calc(subject: str, ref: str, ref_date: date, amount: int, unit: str) -> Calc:
    return Calc(subject, ref, ref_date, amount, unit, shift(ref_date, amount, unit))


def read(subject: str, description: str, value: date) -> Calc:
    return Calc(subject, "", None, 0, "day", value, description)


@dataclass(frozen=True)
class Question:
    steps: tuple[Calc, ...]  # every date step, the question's offset included
    options: tuple[str, ...]  # MM/DD/YYYY strings

    @property
    def answer(self) -> date:
        return self.steps[-1].result


Rule = Callable[[re.Match], list[Calc]]


def _offset_rule(ref: str, amount: int, unit: str = "day") -> Rule:
    return lambda m: [calc("today", ref, _parse_date(m.group("d")), amount, unit)]


def _n(word: str) -> int:
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "ten": 10, "golden": 50, "silver": 25}
    return words[word] if word in words else int(word)


#: BIG-Bench's ways of saying what today is: (pattern on the context, the steps it yields).
#: A context that states today's date directly ("Today is ...") needs no rule: ``_TODAY_RE`` reads it.
CONTEXT_RULES: tuple[tuple[re.Pattern, Rule], ...] = tuple((re.compile(p), r) for p, r in (
    (rf"^The day before yesterday was (?P<d>{_D})\.", _offset_rule("the day before yesterday", 2)),
    (rf"^Yesterday(?: was|,) (?P<d>{_D})[.,]", _offset_rule("yesterday", 1)),
    (rf"^Tomorrow is (?P<d>{_D})\.", _offset_rule("tomorrow", -1)),
    (rf"tomorrow(?: \(\w+)?, (?P<d>{_D})[.)]", _offset_rule("tomorrow", -1)),
    (rf"^It was (?P<d>{_D}) a week ago\.", _offset_rule("a week ago", 7)),
    (rf"^The \w+ is (?P<d>{_D}), which is (?P<n>\d+) days away from now\.",
     lambda m: [calc("today", "the deadline", _parse_date(m.group("d")), -int(m.group("n")), "day")]),
    (rf"on (?P<d>{_D})\. (?P<n>\d+) days have passed since then\.",
     lambda m: [calc("today", "that day", _parse_date(m.group("d")), int(m.group("n")), "day")]),
    (rf"^(?P<d>{_D}) is like yesterday to Jane, but that is actually (?P<n>\w+) years ago\.",
     lambda m: [calc("today", "that day", _parse_date(m.group("d")), _n(m.group("n")), "year")]),
    (rf"scheduled to be on (?P<d>{_D}), but was delayed by one day to today\.",
     lambda m: [calc("today", "the concert", _parse_date(m.group("d")), 1, "day")]),
    (rf"married on (?P<d>{_D})\. (?:It is their (?P<n>\d+)-year anniversary today|Today is their (?P<w>\w+) wedding "
     r"anniversary)\.",
     lambda m: [calc("today", "the wedding", _parse_date(m.group("d")), _n(m.group("n") or m.group("w")), "year")]),
    (rf"thinks today is (?P<a>{_D}), but John thinks today is (?P<b>{_D})\. (?P<who>Jane|John) is correct\.",
     lambda m: [read("today", f"what {m.group('who')} thinks", _parse_date(m.group("a" if m.group("who") == "Jane" else "b")))]),
    (rf"thought today is (?P<d>{_D}), but today is in fact \w+ \d+, which is (?P<n>\d+) days? later\.",
     lambda m: [calc("today", "what Jane thought", _parse_date(m.group("d")), int(m.group("n")), "day")]),
    (r"born on the last day of Feburary in (?P<y>\d{4})\. Today is her (?P<n>\d+)-year-old birthday\.",
     lambda m: (lambda b: [read("her birthday", f"the last day of February {m.group('y')}", b),
                           calc("today", "her birthday", b, int(m.group("n")), "year")])(
         date(int(m.group("y")), 3, 1) - timedelta(days=1))),
    (r"day before the month when formatting the date\. Therefore, today is (?P<dd>\d\d)/(?P<mm>\d\d)/(?P<y>\d{4}) to them",
     lambda m: [read("today", f"day {m.group('dd')} of month {m.group('mm')}",
                     date(int(m.group("y")), int(m.group("mm")), int(m.group("dd"))))]),
    (rf"^On (?P<d>{_D}) Jane bought (?P<n>\d+) eggs\. She ate one per day\. Today she ran out of eggs\.",
     lambda m: [calc("today", "the day she bought them", _parse_date(m.group("d")), int(m.group("n")), "day")]),
    (r"on the (?P<day>\d+)th of each month starting from the (?P<mon>[A-Z][a-z]+) of (?P<y>\d{4})\. It is her (?P<n>\d+)th "
     r"visit",
     lambda m: (lambda first: [read("her first visit", f"{m.group('mon')} {m.group('day')}, {m.group('y')}", first),
                               calc("today", "her first visit", first, int(m.group("n")) - 1, "month")])(
         _parse_date(f"{m.group('mon')} {m.group('day')}, {m.group('y')}"))),
    (rf"got her job in (?P<y>\d{{4}})\. Today is her (?P<n>\d+)-year work anniversary\. She still remember that on "
     rf"(?P<md>{_MD}), her second day at work",
     lambda m: (lambda second: [calc("her first day", "her second day", second, -1, "day"),
                                calc("today", "her first day", shift(second, -1, "day"), int(m.group("n")), "year")])(
         _parse_date(m.group("md"), int(m.group("y"))))),
    (r"Today is the palindrome day of (?P<y>\d{4})",
     lambda m: [read("today", f"the palindrome day of {m.group('y')}",
                     _parse_date(f"{m.group('y')[3]}{m.group('y')[2]}/{m.group('y')[1]}{m.group('y')[0]}/{m.group('y')}"))]),
    (r"Thanksgiving is on the fourth Thursday of November\. Today is the US Thanksgiving of (?P<y>\d{4})",
     lambda m: [read("today", f"the fourth Thursday of November {m.group('y')}", _nth_weekday(int(m.group("y")), 11, 3, 4))]),
    (r"The first day of (?P<y>\d{4}) is a \w+, and today is the first Monday of (?P=y)",
     lambda m: [read("today", f"the first Monday of {m.group('y')}", _nth_weekday(int(m.group("y")), 1, 0, 1))]),
    (r"Today is Christmas Eve of (?P<y>\d{4})", lambda m: [read("today", f"Christmas Eve of {m.group('y')}",
                                                                 date(int(m.group("y")), 12, 24))]),
    (r"(?:the last day|celebrating the last day) of (?P<mon>[A-Z][a-z]+) (?P<y>\d{4})",
     lambda m: [read("today", f"the last day of {m.group('mon')} {m.group('y')}",
                     shift(_parse_date(f"{m.group('mon')} 1, {m.group('y')}"), 1, "month") - timedelta(days=1))]),
    (r"(?:Today|This) is the last day of the first quarter of (?P<y>\d{4})",
     lambda m: [read("today", f"the last day of the first quarter of {m.group('y')}", date(int(m.group("y")), 3, 31))]),
    (r"(?:Today|This) is the last day of (?P<y>\d{4})",
     lambda m: [read("today", f"the last day of {m.group('y')}", date(int(m.group("y")), 12, 31))]),
    (r"Today is the first day of (?P<y>\d{4})",
     lambda m: [read("today", f"the first day of {m.group('y')}", date(int(m.group("y")), 1, 1))]),
    (r"Today is the second day of the third month of (?P<y>\d{4})",
     lambda m: [read("today", f"the second day of the third month of {m.group('y')}", date(int(m.group("y")), 3, 2))]),
    (r"^Today is (?P<md>\d{1,2}/\d{1,2})[.,].*?(?P<y>\d{4})",
     lambda m: [read("today", f"{m.group('md')} in {m.group('y')}", _parse_date(m.group("md"), int(m.group("y"))))]),
))

_TODAY_RE = re.compile(rf"^(?:Today is|It is|Today,|Today's date is|The current local time is [^.]*? of) (?P<d>{_D})\b")
_EVENT_ON_RE = re.compile(rf"^The (?P<e>\w+) is on (?P<d>{_D})\.$")
_REL_RE = re.compile(r"^(?:The (?P<e>\w+)|Today) is (?P<n>\d+) (?P<u>day|month|year)s? (?P<dir>after|before) the (?P<r>\w+)\.$")


def _nth_weekday(year: int, month: int, weekday: int, nth: int) -> date:
    first = date(year, month, 1)
    return first + timedelta(days=(weekday - first.weekday()) % 7 + 7 * (nth - 1))


def _context_steps(context: str) -> tuple[list[Calc], date]:
    """The date steps that lead to today, and today's date."""
    for pattern, rule in CONTEXT_RULES:
        m = pattern.search(context)
        if m:
            steps = rule(m)
            return steps, steps[-1].result
    m = _TODAY_RE.search(context)
    if m:
        return [], _parse_date(m.group("d"))  # parse_question reads it in a step when nothing else is asked
    known: dict[str, date] = {}
    steps: list[Calc] = []
    today: date | None = None
    for sentence in re.split(r"(?<=\.) ", context.strip()):
        m = _EVENT_ON_RE.match(sentence)
        if m:
            known[m.group("e")] = _parse_date(m.group("d"))
            continue
        m = _REL_RE.match(sentence)
        if not m or m.group("r") not in known:
            raise ValueError(f"cannot read the statement {sentence!r}")
        amount = int(m.group("n")) * (1 if m.group("dir") == "after" else -1)
        step = calc(f"the {m.group('e')}" if m.group("e") else "today", f"the {m.group('r')}", known[m.group("r")],
                    amount, m.group("u"))
        steps.append(step)
        if m.group("e"):
            known[m.group("e")] = step.result
        else:
            today = step.result
    if today is None:
        raise ValueError("the question never says what today is")
    return steps, today


_ASK_RE = re.compile(r"What is the date (?P<q>.+?) in MM/DD/YYYY\?$")


def parse_question(question: str, today: date | None = None) -> Question:
    """The date steps and options of a (BIG-Bench or generated) question; ValueError naming
    what is wrong. ``today``: today's date when the question's context is not read but
    taken as given (see :meth:`DateUnderstandingTask.problem_from_record`)."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    text, sep, options = question.strip().partition("\nOptions:\n")
    if not sep:
        raise ValueError('question has no "Options:" list')
    m = _ASK_RE.search(text)
    if not m or m.group("q") not in QUESTION_OFFSETS:
        raise ValueError(f"question must end with 'What is the date <one of {list(QUESTION_OFFSETS)}> in MM/DD/YYYY?'")
    if today is None:
        steps, today = _context_steps(text[: m.start()].strip())
    else:
        steps = [read("today", "the date the question describes", today)]
    amount, unit = QUESTION_OFFSETS[m.group("q")]
    if amount:
        steps.append(calc(f"the date {m.group('q')}", "today", today, amount, unit))
    if not steps:
        steps.append(read("today", "the date the question gives", today))
    opts = []
    for i, line in enumerate(options.strip().split("\n")):
        o = re.fullmatch(rf"\({LETTERS[i]}\) (\d\d/\d\d/\d{{4}})", line.strip()) if i < len(LETTERS) else None
        if not o:
            raise ValueError(f"option {i + 1} is not '({LETTERS[min(i, 5)]}) MM/DD/YYYY': {line!r}")
        opts.append(o.group(1))
    answer = fmt(steps[-1].result)
    if opts.count(answer) != 1:
        raise ValueError(f"the date {answer} is {'not' if not opts.count(answer) else 'more than once'} among the options")
    return Question(tuple(steps), tuple(opts))


# ------------------------------------------------------------------ gold steps


@dataclass(frozen=True)
class _GoldStep:
    label: str
    kind: str  # calc | option | final
    text: str
    calc: Calc | None = None

    @property
    def body(self) -> str:
        return Step(self.label, self.text).body


@lru_cache(maxsize=4096)
def gold_steps_of(question: str, today: date | None = None) -> tuple[_GoldStep, ...]:
    q = parse_question(question, today)
    out = [_GoldStep(str(i + 1), "calc", f"({i + 1}) {c.text()}", c) for i, c in enumerate(q.steps)]
    answer = fmt(q.answer)
    letter = LETTERS[q.options.index(answer)]
    label = str(len(out) + 1)
    out.append(_GoldStep(label, "option", f"({label}) {answer} is option ({letter})."))
    out.append(_GoldStep(FINAL_LABEL, "final", f"{FINAL_RESPONSE_TAG} So the answer is ({letter})."))
    return tuple(out)


def _check_steps(name: str, value: object) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 1 <= value[0] <= value[1] <= 8):
        raise ValueError(f"date_understanding {name} must be two integers (min, max) with 1 <= min <= max <= 8, got {value!r}")
    return value[0], value[1]


class DateUnderstandingTask(StepwiseTask):
    """Dates through chains of 1-2 date steps (seen) or 3 and more (unseen)."""

    name = "date_understanding"
    hint = ""

    def __init__(self, seen_steps: Sequence[int] = (1, 2), unseen_steps: Sequence[int] = (3, 5),
                 years: Sequence[int] = (1900, 2030)) -> None:
        self.seen_steps = _check_steps("seen_steps", seen_steps)
        self.unseen_steps = _check_steps("unseen_steps", unseen_steps)
        if self.unseen_steps[0] <= self.seen_steps[1]:
            raise ValueError(f"date_understanding unseen_steps {list(self.unseen_steps)} must start above seen_steps "
                             f"{list(self.seen_steps)}")
        if (not isinstance(years, (list, tuple)) or len(years) != 2 or not all(isinstance(y, int) for y in years)
                or not 1000 <= years[0] < years[1] <= 9000):
            raise ValueError(f"date_understanding years must be two integers (first, last) within 1000-9000, got {years!r}")
        self.years = (years[0], years[1])

    # ---------------------------------------------------------------- problems

    def _date_text(self, rng: random.Random, d: date) -> str:
        if rng.random() < 0.5:
            return fmt(d)
        return f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}"

    def _question(self, rng: random.Random, n_steps: int) -> str:
        ask = rng.choice([q for q in QUESTION_OFFSETS if q != "today"] + ["today"] * (n_steps > 1))
        chain = n_steps - (ask != "today")
        start = date(rng.randint(*self.years), rng.randint(1, 12), rng.randint(1, 28))
        start = start + timedelta(days=rng.randint(0, 3))  # month ends too
        if chain == 0:
            context = f"Today is {self._date_text(rng, start)}."
        elif chain == 1 and rng.random() < 0.5:
            form = rng.choice(["Yesterday was {d}.", "Tomorrow is {d}.", "The day before yesterday was {d}.",
                               "It was {d} a week ago."])
            context = form.format(d=self._date_text(rng, start))
        else:
            events = rng.sample(EVENTS, chain)
            sentences = [f"The {events[0]} is on {self._date_text(rng, start)}."]
            for k in range(1, chain + 1):
                unit = rng.choice(["day"] * 4 + ["month", "year"])
                n = rng.randint(1, 20) if unit == "day" else rng.randint(1, 3)
                subject = f"The {events[k]}" if k < chain else "Today"
                plural = "s" if n > 1 else ""
                sentences.append(f"{subject} is {n} {unit}{plural} {rng.choice(['after', 'before'])} the {events[k - 1]}.")
            context = " ".join(sentences)
        return f"{context} What is the date {ask} in MM/DD/YYYY?"

    def _options(self, rng: random.Random, head: str) -> str | None:
        steps, today = _context_steps(head[: _ASK_RE.search(head).start()].strip())
        amount, unit = QUESTION_OFFSETS[_ASK_RE.search(head).group("q")]
        answer = shift(today, amount, unit)
        wrong = {shift(answer, 1, "day"), shift(answer, -1, "day"), shift(answer, 1, "month"), shift(answer, -1, "month"),
                 shift(answer, 1, "year"), shift(answer, -1, "year"), shift(answer, 7, "day"), today,
                 shift(today, -amount, unit)}
        if answer.day <= 12 and answer.day != answer.month:
            wrong.add(date(answer.year, answer.day, answer.month))
        wrong.discard(answer)
        wrong = {d for d in wrong if 1 <= d.year <= 9999}
        if len(wrong) < 5:
            return None
        dates = [answer, *rng.sample(sorted(wrong), 5)]
        rng.shuffle(dates)
        return "\n".join(f"({LETTERS[i]}) {fmt(d)}" for i, d in enumerate(dates))

    def generate(self, n: int, split: Split, seed: int = 0) -> list[Problem]:
        """``n`` distinct seeded problems; train never shares a question with a test split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        lo, hi = self.unseen_steps if split == "test_unseen" else self.seen_steps
        want_test = split != "train"
        rng = random.Random(f"date_understanding:{split}:{seed}")
        problems: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(problems) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"could only make {len(problems)} of {n} distinct {split} date problems")
            head = self._question(rng, rng.randint(lo, hi))
            if head in seen or _is_test_bucket(head) != want_test:
                continue
            options = self._options(rng, head)
            if options is None:
                continue
            seen.add(head)
            question = f"{head}\nOptions:\n{options}"
            problems.append(self._problem(question, split, f"{self.name}-{split}-{_digest(head)}"))
        return problems

    def _problem(self, question: str, split: Split, pid: str, meta: dict | None = None) -> Problem:
        meta = dict(meta or {})
        gold = self.gold_steps(Problem(pid, question, "", split, meta))
        n_steps = sum(s.kind == "calc" for s in gold)
        meta.update(n_steps=n_steps, unseen=n_steps >= self.unseen_steps[0])
        return Problem(pid, question, gold[-1].body.removeprefix("So the answer is ").rstrip("."), split, meta)

    def problem_from_record(self, record: dict, index: int, split: Split) -> Problem:
        """BIG-Bench ``{"input", "target"}`` or ``{"question", "target"}``; the target must be
        the option the rationale reaches. A test problem's split follows its number of date
        steps (``unseen_steps`` and up: unseen)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        question = record.get("input", record.get("question"))
        if question is None:
            raise ValueError('record needs an "input" (or "question") field')
        question = question.strip()
        target = record.get("target")
        if not isinstance(target, str) or not re.fullmatch(r"\([A-F]\)", target.strip()):
            raise ValueError(f'record needs a "target" that is an option letter like "(A)", got {target!r}')
        target = target.strip()
        meta: dict = {}
        try:
            gold = gold_steps_of(question)
        except ValueError:
            gold = None
        if gold is None or gold[-1].body != f"So the answer is {target}.":
            # a context the rules do not read, or a published target that disagrees with the
            # calendar: take today from the target so the rationale still reaches it
            today = _today_from_target(question, target)
            meta["today"] = fmt(today)
            gold = gold_steps_of(question, today)
        if split != "train":
            n_steps = sum(s.kind == "calc" for s in gold)
            split = "test_unseen" if n_steps >= self.unseen_steps[0] else "test_seen"
        pid = str(record["id"]) if record.get("id") is not None else f"{self.name}-{split}-{index}"
        return self._problem(question, split, pid, meta)

    # --------------------------------------------------------------- rationales

    def gold_steps(self, problem: Problem) -> tuple[_GoldStep, ...]:
        today = problem.meta.get("today")
        return gold_steps_of(problem.question, _real_date(today) if today else None)

    # -------------------------------------------------------- scripted teachers

    def diagnoser(self, problem: Problem, gold: Sequence) -> Diagnose:
        options = _options_of(problem.question)
        return lambda step, g: _diagnose(step, g, gold, options)


# ------------------------------------------------------------------ diagnosis

_DATE_RE = re.compile(r"\d\d/\d\d/\d{4}")
_CALC_RE = re.compile(
    r"^(?P<head>.+? = .+?) (?P<op>[+-]) (?P<off>\d+ \w+?) = (?P<ref>\S+) (?P<op2>[+-]) (?P<off2>\d+ \w+?) = (?P<res>\S+)\.$"
)


def _real_date(text: str) -> date | None:
    m = re.fullmatch(r"(\d\d)/(\d\d)/(\d{4})", text)
    if not m:
        return None
    try:
        return date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    except ValueError:
        return None


def _diagnose(step: Step, gold: _GoldStep, all_gold: Sequence[_GoldStep], options: Sequence[str]) -> tuple[str, str]:
    body = step.body
    if gold.kind == "calc":
        c = gold.calc
        if c.ref_date is None:  # a read step: only its date can be wrong in a checkable way
            m = re.fullmatch(r"(.+ = )(\S+)\.", body)
            if m and m.group(1) == gold.body[: len(m.group(1))] and m.group(2) != fmt(c.result):
                return m.group(2), f"{c.description} is {fmt(c.result)}"
            return "", ""
        m = _CALC_RE.match(body)
        gm = _CALC_RE.match(gold.body)
        if not m or not gm:
            return "", ""
        if (m.group("head"), m.group("op"), m.group("off")) != (gm.group("head"), gm.group("op"), gm.group("off")):
            return "", ""
        if m.group("ref") != gm.group("ref"):
            return m.group("ref"), f"{c.ref} is {fmt(c.ref_date)}"
        if (m.group("op2"), m.group("off2")) != (gm.group("op2"), gm.group("off2")):
            return f"{m.group('op2')} {m.group('off2')}", f"{c.subject} is {gm.group('op')} {gm.group('off')} from {c.ref}"
        got = _real_date(m.group("res"))
        want = c.result
        what = f"{fmt(c.ref_date)} {gm.group('op')} {gm.group('off')} is {fmt(want)}"
        if got is None:
            mm = re.fullmatch(r"(\d\d)/(\d\d)/(\d{4})", m.group("res"))
            if mm and 1 <= int(mm.group(1)) <= 12:
                y, mo = int(mm.group(3)), int(mm.group(1))
                return m.group("res"), (f"{m.group('res')} is not a date: {MONTHS[mo - 1]} {y} has "
                                        f"{calendar.monthrange(y, mo)[1]} days; {what}")
            return m.group("res"), f"{m.group('res')} is not a date in MM/DD/YYYY; {what}"
        if got != want:
            off = (got - c.ref_date).days
            direction = "after" if off >= 0 else "before"
            return m.group("res"), f"{m.group('res')} is {units(off, 'day')} {direction} {fmt(c.ref_date)}; {what}"
        return "", ""
    if gold.kind == "option":
        m = re.fullmatch(r"(\S+) is option \(([A-F])\)\.", body)
        if not m:
            return "", ""
        answer = fmt(all_gold[-3].calc.result)
        if m.group(1) != answer:
            return m.group(1), f"step ({all_gold[-3].label}) finds {answer}"
        k = LETTERS.find(m.group(2))
        if k < 0 or k >= len(options):
            return f"({m.group(2)})", f"there is no option ({m.group(2)})"
        return f"({m.group(2)})", (f"option ({m.group(2)}) is {options[k]}; {answer} is option "
                                   f"({LETTERS[options.index(answer)]})")
    if gold.kind == "final":
        m = re.match(r"So the answer is (.*?)\.?$", body)
        if m:
            return m.group(1) or body, f"step ({all_gold[-2].label}) finds {gold.body[17:-1]}"
    return "", ""


def _options_of(question: str) -> tuple[str, ...]:
    return tuple(line.strip()[4:] for line in question.partition("\nOptions:\n")[2].strip().split("\n"))


def _today_from_target(question: str, target: str) -> date:
    """Today's date for which the question's offset lands on the target option."""
    m = _ASK_RE.search(question.partition("\nOptions:\n")[0])
    options = _options_of(question)
    k = LETTERS.find(target[1])
    answer = _real_date(options[k]) if m and m.group("q") in QUESTION_OFFSETS and k < len(options) else None
    if answer is None:
        raise ValueError(f"target {target} does not name an option with a date")
    amount, unit = QUESTION_OFFSETS[m.group("q")]
    today = shift(answer, -amount, unit)
    if shift(today, amount, unit) != answer:
        raise ValueError(f"no date is {m.group('q')} from {fmt(answer)}")
    return today


def _is_test_bucket(head: str) -> bool:
    """Train/test membership by a hash of the question before its options: the facts and
    what is asked decide the answer, so no seed can put the same question on both sides."""
    digest = hashlib.sha256(head.encode()).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
