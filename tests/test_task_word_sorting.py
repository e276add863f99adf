"""Word sorting: generation, gold rationales, and the scripted FBK/IMP, checked as
properties over >= 1,000 seeded problems each."""

from __future__ import annotations

import random
import re
import string

import pytest

from tripost_ray.tasks import get_task
from tripost_ray.tasks.base import Problem
from tripost_ray.tasks.word_sorting import QUESTION_PREFIX, WordSortingTask, load_vocabulary
from tripost_ray.trajectory import FINAL_LABEL, parse_attempt, parse_feedback

N = 1000


@pytest.fixture(scope="module")
def task() -> WordSortingTask:
    return get_task("word_sorting")


@pytest.fixture(scope="module")
def problems(task) -> list[Problem]:
    """Seen and unseen problems mixed: every property below runs on both difficulties."""
    return task.generate(N // 2, "train", seed=1) + task.generate(N // 4, "test_seen", seed=1) + task.generate(
        N // 2, "test_unseen", seed=1
    )


def _words(problem: Problem) -> list[str]:
    return problem.question[len(QUESTION_PREFIX) :].split()


# ------------------------------------------------------------------- vocabulary


def test_vocabulary_is_a_few_thousand_distinct_lowercase_words():
    vocab = load_vocabulary()
    assert len(vocab) >= 2000
    assert len(set(vocab)) == len(vocab)
    assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)
    # the file's order is shuffled: even the first 100 words spread over the alphabet
    assert len({w[0] for w in vocab[:100]}) >= 15


# ------------------------------------------------------------------- generation


def test_generation_is_deterministic_with_unique_ids(task):
    for split in ("train", "test_seen", "test_unseen"):
        a, b = task.generate(300, split, seed=7), task.generate(300, split, seed=7)
        assert a == b
        assert len({p.id for p in a}) == 300
        assert len({p.question for p in a}) == 300
        assert all(p.split == split for p in a)
        assert task.generate(300, split, seed=8) != a


def test_sizes_targets_and_vocabulary(task):
    vocab = set(task.vocab)
    for split, (lo, hi) in (("train", (2, 7)), ("test_seen", (2, 7)), ("test_unseen", (8, 20))):
        ps = task.generate(400, split, seed=3)
        sizes = {len(_words(p)) for p in ps}
        assert min(sizes) == lo and max(sizes) == hi
        for p in ps:
            words = _words(p)
            assert p.question == QUESTION_PREFIX + " ".join(words)
            assert set(words) <= vocab and len(set(words)) == len(words)
            assert p.target == " ".join(sorted(words))
            assert p.meta["n_words"] == len(words)


def test_train_and_test_splits_never_share_a_set_of_words(task):
    train = {frozenset(_words(p)) for seed in (0, 1) for p in task.generate(2000, "train", seed=seed)}
    test = {frozenset(_words(p)) for seed in (0, 1) for p in task.generate(500, "test_seen", seed=seed)}
    unseen = {frozenset(_words(p)) for p in task.generate(500, "test_unseen", seed=0)}
    assert not train & test
    assert not train & unseen
    # a small vocabulary makes collisions likely, so this is where disjointness is earned
    small = WordSortingTask(seen_sizes=(2, 3), unseen_sizes=(3, 3), vocab_size=30)
    s_train = {frozenset(_words(p)) for p in small.generate(400, "train", seed=0)}
    s_test = {frozenset(_words(p)) for p in small.generate(100, "test_seen", seed=5)}
    assert s_train and s_test and not s_train & s_test


def test_difficulty_options(task):
    small = get_task("word_sorting", seen_sizes=[3, 3], unseen_sizes=(9, 10), vocab_size=50)
    assert small.vocab == load_vocabulary()[:50]
    assert {len(_words(p)) for p in small.generate(50, "train")} == {3}
    assert {len(_words(p)) for p in small.generate(50, "test_unseen")} == {9, 10}
    assert all(set(_words(p)) <= set(small.vocab) for p in small.generate(50, "test_seen"))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"seen_sizes": (5, 2)}, "seen_sizes"),
        ({"seen_sizes": (0, 2)}, "seen_sizes"),
        ({"seen_sizes": (2,)}, "seen_sizes"),
        ({"unseen_sizes": "8-20"}, "unseen_sizes"),
        ({"unseen_sizes": (8.0, 20)}, "unseen_sizes"),
        ({"vocab_size": 10}, "vocab_size"),
        ({"vocab_size": 10**6}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
    ],
)
def test_bad_difficulty_is_a_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        WordSortingTask(**kwargs)


def test_too_few_distinct_problems_is_a_clear_error():
    tiny = WordSortingTask(seen_sizes=(2, 2), unseen_sizes=(2, 2), vocab_size=20)
    with pytest.raises(ValueError, match="could only make .* of 1000 distinct train"):
        tiny.generate(1000, "train")


def test_unknown_split_is_an_error(task):
    with pytest.raises(ValueError, match="unknown split"):
        task.generate(1, "validation")  # type: ignore[arg-type]


# --------------------------------------------------------------------- records


def test_problem_from_bigbench_and_question_records(task):
    q = "Sort the following words alphabetically: List: oven costume counterpart"
    p = task.problem_from_record({"input": q, "target": "costume counterpart oven"}, 4, "test_seen")
    assert (p.question, p.target, p.split, p.id) == (q, "costume counterpart oven", "test_seen", "word_sorting-test_seen-4")
    p2 = task.problem_from_record({"question": q + "\n", "target": " costume  counterpart oven", "id": 17}, 0, "train")
    assert (p2.question, p2.target, p2.id) == (q, "costume counterpart oven", "17")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"target": "a b"}, '"input"'),
        ({"input": "Sort these: List: b a", "target": "a b"}, "must start with"),
        ({"input": QUESTION_PREFIX, "target": ""}, "no words"),
        ({"input": QUESTION_PREFIX + "Oven cat", "target": "Oven cat"}, "lowercase a-z"),
        ({"input": QUESTION_PREFIX + "oven cat", "target": "oven cat"}, "not the list in alphabetical order"),
        ({"input": QUESTION_PREFIX + "oven cat"}, '"target"'),
        ({"input": 12, "target": "x"}, "must be a string"),
    ],
)
def test_bad_records_are_clear_errors(task, record, message):
    with pytest.raises(ValueError, match=message):
        task.problem_from_record(record, 0, "test_seen")


# --------------------------------------------------------------- gold rationales


def test_reference_rationale_format(task):
    p = task.problem_from_record(
        {"input": QUESTION_PREFIX + "oven costume counterpart", "target": "costume counterpart oven"}, 0, "test_seen"
    )
    assert task.gold_rationale(p) == "\n".join(
        [
            "Let's think step by step.",
            '(1) The first letter: "oven": "o" (15). "costume": "c" (3). "counterpart": "c" (3).',
            '(2) We now have: (3) ["costume" ? "counterpart"] < (15) "oven". Now sort this subpart '
            '["costume" ? "counterpart"] by looking at their second letters.',
            '(2.1) The second letter: "costume": "o" (15). "counterpart": "o" (15).',
            '(2.2) We now have: (15) ["costume" ? "counterpart"]. Now sort this subpart '
            '["costume" ? "counterpart"] by looking at their third letters.',
            '(2.2.1) The third letter: "costume": "s" (19). "counterpart": "u" (21).',
            '(2.2.2) We now have: (19) "costume" < (21) "counterpart".',
            '(3) Hence, we have "costume" < "counterpart" < "oven".',
            "(Final response) So the answer is costume counterpart oven.",
        ]
    )


def test_prefixes_repeats_and_several_subparts(task):
    p = task.problem_from_record(
        {"input": QUESTION_PREFIX + "cat an ant cab bee bat cat", "target": "an ant bat bee cab cat cat"}, 0, "test_seen"
    )
    gold = task.gold_rationale(p)
    assert '(2.2.1) The third letter: "an": none (0). "ant": "t" (20).' in gold
    assert '(2.3) The second letter: "bee": "e" (5). "bat": "a" (1).' in gold
    assert '(2.6.2) We now have: (2) "cab" < (20) "cat" = "cat".' in gold
    assert task.verify(p, gold).is_correct
    assert task.extract_answer(gold) == "an ant bat bee cab cat cat"


def test_gold_rationales_verify_all_correct(task, problems):
    for p in problems:
        gold = task.gold_rationale(p)
        assert gold.startswith(task.attempt_prefix + "\n")
        parsed = parse_attempt(gold)
        assert all(s.text.startswith(f"({s.label}) " if s.label != FINAL_LABEL else "(Final response) ")
                   for s in parsed.steps)
        assert len(set(parsed.labels)) == len(parsed.labels)
        fb = task.verify(p, gold)
        assert fb.is_correct, (p.question, fb)
        assert fb.last_correct == parsed.reasoning_steps[-1].label
        assert task.is_correct(p, task.extract_answer(gold))


# ----------------------------------------------------------- corrupted attempts


def _corrupt_step(step_text: str, label: str, words: list[str], vocab: tuple[str, ...], rng: random.Random) -> str | None:
    """Change one word, one letter or one index in a step's body (never its label)."""
    head = "(Final response) " if label == FINAL_LABEL else f"({label}) "
    body = step_text[len(head) :]
    options = []
    if label == FINAL_LABEL:
        tokens = body.removeprefix("So the answer is ").rstrip(".").split()
        k = rng.randrange(len(tokens))
        new = rng.choice([w for w in vocab[:200] if w != tokens[k]] + [w for w in words if w != tokens[k]])
        tokens[k] = new
        return head + "So the answer is " + " ".join(tokens) + "."
    for m in re.finditer(r'"([a-z]+)"', body):
        if m.group(1) in words:  # a word of the list
            options.append(("word", m))
        elif len(m.group(1)) == 1 and body[m.end() : m.end() + 2] == " (":  # a letter
            options.append(("letter", m))
    options += [("index", m) for m in re.finditer(r"\((\d+)\)", body)]
    if not options:
        return None
    kind, m = rng.choice(options)
    old = m.group(1)
    if kind == "word":
        new = rng.choice([w for w in words + list(vocab[:50]) if w != old])
    elif kind == "letter":
        new = rng.choice([c for c in string.ascii_lowercase if c != old])
    else:
        new = str(rng.choice([n for n in range(0, 27) if n != int(old)]))
    return head + body[: m.start(1)] + new + body[m.end(1) :]


def test_one_changed_word_letter_or_index_is_flagged_at_its_step_and_improved(task, problems):
    rng = random.Random(11)
    for p in problems:
        gold = task.gold_rationale(p)
        steps = list(parse_attempt(gold).steps)
        k = rng.randrange(len(steps))
        bad_text = _corrupt_step(steps[k].text, steps[k].label, _words(p), task.vocab, rng)
        assert bad_text is not None and bad_text != steps[k].text
        corrupted = "\n".join([task.attempt_prefix, *(s.text for s in steps[:k]), bad_text, *(s.text for s in steps[k + 1 :])])

        fb = task.verify(p, corrupted)
        assert fb.step == steps[k].label, (corrupted, fb)
        assert fb.segment and fb.segment in bad_text, (bad_text, fb)
        assert fb.reason and "\n" not in fb.text
        assert fb.last_correct == (steps[k - 1].label if k else None)
        back = parse_feedback(fb.text)
        assert back is not None and (back.step, back.segment, back.last_correct) == (fb.step, fb.segment, fb.last_correct)

        improved = task.improve(p, corrupted, fb)
        new_steps = parse_attempt(improved).steps
        assert [s.text for s in new_steps[:k]] == [s.text for s in steps[:k]]  # earlier steps verbatim
        assert new_steps[k].text != bad_text
        assert task.verify(p, improved).is_correct


def test_specific_reasons(task):
    p = task.problem_from_record(
        {"input": QUESTION_PREFIX + "oven costume counterpart", "target": "costume counterpart oven"}, 0, "test_seen"
    )
    gold = task.gold_rationale(p)

    def fb_of(old: str, new: str):
        assert old in gold
        return task.verify(p, gold.replace(old, new, 1))

    fb = fb_of('"oven": "o" (15)', '"oven": "o" (16)')
    assert (fb.step, fb.segment, fb.last_correct) == ("1", '"oven": "o" (16)', None)
    assert "letter 15" in fb.reason
    fb = fb_of('"counterpart": "u" (21)', '"counterpart": "v" (21)')
    assert (fb.step, fb.last_correct) == ("2.2.1", "2.2") and 'is "u", not "v"' in fb.reason
    fb = fb_of('"costume": "c" (3). "counterpart": "c" (3).', '"costume": "c" (3).')
    assert fb.step == "1" and '"counterpart" is missing' in fb.reason
    fb = fb_of('"costume": "c" (3). "counterpart"', '"costume": "c" (3). "costume": "c" (3). "counterpart"')
    assert fb.step == "1" and "twice" in fb.reason
    fb = fb_of('"costume" < "counterpart" < "oven".', '"counterpart" < "costume" < "oven".')
    assert fb.step == "3" and 'their third letters are "s" (19) and "u" (21)' in fb.reason
    fb = fb_of("So the answer is costume counterpart oven.", "So the answer is costume oven.")
    assert fb.step == FINAL_LABEL and '"counterpart" is missing' in fb.reason
    fb = fb_of("So the answer is costume counterpart oven.", "So the answer is costume counterpart oven pizza.")
    assert fb.step == FINAL_LABEL and fb.segment == "pizza" and "not one of the words" in fb.reason
    fb = fb_of('(3) ["costume" ? "counterpart"] < (15) "oven"', '(15) "oven" < (3) ["costume" ? "counterpart"]')
    assert fb.step == "2" and "increasing order" in fb.reason
    # the final response too early, and an attempt that stops before its end
    fb = task.verify(p, gold.replace(gold.split("\n")[-2] + "\n", ""))
    assert fb.step == FINAL_LABEL and "(3)" in fb.reason and fb.last_correct == "2.2.2"
    fb = task.verify(p, "\n".join(gold.split("\n")[:4]))
    assert (fb.step, fb.segment, fb.last_correct) == (FINAL_LABEL, "", "2.1") and "stops after step (2.1)" in fb.reason
    assert task.verify(p, task.improve(p, "\n".join(gold.split("\n")[:4]), fb)).is_correct


# ------------------------------------------------------------------- garbling


_JUNK = ['"', "(", ")", "(2.1) ", "(Final response) ", "\n", " < ", " ? ", "So the answer is ", "9", "x", "..", "Feedback:"]


def _garble(text: str, start: int, rng: random.Random) -> str:
    """One random edit of ``text[start:]`` that changes more than whitespace."""
    head, tail = text[:start], text[start:]
    while True:
        op = rng.randrange(7)
        i, j = sorted(rng.randrange(len(tail) + 1) for _ in range(2))
        if op == 0:
            new = tail[:i] + tail[j:]
        elif op == 1:
            new = tail[:i] + rng.choice(_JUNK) + tail[i:]
        elif op == 2:
            new = tail[:i] + tail[i:j] + tail[i:]
        elif op == 3:
            lines = tail.split("\n")
            rng.shuffle(lines)
            new = "\n".join(lines)
        elif op == 4:
            new = tail[:i]
        elif op == 5:
            new = tail[:i] + rng.choice(string.printable) + tail[i + 1 :]
        else:
            lines = tail.split("\n")
            del lines[rng.randrange(len(lines))]
            new = "\n".join(lines)
        if "".join(new.split()) != "".join(tail.split()):
            return head + new


def test_garbled_attempts_never_raise_and_are_never_all_correct(task, problems):
    """Garbling hits the steps; the preamble line is prompt text and is not judged."""
    rng = random.Random(5)
    start = len(task.attempt_prefix) + 1
    for p in problems:
        gold = task.gold_rationale(p)
        garbled = _garble(gold, start, rng)
        for _ in range(rng.randrange(3)):
            garbled = _garble(garbled, start, rng)
        while "".join(garbled.split()) == "".join(gold.split()):  # a later edit undid an earlier one
            garbled = _garble(garbled, start, rng)
        fb = task.verify(p, garbled)
        assert not fb.is_correct, garbled
        assert "\n" not in fb.text
        labelled = [s.text for s in parse_attempt(garbled).steps if s.label == fb.step]
        assert fb.step == FINAL_LABEL or labelled
        if fb.segment:
            assert any(fb.segment in t for t in labelled)
        # the scripted improver repairs whatever the scripted verifier found
        assert task.verify(p, task.improve(p, garbled, fb)).is_correct


@pytest.mark.parametrize(
    "text", ["", "\n\n", "garbage", "(1)", "(Final response)", "(1) The first letter:\n(1) x", '"""(((', "(99.1.1) ?"]
)
def test_odd_texts_never_raise(task, problems, text):
    p = problems[0]
    fb = task.verify(p, text)
    assert not fb.is_correct
    assert task.verify(p, task.improve(p, text, fb)).is_correct


def test_improve_keeps_a_correct_attempt(task, problems):
    gold = task.gold_rationale(problems[0])
    assert task.improve(problems[0], gold, task.verify(problems[0], gold)) == gold
