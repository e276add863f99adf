"""The TriPosT editing rules (tripost_ray.editing), pure Python, no Ray.

FBK/IMP are played by plain async functions defined here: a tiny "sum" task's own
verifier and improver (scripted teachers, as the paper uses for arithmetic), or queues
of hand-written outcomes when a test needs a teacher to misbehave.
"""

from __future__ import annotations

import asyncio
import re
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tripost_ray.editing import (
    DISCARD_REASONS,
    DiscardReason,
    EditResult,
    check_update,
    contains_segment,
    edit_trajectory,
    made_worse,
    scripted_fbk,
    scripted_imp,
    segments_overlap,
)
from tripost_ray.outcomes import STATUSES, CallOutcome
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import Feedback, Trajectory, parse_attempt, parse_feedback

# --------------------------------------------------------------------------- a tiny task

_STEP = re.compile(r"^\((\d+)\) (-?\d+) \+ (-?\d+) = (-?\d+)\.$")


class SumTask(Task):
    """Add a list of integers left to right, one step per addition (test-only task)."""

    name = "sum"

    def generate(self, n, split, seed=0):  # not needed here
        raise NotImplementedError

    def problem_from_record(self, record, index, split):
        raise NotImplementedError

    @staticmethod
    def numbers(problem: Problem) -> list[int]:
        return [int(x) for x in re.findall(r"-?\d+", problem.question)]

    def rationale(self, numbers: list[int]) -> str:
        lines, acc = [self.attempt_prefix], numbers[0]
        for i, n in enumerate(numbers[1:], 1):
            lines.append(f"({i}) {acc} + {n} = {acc + n}.")
            acc += n
        lines.append(f"(Final response) So the answer is {acc}.")
        return "\n".join(lines)

    def gold_rationale(self, problem):
        return self.rationale(self.numbers(problem))

    def verify(self, problem, attempt):
        nums = self.numbers(problem)
        parsed = parse_attempt(attempt)
        steps = parsed.reasoning_steps
        acc, last = nums[0], None
        for i, n in enumerate(nums[1:]):
            if i >= len(steps):
                break
            step = steps[i]
            m = _STEP.match(step.text)
            if not m:
                return Feedback(step.label, step.body, "it cannot be read", last)
            a, b, c = (int(m.group(k)) for k in (2, 3, 4))
            if (a, b) != (acc, n):
                return Feedback(step.label, f"{a} + {b}", f"it should add {n} to {acc}", last)
            if c != a + b:
                return Feedback(step.label, f"= {c}", f"{a} + {b} = {a + b}", last)
            acc, last = c, step.label
        answer = self.extract_answer(attempt)
        if len(steps) != len(nums) - 1 or answer != str(acc):
            return Feedback("final", f"So the answer is {answer}", f"the sum is {acc}", last)
        return Feedback.all_correct(last)

    def improve(self, problem, attempt, feedback):
        parsed = parse_attempt(attempt)
        gold = parse_attempt(self.gold_rationale(problem))
        k = parsed.index_of(feedback.step)
        return "\n".join([parsed.preamble, *[s.text for s in parsed.steps[:k]], *[s.text for s in gold.steps[k:]]])


TASK = SumTask()


def attempt(*steps: str) -> str:
    return "\n".join([TASK.attempt_prefix, *steps])


P = Problem("p1", "What is 3 + 4 + 5 + 6?", "18")
GOLD = TASK.gold_rationale(P)
#: step (2) wrong ("= 13"), the rest follows from it
WRONG2 = attempt("(1) 3 + 4 = 7.", "(2) 7 + 5 = 13.", "(3) 13 + 6 = 19.", "(Final response) So the answer is 19.")
#: step (1) wrong
WRONG1 = attempt("(1) 3 + 4 = 8.", "(2) 8 + 5 = 13.", "(3) 13 + 6 = 19.", "(Final response) So the answer is 19.")
#: steps right, final response wrong
WRONGF = attempt("(1) 3 + 4 = 7.", "(2) 7 + 5 = 12.", "(3) 12 + 6 = 18.", "(Final response) So the answer is 17.")
#: step (3) wrong
WRONG3 = attempt("(1) 3 + 4 = 7.", "(2) 7 + 5 = 12.", "(3) 12 + 6 = 19.", "(Final response) So the answer is 19.")
ALL_CORRECT = "Step (1) to step (3) are correct. The final response is also correct."


def fb_text(attempt: str) -> str:
    return TASK.verify(P, attempt).text


def output_of(*turns: tuple[str, str | None]) -> str:
    """The model's output text after "Answer: " for the given (attempt, feedback) turns."""
    parts = []
    for i, (attempt, feedback) in enumerate(turns):
        parts.append(("" if i == 0 else "Updated Answer: ") + attempt)
        if feedback is not None:
            parts.append("Feedback: " + feedback)
    return "\n".join(parts)


class Teacher:
    """FBK and IMP as plain async functions that record their inputs.

    Each queue holds what the next call returns: a Feedback / attempt text (wrapped in an
    ok outcome), a ready CallOutcome, or nothing left -> the task's scripted answer.
    """

    def __init__(self, fbk=(), imp=()):
        self.fbk_queue, self.imp_queue = list(fbk), list(imp)
        self.fbk_inputs: list[str] = []
        self.imp_inputs: list[tuple[str, Feedback]] = []
        self._fbk, self._imp = scripted_fbk(TASK), scripted_imp(TASK)

    async def fbk(self, problem, attempt):
        self.fbk_inputs.append(attempt)
        if self.fbk_queue:
            item = self.fbk_queue.pop(0)
            return item if isinstance(item, CallOutcome) else CallOutcome("ok", item, role="fbk")
        return await self._fbk(problem, attempt)

    async def imp(self, problem, attempt, feedback):
        self.imp_inputs.append((attempt, feedback))
        if self.imp_queue:
            item = self.imp_queue.pop(0)
            return item if isinstance(item, CallOutcome) else CallOutcome("ok", item, role="imp")
        return await self._imp(problem, attempt, feedback)


def edit(output: str, teacher: Teacher | None = None, max_rounds: int = 5, problem: Problem = P) -> EditResult:
    teacher = teacher or Teacher()
    return asyncio.run(edit_trajectory(TASK, problem, output, teacher.fbk, teacher.imp, max_rounds=max_rounds))


def roles(result: EditResult) -> list[str]:
    return [c.role for c in result.calls]


def assert_discarded(result: EditResult, reason: str) -> None:
    assert result.trajectory is None
    assert result.discard_reason == reason, result.discard_reason
    assert reason in DISCARD_REASONS


# ------------------------------------------------------------------ the tiny task itself


def test_tiny_task_teachers_are_sound():
    assert TASK.verify(P, GOLD).is_correct
    fb = TASK.verify(P, WRONG2)
    assert (fb.step, fb.segment, fb.last_correct) == ("2", "= 13", "1")
    assert TASK.verify(P, WRONGF).step == "final"
    assert TASK.improve(P, WRONG2, fb) == GOLD


# ------------------------------------------------------------------------ (a) direct


def test_direct_correct_makes_no_call():
    teacher = Teacher()
    result = edit(GOLD, teacher)
    assert teacher.fbk_inputs == [] and teacher.imp_inputs == []
    assert result.calls == [] and result.rounds == 0 and result.discard_reason is None
    traj = result.trajectory
    assert traj.kind == "direct_correct"
    assert traj.text == f"Q: {P.question}\nAnswer: {GOLD}\nFeedback: {ALL_CORRECT}"
    assert traj.meta["rounds"] == 0 and traj.meta["n_calls"] == 0 and traj.meta["model_turns"] == 1


def test_direct_correct_with_the_models_own_consistent_feedback():
    teacher = Teacher()
    own = fb_text(WRONG2)  # the model found its error itself
    result = edit(output_of((WRONG2, own), (GOLD, None)), teacher)
    assert teacher.fbk_inputs == [] and teacher.imp_inputs == []
    assert result.trajectory.kind == "direct_correct"
    assert [t.feedback for t in result.trajectory.turns] == [own, ALL_CORRECT]
    assert result.trajectory.meta["model_turns_kept"] == 2


def test_direct_correct_replaces_a_sloppy_all_correct_feedback():
    teacher = Teacher()
    result = edit(output_of((GOLD, "Step (1) to step (9) are correct. The final response is also correct.")), teacher)
    assert teacher.fbk_inputs == []
    assert result.trajectory.kind == "direct_correct"
    assert result.trajectory.turns[-1].feedback == ALL_CORRECT


@pytest.mark.parametrize(
    "output",
    [
        # a correct answer, but the model's last feedback says it is wrong
        output_of((GOLD, 'In step (2) the part "= 12" is incorrect. This is because no.')),
        # an intermediate feedback that says "all correct" and is followed by an update
        output_of((WRONG2, ALL_CORRECT), (GOLD, None)),
        # an intermediate feedback that does not parse
        output_of((WRONG2, "this looks off somewhere"), (GOLD, None)),
        # the feedback points at a step the attempt does not have
        output_of((WRONG2, 'In step (7) the part "= 13" is incorrect. This is because no.'), (GOLD, None)),
        # the flagged segment is not in the flagged step
        output_of((WRONG2, 'In step (2) the part "= 99" is incorrect. This is because no.'), (GOLD, None)),
        # the update changes a step before the one the model flagged
        output_of((WRONG3, fb_text(WRONG3)), (GOLD.replace("3 + 4 = 7", "4 + 3 = 7"), None)),
    ],
)
def test_correct_answer_but_inconsistent_goes_to_fbk(output):
    teacher = Teacher()
    result = edit(output, teacher)
    assert teacher.fbk_inputs, "an inconsistent output must be checked by FBK"
    assert result.trajectory is None or result.trajectory.kind != "direct_correct"


def test_correct_answer_after_a_truncated_update_is_not_direct():
    # the model's second update was cut off: the output is not trusted without FBK
    teacher = Teacher()
    result = edit(output_of((GOLD, ALL_CORRECT), ("Let's think step by step.\n(1) 3 +", None)), teacher)
    assert teacher.fbk_inputs == [GOLD]
    assert result.trajectory.kind == "edited" and len(result.trajectory.turns) == 1


RIGHT_BY_LUCK = attempt("(1) 3 + 4 = 8.", "(2) 7 + 5 = 12.", "(3) 12 + 6 = 18.", "(Final response) So the answer is 18.")


def test_right_answer_with_a_wrong_step_is_direct_by_default():
    teacher = Teacher()
    result = edit(RIGHT_BY_LUCK, teacher)
    assert result.trajectory.kind == "direct_correct" and teacher.fbk_inputs == []


def test_verify_direct_correct_edits_a_right_answer_reached_by_wrong_steps():
    teacher = Teacher()
    result = asyncio.run(edit_trajectory(TASK, P, RIGHT_BY_LUCK, teacher.fbk, teacher.imp, verify_direct_correct=True))
    assert result.trajectory.kind == "edited" and roles(result) == ["fbk", "imp", "fbk"]
    assert [t.attempt for t in result.trajectory.turns] == [RIGHT_BY_LUCK, GOLD]


def test_verify_direct_correct_keeps_a_confirmed_output_direct():
    own = fb_text(WRONG2)
    teacher = Teacher()
    output = output_of((WRONG2, own), (GOLD, None))
    result = asyncio.run(edit_trajectory(TASK, P, output, teacher.fbk, teacher.imp, verify_direct_correct=True))
    assert result.trajectory.kind == "direct_correct" and teacher.fbk_inputs == [WRONG2, GOLD]
    assert [t.feedback for t in result.trajectory.turns] == [own, ALL_CORRECT]
    assert result.trajectory.meta["fbk_calls"] == 2


# --------------------------------------------------------------- (b) + (c) edited


def test_one_round_edit():
    teacher = Teacher()
    result = edit(WRONG2, teacher)
    traj = result.trajectory
    assert traj.kind == "edited" and result.rounds == 1
    assert roles(result) == ["fbk", "imp", "fbk"]
    assert teacher.fbk_inputs == [WRONG2, GOLD]
    assert teacher.imp_inputs[0][1].step == "2"
    assert traj.text == (
        f"Q: {P.question}\nAnswer: {WRONG2}\nFeedback: {fb_text(WRONG2)}\n"
        f"Updated Answer: {GOLD}\nFeedback: {ALL_CORRECT}"
    )
    assert traj.meta == {"rounds": 1, "n_calls": 3, "fbk_calls": 2, "imp_calls": 1, "model_turns": 1,
                         "model_turns_kept": 1, "cost_usd": 0.0}


def test_multi_round_edit_reaches_success_in_three_rounds():
    # IMP fixes the flagged step each time but slips on a later one twice
    a2 = WRONG1.replace("3 + 4 = 8.", "3 + 4 = 7.").replace("8 + 5 = 13.", "7 + 5 = 13.")  # now step 2 wrong
    a3 = WRONG3  # now step 3 wrong
    teacher = Teacher(imp=[a2, a3])  # the third round is the scripted improver
    result = edit(WRONG1, teacher)
    traj = result.trajectory
    assert traj.kind == "edited" and result.rounds == 3
    assert roles(result) == ["fbk", "imp", "fbk", "imp", "fbk", "imp", "fbk"]
    assert [t.attempt for t in traj.turns] == [WRONG1, a2, a3, GOLD]
    assert [parse_feedback(t.feedback).step for t in traj.turns] == ["1", "2", "3", None]
    assert traj.turns[-1].feedback == ALL_CORRECT


def test_final_response_error_is_improved():
    result = edit(WRONGF)
    assert result.trajectory.kind == "edited"
    assert [t.attempt for t in result.trajectory.turns] == [WRONGF, GOLD]


def test_agreement_then_disagreement_cuts_at_the_first_disagreement():
    a2 = WRONG1.replace("3 + 4 = 8.", "3 + 4 = 7.").replace("8 + 5 = 13.", "7 + 5 = 13.")  # step 2 wrong
    own1 = 'In step (1) the part "4 = 8" is incorrect. This is because 3 + 4 is 7.'  # overlaps FBK's "= 8"
    own2 = 'In step (3) the part "= 19" is incorrect. This is because no.'  # FBK says step (2)
    a3 = GOLD.replace("So the answer is 18", "So the answer is 20")  # never judged: after the cut
    teacher = Teacher()
    result = edit(output_of((WRONG1, own1), (a2, own2), (a3, None)), teacher)
    traj = result.trajectory
    assert traj.kind == "edited"
    assert teacher.fbk_inputs == [WRONG1, a2, GOLD]  # not a3
    assert [t.attempt for t in traj.turns] == [WRONG1, a2, GOLD]
    assert traj.turns[0].feedback == own1  # agreed: the model's words are kept
    assert traj.turns[1].feedback == fb_text(a2)  # disagreed: replaced by FBK's
    assert traj.meta["model_turns"] == 3 and traj.meta["model_turns_kept"] == 2


def test_missing_model_feedback_counts_as_disagreement():
    own1 = fb_text(WRONG1)
    a2 = WRONG1.replace("3 + 4 = 8.", "3 + 4 = 7.").replace("8 + 5 = 13.", "7 + 5 = 13.")
    result = edit(output_of((WRONG1, own1), (a2, None)))
    assert [t.feedback for t in result.trajectory.turns[:2]] == [own1, fb_text(a2)]


def test_all_agreed_but_truncated_continues_with_imp():
    # the model flagged its error correctly, then its update was cut off
    own = fb_text(WRONG2)
    teacher = Teacher()
    result = edit(output_of((WRONG2, own)) + "\nUpdated Answer: Let's think step by step.\n(1) 3 + 4", teacher)
    assert roles(result) == ["fbk", "imp", "fbk"]
    assert [t.feedback for t in result.trajectory.turns] == [own, ALL_CORRECT]


def test_fbk_says_the_attempt_at_the_cut_is_correct():
    own = 'In step (1) the part "= 7" is incorrect. This is because no.'
    teacher = Teacher()
    result = edit(output_of((GOLD, own), (WRONG2, None)), teacher)
    assert roles(result) == ["fbk"] and teacher.imp_inputs == []
    traj = result.trajectory
    assert traj.kind == "edited" and [(t.attempt, t.feedback) for t in traj.turns] == [(GOLD, ALL_CORRECT)]


def test_the_agreement_check():
    attempt = parse_attempt(WRONG2)
    fbk = TASK.verify(P, WRONG2)
    from tripost_ray.editing import agrees

    assert agrees(fbk.text, fbk, attempt)
    assert agrees('In step (2) the part "5 = 13" is incorrect. This is because x.', fbk, attempt)
    assert not agrees('In step (1) the part "= 13" is incorrect. This is because x.', fbk, attempt)
    assert not agrees('In step (2) the part "7 +" is incorrect. This is because x.', fbk, attempt)
    assert not agrees(ALL_CORRECT, fbk, attempt)
    assert not agrees(None, fbk, attempt)
    assert not agrees("garbage", fbk, attempt)
    assert agrees(ALL_CORRECT, Feedback.all_correct("3"), parse_attempt(GOLD))
    assert segments_overlap("(2) 7 + 5 = 13.", "5 = 1", "= 13")
    assert segments_overlap("(2) 7 + 5 = 13.", "anything", "")
    assert not segments_overlap("(2) 7 + 5 = 13.", "", "= 13")


# ------------------------------------------------------------------ rejection rules

REJECTIONS = {
    "imp_unparsable": "I think the answer is 18.",
    "imp_identical": WRONG2,
    "imp_changed_earlier_step": GOLD.replace("(1) 3 + 4 = 7.", "(1) 4 + 3 = 7."),
    "imp_error_step_unchanged": WRONG2.replace("(3) 13 + 6 = 19.", "(3) 12 + 6 = 18.").replace("is 19", "is 18"),
    "imp_kept_flagged_segment": GOLD.replace("(2) 7 + 5 = 12.", "(2) 7 + 5 = 12, not = 13."),
}


@pytest.mark.parametrize("reason", sorted(REJECTIONS))
def test_each_rejection_rule_stops_and_discards(reason):
    teacher = Teacher(imp=[REJECTIONS[reason]])
    result = edit(WRONG2, teacher)
    assert_discarded(result, reason)
    assert roles(result) == ["fbk", "imp"] and result.rounds == 1
    assert result.failure is None  # a rejection is not a failed call


@pytest.mark.parametrize(
    "update",
    [
        GOLD + "\nFeedback: " + ALL_CORRECT,  # holds another turn
        "Let's think step by step.\n(1) 3 + 4 = 7.",  # no final response
        "Let's think step by step.\n(Final response) So the answer is 18.",  # no steps
        GOLD.replace("(Final response) So the answer is 18.", "(Final response) Done."),  # no answer
        GOLD + "\nQ: What is 1 + 1?",  # runs into another question
        "",
    ],
)
def test_unparsable_updates(update):
    assert_discarded(edit(WRONG2, Teacher(imp=[update])), "imp_unparsable")


def test_update_without_the_preamble_gets_it_back():
    body = GOLD.split("\n", 1)[1]  # IMP answered from "(1)" on
    result = edit(WRONG2, Teacher(imp=[body]))
    assert result.trajectory.turns[-1].attempt == GOLD


def test_preamble_may_be_kept_or_repaired_but_not_invented():
    previous, fb = parse_attempt(WRONG2.replace("step by step", "step by stpe")), TASK.verify(P, WRONG2)
    assert check_update(TASK, previous, fb, GOLD) is None  # repaired to the task's prefix
    assert check_update(TASK, previous, fb, GOLD.replace("step by step", "step by stpe")) is None  # kept
    invented = GOLD.replace("Let's think step by step.", "Let me guess.")
    assert check_update(TASK, previous, fb, invented) == "imp_changed_earlier_step"


def test_check_update_directly():
    previous, fb = parse_attempt(WRONG2), TASK.verify(P, WRONG2)
    assert check_update(TASK, previous, fb, GOLD) is None
    for reason, update in REJECTIONS.items():
        assert check_update(TASK, previous, fb, update) == reason
    with pytest.raises(ValueError, match="step '7'"):
        check_update(TASK, previous, Feedback("7", "x"), GOLD)


def test_segment_matching_respects_number_boundaries():
    assert contains_segment("(2) 7 + 5 = 13.", "= 13")
    assert not contains_segment("(2) 7 + 5 = 12.", "= 1")
    assert not contains_segment("(1) 3 + 4 = 17.", "7")
    assert contains_segment("(1) 3 + 4 = -7.", "7")
    assert contains_segment('"apple" < "banana"', '"apple" <')


# ------------------------------------------------------------------ (d) outcomes


def test_round_limit_discards():
    # IMP keeps slipping on the final response
    slip = GOLD.replace("is 18", "is 17")
    teacher = Teacher(imp=[WRONG3, slip])
    result = edit(WRONG2, teacher, max_rounds=2)
    assert_discarded(result, "max_rounds")
    assert result.rounds == 2 and roles(result) == ["fbk", "imp", "fbk", "imp", "fbk"]


def test_zero_rounds_discards_a_wrong_attempt_after_one_call():
    result = edit(WRONG2, max_rounds=0)
    assert_discarded(result, "max_rounds")
    assert roles(result) == ["fbk"]


def test_negative_rounds_is_an_error():
    with pytest.raises(ValueError, match="max_rounds"):
        edit(WRONG2, max_rounds=-1)


def test_bad_improvement_points_earlier():
    first = TASK.verify(P, WRONG3)  # step 3
    update = WRONG3.replace("(3) 12 + 6 = 19.", "(3) 12 + 6 = 18.").replace("is 19", "is 18")
    earlier = Feedback("2", "= 12", "a confused teacher", "1")
    teacher = Teacher(fbk=[first, earlier], imp=[update])
    result = edit(WRONG3, teacher)
    traj = result.trajectory
    assert traj.kind == "bad_improvement" and result.discard_reason is None
    assert [(t.attempt, t.feedback) for t in traj.turns] == [(WRONG3, first.text)]
    assert traj.text == f"Q: {P.question}\nAnswer: {WRONG3}\nFeedback: {first.text}"
    assert roles(result) == ["fbk", "imp", "fbk"]


def test_bad_improvement_repeats_the_same_step_and_segment():
    first = Feedback("2", "= 13", "a stubborn teacher", "1")
    teacher = Teacher(fbk=[first, first], imp=[GOLD])
    result = edit(WRONG2, teacher)
    assert result.trajectory.kind == "bad_improvement"
    assert result.trajectory.turns[0].feedback == first.text


def test_bad_improvement_keeps_fbks_feedback_not_the_models():
    # the model's own update made it worse: first error at (2), then at (1)
    own = 'In step (2) the part "= 13" is incorrect. This is because 7 + 5 = 12.'
    teacher = Teacher()
    result = edit(output_of((WRONG2, own), (WRONG1, None)), teacher)
    assert teacher.imp_inputs == []
    assert result.trajectory.kind == "bad_improvement"
    assert result.trajectory.turns[0].feedback == fb_text(WRONG2)


def test_made_worse():
    a, b = parse_attempt(WRONG2), parse_attempt(WRONG3)
    f2, f3 = TASK.verify(P, WRONG2), TASK.verify(P, WRONG3)
    assert made_worse(b, f3, a, f2)  # (3) -> (2): earlier
    assert not made_worse(a, f2, b, f3)  # (2) -> (3): progress
    assert made_worse(a, f2, a, f2)  # the same step and segment
    assert not made_worse(a, f2, a, Feedback("2", "7 + 5"))  # same step, another segment
    assert not made_worse(a, f2, parse_attempt(GOLD), Feedback.all_correct("3"))


# -------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "ok"])
@pytest.mark.parametrize("at", [0, 1])
def test_fbk_failures_discard(status, at):
    failed = CallOutcome(status, detail="teacher down", role="fbk", provider="openai")
    teacher = Teacher(fbk=[TASK.verify(P, WRONG2)] * at + [failed])
    result = edit(WRONG2, teacher)
    assert_discarded(result, f"fbk_{status}")
    assert result.failure is failed and result.calls[-1] is failed


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "ok"])
def test_imp_failures_discard(status):
    failed = CallOutcome(status, detail="teacher down", role="imp", provider="anthropic")
    result = edit(WRONG2, Teacher(imp=[failed]))
    assert_discarded(result, f"imp_{status}")
    assert result.failure is failed and roles(result) == ["fbk", "imp"]


def test_failure_after_a_successful_round_loses_the_partial_trajectory():
    failed = CallOutcome("timeout", role="fbk")
    result = edit(WRONG1, Teacher(fbk=[TASK.verify(P, WRONG1), TASK.verify(P, WRONG3), failed], imp=[WRONG3]))
    assert_discarded(result, "fbk_timeout")
    assert result.rounds == 2 and result.failure is failed


def test_failure_on_a_direct_correct_looking_output_never_becomes_data():
    # inconsistent, so FBK is asked, and FBK fails: no trajectory at all
    failed = CallOutcome("api_error", role="fbk")
    own = 'In step (1) the part "= 7" is incorrect. This is because x.'
    result = edit(output_of((GOLD, own)), Teacher(fbk=[failed]))
    assert_discarded(result, "fbk_api_error")


@pytest.mark.parametrize("role", ["fbk", "imp"])
def test_ok_outcome_without_a_value_is_a_parse_error(role):
    empty = CallOutcome("ok", None, role=role)
    teacher = Teacher(fbk=[empty]) if role == "fbk" else Teacher(imp=[empty])
    result = edit(WRONG2, teacher)
    assert_discarded(result, f"{role}_parse_error")
    assert result.failure.status == "parse_error" and empty.status == "ok"  # the caller's object is untouched


def test_fbk_naming_a_missing_step():
    result = edit(WRONG2, Teacher(fbk=[Feedback("9", "x", "no")]))
    assert_discarded(result, "fbk_unknown_step")


def test_fbk_saying_correct_for_a_wrong_answer():
    result = edit(WRONG2, Teacher(fbk=[Feedback.all_correct("3")]))
    assert_discarded(result, "fbk_correct_but_wrong_answer")


def test_scripted_teachers_crash_into_recorded_failures():
    class Broken(SumTask):
        def verify(self, problem, attempt):
            raise RuntimeError("verifier bug")

    broken = Broken()
    result = asyncio.run(edit_trajectory(broken, P, WRONG2, scripted_fbk(broken), scripted_imp(broken)))
    assert_discarded(result, "fbk_api_error")
    assert "verifier bug" in result.failure.detail


def test_scripted_callables_label_their_outcomes():
    fbk = asyncio.run(scripted_fbk(TASK)(P, WRONG2))
    imp = asyncio.run(scripted_imp(TASK)(P, WRONG2, fbk.value))
    assert (fbk.status, fbk.role, fbk.provider, fbk.value.step) == ("ok", "fbk", "scripted", "2")
    assert (imp.status, imp.role, imp.provider, imp.value) == ("ok", "imp", "scripted", GOLD)


# ------------------------------------------------------------ bad model outputs

GARBAGE = [
    "",
    "   \n\n",
    "Let's think step by step.",
    "Let's think step by step.\n(1) 3 + 4 = 7.\n(2) 7 +",  # truncated
    "Let's think step by step.\n(Final response) So the answer is 18.",  # no steps
    "Feedback: The final response is also correct.",
    "Updated Answer: Feedback: Updated Answer:",
    "(((((((( So the answer is",
    "Let's think step by step.\n(1) 3 + 4 = 7.\n(Final response) So the answer is 18.\n(2) 7 + 5 = 12.",
    "\x00\ufffd日本語 (1) (Final response)",
]


@pytest.mark.parametrize("output", GARBAGE)
def test_garbage_outputs_are_recorded_not_raised(output):
    teacher = Teacher()
    result = edit(output, teacher)
    assert_discarded(result, "unparsable_output")
    assert result.calls == [] and teacher.fbk_inputs == []
    assert result.record()["discard_reason"] == "unparsable_output"


_FRAGMENTS = st.sampled_from(
    ["Let's think step by step.", "\n", "(1) ", "(2) ", "(2.1) ", "(Final response) ", "So the answer is ",
     "18", "19", "3 + 4 = 7.", "7 + 5 = 13.", "Feedback: ", "Updated Answer: ", ALL_CORRECT, fb_text(WRONG2),
     'In step (9) the part "" is incorrect.', ".", " "]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=30))
def test_any_output_ends_as_a_kept_trajectory_or_a_named_reason(parts):
    result = edit("".join(parts))
    if result.trajectory is None:
        assert result.discard_reason in DISCARD_REASONS
    else:
        assert result.discard_reason is None
        assert isinstance(result.trajectory, Trajectory)
        assert all(t.feedback is not None for t in result.trajectory.turns)
        if result.trajectory.kind != "bad_improvement":
            assert parse_feedback(result.trajectory.turns[-1].feedback).is_correct
    assert all(c.ok for c in result.calls) or result.trajectory is None


# ------------------------------------------------------- every reason, one table

SCENARIOS: dict[str, tuple[str, dict, int]] = {  # reason -> (model output, teacher queues, max_rounds)
    "unparsable_output": ("garbage", {}, 5),
    **{f"fbk_{s}": (WRONG2, {"fbk": [CallOutcome(s, role="fbk")]}, 5) for s in STATUSES if s != "ok"},
    **{f"imp_{s}": (WRONG2, {"imp": [CallOutcome(s, role="imp")]}, 5) for s in STATUSES if s != "ok"},
    "fbk_unknown_step": (WRONG2, {"fbk": [Feedback("4", "x")]}, 5),
    "fbk_correct_but_wrong_answer": (WRONG2, {"fbk": [Feedback.all_correct("3")]}, 5),
    **{reason: (WRONG2, {"imp": [update]}, 5) for reason, update in REJECTIONS.items()},
    "max_rounds": (WRONG2, {"imp": [WRONG3]}, 1),
}


def test_every_discard_reason_is_documented_and_covered():
    assert set(DISCARD_REASONS) == set(get_args(DiscardReason)) == set(SCENARIOS)
    assert all(DISCARD_REASONS[r].strip() for r in DISCARD_REASONS)


@pytest.mark.parametrize("reason", sorted(SCENARIOS))
def test_every_discard_reason_is_reachable(reason):
    output, queues, max_rounds = SCENARIOS[reason]
    result = edit(output, Teacher(**queues), max_rounds=max_rounds)
    assert_discarded(result, reason)
    assert (result.failure is not None) == reason.endswith(tuple(s for s in STATUSES if s != "ok"))


# -------------------------------------------------------- property: corrupted gold


def _arithmetic_task():
    try:
        from tripost_ray.tasks.arithmetic import ArithmeticTask
    except ImportError:
        return None
    return ArithmeticTask()


def _corrupt_one_number(text: str, rng, where: str) -> str | None:
    """Change one number of a step, never a step label; ``where``: "final" (the final
    response line), "reasoning" (a numbered step) or "any"."""
    lines = text.split("\n")
    spots = []
    for i, line in enumerate(lines):
        label = re.match(r"^\((?:[\d.]+|Final response)\)\s?", line)
        is_final = line.startswith("(Final response)")
        if label and (where == "any" or (where == "final") == is_final):
            spots += [(i, m) for m in re.finditer(r"\d+", line) if m.start() >= label.end()]
    if not spots:
        return None
    i, m = rng.choice(spots)
    lines[i] = lines[i][: m.start()] + str(int(m.group()) + rng.randint(1, 9)) + lines[i][m.end():]
    return "\n".join(lines)


def test_corrupted_gold_rationales_are_always_repaired():
    """Gold rationales with a corrupted number, edited by the scripted teachers.

    Three kinds of corruption, in turn: (0) the final answer; (1) any number of a step,
    which often leaves the final answer right; (2) a number of a reasoning step *and*
    the final answer, so FBK must find the earlier error and IMP rewrite from it.
    Whenever the final answer is wrong the result is an "edited" trajectory that ends
    all-correct on the right answer; when the corruption left it right, rule (a) keeps
    the output as directly correct without a call (TriPosT judges by the answer).
    """
    import random

    arithmetic = _arithmetic_task()
    task = arithmetic or TASK
    rng = random.Random(0)
    if arithmetic is None:
        questions = ["What is " + " + ".join(str(rng.randint(-9, 9)) for _ in range(rng.randint(2, 6))) + "?"
                     for _ in range(300)]
        problems = [Problem(f"s{i}", q, str(sum(SumTask.numbers(Problem("", q, ""))))) for i, q in enumerate(questions)]
    else:
        problems = task.generate(300, "train", seed=7)
    fbk, imp = scripted_fbk(task), scripted_imp(task)
    counts = {"edited": 0, "direct_correct": 0, "edited_from_a_step": 0}
    for i, problem in enumerate(problems):
        gold = task.gold_rationale(problem)
        mode = i % 3
        broken = _corrupt_one_number(gold, rng, ("final", "any", "reasoning")[mode])
        if mode == 2:
            broken = _corrupt_one_number(broken, rng, "final")
        assert broken is not None and broken != gold
        result = asyncio.run(edit_trajectory(task, problem, broken, fbk, imp))
        assert result.discard_reason is None, (problem.question, broken, result.discard_reason, result.calls)
        traj = result.trajectory
        if task.is_correct(problem, task.extract_answer(broken)):
            assert traj.kind == "direct_correct" and result.calls == []
        else:
            assert traj.kind == "edited", (broken, traj.kind)
            assert parse_feedback(traj.turns[-1].feedback).is_correct
            assert task.is_correct(problem, task.extract_answer(traj.turns[-1].attempt))
            assert traj.turns[0].attempt == broken
            first = parse_feedback(traj.turns[0].feedback)
            counts["edited_from_a_step"] += first.step != "final"
        counts[traj.kind] += 1
    assert counts["edited"] >= 150 and counts["direct_correct"] >= 50 and counts["edited_from_a_step"] >= 50, counts
