"""The text format of TriPosT (TRIPOST.md, "Text formats") and its parsers."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tripost_ray.trajectory import (
    ANSWER_PREFIX,
    FINAL_LABEL,
    Feedback,
    TrainingExample,
    Trajectory,
    Turn,
    extract_final_answer,
    parse_attempt,
    parse_feedback,
    parse_model_output,
    prompt_for,
    render_feedback,
    render_trajectory,
    weighted_example,
)

ATTEMPT = "\n".join(
    [
        "Let's think step by step.",
        '(1) The first letter: "oven": "o" (15). "costume": "c" (3).',
        '(2) We now have: (3) "costume" < (15) "oven".',
        "(2.1) A nested step",
        "that goes on over a second line.",
        "(2.1.3) A deeper one.",
        '(3) Hence, we have "costume" < "oven".',
        "(Final response) So the answer is costume oven.",
    ]
)


# ---------------------------------------------------------------------- attempts


def test_parse_attempt_labels_preamble_and_multiline_steps():
    parsed = parse_attempt(ATTEMPT)
    assert parsed.preamble == ANSWER_PREFIX
    assert parsed.labels == ["1", "2", "2.1", "2.1.3", "3", FINAL_LABEL]
    assert parsed.steps[2].text == "(2.1) A nested step\nthat goes on over a second line."
    assert parsed.steps[2].body == "A nested step\nthat goes on over a second line."
    assert parsed.steps[0].body.startswith("The first letter:")
    assert [s.label for s in parsed.reasoning_steps] == ["1", "2", "2.1", "2.1.3", "3"]
    assert parsed.final_response.text == "(Final response) So the answer is costume oven."
    assert parsed.index_of("2.1.3") == 3 and parsed.index_of("9") is None
    assert parsed.render() == ATTEMPT


def test_parse_attempt_preamble_with_hint_and_no_steps():
    parsed = parse_attempt("Let's think step by step. Use the letters.\nsome words\n")
    assert parsed.preamble == "Let's think step by step. Use the letters.\nsome words"
    assert parsed.steps == () and parsed.final_response is None
    assert parse_attempt("").steps == () and parse_attempt("").preamble == ""


def test_labels_must_open_a_line():
    parsed = parse_attempt("Let's think step by step.\n(1) a (2) b\n (3) indented\n(x) not a label\n(4)no space")
    assert parsed.labels == ["1", "4"]
    assert parsed.steps[0].text == "(1) a (2) b\n (3) indented\n(x) not a label"
    assert parsed.steps[1].body == "no space"


def test_the_last_final_response_counts():
    text = ATTEMPT + "\n(Final response) So the answer is oven costume."
    assert parse_attempt(text).final_response.body == "So the answer is oven costume."
    assert extract_final_answer(text) == "oven costume"


def test_extract_final_answer():
    assert extract_final_answer(ATTEMPT) == "costume oven"
    assert extract_final_answer("(1) x\n(Final response) So the answer is -199.") == "-199"
    assert extract_final_answer("(Final response) So the answer is 3.5") == "3.5"
    assert extract_final_answer("(Final response) So the answer is 12.\nmore text") == "12"
    assert extract_final_answer("(1) So the answer is 4.") is None  # not a final response
    assert extract_final_answer("(Final response) I give up.") is None
    assert extract_final_answer("") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("()1.2 x\n\"") + ["(Final response)", "(2.1)", "So the answer is ", "Feedback: ",
                                                          "Updated Answer: ", 'the part "', '" is incorrect.'])))
def test_parsers_never_raise_on_garbage(pieces):
    text = "".join(pieces)
    parsed = parse_attempt(text)
    assert all(s.text for s in parsed.steps)
    extract_final_answer(text)
    parse_feedback(text)
    parse_model_output(text, prefix=ANSWER_PREFIX)


# ---------------------------------------------------------------------- feedback


def test_render_feedback_reference_format():
    fb = Feedback(step="3", segment='"oven" < "costume"', reason='"costume" comes first.', last_correct="2.2")
    assert render_feedback(fb) == (
        'Step (1) to step (2.2) are correct. In step (3) the part ""oven" < "costume"" is incorrect. '
        'This is because "costume" comes first.'
    )
    assert fb.text == render_feedback(fb)
    assert render_feedback(Feedback.all_correct("4")) == "Step (1) to step (4) are correct. The final response is also correct."
    assert render_feedback(Feedback(step="1", segment="x", reason="y")) == 'In step (1) the part "x" is incorrect. This is because y.'
    assert render_feedback(Feedback(step=FINAL_LABEL, segment="7", reason="it is 8.", last_correct="3")) == (
        'Step (1) to step (3) are correct. In the final response the part "7" is incorrect. This is because it is 8.'
    )


def test_feedback_round_trip():
    cases = [
        Feedback(step="2", segment="(8 + -1)", reason="8 + -1 = 7, not 9.", last_correct="1"),
        Feedback(step="2.1.1", segment='"o" (16)', reason='"o" is letter 15.', last_correct="2.1"),
        Feedback(step="1", segment="A = (7 - 1)", reason="the partition is wrong.", last_correct=None),
        Feedback(step=FINAL_LABEL, segment="199", reason="the answer is 200.", last_correct="4"),
        Feedback(step=FINAL_LABEL, segment="", reason="the final response is missing.", last_correct="3"),
        Feedback.all_correct("4"),
        Feedback.all_correct("2.2.2"),
        Feedback.all_correct(None),
    ]
    for fb in cases:
        back = parse_feedback(render_feedback(fb))
        assert back == fb, (fb, back)
        assert back.is_correct == (fb.step is None)
    # a reason without a period gains one; nothing else changes
    back = parse_feedback(render_feedback(Feedback(step="2", segment="x", reason="no period", last_correct="1")))
    assert back == Feedback(step="2", segment="x", reason="no period.", last_correct="1")


def test_parse_feedback_malformed_is_none():
    for text in [
        "",
        "Looks good to me.",
        "Step (1) to step (2) are correct.",
        'In step (two) the part "x" is incorrect.',
        'In step (2) the part x is incorrect.',
        "The final response is correct.",
        "Step (1) to step (x) are correct. The final response is also correct. And more.",
    ]:
        assert parse_feedback(text) is None, text
    fb = parse_feedback('  In step (2) the part "x" is incorrect.  ')
    assert fb == Feedback(step="2", segment="x", reason="", last_correct=None)


def test_rendered_feedback_is_one_line():
    """A trajectory holds each feedback on one ``Feedback:`` line, so line breaks in a
    teacher's segment or reason must not split it."""
    fb = Feedback(step="2", segment="(8 + -1)\n= 9", reason="8 + -1 = 7,\n  not 9.", last_correct="1")
    text = render_feedback(fb)
    assert "\n" not in text
    assert parse_feedback(text) == Feedback(step="2", segment="(8 + -1) = 9", reason="8 + -1 = 7, not 9.", last_correct="1")
    out = parse_model_output(f"\n(1) a\nFeedback: {text}\nUpdated Answer: {ANSWER_PREFIX}\n(1) b", prefix=ANSWER_PREFIX)
    assert [t.feedback for t in out.turns] == [text, None]


def test_feedback_to_dict():
    fb = Feedback(step="2", segment="x", reason="y.", last_correct="1")
    assert Feedback(**fb.to_dict()) == fb


# -------------------------------------------------------------- model outputs


FB_WRONG = 'Step (1) to step (1) are correct. In step (2) the part "9" is incorrect. This is because 8 + -1 = 7.'
FB_RIGHT = "Step (1) to step (3) are correct. The final response is also correct."


def test_parse_model_output_single_attempt():
    out = parse_model_output("\n(1) a\n(Final response) So the answer is 3.", prefix=ANSWER_PREFIX)
    assert out.turns == [Turn(ANSWER_PREFIX + "\n(1) a\n(Final response) So the answer is 3.", None)]
    assert not out.ends_with_feedback


def test_parse_model_output_attempts_feedbacks_and_updates():
    continuation = (
        "\n(1) a\n(2) 9\n(Final response) So the answer is 9.\n"
        f"Feedback: {FB_WRONG}\n"
        "Updated Answer: Let's think step by step.\n(1) a\n(2) 7\n(Final response) So the answer is 7.\n"
        f"Feedback: {FB_WRONG}\n"
        "Updated Answer: Let's think step by step.\n(1) a\n(2) 7\n(3) b\n(Final response) So the answer is 7.\n"
        f"Feedback: {FB_RIGHT}"
    )
    out = parse_model_output(continuation, prefix=ANSWER_PREFIX)
    assert [t.feedback for t in out.turns] == [FB_WRONG, FB_WRONG, FB_RIGHT]
    assert out.turns[0].attempt == "Let's think step by step.\n(1) a\n(2) 9\n(Final response) So the answer is 9."
    assert out.turns[2].attempt.endswith("(3) b\n(Final response) So the answer is 7.")
    assert all(t.attempt.startswith(ANSWER_PREFIX) for t in out.turns)
    assert out.ends_with_feedback
    assert parse_feedback(out.turns[-1].feedback).is_correct


def test_parse_model_output_trailing_attempt_without_feedback():
    continuation = (
        "\n(1) a\n(Final response) So the answer is 9.\n"
        f"Feedback: {FB_WRONG}\n"
        "Updated Answer: Let's think step by step.\n(1) a\n(2) 7"
    )
    out = parse_model_output(continuation, prefix=ANSWER_PREFIX)
    assert len(out.turns) == 2
    assert out.turns[1] == Turn("Let's think step by step.\n(1) a\n(2) 7", None)
    assert not out.ends_with_feedback
    assert parse_model_output("", prefix="").turns == []


def test_render_trajectory_format_and_round_trip():
    q = "Sort the following words alphabetically: List: oven costume"
    turns = [
        Turn(ANSWER_PREFIX + "\n(1) x\n(Final response) So the answer is oven costume.", FB_WRONG),
        Turn(ANSWER_PREFIX + "\n(1) y\n(Final response) So the answer is costume oven.", FB_RIGHT),
    ]
    text = render_trajectory(q, turns)
    assert text == (
        f"Q: {q}\n"
        "Answer: Let's think step by step.\n(1) x\n(Final response) So the answer is oven costume.\n"
        f"Feedback: {FB_WRONG}\n"
        "Updated Answer: Let's think step by step.\n(1) y\n(Final response) So the answer is costume oven.\n"
        f"Feedback: {FB_RIGHT}"
    )
    prompt = prompt_for(q)
    assert prompt == f"Q: {q}\nAnswer: {ANSWER_PREFIX}"
    assert text.startswith(prompt)
    assert parse_model_output(text[len(prompt) :], prefix=ANSWER_PREFIX).turns == turns
    # an attempt without feedback renders without a Feedback line
    assert render_trajectory(q, [Turn("Let's think step by step.\n(1) x", None)]) == (
        f"Q: {q}\nAnswer: Let's think step by step.\n(1) x"
    )
    assert prompt_for(q, " Hint.") == f"Q: {q}\nAnswer: {ANSWER_PREFIX} Hint."


# -------------------------------------------------------------- weighted spans


def test_weighted_example_spans():
    text = render_trajectory("q?", [Turn("Let's think step by step.\n(1) a", FB_WRONG), Turn("Let's think step by step.\n(1) b", FB_RIGHT)])
    ex = weighted_example(text, "self_improve", 1.5, problem_id="p1")
    (s0, e0, w0), (s1, e1, w1) = ex.spans
    assert (s0, w0, e1, w1) == (0, 1.0, len(text), 1.5)
    assert e0 == s1  # contiguous, covering the text exactly
    assert text[s1:].startswith("Feedback: ") and text[:e0].endswith("(1) a\n")
    assert text.count("Feedback:") == 2 and "Feedback:" not in text[:e0]

    plain = weighted_example("Q: q?\nAnswer: Let's think step by step.\n(1) a", "gold", 1.5)
    assert plain.spans == ((0, len(plain.text), 1.0),)


def test_weighted_example_spans_cover_random_texts():
    rng = random.Random(3)
    for _ in range(500):
        parts = [rng.choice(["Q: x", "Answer: a", "Feedback: f", "Updated Answer: b", "(1) s", "Feedback:x"]) for _ in range(rng.randrange(1, 8))]
        text = "\n".join(parts)
        w = rng.choice([0.0, 1.0, 1.5, 2.0])
        ex = weighted_example(text, "terminal", w)
        assert ex.spans[0][0] == 0 and ex.spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(ex.spans, ex.spans[1:]))
        first = text.find("\nFeedback:")
        if first < 0:
            assert [s[2] for s in ex.spans] == [1.0]
        else:
            assert ex.spans[1] == (first + 1, len(text), w)


# ---------------------------------------------------------------- serialisation


def test_trajectory_and_example_dict_round_trip():
    traj = Trajectory(
        problem_id="ws-1",
        question="q?",
        turns=[Turn("Let's think step by step.\n(1) a", FB_WRONG), Turn("Let's think step by step.\n(1) b", FB_RIGHT)],
        kind="edited",
        meta={"rounds": 1, "fbk": ["ok"]},
    )
    back = Trajectory.from_dict(traj.to_dict())
    assert back == traj
    assert back.text == traj.text == render_trajectory("q?", traj.turns)
    assert Trajectory.from_dict({**traj.to_dict(), "meta": None}).meta == {}

    ex = weighted_example(traj.text, "self_improve", 1.5, problem_id="ws-1")
    d = ex.to_dict()
    assert set(d) == {"text", "span_starts", "span_ends", "span_weights", "kind", "problem_id"}
    assert TrainingExample.from_dict(d) == ex
    assert TrainingExample.from_dict({k: v for k, v in d.items() if k != "problem_id"}).problem_id == ""


def test_update_without_feedback_keeps_the_unjudged_attempt():
    from tripost_ray.trajectory import parse_model_output

    parsed = parse_model_output("P\n(1) a\nUpdated Answer: P\n(1) b\nFeedback: fb")
    assert [t.attempt for t in parsed.turns] == ["P\n(1) a", "P\n(1) b"]
    assert [t.feedback for t in parsed.turns] == [None, "fb"]
