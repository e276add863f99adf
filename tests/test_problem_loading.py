"""Problem files through real fsspec storage (local paths, file:// and memory:// URLs),
and the task registry."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from tripost_ray.tasks import TASKS, ProblemFormatError, get_task, load_problems
from tripost_ray.tasks.datasets import Problems, read_problems
from tripost_ray.tasks.word_sorting import QUESTION_PREFIX

WS = get_task("word_sorting")
ARITH = get_task("multistep_arithmetic")

RECORDS = [
    {"input": QUESTION_PREFIX + "oven costume counterpart", "target": "costume counterpart oven"},
    {"input": QUESTION_PREFIX + "syndrome therefrom", "target": "syndrome therefrom"},
    {"question": QUESTION_PREFIX + "zebra apple middle", "target": "apple middle zebra", "id": "z1", "split": "test_unseen"},
]


def _check(problems):
    assert [p.target for p in problems] == ["costume counterpart oven", "syndrome therefrom", "apple middle zebra"]
    assert [p.split for p in problems] == ["test_seen", "test_seen", "test_unseen"]
    assert problems[2].id == "z1"
    assert len({p.id for p in problems}) == 3
    # loaded problems are full problems: their gold rationale verifies
    assert all(WS.verify(p, WS.gold_rationale(p)).is_correct for p in problems)


def test_local_json_list(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    _check(load_problems(WS, str(path)))


def test_bigbench_examples_json_with_file_url(tmp_path):
    path = tmp_path / "word_sorting.json"
    path.write_text(json.dumps({"canary": "...", "examples": RECORDS}))
    _check(load_problems(WS, path.as_uri()))
    assert path.as_uri().startswith("file://")


def test_jsonl_with_blank_lines(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n" + json.dumps(RECORDS[2]) + "\n")
    _check(load_problems(WS, str(path)))


def test_memory_url_and_default_split():
    url = f"memory://problems-{uuid.uuid4().hex}/test.jsonl"
    with fsspec.open(url, "w") as f:
        f.write("\n".join(json.dumps(r) for r in RECORDS))
    _check(load_problems(WS, url))
    train = load_problems(WS, url, split="train")
    assert [p.split for p in train] == ["train", "train", "test_unseen"]  # a record's own split wins


def test_arithmetic_records(tmp_path):
    path = tmp_path / "arith.json"
    path.write_text(json.dumps({"examples": [{"input": "((-1 + 2) * (3 - 4)) =", "target": "-1"}]}))
    [problem] = load_problems(ARITH, str(path))
    assert problem.target == "-1"
    assert ARITH.verify(problem, ARITH.gold_rationale(problem)).is_correct


def test_empty_file_has_no_problems(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert load_problems(WS, str(path)) == []


# ------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(ProblemFormatError, match="problem file not found: .*nope.json"):
        load_problems(WS, str(tmp_path / "nope.json"))
    with pytest.raises(ProblemFormatError, match="problem file not found: memory://"):
        load_problems(WS, f"memory://missing-{uuid.uuid4().hex}/x.json")


def test_unreadable_locations_are_problem_format_errors(tmp_path):
    with pytest.raises(ProblemFormatError, match="cannot read problem file"):
        load_problems(WS, str(tmp_path))  # a directory
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ProblemFormatError, match="cannot read problem file .*binary.jsonl"):
        load_problems(WS, str(binary))
    with pytest.raises(ProblemFormatError, match="cannot read problem file nosuchprotocol://x"):
        load_problems(WS, "nosuchprotocol://x/problems.json")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n{not json\n")
    with pytest.raises(ProblemFormatError, match=r"bad.jsonl: line 3 is not valid JSON"):
        load_problems(WS, str(path))


def test_pretty_printed_json_syntax_error_is_reported_at_its_line(tmp_path):
    path = tmp_path / "bad.json"
    text = json.dumps({"examples": RECORDS}, indent=2)
    path.write_text("\n" + text.replace('"syndrome therefrom"', '"syndrome therefrom",', 1))  # a trailing comma
    # 1-based line of the comma in the file (after the blank first line); JSON reports the
    # error at the next token, the "}" on the line after it
    comma_line = 2 + next(i for i, line in enumerate(text.splitlines()) if '"syndrome therefrom"' in line)
    with pytest.raises(ProblemFormatError, match=rf"bad.json: not valid JSON at line {comma_line + 1}, column"):
        load_problems(WS, str(path))


def test_jsonl_error_line_counts_leading_blank_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n\n" + json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ProblemFormatError, match=r"bad.jsonl: line 4 is not valid JSON"):
        load_problems(WS, str(path))


def test_missing_storage_backend_names_the_extra(without_s3fs):
    with pytest.raises(ProblemFormatError, match=r"s3://b/p.json: .*needs the package s3fs.*tripost-ray\[s3\]"):
        load_problems(WS, "s3://b/p.json")


def test_record_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([RECORDS[0], ["oven", "costume"]]))
    with pytest.raises(ProblemFormatError, match=r"list.json: record 1 is not an object"):
        load_problems(WS, str(path))


def test_record_of_the_wrong_task(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"input": "((1 + 2) * 3) =", "target": "9"}) + "\n")
    with pytest.raises(ProblemFormatError, match=r"mixed.jsonl: record 1 is not a word_sorting problem: .*must start with"):
        load_problems(WS, str(path))
    with pytest.raises(ProblemFormatError, match=r"mixed.jsonl: record 0 is not a multistep_arithmetic problem"):
        load_problems(ARITH, str(path))


@pytest.mark.parametrize(
    "record, words",
    [
        ({"input": QUESTION_PREFIX + "b a", "target": "b a"}, "alphabetical order"),
        ({"input": QUESTION_PREFIX + "b a"}, "target"),
        ({"target": "a b"}, "input"),
        ({"input": QUESTION_PREFIX + "b a", "target": "a b", "split": "dev"}, "unknown split"),
    ],
)
def test_bad_records_name_the_record(tmp_path, record, words):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([RECORDS[0], RECORDS[1], record]))
    with pytest.raises(ProblemFormatError, match=f"p.json: record 2 is not a word_sorting problem: .*{words}"):
        load_problems(WS, str(path))


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "dups.json"
    path.write_text(json.dumps([{**RECORDS[0], "id": "a"}, {**RECORDS[1], "id": "a"}]))
    with pytest.raises(ProblemFormatError, match=r"dups.json: record 1 repeats the id 'a' of record 0"):
        load_problems(WS, str(path))


def test_a_jobs_problem_splits_round_trip_through_storage():
    """The problems stage writes its splits once; later stages and offline analyses read
    them back whole, or one split alone."""
    problems = Problems(train=ARITH.generate(3, "train", seed=1), sft=ARITH.generate(5, "train", seed=1),
                        test=ARITH.generate(2, "test_seen", seed=1) + ARITH.generate(2, "test_unseen", seed=1))
    url = f"memory://problems-{uuid.uuid4().hex}"
    assert problems.write(url) == {"train": 3, "sft": 5, "test": 4}
    assert Problems.read(url) == problems
    assert [p.split for p in read_problems(url, "test")] == ["test_seen"] * 2 + ["test_unseen"] * 2


# --------------------------------------------------------------------- registry


def test_get_task_known_and_unknown():
    assert get_task("word_sorting").name == "word_sorting"
    assert get_task("multistep_arithmetic").name == "multistep_arithmetic"
    assert set(TASKS) == {"word_sorting", "multistep_arithmetic", "date_understanding", "logical_deduction"}
    with pytest.raises(KeyError) as info:
        get_task("causal_judgement")
    assert str(info.value) == ("unknown task 'causal_judgement'; allowed: ['date_understanding', 'logical_deduction', "
                               "'multistep_arithmetic', 'word_sorting']")


def test_get_task_options_are_checked():
    assert get_task("word_sorting", vocab_size=100).vocab == WS.vocab[:100]
    with pytest.raises(ValueError, match=r"task word_sorting has no option 'vocab'; allowed: seen_sizes, unseen_sizes, vocab_size"):
        get_task("word_sorting", vocab=100)
