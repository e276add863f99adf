"""Self-improving inference (TRIPOST.md, "Inference with self-improvement").

The model answers ``Q: ...\\nAnswer: Let's think step by step.<hint>``; each round
generates one attempt and the model's own feedback on it (generation stops at the end of
the ``Feedback:`` line). When that feedback is not all-correct, ``Updated Answer:`` plus
the attempt prefix is appended and the model continues. It stops on an all-correct
feedback, an output without (parsable) feedback, no progress (nothing new, or an attempt
identical to an earlier one), or the round limit. The final answer is the last attempt's.

Rounds are batched across problems: each round generates for the still-active subset.
Everything here is plain Python over a :class:`GenerationEngine`, testable without Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from tripost_ray.generation import GenerationEngine, SamplingParams, derive_seed
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import (
    FEEDBACK_TAG,
    QUESTION_TAG,
    UPDATED_TAG,
    Turn,
    parse_feedback,
    parse_model_output,
)

#: A round ends at the end of a feedback line; a new question means the answer is over.
FEEDBACK_LINE_RE = r"(?:^|\n)" + re.escape(FEEDBACK_TAG.strip()) + r"[^\n]*\n"
STOP_STRINGS = ("\n" + QUESTION_TAG.strip(),)

StopReason = Literal["correct_feedback", "no_feedback", "bad_feedback", "repetition", "no_progress",
                     "round_limit", "single_pass"]


@dataclass
class InferenceResult:
    """One problem's self-improving inference.

    ``output`` is the whole text after ``Answer: `` (it begins with the task's attempt
    prefix and may hold feedbacks and ``Updated Answer:`` turns): what the editing stage
    consumes. ``rounds`` counts generate calls.
    """

    problem_id: str
    output: str
    turns: list[Turn]
    first_answer: str | None
    final_answer: str | None
    first_correct: bool
    correct: bool
    rounds: int
    stop_reason: StopReason
    prompt_tokens: int = 0
    generated_tokens: int = 0
    gen_time_s: float = 0.0
    round_seeds: list[int] = field(default_factory=list)

    @property
    def n_turns(self) -> int:
        return len(self.turns)


@dataclass
class _State:
    problem: Problem
    prompt: str
    continuation: str = ""
    rounds: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    gen_time_s: float = 0.0
    stop_reason: StopReason | None = None
    seeds: list[int] = field(default_factory=list)


def _round_outcome(turns: list[Turn], rounds: int, max_rounds: int, self_improve: bool, new_text: str
                   ) -> StopReason | None:
    """Why to stop after a round, or None to continue with an updated answer."""
    if not new_text.strip():
        return "no_progress"
    if not turns or turns[-1].feedback is None:
        return "no_feedback"
    fb = parse_feedback(turns[-1].feedback)
    if fb is None:
        return "bad_feedback"
    if fb.is_correct:
        return "correct_feedback"
    if not self_improve:
        return "single_pass"
    if any(t.attempt.strip() == turns[-1].attempt.strip() for t in turns[:-1]):
        return "repetition"
    if rounds > max_rounds:
        return "round_limit"
    return None


def self_improving_inference(
    engine: GenerationEngine,
    task: Task,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    max_rounds: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    self_improve: bool = True,
) -> list[InferenceResult]:
    """Run (self-improving) inference on ``problems``; results in input order.

    ``max_rounds`` is the number of ``Updated Answer`` rounds after the first attempt
    (so at most ``max_rounds + 1`` generate calls). With ``self_improve=False`` only the
    first round runs (one attempt, plus whatever feedback the model writes after it).
    Each problem's sampling seed for round ``r`` is ``derive_seed(seed, problem.id, r)``,
    so results do not depend on how problems are batched or sharded.
    """
    prefix = task.attempt_prefix
    states = [_State(problem=p, prompt=task.prompt(p)) for p in problems]
    active = list(states)
    while active:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=STOP_STRINGS, stop_regex=FEEDBACK_LINE_RE,
                                stop_regex_trigger=FEEDBACK_TAG.strip())
        seeds = [derive_seed(seed, s.problem.id, s.rounds) for s in active]
        gens = engine.generate([s.prompt + s.continuation for s in active], params, seeds)
        still_active = []
        for s, g, sd in zip(active, gens, seeds):
            s.rounds += 1
            s.seeds.append(sd)
            s.prompt_tokens += g.prompt_tokens
            s.generated_tokens += g.generated_tokens
            s.gen_time_s += g.time_s
            s.continuation += g.text
            turns = parse_model_output(s.continuation, prefix).turns
            s.stop_reason = _round_outcome(turns, s.rounds, max_rounds, self_improve, g.text)
            if s.stop_reason is None:
                s.continuation = s.continuation.rstrip("\n") + "\n" + UPDATED_TAG + prefix
                still_active.append(s)
        active = still_active
    return [_result(task, s) for s in states]


def _result(task: Task, s: _State) -> InferenceResult:
    output = (task.attempt_prefix + s.continuation).rstrip()
    turns = parse_model_output(output).turns
    first = task.extract_answer(turns[0].attempt) if turns else None
    final = task.extract_answer(turns[-1].attempt) if turns else None
    return InferenceResult(
        problem_id=s.problem.id, output=output, turns=turns, first_answer=first, final_answer=final,
        first_correct=task.is_correct(s.problem, first), correct=task.is_correct(s.problem, final),
        rounds=s.rounds, stop_reason=s.stop_reason or "no_progress", prompt_tokens=s.prompt_tokens,
        generated_tokens=s.generated_tokens, gen_time_s=s.gen_time_s, round_seeds=s.seeds,
    )
