"""Post-processing (tripost_ray.postprocess): filters, the split, rebalancing. Pure Python."""

from __future__ import annotations

import math
from collections import Counter
from typing import get_args

import pytest

from tripost_ray.config import PostprocessConfig
from tripost_ray.postprocess import (
    DROP_REASONS,
    DropReason,
    gold_example,
    gold_examples,
    postprocess,
    rebalance,
    split_trajectory,
    trajectory_problem,
)
from tripost_ray.tasks.base import Problem, Task
from tripost_ray.trajectory import Feedback, TrainingExample, Trajectory, Turn, weighted_example

W = 1.5
PREFIX = "Let's think step by step."
A1 = PREFIX + "\n(1) 3 + 4 = 8.\n(2) 8 + 5 = 13.\n(Final response) So the answer is 13."
A2 = PREFIX + "\n(1) 3 + 4 = 7.\n(2) 7 + 5 = 13.\n(Final response) So the answer is 13."
A3 = PREFIX + "\n(1) 3 + 4 = 7.\n(2) 7 + 5 = 12.\n(Final response) So the answer is 12."
F1 = Feedback("1", "= 8", "3 + 4 is 7").text
F2 = Feedback("2", "= 13", "7 + 5 is 12", "1").text
OK = Feedback.all_correct("2").text
Q = "What is 3 + 4 + 5?"


def traj(turns, kind="edited", pid="p", question=Q, **meta) -> Trajectory:
    return Trajectory(pid, question, [Turn(a, f) for a, f in turns], kind, dict(meta))


def cfg(**kw) -> PostprocessConfig:
    return PostprocessConfig(**{"feedback_weight": W, **kw})


def spans_of(text: str, w: float = W) -> tuple:
    cut = text.index("\nFeedback:") + 1
    return ((0, cut, 1.0), (cut, len(text), w))


# -------------------------------------------------------------------------- split


def test_split_edited_trajectory_exact_texts_and_weights():
    t = traj([(A1, F1), (A2, F2), (A3, OK)])
    examples = split_trajectory(t, W)
    assert [e.kind for e in examples] == ["self_improve", "self_improve", "terminal"]
    assert [e.text for e in examples] == [
        f"Q: {Q}\nAnswer: {A1}\nFeedback: {F1}\nUpdated Answer: {A2}",
        f"Q: {Q}\nAnswer: {A2}\nFeedback: {F2}\nUpdated Answer: {A3}",
        f"Q: {Q}\nAnswer: {A3}\nFeedback: {OK}",
    ]
    for e in examples:
        assert e.spans == spans_of(e.text)
        assert e.problem_id == "p"
        # weight 1 up to and including the newline before "Feedback:", w from it on
        assert e.text[e.spans[1][0]:].startswith("Feedback: ")
    assert "Feedback" not in examples[0].text.split("Updated Answer: ")[1]  # no trailing feedback


def test_split_direct_correct_is_one_terminal_example():
    (example,) = split_trajectory(traj([(A3, OK)], kind="direct_correct"), 2.0)
    assert example.kind == "terminal"
    assert example.text == f"Q: {Q}\nAnswer: {A3}\nFeedback: {OK}"
    assert example.spans == spans_of(example.text, 2.0)


def test_split_bad_improvement_is_one_feedback_example():
    (example,) = split_trajectory(traj([(A1, F1)], kind="bad_improvement"), W)
    assert example.kind == "self_improve"
    assert example.text == f"Q: {Q}\nAnswer: {A1}\nFeedback: {F1}"
    assert example.spans == spans_of(example.text)


def test_a_first_attempt_weight_reweights_only_the_wrong_attempts_that_open_self_improvement_examples():
    t = traj([(A1, F1), (A2, F2), (A3, OK)])
    si_1, si_2, terminal = split_trajectory(t, W, first_attempt_weight=0.0)
    for example, attempt in ((si_1, A1), (si_2, A2)):
        start = example.text.index("\nAnswer: ") + len("\nAnswer: ")
        cut = example.text.index("\nFeedback:") + 1
        assert example.spans == ((0, start, 1.0), (start, cut, 0.0), (cut, len(example.text), W))
        assert example.text[start:cut] == attempt + "\n"  # the question keeps weight 1
    assert terminal.spans == spans_of(terminal.text)  # a right attempt is still learnt
    (bad,) = split_trajectory(traj([(A1, F1)], kind="bad_improvement"), W, first_attempt_weight=0.25)
    assert bad.spans[1][2] == 0.25
    assert [e.spans for e in split_trajectory(t, W, first_attempt_weight=1.0)] == [e.spans for e in split_trajectory(t, W)]


def test_the_first_attempt_weight_reaches_the_examples_postprocess_writes():
    t = traj([(A1, F1), (A3, OK)])
    default = postprocess([t], [], cfg(rebalance_ratio=0), seed=0).examples
    zeroed = postprocess([t], [], cfg(rebalance_ratio=0, first_attempt_weight=0.0), seed=0).examples
    assert [e.text for e in default] == [e.text for e in zeroed]
    si = next(e for e in zeroed if e.kind == "self_improve")
    assert [w for _, _, w in si.spans] == [1.0, 0.0, W]


def test_gold_example_is_answer_plus_all_correct_feedback():
    example = gold_example(Problem("g", Q, "12"), A3, W)
    assert example.kind == "gold" and example.problem_id == "g"
    assert example.text == f"Q: {Q}\nAnswer: {A3}\nFeedback: Step (1) to step (2) are correct. " \
                           "The final response is also correct."
    assert example.spans == spans_of(example.text)
    with pytest.raises(ValueError, match="problem 'g'"):
        gold_example(Problem("g", Q, "12"), "no steps here", W)


class _GoldOnly(Task):
    """A task that only writes gold rationales (enough for gold_examples)."""

    name = "gold_only"

    def generate(self, n, split, seed=0):
        raise NotImplementedError

    def problem_from_record(self, record, index, split):
        raise NotImplementedError

    def gold_rationale(self, problem):
        return A3 if problem.id == "a" else A2

    def verify(self, problem, attempt):
        raise NotImplementedError

    def improve(self, problem, attempt, feedback):
        raise NotImplementedError


def test_gold_examples_from_a_task():
    examples = gold_examples(_GoldOnly(), [Problem("a", Q, "12"), Problem("b", Q, "13")], W)
    assert [e.text for e in examples] == [f"Q: {Q}\nAnswer: {A3}\nFeedback: {OK}",
                                          f"Q: {Q}\nAnswer: {A2}\nFeedback: {OK}"]


# ------------------------------------------------------------------------ filters


def test_drop_reasons_are_documented():
    assert set(DROP_REASONS) == set(get_args(DropReason))


@pytest.mark.parametrize("marker", [{"failure": {"status": "timeout"}}, {"discard_reason": "fbk_timeout"},
                                    {"error": "api_error"}])
def test_failure_markers_are_dropped(marker):
    result = postprocess([traj([(A3, OK)], **marker)], [], cfg(rebalance_ratio=0))
    assert result.examples == [] and result.dropped == Counter({"fbk_error": 1})


BROKEN = {
    "no final response": [(PREFIX + "\n(1) 3 + 4 = 7.", OK)],
    "no steps": [(PREFIX + "\n(Final response) So the answer is 12.", OK)],
    "no answer": [(A3.replace("So the answer is 12.", "I give up."), OK)],
    "feedback does not parse": [(A1, "looks wrong"), (A3, OK)],
    "feedback missing": [(A1, None), (A3, OK)],
    "error step missing": [(A1, Feedback("7", "x").text), (A3, OK)],
    "last feedback is an error": [(A1, F1)],
    "an early feedback says correct": [(A1, OK), (A3, OK)],
    "no turns": [],
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_formats_are_dropped(case):
    result = postprocess([traj(BROKEN[case]), traj([(A3, OK)], pid="good")], [], cfg(rebalance_ratio=0))
    assert result.dropped == Counter({"broken_format": 1})
    assert [e.problem_id for e in result.examples] == ["good"]


def test_kind_shapes():
    assert trajectory_problem(traj([(A1, F1), (A3, OK)], kind="bad_improvement"), 512) == "broken_format"
    assert trajectory_problem(traj([(A1, OK)], kind="bad_improvement"), 512) == "broken_format"
    assert trajectory_problem(traj([(A3, OK)], kind="mystery"), 512) == "broken_format"
    assert trajectory_problem(traj([(A1, F1)], kind="bad_improvement"), 512) is None


def test_long_attempts_are_dropped():
    long_step = PREFIX + "\n(1) " + " ".join(["word"] * 30) + ".\n(Final response) So the answer is 12."
    t_long = traj([(A1, F1), (long_step, OK)], pid="long")
    result = postprocess([t_long, traj([(A3, OK)])], [(Problem("g", Q, "12"), long_step)],
                         cfg(max_attempt_words=25, rebalance_ratio=0))
    assert result.dropped == Counter({"attempt_too_long": 2})  # the trajectory and the gold rationale
    assert [e.problem_id for e in result.examples] == ["p"]
    n_words = len(long_step.split())
    assert trajectory_problem(t_long, n_words) is None
    assert trajectory_problem(t_long, n_words - 1) == "attempt_too_long"


def test_over_length_examples_with_a_token_counter():
    t = traj([(A1, F1), (A3, OK)])
    si, terminal = split_trajectory(t, W)
    limit = len(terminal.text)  # a character-level "tokenizer": the SI example is longer

    result = postprocess([t], [], cfg(max_example_tokens=limit, rebalance_ratio=0), count_tokens=len)
    assert result.dropped == Counter({"too_many_tokens": 1})
    assert [e.text for e in result.examples] == [terminal.text]
    assert result.length_unit == "tokens"


def test_over_length_without_a_tokenizer_counts_words():
    t = traj([(A3, OK)])
    words = len(split_trajectory(t, W)[0].text.split())
    kept = postprocess([t], [], cfg(max_example_tokens=words, rebalance_ratio=0))
    dropped = postprocess([t], [], cfg(max_example_tokens=words - 1, rebalance_ratio=0))
    assert kept.length_unit == dropped.length_unit == "words"
    assert len(kept.examples) == 1 and dropped.dropped == Counter({"too_many_tokens": 1})


def test_exact_duplicates_are_dropped_once_kept_once():
    t = traj([(A1, F1), (A3, OK)])
    gold = [(Problem("p", Q, "12"), A3)]  # the same text as the trajectory's terminal example
    result = postprocess([t, traj([(A1, F1), (A3, OK)], pid="q")], gold, cfg(rebalance_ratio=0))
    assert result.dropped == Counter({"duplicate": 3})  # the second trajectory's two + the gold one
    assert sorted(e.kind for e in result.examples) == ["self_improve", "terminal"]
    assert result.counts["gold_before"] == 0


# -------------------------------------------------------------------- rebalance


def _pool(kind: str, n: int) -> list[TrainingExample]:
    return [weighted_example(f"Q: {kind} {i}\nAnswer: x\nFeedback: y", kind, W, f"{kind}{i}") for i in range(n)]


@pytest.mark.parametrize("ratio", [0.5, 1, 1.5, 3])
@pytest.mark.parametrize("n_si", [1, 7, 30, 301])
def test_rebalanced_proportions_follow_r(ratio, n_si):
    si, terminal, gold = _pool("self_improve", n_si), _pool("terminal", 1000), _pool("gold", 1000)
    chosen = rebalance(si, terminal, gold, ratio, seed=3)
    counts = Counter(e.kind for e in chosen)
    k = math.ceil(n_si / ratio)
    assert counts == Counter({"self_improve": n_si, "terminal": k, "gold": k})
    assert abs(n_si / k - ratio) <= ratio / k + 1e-9  # r within one example of rounding
    assert len({e.text for e in chosen}) == len(chosen)
    assert {e.text for e in si} <= {e.text for e in chosen}


def test_self_improvement_share_at_the_default_ratio():
    si, terminal, gold = _pool("self_improve", 300), _pool("terminal", 1000), _pool("gold", 1000)
    chosen = rebalance(si, terminal, gold, PostprocessConfig().rebalance_ratio, seed=0)
    share = sum(e.kind == "self_improve" for e in chosen) / len(chosen)
    assert share == pytest.approx(0.43, abs=0.005)


def test_shortfall_takes_everything_and_is_recorded():
    trajectories = [traj([(A1, F1), (A2, F2), (A3, OK)], pid=f"p{i}", question=f"Q{i}") for i in range(6)]
    gold = [(Problem("g", "G?", "12"), A3)]
    result = postprocess(trajectories, gold, cfg(rebalance_ratio=1))
    # 12 SI examples, 6 terminal, 1 gold: k = 12, so 6 and 11 short
    assert result.counts["sample_target"] == 12
    assert result.counts["terminal_after"] == 6 and result.counts["terminal_shortfall"] == 6
    assert result.counts["gold_after"] == 1 and result.counts["gold_shortfall"] == 11
    assert result.counts["self_improve_after"] == 12 and result.counts["examples"] == 19


@pytest.mark.parametrize("ratio", [0, -1.0])
def test_rebalancing_off_keeps_everything_without_gold(ratio):
    si, terminal, gold = _pool("self_improve", 5), _pool("terminal", 40), _pool("gold", 40)
    chosen = rebalance(si, terminal, gold, ratio, seed=0)
    assert Counter(e.kind for e in chosen) == Counter({"self_improve": 5, "terminal": 40})
    trajectories = [traj([(A1, F1), (A3, OK)], pid=f"p{i}", question=f"Q{i}") for i in range(3)]
    result = postprocess(trajectories, [(Problem("g", "G?", "12"), A3)], cfg(rebalance_ratio=ratio))
    assert result.counts["rebalanced"] == 0 and result.counts["gold_after"] == 0
    assert result.counts["gold_before"] == 1 and len(result.examples) == 6


def test_no_self_improvement_keeps_nothing_when_rebalancing():
    result = postprocess([traj([(A3, OK)], kind="direct_correct")], [(Problem("g", "G?", "12"), A3)], cfg())
    assert result.examples == [] and result.counts["terminal_before"] == 1 and result.counts["sample_target"] == 0


def test_counts_before_and_after():
    trajectories = (
        [traj([(A1, F1), (A3, OK)], pid=f"e{i}", question=f"E{i}") for i in range(10)]
        + [traj([(A3, OK)], kind="direct_correct", pid=f"d{i}", question=f"D{i}") for i in range(20)]
        + [traj([(A1, F1)], kind="bad_improvement", pid=f"b{i}", question=f"B{i}") for i in range(2)]
    )
    gold = [(Problem(f"g{i}", f"G{i}", "12"), A3) for i in range(50)]
    result = postprocess(trajectories, gold, cfg(rebalance_ratio=1.5), seed=1)
    c = result.counts
    assert c["trajectories"] == c["trajectories_kept"] == 32 and c["bad_improvement"] == 2
    assert (c["self_improve_before"], c["terminal_before"], c["gold_before"]) == (12, 30, 50)
    assert (c["self_improve_after"], c["terminal_after"], c["gold_after"]) == (12, 8, 8)
    assert c["examples"] == len(result.examples) == 28 and not result.dropped


# ------------------------------------------------------------------ determinism


def _big_input():
    trajectories = [traj([(A1, F1), (A2, F2), (A3, OK)], pid=f"p{i}", question=f"Q{i}") for i in range(40)]
    trajectories += [traj([(A3, OK)], kind="direct_correct", pid=f"d{i}", question=f"D{i}") for i in range(200)]
    gold = [(Problem(f"g{i}", f"G{i}", "12"), A3) for i in range(200)]
    return trajectories, gold


def test_deterministic_under_a_seed():
    trajectories, gold = _big_input()
    runs = [postprocess(trajectories, gold, cfg(), seed=s) for s in (5, 5, 6)]
    assert [e.to_dict() for e in runs[0].examples] == [e.to_dict() for e in runs[1].examples]
    assert runs[0].counts == runs[1].counts == runs[2].counts
    assert {e.text for e in runs[0].examples} != {e.text for e in runs[2].examples}
    assert rebalance(*map(list, ([], [], [])), 1.5, 0) == []


def test_kinds_are_mixed_in_the_output():
    trajectories, gold = _big_input()
    kinds = [e.kind for e in postprocess(trajectories, gold, cfg()).examples]
    assert kinds != sorted(kinds, key=("self_improve", "terminal", "gold").index)


# ------------------------------------------------------- editing -> postprocess


def test_edited_trajectories_pass_every_filter():
    """What the editing rules keep is always well formed for post-processing."""
    import asyncio
    import re

    from tripost_ray.editing import edit_trajectory, scripted_fbk, scripted_imp
    from tripost_ray.tasks import get_task
    from tripost_ray.trajectory import ANSWER_TAG, parse_model_output

    task = get_task("multistep_arithmetic")
    problems = task.generate(60, "train", seed=11)
    fbk, imp = scripted_fbk(task), scripted_imp(task)

    def wrong_answer(gold: str) -> str:
        return re.sub(r"So the answer is (-?\d+)", lambda m: f"So the answer is {int(m.group(1)) + 3}", gold)

    outputs = [(p, task.gold_rationale(p) if i % 2 else wrong_answer(task.gold_rationale(p)))
               for i, p in enumerate(problems)]
    results = [asyncio.run(edit_trajectory(task, p, out, fbk, imp)) for p, out in outputs]
    trajectories = [r.trajectory for r in results]
    assert all(t is not None for t in trajectories)
    gold = [(p, task.gold_rationale(p)) for p in task.generate(60, "train", seed=12)]
    result = postprocess(trajectories, gold, cfg(), seed=0)
    assert not result.dropped
    assert result.counts["self_improve_before"] == 30 and result.counts["terminal_before"] == 60
    for example in result.examples:
        after_answer = example.text.split("\n" + ANSWER_TAG, 1)[1]
        turns = parse_model_output(after_answer).turns
        assert len(turns) == (2 if example.kind == "self_improve" else 1)
        assert turns[0].feedback is not None and all(task.extract_answer(t.attempt) for t in turns)
