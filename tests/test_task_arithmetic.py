"""Multistep arithmetic: generation, gold rationales, the scripted verifier and improver.

The properties run over >= 1,000 generated problems each (seeded loops, so a failure
names the problem and reproduces).
"""

from __future__ import annotations

import json
import random
import re
import string

import fsspec
import pytest

from tripost_ray.tasks import ProblemFormatError, get_task, load_problems
from tripost_ray.tasks import arith_expr as ex
from tripost_ray.tasks.arithmetic import ArithmeticTask
from tripost_ray.trajectory import FINAL_LABEL, ANSWER_PREFIX, Feedback, parse_attempt, parse_feedback

N = 1000  # problems per property
TASK = ArithmeticTask()
SEEN = TASK.generate(600, "train", seed=7) + TASK.generate(400, "test_seen", seed=7)
UNSEEN = TASK.generate(N, "test_unseen", seed=7)
_NUMBER_RE = re.compile(r"-?\d+")


def _structure(question: str) -> tuple[int, int]:
    """(number of groups, operands in the largest group) read from the question text."""
    tokens = ex.tokenize(question.rstrip("= "))
    spans = ex.leaf_groups(tokens)
    sizes = [sum(1 for t in tokens[a : b + 1] if _NUMBER_RE.fullmatch(t)) for a, b in spans]
    return len(spans), max(sizes)


def _check_feedback(attempt: str, fb: Feedback) -> None:
    """Invariants of every feedback: round-trips, one-line segment found in the attempt."""
    assert parse_feedback(fb.text) == fb, fb.text
    assert len(fb.segment.splitlines()) <= 1 and len(fb.reason.splitlines()) <= 1
    assert fb.segment in attempt
    if fb.step is not None:
        assert fb.reason.endswith(".") and len(fb.reason) > 5
        assert (fb.last_correct is None) == (fb.step == "1")


def _kept_count(fb: Feedback) -> int:
    """Steps before the flagged one: the verifier requires them to be labelled 1..k-1."""
    return int(fb.last_correct) if fb.last_correct else 0


# ------------------------------------------------------------------ spec examples


def test_gold_rationale_matches_the_reference_format():
    problem = TASK.problem_from_record(
        {"input": "((7 - -1 + -1 + -4) - (-7 + 7 * 3 * -9)) =", "target": "199"}, 0, "test_seen"
    )
    assert TASK.gold_rationale(problem).split("\n") == [
        "Let's think step by step.",
        '(1) This equation can be written as "(A - B)", where A = (7 - -1 + -1 + -4) and B = (-7 + 7 * 3 * -9).',
        "(2) Let's calculate A = (7 - -1 + -1 + -4) = (((7 - -1) + -1) + -4) = ((8 + -1) + -4) = (7 + -4) = 3.",
        "(3) Let's calculate B = (-7 + 7 * 3 * -9) = (-7 + ((7 * 3) * -9)) = (-7 + (21 * -9)) = (-7 + -189) = -196.",
        "(4) Then, the final equation is (A - B) = (3 - -196) = 199.",
        "(Final response) So the answer is 199.",
    ]
    assert TASK.extract_answer(TASK.gold_rationale(problem)) == "199"
    assert TASK.is_correct(problem, "+199") and TASK.is_correct(problem, "199.") and not TASK.is_correct(problem, "198")
    assert TASK.normalize_answer("-0") == "0" and TASK.normalize_answer(" 24 ") == "24"
    assert not TASK.is_correct(problem, None) and not TASK.is_correct(problem, "one hundred ninety-nine")


def test_four_groups_get_four_letters_and_a_combination_chain():
    problem = TASK.problem_from_record(
        {"input": "(((-9 * 3 + -6) * (-2 + 7 * -6)) - ((-4 - -6 + 6) * (4 * -4 + 8))) =", "target": 1516}, 3, "train"
    )
    lines = TASK.gold_rationale(problem).split("\n")
    assert lines[1] == (
        '(1) This equation can be written as "((A * B) - (C * D))", where A = (-9 * 3 + -6), '
        "B = (-2 + 7 * -6), C = (-4 - -6 + 6) and D = (4 * -4 + 8)."
    )
    assert lines[6] == (
        "(6) Then, the final equation is ((A * B) - (C * D)) = ((-33 * -44) - (8 * -8)) = "
        "(1452 - (8 * -8)) = (1452 - -64) = 1516."
    )
    assert lines[7] == "(Final response) So the answer is 1516."


def test_the_reference_wrong_step_is_reported_with_its_link_and_reason():
    problem = TASK.problem_from_record(
        {"input": "((7 - -1 + -1 + -4) - (-7 + 7 * 3 * -9)) =", "target": "199"}, 0, "test_seen"
    )
    wrong = TASK.gold_rationale(problem).replace("((8 + -1) + -4) = (7 + -4) = 3", "((8 + -1) + -4) = (6 + -4) = 2")
    fb = TASK.verify(problem, wrong)
    assert fb == Feedback(
        step="2",
        segment="((8 + -1) + -4) = (6 + -4)",
        reason="(8 + -1) = 6 is wrong; 8 + -1 = 7.",
        last_correct="1",
    )
    assert fb.text == (
        'Step (1) to step (1) are correct. In step (2) the part "((8 + -1) + -4) = (6 + -4)" is incorrect. '
        "This is because (8 + -1) = 6 is wrong; 8 + -1 = 7."
    )


def test_a_right_answer_through_a_skipped_operation_is_flagged():
    problem = TASK.problem_from_record(
        {"input": "((7 - -1 + -1 + -4) - (-7 + 7 * 3 * -9)) =", "target": "199"}, 0, "test_seen"
    )
    skipped = TASK.gold_rationale(problem).replace(" = ((8 + -1) + -4) = (7 + -4)", " = (7 + -4)")
    fb = TASK.verify(problem, skipped)
    assert TASK.is_correct(problem, TASK.extract_answer(skipped))
    assert fb.step == "2" and fb.segment == "(((7 - -1) + -1) + -4) = (7 + -4)"
    assert "not a single operation" in fb.reason


# ------------------------------------------------------------------ generation


def test_generation_is_deterministic_and_ids_are_unique_and_stable():
    again = TASK.generate(600, "train", seed=7)
    assert [p.to_dict() for p in again] == [p.to_dict() for p in SEEN[:600]]
    assert TASK.generate(50, "train", seed=8)[0].question != SEEN[0].question
    for problems in (SEEN, UNSEEN):
        assert len({p.id for p in problems}) == len(problems)
        assert len({p.question for p in problems}) == len(problems)
    assert SEEN[0].id == "arith-train-7-0" and UNSEEN[5].id == "arith-test_unseen-7-5"
    for p in SEEN + UNSEEN:
        assert str(ex.evaluate(ex.parse(p.question.rstrip("= ")))) == p.target
        assert p.question.endswith(" =")


def test_train_and_test_splits_never_share_a_question():
    train = {p.question for p in TASK.generate(3000, "train", seed=1)}
    for seed in (1, 2):
        test_seen = {p.question for p in TASK.generate(600, "test_seen", seed=seed)}
        assert not train & test_seen
    assert not train & {p.question for p in TASK.generate(300, "test_unseen", seed=1)}


def test_unseen_problems_are_harder_than_seen_ones():
    seen_shapes = {_structure(p.question) for p in SEEN}
    assert {g for g, _ in seen_shapes} == {2, 4} and {s for _, s in seen_shapes} == {3, 4}
    kinds = set()
    for p in UNSEEN:
        groups, size = _structure(p.question)
        assert size > 4 or groups > 4, p.question
        assert not (size > 4 and groups > 4), p.question  # harder in one way only
        kinds.add("size" if size > 4 else "nesting")
    assert kinds == {"size", "nesting"}
    assert {_structure(p.question)[1] for p in UNSEEN} >= {5, 6}
    assert max(_structure(p.question)[0] for p in UNSEEN) == 8


def test_difficulty_options_make_easier_and_other_shapes():
    easy = get_task("multistep_arithmetic", seen_group_sizes=[2, 3], seen_nestings=["2"], operand_range=5)
    shapes = {_structure(p.question) for p in easy.generate(300, "train", seed=0)}
    assert shapes == {(2, 2), (2, 3)}
    assert all(-5 <= int(t) <= 5 for p in easy.generate(100, "train") for t in _NUMBER_RE.findall(p.question))
    wide = ArithmeticTask(seen_nestings=["3", (2, 3)], unseen_nestings=[], operators="+*")
    problems = wide.generate(200, "train", seed=3)
    assert {_structure(p.question)[0] for p in problems} == {3, 6}
    assert not any(" - " in p.question for p in problems)
    for p in problems + wide.generate(100, "test_unseen", seed=3):
        assert wide.verify(p, wide.gold_rationale(p)).is_correct


@pytest.mark.parametrize(
    "options, bad",
    [
        ({"seen_groups": [3]}, "seen_groups"),
        ({"seen_group_sizes": []}, "seen_group_sizes"),
        ({"seen_group_sizes": [1, 3]}, "seen_group_sizes"),
        ({"seen_group_sizes": "abc"}, "seen_group_sizes"),
        ({"unseen_group_sizes": [4, 5]}, "unseen_group_sizes"),
        ({"seen_nestings": ["2,x"]}, "seen_nestings"),
        ({"seen_nestings": ["1"]}, "seen_nestings"),
        ({"unseen_nestings": ["2,2,2,2,2"]}, "unseen_nestings"),
        ({"unseen_nestings": ["2,2"]}, "unseen_nestings"),
        ({"unseen_nestings": [], "unseen_group_sizes": []}, "unseen_group_sizes"),
        ({"operand_range": 0}, "operand_range"),
        ({"operators": ["/"]}, "operators"),
    ],
)
def test_bad_difficulty_options_are_named(options, bad):
    with pytest.raises(ValueError, match=bad):
        get_task("multistep_arithmetic", **options)


def test_too_small_a_question_space_is_a_clear_error():
    tiny = ArithmeticTask(seen_group_sizes=[2], seen_nestings=["2"], operand_range=1, operators="+")
    with pytest.raises(ValueError, match="too few questions"):
        tiny.generate(100, "train")
    with pytest.raises(ValueError, match="split"):
        TASK.generate(1, "validation")


# ------------------------------------------------------------------ records


def test_big_bench_records_become_problems():
    good = TASK.problem_from_record({"input": "((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =", "target": "24"}, 4, "test_seen")
    assert good.question == "((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =" and good.target == "24"
    assert good.id == "arith-test_seen-record-4" and good.split == "test_seen"
    spaced = TASK.problem_from_record({"question": "Q: ((3+4) *(-2 - -1)) = ", "target": -7, "id": "q9"}, 0, "train")
    assert spaced.question == "((3 + 4) * (-2 - -1)) =" and spaced.target == "-7" and spaced.id == "q9"
    assert TASK.verify(spaced, TASK.gold_rationale(spaced)).is_correct


@pytest.mark.parametrize(
    "record, message",
    [
        ({"input": "((1 + 2) - (3 * 4)) =", "target": "10"}, "does not match the value -9"),
        ({"input": "((1 + 2) - (3 * 4) =", "target": "-9"}, "not an arithmetic expression"),
        ({"input": "((1 + 2) / (3 * 4)) =", "target": "0"}, "not an arithmetic expression"),
        ({"input": "((1 + A) - 3) =", "target": "0"}, "letters"),
        ({"input": "((1 + 2) - (3 * 4)) =", "target": "minus nine"}, "not an integer"),
        ({"input": "((1 + 2) - (3 * 4)) ="}, "target"),
        ({"prompt": "((1 + 2) - (3 * 4)) =", "target": "-9"}, "neither an 'input' nor a 'question'"),
    ],
)
def test_bad_records_are_rejected_with_the_reason(record, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TASK.problem_from_record(record, 0, "test_seen")


def test_a_big_bench_file_loads_through_fsspec():
    examples = [{"input": p.question, "target": p.target} for p in SEEN[:5]]
    with fsspec.open("memory://arith/task.json", "w") as f:
        json.dump({"examples": examples}, f)
    loaded = load_problems(TASK, "memory://arith/task.json", split="test_seen")
    assert [(p.question, p.target) for p in loaded] == [(p.question, p.target) for p in SEEN[:5]]
    with fsspec.open("memory://arith/bad.jsonl", "w") as f:
        f.write(json.dumps(examples[0]) + "\n" + json.dumps({"input": "(1 + 2) =", "target": "4"}) + "\n")
    with pytest.raises(ProblemFormatError, match="record 1"):
        load_problems(TASK, "memory://arith/bad.jsonl")


# ------------------------------------------------------------------ verifier properties


@pytest.mark.parametrize("which", ["seen", "unseen"])
def test_every_gold_rationale_verifies_as_all_correct(which):
    problems = SEEN if which == "seen" else UNSEEN
    assert len(problems) >= N
    for p in problems:
        gold = TASK.gold_rationale(p)
        fb = TASK.verify(p, gold)
        labels = parse_attempt(gold).labels
        assert fb == Feedback.all_correct(labels[-2]), (p.question, fb.text)
        assert labels == [str(i) for i in range(1, len(labels))] + [FINAL_LABEL]
        assert TASK.is_correct(p, TASK.extract_answer(gold))
        assert parse_feedback(fb.text) == fb
        assert TASK.improve(p, gold, fb) == gold


def _corrupt_one_number(rng: random.Random, attempt: str, index: int) -> str | None:
    """The attempt with one number of step ``index``'s body replaced by a different one."""
    lines = attempt.split("\n")
    line = lines[index + 1]  # line 0 is the preamble
    label_end = line.index(")") + 1
    numbers = list(_NUMBER_RE.finditer(line, label_end))
    if not numbers:
        return None
    m = rng.choice(numbers)
    new = int(m.group()) + rng.choice([-1, 1]) * rng.randint(1, 20)
    lines[index + 1] = line[: m.start()] + str(new) + line[m.end() :]
    return "\n".join(lines)


def test_one_changed_number_is_flagged_at_its_step_and_improved_to_all_correct():
    rng = random.Random(11)
    checked = 0
    labels_hit: set[str] = set()
    for p in SEEN + UNSEEN[:300]:
        gold = TASK.gold_rationale(p)
        steps = parse_attempt(gold).steps
        for index, step in enumerate(steps):
            corrupted = _corrupt_one_number(rng, gold, index)
            if corrupted is None:
                continue
            fb = TASK.verify(p, corrupted)
            assert fb.step == step.label, (corrupted, fb.text)
            assert fb.last_correct == (steps[index - 1].label if index else None)
            _check_feedback(corrupted, fb)
            improved = TASK.improve(p, corrupted, fb)
            assert TASK.verify(p, improved).is_correct, (corrupted, fb.text, improved)
            before = [s.text for s in parse_attempt(corrupted).steps[:index]]
            assert [s.text for s in parse_attempt(improved).steps[:index]] == before
            assert fb.segment and fb.segment not in improved
            checked += 1
            labels_hit.add(fb.step)
    assert checked >= 5 * N
    assert {"1", "2", "3", "4", "5", "6", FINAL_LABEL} <= labels_hit


def _mutate(rng: random.Random, gold: str) -> str:
    """A random damage to the steps of a gold attempt (the preamble line is kept)."""
    head, body = gold.split("\n", 1)
    lines = body.split("\n")
    kind = rng.randrange(11)
    if kind == 0:  # delete one character
        i = rng.randrange(len(body))
        body = body[:i] + body[i + 1 :]
    elif kind == 1:  # delete a span
        i = rng.randrange(len(body))
        body = body[:i] + body[i + rng.randint(2, 30) :]
    elif kind == 2:  # delete a line
        del lines[rng.randrange(len(lines))]
        body = "\n".join(lines)
    elif kind == 3:  # swap two lines
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        body = "\n".join(lines)
    elif kind == 4:  # shuffle
        rng.shuffle(lines)
        body = "\n".join(lines)
    elif kind == 5:  # truncate
        body = body[: rng.randrange(len(body))]
    elif kind == 6:  # insert visible characters
        i = rng.randrange(len(body) + 1)
        body = body[:i] + "".join(rng.choices(string.ascii_letters + string.digits + string.punctuation, k=rng.randint(1, 4))) + body[i:]
    elif kind == 7:  # a random string instead of the steps
        body = "".join(rng.choices(string.printable, k=rng.randint(0, 300)))
    elif kind == 8:  # an extra step, somewhere
        lines.insert(rng.randrange(len(lines) + 1), f"({rng.randint(1, 9)}) Let's calculate Z = (1 + 2) = 3.")
        body = "\n".join(lines)
    elif kind == 9:  # a duplicated line
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        body = "\n".join(lines)
    else:  # nothing after the preamble, or nothing at all
        return rng.choice(["", head, head + "\n"])
    return head + "\n" + body


def test_damaged_attempts_never_raise_and_are_never_all_correct():
    rng = random.Random(5)
    judged = 0
    for p in SEEN + UNSEEN:
        if judged >= 2 * N:
            break
        gold = TASK.gold_rationale(p)
        damaged = _mutate(rng, gold)
        if damaged == gold:
            continue
        fb = TASK.verify(p, damaged)
        assert not fb.is_correct, damaged
        _check_feedback(damaged, fb)
        improved = TASK.improve(p, damaged, fb)
        assert TASK.verify(p, improved).is_correct, (damaged, fb.text, improved)
        keep = _kept_count(fb)
        assert [s.text for s in parse_attempt(improved).steps[:keep]] == [s.text for s in parse_attempt(damaged).steps[:keep]]
        judged += 1
    assert judged >= N


@pytest.mark.parametrize(
    "attempt, step, reason",
    [
        ("", "1", "step (1) is missing"),
        ("Let's think step by step.", "1", "step (1) is missing"),
        ("Let's think step by step.\n(Final response) So the answer is 24.", "1", "step (1) is missing"),
        ("(1) This equation can be written as \"(A - B)\", where A = (-1 + 2 + 9 * 5) and B = (-2 + -4 + -4 * -7).", "2",
         "step (2) is missing; it should calculate A"),
        ("(1) x\x00\uffff \" ((((((((((((( 9" * 300, "1", "step (1) should be"),
        ("(1) This equation can be written as \"(A - B)\", where A = (-1 + 2 + 9 * 5) and B = (-2 + -4 + -4 * -7)."
         "\n(3) Let's calculate B = (-2 + -4 + -4 * -7) = 22.", "2", "step (2) is missing"),
    ],
)
def test_malformed_attempts_point_at_the_first_missing_or_wrong_step(attempt, step, reason):
    problem = TASK.problem_from_record({"input": "((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =", "target": "24"}, 0, "train")
    fb = TASK.verify(problem, attempt)
    assert fb.step == step and reason in fb.reason, fb.text
    _check_feedback(attempt, fb)
    assert TASK.verify(problem, TASK.improve(problem, attempt, fb)).is_correct


def test_missing_and_extra_final_responses():
    problem = TASK.problem_from_record({"input": "((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =", "target": "24"}, 0, "train")
    gold = TASK.gold_rationale(problem)
    without = gold.rsplit("\n", 1)[0]
    assert TASK.verify(problem, without) == Feedback("final", "", "the final response is missing.", "4")
    extra = gold + "\n(5) Let's calculate C = (1 + 1) = 2."
    fb = TASK.verify(problem, extra)
    assert (fb.step, fb.segment, fb.last_correct) == ("final", "", "4")
    assert fb.reason == "the final response must be the last step, but step (5) follows it."
    assert TASK.improve(problem, extra, fb) == gold
    assert TASK.verify(problem, gold.replace("answer is 24.", "answer is +24.")).step == "final"


# ------------------------------------------------------------------ improver specifics


def test_improver_continues_an_attempt_s_own_valid_partition():
    problem = TASK.problem_from_record({"input": "((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =", "target": "24"}, 0, "train")
    own = "\n".join([
        ANSWER_PREFIX,
        '(1) This equation can be written as "(P - (Q + -4 * -7))", where P = (-1 + 2 + 9 * 5) and Q = (-2 + -4).',
        "(2) Let's calculate P = (-1 + 2 + 9 * 5) = ((-1 + 2) + (9 * 5)) = ((-1 + 2) + 45) = (1 + 45) = 46.",
        "(3) Let's calculate Q = (-2 + -4) = -5.",
    ])
    fb = TASK.verify(problem, own)
    assert (fb.step, fb.segment, fb.reason) == ("3", "(-2 + -4) = -5.", "(-2 + -4) = -5 is wrong; -2 + -4 = -6.")
    improved = TASK.improve(problem, own, fb)
    assert TASK.verify(problem, improved).is_correct
    assert improved.split("\n")[:3] == own.split("\n")[:3]
    assert improved.split("\n")[4:] == [
        "(4) Then, the final equation is (P - (Q + -4 * -7)) = (46 - (-6 + -4 * -7)) = (46 - (-6 + (-4 * -7))) = "
        "(46 - (-6 + 28)) = (46 - 22) = 24.",
        "(Final response) So the answer is 24.",
    ]
    # The same idea with the wrong grouping: -2 + -4 + -4 * -7 is (-2 + -4) + (-4 * -7).
    regrouped = own.replace('"(P - (Q + -4 * -7))", where P = (-1 + 2 + 9 * 5) and Q = (-2 + -4)',
                            '"(P - (-2 + Q))", where P = (-1 + 2 + 9 * 5) and Q = (-4 + -4 * -7)')
    fb = TASK.verify(problem, regrouped)
    assert fb.step == "1" and fb.segment == '"(P - (-2 + Q))"' and "does not have the form" in fb.reason


def test_improver_keeps_only_correct_steps_when_the_feedback_points_too_late():
    problem = SEEN[0]
    gold = TASK.gold_rationale(problem)
    corrupted = _corrupt_one_number(random.Random(0), gold, 1)
    late = Feedback(step=FINAL_LABEL, segment="", reason="made up.", last_correct="6")
    improved = TASK.improve(problem, corrupted, late)
    assert TASK.verify(problem, improved).is_correct
    assert improved == gold
    assert TASK.improve(problem, corrupted, Feedback.all_correct("6")) == gold
    assert TASK.improve(problem, corrupted, Feedback(step="x.y", segment="", reason="?")) == gold
