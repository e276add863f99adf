"""Evaluation metrics on hand-made records, and ``tripost eval`` end to end."""

from __future__ import annotations

import json

import pytest

from tripost_ray.cli import main
from tripost_ray.evaluate import compute_metrics, format_metrics


def _rec(pid, split, first_correct, correct, n_turns):
    return {"problem_id": pid, "split": split, "first_correct": first_correct, "correct": correct, "n_turns": n_turns}


def test_metrics_on_hand_made_outputs():
    records = [
        _rec("a", "test_seen", True, True, 1),     # right at once
        _rec("b", "test_seen", False, True, 2),    # fixed by self-improvement
        _rec("c", "test_seen", True, False, 3),    # correct -> wrong
        _rec("d", "test_seen", False, False, 1),   # wrong, no attempt to improve
        _rec("e", "test_unseen", False, False, 2),  # tried, still wrong
        _rec("f", "test_unseen", False, True, 2),  # fixed
        _rec("g", "test_unseen", False, False, 1),
    ]
    m = compute_metrics(records)
    assert m["n"] == {"seen": 4, "unseen": 3, "total": 7}
    assert m["n_correct"] == {"seen": 2, "unseen": 1, "total": 3}
    assert m["accuracy"] == {"seen": 0.5, "unseen": 1 / 3, "total": 3 / 7}
    si = m["self_improvement"]
    assert (si["n_attempted"], si["n_fixed"], si["n_broken_correct"], si["n_wrong_to_correct"]) == (4, 2, 1, 2)
    assert si["attempt_rate"] == 4 / 7 and si["fixed_rate"] == 0.5 and si["broken_correct_rate"] == 0.25
    assert si["wrong_flagged_rate"] == 3 / 5 and si["right_flagged_rate"] == 1 / 2  # b e f of b d e f g; c of a c
    seen, unseen = (m["self_improvement_by_split"][k] for k in ("seen", "unseen"))
    assert (seen["attempt_rate"], seen["fixed_rate"], seen["broken_correct_rate"]) == (0.5, 0.5, 0.5)  # b c of a-d
    assert seen["wrong_flagged_rate"] == 0.5 and seen["right_flagged_rate"] == 0.5  # b of b d; c of a c
    assert (unseen["attempt_rate"], unseen["fixed_rate"], unseen["broken_correct_rate"]) == (2 / 3, 0.5, 0.0)
    assert unseen["wrong_flagged_rate"] == 2 / 3 and unseen["right_flagged_rate"] is None  # e f of e f g; no right
    table = format_metrics(m)
    assert "50.0%" in table and "1/4" in table


def test_metrics_edge_cases_and_bad_records():
    m = compute_metrics([_rec("a", "test_seen", True, True, 1)])
    assert m["accuracy"]["unseen"] is None and m["self_improvement"]["fixed_rate"] is None
    assert m["self_improvement"]["attempt_rate"] == 0.0
    assert compute_metrics([])["accuracy"]["total"] is None
    with pytest.raises(ValueError, match=r"record 0 \(x\) lacks \['first_correct', 'n_turns'\]"):
        compute_metrics([{"problem_id": "x", "split": "test_seen", "correct": True}])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        compute_metrics([_rec("x", "dev", True, True, 1)])


@pytest.mark.integration
def test_tripost_eval_on_a_big_bench_file(ray_cluster, tiny_model_dir, tmp_path, capsys):
    bb = {"examples": [
        {"input": "((-1 + 2) * (3 - 4)) =", "target": "-1"},
        {"input": "((5 - 7 + 1) - (2 * 3 * -1)) =", "target": "5"},
        {"input": "((9 * -1 - 2) + (4 + 4 - 8)) =", "target": "-11"},
    ]}
    problems = tmp_path / "multistep_arithmetic.json"
    problems.write_text(json.dumps(bb))
    out = tmp_path / "out" / "metrics.json"
    rc = main(["eval", "--model", tiny_model_dir, "--task", "multistep_arithmetic", "--problems", str(problems),
               "--out", str(out), "-o", "eval.max_new_tokens=6", "-o", "eval.self_improve_rounds=1",
               "-o", "eval.batch_size=2", "-o", "rollout.torch_threads_per_actor=1"])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == {"seen": 3, "unseen": 0, "total": 3}
    assert metrics["rollout"]["n_written"] == 3 and metrics["rollout"]["generated_tokens"] > 0
    # a random tiny model gets these wrong: the metrics say so rather than crash
    assert metrics["accuracy"]["total"] == metrics["n_correct"]["total"] / 3
    assert metrics["task"] == "multistep_arithmetic"
    printed = capsys.readouterr().out
    assert "accuracy total" in printed and str(out) in printed


def test_tripost_eval_bad_inputs_fail_clearly(tmp_path, tiny_model_dir, capsys):
    out = str(tmp_path / "m.json")
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", "multistep_arithmetic", "--out", out]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_model_dir, "--task", "no_such_task", "--out", out]) == 2
    assert "no_such_task" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"examples": [{"input": "not arithmetic at all", "target": "x"}]}')
    assert main(["eval", "--model", tiny_model_dir, "--task", "multistep_arithmetic", "--problems", str(bad),
                 "--out", out]) == 2
    assert "record 0" in capsys.readouterr().err
