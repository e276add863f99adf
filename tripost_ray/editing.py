"""Interactive trajectory editing: the TriPosT rules of TRIPOST.md, "The loop", step 1.

Given the small model's output on one question, decide what training data it yields:

(a) **Directly correct.** The last attempt's answer is right and the output is
    *internally consistent* (defined below): keep it, end it with the all-correct
    feedback, and make no FBK/IMP call at all.
(b) **Agreement check.** Otherwise ask FBK about the model's attempts in order and find
    the first model feedback that disagrees with FBK (another step, a segment that does
    not overlap, or no/unparsable model feedback). The agreed prefix is kept and that
    feedback is replaced by FBK's. If FBK says the attempt at the cut is correct, done.
(c) **Improvement.** Up to ``max_rounds`` times: IMP rewrites the attempt from the error
    step; the update is rejected (the loop stops) when it breaks a rule of
    :func:`check_update`; otherwise FBK judges it and it is appended; stop on
    all-correct feedback.
(d) **Outcome.** The trajectory is discarded unless its last feedback says correct. If
    an update made things worse (FBK points at an earlier step than before, or at the
    same step and segment again) only question + first attempt + first FBK feedback are
    kept (kind ``bad_improvement``): it still teaches the model to find its own error.

Failures are values: any non-ok :class:`CallOutcome` ends the trajectory as discarded
with a reason naming the role and status (``fbk_timeout``, ``imp_api_error``, ...), so a
failure never becomes training data. Every reason is listed in :data:`DISCARD_REASONS`.

Internally consistent (rule a) means, for the parsed output ``(a_1, f_1) ... (a_n, f_n)``:

* every attempt is well formed (:func:`parse_valid_attempt`) and none was cut off;
* ``f_1 .. f_{n-1}`` parse and each points at an error: a step that exists in its
  attempt, with a segment (when non-empty) that occurs in that step's text;
* ``f_n`` is absent or parses as the all-correct feedback;
* each ``a_{i+1}`` is an acceptable update of ``a_i`` under ``f_i`` by the same rules
  that IMP's updates must pass (:func:`check_update`).

Steps are compared by their position in the parsed attempt
(:meth:`ParsedAttempt.index_of`), since labels may be ``2.1`` or ``final``.

Departures from a literal reading, and why:

* FBK is called on the model's attempts in order *up to the first disagreement*: the
  attempts after the cut are dropped, so judging them would only cost money and add
  chances of failure.
* The output is cut before its first malformed attempt (a truncated or garbled
  ``Updated Answer``); with no well-formed first attempt it is discarded without calls.
* When FBK says "all correct" the final answer must also match the problem's target
  (``fbk_correct_but_wrong_answer`` otherwise): a wrong teacher must not become data.
* A feedback naming a step the attempt does not have is unusable (``fbk_unknown_step``).
* The all-correct feedback that ends a kept trajectory is always re-rendered from the
  attempt (``Step (1) to step (n) are correct. The final response is also correct.``).
  Agreed model feedbacks keep the model's own words; the feedback at the cut and every
  later one is FBK's text. IMP and the rules always see FBK's structured feedback.
* "Still contains the flagged segment" matches the segment at word boundaries, so a
  flagged ``= 1`` is not found inside a corrected ``= 12``.
* The preamble (``Let's think step by step.<hint>``) is not a step: an update may keep
  it or restore the task's own prefix, but not invent another; an update that starts
  at ``(1)`` gets the task's prefix.
* ``verify_direct_correct`` (off by default, as in the paper) also sends outputs that
  pass rule (a) through FBK, for models whose right answers often rest on wrong steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Literal, get_args

from tripost_ray.outcomes import CallOutcome
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import (
    ANSWER_TAG,
    FEEDBACK_TAG,
    QUESTION_TAG,
    UPDATED_TAG,
    Feedback,
    ParsedAttempt,
    Trajectory,
    TrajectoryKind,
    Turn,
    extract_final_answer,
    parse_attempt,
    parse_feedback,
    parse_model_output,
)

FbkCall = Callable[[Problem, str], Awaitable[CallOutcome[Feedback]]]
"""FBK: (problem, attempt) -> outcome whose value is the :class:`Feedback`."""

ImpCall = Callable[[Problem, str, Feedback], Awaitable[CallOutcome[str]]]
"""IMP: (problem, attempt, feedback) -> outcome whose value is the updated attempt text."""

RejectReason = Literal[
    "imp_unparsable", "imp_identical", "imp_changed_earlier_step", "imp_error_step_unchanged",
    "imp_kept_flagged_segment",
]

DiscardReason = Literal[
    "unparsable_output",
    "fbk_parse_error", "fbk_api_error", "fbk_timeout", "fbk_refused", "fbk_over_budget",
    "imp_parse_error", "imp_api_error", "imp_timeout", "imp_refused", "imp_over_budget",
    "fbk_unknown_step",
    "fbk_correct_but_wrong_answer",
    "imp_unparsable", "imp_identical", "imp_changed_earlier_step", "imp_error_step_unchanged",
    "imp_kept_flagged_segment",
    "max_rounds",
]

_CALL_FAILURE = {
    "parse_error": "its reply could not be parsed",
    "api_error": "the endpoint returned an error (after retries)",
    "timeout": "it timed out (after retries)",
    "refused": "the model refused to answer",
    "over_budget": "the job's spending limit was reached",
}

#: Every reason a trajectory can be discarded for, and what it means.
DISCARD_REASONS: dict[str, str] = {
    "unparsable_output": "the model's output has no well-formed first attempt (numbered steps and a one-line "
    "final response with an answer); no call is made",
    **{f"fbk_{s}": f"an FBK call failed: {m}" for s, m in _CALL_FAILURE.items()},
    **{f"imp_{s}": f"an IMP call failed: {m}" for s, m in _CALL_FAILURE.items()},
    "fbk_unknown_step": "FBK named a wrong step that the attempt does not have",
    "fbk_correct_but_wrong_answer": "FBK called an attempt all correct but its final answer is not the target",
    "imp_unparsable": "IMP's update is not a well-formed attempt (no steps or no one-line final response with an "
    "answer, or it holds Q:/Answer:/Feedback:/Updated Answer: lines)",
    "imp_identical": "IMP's update is identical to the attempt it was asked to improve",
    "imp_changed_earlier_step": "IMP's update changed a step before the error step, or its preamble is neither "
    "the attempt's nor the task's attempt prefix",
    "imp_error_step_unchanged": "IMP's update left the error step unchanged",
    "imp_kept_flagged_segment": "IMP's update still contains the flagged segment in the error step",
    "max_rounds": "the improvement rounds ran out before FBK said the attempt is correct",
}
assert set(DISCARD_REASONS) == set(get_args(DiscardReason)), "DISCARD_REASONS and DiscardReason must agree"


@dataclass
class EditResult:
    """What the editing rules made of one model output: a trajectory or a named discard."""

    problem_id: str
    trajectory: Trajectory | None  # None when discarded
    discard_reason: DiscardReason | None  # a key of DISCARD_REASONS; None when kept
    calls: list[CallOutcome] = field(default_factory=list)  # every FBK/IMP call made, in order
    rounds: int = 0  # improvement rounds run (IMP calls made)

    @property
    def failure(self) -> CallOutcome | None:
        """The first non-ok call (then ``discard_reason`` names its role and status)."""
        return next((c for c in self.calls if not c.ok), None)

    @property
    def kept(self) -> bool:
        return self.trajectory is not None

    def record(self) -> dict[str, Any]:
        """A JSON-able record (for the trajectories and failures datasets)."""
        return {
            "problem_id": self.problem_id,
            "trajectory": self.trajectory.to_dict() if self.trajectory else None,
            "discard_reason": self.discard_reason,
            "rounds": self.rounds,
            "calls": [c.record() for c in self.calls],
        }


# ------------------------------------------------------------------ attempt rules

_FOREIGN_TAGS = tuple(t.strip() for t in (QUESTION_TAG, ANSWER_TAG, FEEDBACK_TAG, UPDATED_TAG))


def parse_valid_attempt(task: Task | None, attempt: str) -> ParsedAttempt | None:
    """The parsed attempt when it is well formed, else None.

    Well formed: at least one reasoning step, the final response is the last step and a
    single line from which the task (or, with no task, the generic
    ``So the answer is X.`` reader) reads an answer, and no line opens another turn
    (``Q:``, ``Answer:``, ``Feedback:``, ``Updated Answer:``).
    """
    parsed = parse_attempt(attempt)
    if not parsed.reasoning_steps or not parsed.steps:
        return None
    final = parsed.steps[-1]
    if parsed.final_response is not final or "\n" in final.text:
        return None
    if any(line.lstrip().startswith(_FOREIGN_TAGS) for line in attempt.split("\n")):
        return None
    answer = task.extract_answer(attempt) if task is not None else extract_final_answer(attempt)
    if answer is None:
        return None
    return parsed


def contains_segment(text: str, segment: str) -> bool:
    """Whether ``segment`` occurs in ``text``, not as part of a longer word or number."""
    start = text.find(segment)
    while start >= 0:
        end = start + len(segment)
        left_ok = not (segment[0].isalnum() and start > 0 and text[start - 1].isalnum())
        right_ok = not (segment[-1].isalnum() and end < len(text) and text[end].isalnum())
        if left_ok and right_ok:
            return True
        start = text.find(segment, start + 1)
    return False


def check_update(task: Task, previous: ParsedAttempt, feedback: Feedback, update: str) -> RejectReason | None:
    """The first rule an update of ``previous`` under error ``feedback`` breaks, or None.

    Rules, in order: well formed; not identical; every step before the error step
    unchanged (verbatim) and the preamble either unchanged or the task's own attempt
    prefix (the preamble is not a step: repairing a garbled one is fine, inventing a new
    one is not); the error step changed; the flagged segment (when non-empty) no longer
    in the error step.
    """
    k = previous.index_of(feedback.step) if feedback.step is not None else None
    if k is None:
        raise ValueError(f"feedback names step {feedback.step!r}, which the attempt does not have")
    parsed = parse_valid_attempt(task, update)
    if parsed is None:
        return "imp_unparsable"
    if parsed.render() == previous.render():
        return "imp_identical"
    if parsed.preamble not in (previous.preamble, task.attempt_prefix):
        return "imp_changed_earlier_step"
    if parsed.steps[:k] != previous.steps[:k] or len(parsed.steps) <= k:
        return "imp_changed_earlier_step"
    if parsed.steps[k] == previous.steps[k]:
        return "imp_error_step_unchanged"
    if feedback.segment and contains_segment(parsed.steps[k].text, feedback.segment):
        return "imp_kept_flagged_segment"
    return None


def made_worse(prev: ParsedAttempt, prev_fb: Feedback, new: ParsedAttempt, new_fb: Feedback) -> bool:
    """An update made things worse: FBK now points earlier, or at the same step and segment."""
    if prev_fb.is_correct or new_fb.is_correct:
        return False
    before, after = prev.index_of(prev_fb.step), new.index_of(new_fb.step)
    if before is None or after is None:
        return False
    return after < before or (after == before and new_fb.segment == prev_fb.segment)


def segments_overlap(step_text: str, model_segment: str, fbk_segment: str) -> bool:
    """Whether the model's flagged segment overlaps FBK's within the step's text.

    An empty FBK segment constrains nothing; an empty model segment names nothing and so
    cannot agree with a non-empty one. Otherwise the segments overlap when one contains
    the other or their first occurrences in the step share a character.
    """
    if not fbk_segment:
        return True
    if not model_segment:
        return False
    if model_segment in fbk_segment or fbk_segment in model_segment:
        return True
    i, j = step_text.find(model_segment), step_text.find(fbk_segment)
    if i < 0 or j < 0:
        return False
    return i < j + len(fbk_segment) and j < i + len(model_segment)


def agrees(model_feedback: str | None, fbk: Feedback, attempt: ParsedAttempt) -> bool:
    """Whether the model's own feedback text agrees with FBK's on this attempt."""
    parsed = parse_feedback(model_feedback) if model_feedback is not None else None
    if parsed is None:
        return False
    if parsed.is_correct or fbk.is_correct:
        return parsed.is_correct and fbk.is_correct
    if parsed.step != fbk.step:
        return False
    k = attempt.index_of(fbk.step)
    return segments_overlap(attempt.steps[k].text if k is not None else "", parsed.segment, fbk.segment)


def all_correct_text(attempt: ParsedAttempt) -> str:
    """The all-correct feedback for an attempt (names its last reasoning step)."""
    steps = attempt.reasoning_steps
    return Feedback.all_correct(steps[-1].label if steps else None).text


def is_internally_consistent(task: Task, turns: list[tuple[Turn, ParsedAttempt]]) -> bool:
    """Rule (a)'s consistency: see the module docstring."""
    last_turn, _ = turns[-1]
    if last_turn.feedback is not None:
        last_fb = parse_feedback(last_turn.feedback)
        if last_fb is None or not last_fb.is_correct:
            return False
    for (turn, parsed), (next_turn, _) in zip(turns, turns[1:]):
        fb = parse_feedback(turn.feedback) if turn.feedback is not None else None
        if fb is None or fb.is_correct:
            return False
        k = parsed.index_of(fb.step)
        if k is None or (fb.segment and fb.segment not in parsed.steps[k].text):
            return False
        if check_update(task, parsed, fb, next_turn.attempt) is not None:
            return False
    return True


# ------------------------------------------------------------------- the editor


def _with_preamble(update: str, task: Task) -> str:
    """IMP may answer from ``(1)`` on; give such an update the task's attempt prefix."""
    update = update.strip()
    if update and not parse_attempt(update).preamble:
        return task.attempt_prefix + "\n" + update
    return update


class _Editor:
    """The state of one edit: the calls made, the rounds run, and how it ends."""

    def __init__(self, task: Task, problem: Problem, fbk: FbkCall, imp: ImpCall) -> None:
        self.task, self.problem, self._fbk, self._imp = task, problem, fbk, imp
        self.calls: list[CallOutcome] = []
        self.rounds = 0
        self.model_turns = 0
        self.model_turns_kept = 0

    # outcomes
    def discard(self, reason: DiscardReason) -> EditResult:
        return EditResult(self.problem.id, None, reason, list(self.calls), self.rounds)

    def keep(self, turns: list[Turn], kind: TrajectoryKind) -> EditResult:
        meta = {
            "rounds": self.rounds,
            "n_calls": len(self.calls),
            "fbk_calls": sum(c.role == "fbk" for c in self.calls),
            "imp_calls": sum(c.role == "imp" for c in self.calls),
            "model_turns": self.model_turns,
            "model_turns_kept": self.model_turns_kept,
            "cost_usd": sum(c.cost_usd for c in self.calls),
        }
        traj = Trajectory(self.problem.id, self.problem.question, turns, kind, meta)
        return EditResult(self.problem.id, traj, None, list(self.calls), self.rounds)

    # calls
    async def call_fbk(self, attempt: str) -> tuple[Feedback | None, DiscardReason | None]:
        outcome = await self._fbk(self.problem, attempt)
        if outcome.ok and not isinstance(outcome.value, Feedback):
            outcome = replace(outcome, status="parse_error", detail=f"ok outcome without a Feedback: {outcome.detail}")
        self.calls.append(outcome)
        if not outcome.ok:
            return None, f"fbk_{outcome.status}"  # type: ignore[return-value]
        fb = outcome.value
        parsed = parse_attempt(attempt)
        if not fb.is_correct and parsed.index_of(fb.step) is None:
            return None, "fbk_unknown_step"
        if fb.is_correct and not self.task.is_correct(self.problem, self.task.extract_answer(attempt)):
            return None, "fbk_correct_but_wrong_answer"
        return fb, None

    async def call_imp(self, attempt: str, feedback: Feedback) -> tuple[str | None, DiscardReason | None]:
        self.rounds += 1
        outcome = await self._imp(self.problem, attempt, feedback)
        if outcome.ok and not isinstance(outcome.value, str):
            outcome = replace(outcome, status="parse_error", detail=f"ok outcome without an attempt: {outcome.detail}")
        self.calls.append(outcome)
        if not outcome.ok:
            return None, f"imp_{outcome.status}"  # type: ignore[return-value]
        return outcome.value, None

    # the rules
    async def run(self, output: str, max_rounds: int, verify_direct_correct: bool) -> EditResult:
        task = self.task
        model_turns = parse_model_output(output or "").turns
        self.model_turns = len(model_turns)
        turns: list[tuple[Turn, ParsedAttempt]] = []
        for turn in model_turns:  # cut before the first malformed attempt
            parsed = parse_valid_attempt(task, turn.attempt)
            if parsed is None:
                break
            turns.append((turn, parsed))
        if not turns:
            return self.discard("unparsable_output")

        # (a) directly correct: no calls (unless asked to confirm it with FBK)
        last_turn, last_parsed = turns[-1]
        direct = (
            len(turns) == len(model_turns)
            and task.is_correct(self.problem, task.extract_answer(last_turn.attempt))
            and is_internally_consistent(task, turns)
        )
        if direct and not verify_direct_correct:
            self.model_turns_kept = len(turns)
            kept = [t for t, _ in turns[:-1]] + [Turn(last_turn.attempt, all_correct_text(last_parsed))]
            return self.keep(kept, "direct_correct")

        # (b) the agreement check: FBK on the model's attempts, in order, up to the cut
        kept: list[Turn] = []
        history: list[tuple[ParsedAttempt, Feedback]] = []  # each kept attempt with FBK's feedback
        for i, (turn, parsed) in enumerate(turns):
            fb, reason = await self.call_fbk(turn.attempt)
            if reason:
                return self.discard(reason)
            if history and made_worse(*history[-1], parsed, fb):
                return self.bad_improvement(kept, history)
            self.model_turns_kept += 1
            if fb.is_correct:
                kept.append(Turn(turn.attempt, all_correct_text(parsed)))
                # a direct-correct output that FBK confirmed turn by turn is still direct
                confirmed = direct and i == len(turns) - 1
                return self.keep(kept, "direct_correct" if confirmed else "edited")
            history.append((parsed, fb))
            if agrees(turn.feedback, fb, parsed):
                kept.append(turn)
                continue
            kept.append(Turn(turn.attempt, fb.text))
            break

        # (c) improvement rounds from the cut
        for _ in range(max_rounds):
            previous, prev_fb = history[-1]
            update, reason = await self.call_imp(kept[-1].attempt, prev_fb)
            if reason:
                return self.discard(reason)
            update = _with_preamble(update, task)
            rejected = check_update(task, previous, prev_fb, update)
            if rejected:
                return self.discard(rejected)
            parsed = parse_attempt(update)
            fb, reason = await self.call_fbk(update)
            if reason:
                return self.discard(reason)
            if made_worse(previous, prev_fb, parsed, fb):
                return self.bad_improvement(kept, history)
            if fb.is_correct:
                kept.append(Turn(update, all_correct_text(parsed)))
                return self.keep(kept, "edited")
            kept.append(Turn(update, fb.text))
            history.append((parsed, fb))
        # (d) the last feedback still names an error
        return self.discard("max_rounds")

    def bad_improvement(self, kept: list[Turn], history: list[tuple[ParsedAttempt, Feedback]]) -> EditResult:
        """Keep question + first attempt + FBK's first feedback only."""
        self.model_turns_kept = 1
        return self.keep([Turn(kept[0].attempt, history[0][1].text)], "bad_improvement")


async def edit_trajectory(
    task: Task,
    problem: Problem,
    output: str,
    fbk: FbkCall,
    imp: ImpCall,
    *,
    max_rounds: int = 5,
    verify_direct_correct: bool = False,
) -> EditResult:
    """Apply the TriPosT editing rules to the model's ``output`` on ``problem``.

    ``output`` is the model's whole text after ``Answer: `` (it starts with
    ``task.attempt_prefix`` and may hold the model's own feedbacks and updates, or be
    truncated or garbage). Never raises on bad output or failed calls: the result is a
    trajectory or a named discard reason (:data:`DISCARD_REASONS`).

    ``verify_direct_correct`` (off in the paper) sends even a right, consistent output
    through FBK: a right answer reached by wrong steps is then edited instead of being
    taught as correct. It costs one FBK call per attempt, nothing with a scripted FBK.
    An output FBK confirms turn by turn stays ``direct_correct`` (with its calls).
    """
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    return await _Editor(task, problem, fbk, imp).run(output, max_rounds, verify_direct_correct)


# ----------------------------------------------------------- scripted teachers


def scripted_fbk(task: Task) -> FbkCall:
    """FBK played by the task's verifier, in process (a crash becomes an ``api_error``)."""

    async def fbk(problem: Problem, attempt: str) -> CallOutcome[Feedback]:
        try:
            feedback = task.verify(problem, attempt)
        except Exception as err:  # a verifier bug is recorded as a failed call, never data
            return CallOutcome(status="api_error", detail=f"scripted verifier raised {err!r}", role="fbk")
        return CallOutcome(status="ok", value=feedback, raw=feedback.text, role="fbk", provider="scripted")

    return fbk


def scripted_imp(task: Task) -> ImpCall:
    """IMP played by the task's improver, in process (a crash becomes an ``api_error``)."""

    async def imp(problem: Problem, attempt: str, feedback: Feedback) -> CallOutcome[str]:
        try:
            update = task.improve(problem, attempt, feedback)
        except Exception as err:  # an improver bug is recorded as a failed call, never data
            return CallOutcome(status="api_error", detail=f"scripted improver raised {err!r}", role="imp")
        return CallOutcome(status="ok", value=update, raw=update, role="imp", provider="scripted")

    return imp


__all__ = [
    "DISCARD_REASONS", "DiscardReason", "EditResult", "FbkCall", "ImpCall", "RejectReason", "agrees",
    "all_correct_text", "check_update", "contains_segment", "edit_trajectory", "is_internally_consistent",
    "made_worse", "parse_valid_attempt", "scripted_fbk", "scripted_imp", "segments_overlap",
]
