"""Date understanding and logical deduction: generation, gold rationales, the scripted FBK
and IMP checked as properties over >= 1,000 seeded problems per split, and the published
BIG-Bench-Hard test files."""

from __future__ import annotations

import random
import re
from datetime import date
from pathlib import Path

import pytest

from conftest import shared_data_dir
from tripost_ray.config import ConfigError, load_config
from tripost_ray.tasks import get_task, load_problems
from tripost_ray.tasks.base import Problem
from tripost_ray.tasks.date_understanding import shift
from tripost_ray.tasks.logical_deduction import parse_question as parse_puzzle
from tripost_ray.trajectory import FINAL_LABEL, ParsedAttempt, Step, parse_attempt, parse_feedback

N = 1000
TASK_NAMES = ["date_understanding", "logical_deduction"]
SPLITS = ["train", "test_seen", "test_unseen"]


@pytest.fixture(scope="module", params=[(t, s) for t in TASK_NAMES for s in SPLITS], ids=lambda p: f"{p[0]}-{p[1]}")
def generated(request):
    name, split = request.param
    task = get_task(name)
    return task, task.generate(N, split, seed=3)


def _corrupt(step: Step, rng: random.Random) -> Step:
    """Change one number of the step's body, or (with none) one letter of it."""
    head = len(step.text) - len(step.body)
    numbers = list(re.finditer(r"\d+", step.text[head:]))
    if numbers:
        m = rng.choice(numbers)
        value = int(m.group())
        new = str(value + rng.choice([-2, -1, 1, 2]) if value > 2 else value + 1).zfill(len(m.group()))
        body = step.body[: m.start()] + new + step.body[m.end() :]
    else:
        k = rng.randrange(len(step.body))
        body = step.body[:k] + ("x" if step.body[k] != "x" else "y") + step.body[k + 1 :]
    return Step(step.label, step.text[:head] + body)


# ---------------------------------------------------------------- properties


def test_generation_is_deterministic_distinct_and_balanced(generated):
    task, problems = generated
    split = problems[0].split
    assert len({p.id for p in problems}) == N and len({p.question for p in problems}) == N
    assert task.generate(50, split, seed=3) == problems[:50]
    assert task.generate(50, split, seed=4) != problems[:50]
    letters = {p.target for p in problems}
    assert len(letters) >= 3 and all(re.fullmatch(r"\([A-G]\)", t) for t in letters)
    unseen = {p.meta["unseen"] for p in problems}
    assert unseen == {split == "test_unseen"}


def test_every_gold_rationale_verifies_and_reaches_the_target(generated):
    task, problems = generated
    for p in problems:
        gold = task.gold_rationale(p)
        assert gold.endswith(f"(Final response) So the answer is {p.target}.")
        assert task.is_correct(p, task.extract_answer(gold))
        feedback = task.verify(p, gold)
        assert feedback.is_correct, (p.question, feedback)
        labels = parse_attempt(gold).labels
        assert labels == [str(i) for i in range(1, len(labels))] + [FINAL_LABEL]


def test_any_single_corrupted_step_is_flagged_there_and_the_improver_repairs_from_it(generated):
    task, problems = generated
    rng = random.Random(11)
    for p in problems:
        parsed = parse_attempt(task.gold_rationale(p))
        k = rng.randrange(len(parsed.steps))
        bad = _corrupt(parsed.steps[k], rng)
        assert bad.text != parsed.steps[k].text
        steps = list(parsed.steps)
        steps[k] = bad
        attempt = ParsedAttempt(parsed.preamble, tuple(steps)).render()
        feedback = task.verify(p, attempt)
        assert feedback.step == bad.label, (bad.text, feedback)
        assert feedback.segment and feedback.segment in bad.text and feedback.reason
        assert parse_feedback(feedback.text).text == feedback.text
        assert feedback.last_correct == (steps[k - 1].label if k else None)
        updated = task.improve(p, attempt, feedback)
        assert task.verify(p, updated).is_correct
        assert parse_attempt(updated).steps[:k] == parsed.steps[:k]


def test_problems_are_unambiguous(generated):
    task, problems = generated
    for p in problems:
        options = p.question.partition("\nOptions:\n")[2].split("\n")
        if task.name == "logical_deduction":
            puzzle = parse_puzzle(p.question)
            solutions = list(_solutions(puzzle))
            assert len(solutions) == 1, p.question
            winner = next(nm for nm, place in solutions[0].items() if place == puzzle.place)
            assert p.target == f"({'ABCDEFG'[puzzle.names.index(winner)]})"
        else:
            dates = [o[4:] for o in options]
            assert len(set(dates)) == len(dates) == 6
            right = [o[:3] for o in options if o[4:] == _independent_answer(p)]
            assert right == [p.target]


def _solutions(puzzle):
    """Every arrangement satisfying the statements, by backtracking over places."""
    n = puzzle.n

    def rec(assign: dict):
        if any(c.a in assign and (c.b is None and assign[c.a] != c.place or c.b in assign and not c.holds(assign))
               for c in puzzle.constraints):
            return
        if len(assign) == n:
            yield dict(assign)
            return
        name = puzzle.names[len(assign)]
        for v in range(1, n + 1):
            if v not in assign.values():
                assign[name] = v
                yield from rec(assign)
                del assign[name]

    yield from rec({})


def _independent_answer(p: Problem) -> str:
    """The answer of a generated question by date ordinals, not by the task's steps."""
    text = p.question.partition("\nOptions:\n")[0]
    months = {m: i + 1 for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())}

    def when(s: str) -> date:
        m = re.fullmatch(r"(\d\d)/(\d\d)/(\d{4})", s)
        if m:
            return date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
        m = re.fullmatch(r"(\w{3}) (\d+), (\d{4})", s)
        return date(int(m.group(3)), months[m.group(1)], int(m.group(2)))

    D = r"(\d\d/\d\d/\d{4}|\w{3} \d+, \d{4})"
    known, today = {}, None
    for pattern, days in ((rf"^Today is {D}\.", 0), (rf"^Yesterday was {D}\.", 1), (rf"^Tomorrow is {D}\.", -1),
                          (rf"^The day before yesterday was {D}\.", 2), (rf"^It was {D} a week ago\.", 7)):
        m = re.match(pattern, text)
        if m:
            today = date.fromordinal(when(m.group(1)).toordinal() + days)
    for m in re.finditer(rf"The (\w+) is on {D}\.", text):
        known[m.group(1)] = when(m.group(2))
    for m in re.finditer(r"(?:The (\w+)|Today) is (\d+) (day|month|year)s? (after|before) the (\w+)\.", text):
        n = int(m.group(2)) * (1 if m.group(4) == "after" else -1)
        value = shift(known[m.group(5)], n, m.group(3))
        if m.group(1):
            known[m.group(1)] = value
        else:
            today = value
    ask = re.search(r"What is the date (.+) in MM/DD/YYYY\?", text).group(1)
    amount, unit = {"today": (0, "day"), "tomorrow": (1, "day"), "yesterday": (-1, "day"), "24 hours later": (1, "day"),
                    "one week from today": (7, "day"), "one week ago from today": (-7, "day"),
                    "10 days ago": (-10, "day"), "a month ago": (-1, "month"),
                    "one year ago from today": (-1, "year")}[ask]
    answer = shift(today, amount, unit)
    return f"{answer.month:02d}/{answer.day:02d}/{answer.year}"


def test_train_and_test_splits_never_share_a_question():
    for name in TASK_NAMES:
        task = get_task(name)
        train = {p.question for seed in range(3) for p in task.generate(300, "train", seed=seed)}
        test = {p.question for seed in range(3) for p in task.generate(100, "test_seen", seed=seed)}
        assert train and test and not train & test


# ------------------------------------------------------------- task specifics


def test_calendar_arithmetic_knows_month_lengths_and_leap_years():
    assert shift(date(2000, 2, 28), 1, "day") == date(2000, 2, 29)
    assert shift(date(1900, 2, 28), 1, "day") == date(1900, 3, 1)  # 1900 is not a leap year
    assert shift(date(2021, 3, 31), -1, "month") == date(2021, 2, 28)
    assert shift(date(2016, 2, 29), -1, "year") == date(2015, 2, 28)
    assert shift(date(1999, 12, 25), 10, "day") == date(2000, 1, 4)


def test_date_feedback_says_how_many_days_off_and_when_a_date_does_not_exist():
    task = get_task("date_understanding")
    q = ("Yesterday was 02/28/1900. What is the date one week from today in MM/DD/YYYY?\nOptions:\n(A) 03/08/1900\n"
         "(B) 03/07/1900\n(C) 03/01/1900\n(D) 02/08/1900\n(E) 03/08/1901\n(F) 03/09/1900")
    p = task.problem_from_record({"input": q, "target": "(A)"}, 0, "test_seen")
    gold = task.gold_rationale(p)
    assert "(1) Today = yesterday + 1 day = 02/28/1900 + 1 day = 03/01/1900." in gold
    fb = task.verify(p, gold.replace("= 03/01/1900.", "= 02/29/1900."))
    assert (fb.step, fb.segment) == ("1", "02/29/1900") and "February 1900 has 28 days" in fb.reason
    fb = task.verify(p, gold.replace("= 03/08/1900.", "= 03/09/1900."))
    assert fb.step == "2" and fb.reason.startswith("03/09/1900 is 8 days after 03/01/1900")
    fb = task.verify(p, gold.replace("is option (A).", "is option (F)."))
    assert fb.segment == "(F)" and "option (F) is 03/09/1900" in fb.reason


def test_logical_deduction_feedback_names_the_violated_statement():
    task = get_task("logical_deduction")
    q = ("The following paragraphs each describe a set of three objects arranged in a fixed order. The statements are "
         "logically consistent within each paragraph. On a branch, there are three birds: a blue jay, a quail, and a "
         "falcon. The falcon is to the right of the blue jay. The blue jay is to the right of the quail.\nOptions:\n"
         "(A) The blue jay is the second from the left\n(B) The quail is the second from the left\n"
         "(C) The falcon is the second from the left")
    p = task.problem_from_record({"input": q, "target": "(A)"}, 0, "test_seen")
    gold = task.gold_rationale(p)
    assert '(2) Apply "The falcon is to the right of the blue jay." Now: blue jay 1 or 2, falcon 2 or 3.' in gold
    fb = task.verify(p, gold.replace("blue jay 1 or 2, falcon 2 or 3", "blue jay 1 to 3, falcon 2 or 3"))
    assert fb.step == "2" and fb.segment == "blue jay 1 to 3"
    assert fb.reason == 'the blue jay at place 3 violates "The falcon is to the right of the blue jay."'
    fb = task.verify(p, gold.replace('option (A) "The blue jay', 'option (B) "The blue jay'))
    assert fb.segment == "option (B)" and "is (A)" in fb.reason


@pytest.mark.parametrize("options, match", [
    ({"seen_objects": [3, 7]}, "must not share a count"),
    ({"seen_objects": [2]}, "between 3 and 7"),
    ({"unseen_steps": [2, 4]}, "must start above seen_steps"),
    ({"seen_steps": [0, 2]}, "1 <= min <= max"),
])
def test_difficulty_options_are_validated_at_config_load(tmp_path, options, match):
    name = "logical_deduction" if "seen_objects" in options else "date_understanding"
    path = tmp_path / "job.yaml"
    path.write_text(f"task: {{name: {name}, difficulty: {options}}}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


# ----------------------------------------------------------- BIG-Bench files


def _bbh_file(name: str) -> Path:
    return shared_data_dir("bbh") / name


@pytest.mark.parametrize("file, task_name, split", [
    ("date_understanding.json", "date_understanding", None),
    ("logical_deduction_three_objects.json", "logical_deduction", "test_seen"),
    ("logical_deduction_five_objects.json", "logical_deduction", "test_seen"),
    ("logical_deduction_seven_objects.json", "logical_deduction", "test_unseen"),
])
def test_every_published_problem_loads_with_its_split_and_a_gold_rationale_reaching_its_target(file, task_name, split):
    import json

    path = _bbh_file(file)
    task = get_task(task_name)
    records = json.loads(path.read_text())["examples"]
    problems = load_problems(task, str(path))
    assert len(problems) == len(records) == 250
    for p, record in zip(problems, records):
        assert p.target == record["target"]
        gold = task.gold_rationale(p)
        assert task.extract_answer(gold) == record["target"] and task.verify(p, gold).is_correct
        assert p.split == (split or ("test_unseen" if p.meta["n_steps"] >= 3 else "test_seen"))
    if task_name == "date_understanding":
        read_by_rules = sum("today" not in p.meta for p in problems)
        assert read_by_rules >= 225, "the context rules read almost every published question"
        assert {p.split for p in problems} == {"test_seen", "test_unseen"}
