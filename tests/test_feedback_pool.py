"""The editing pool end to end on a real local Ray, with the real openai and anthropic SDKs
talking HTTP to the project's Ray Serve teacher on 127.0.0.1.

One Serve instance per module: a clean teacher per task, one with injected faults, one
for the rate-limit measurement; all shut down at the end (``serve.shutdown()``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tripost_ray.config import build_config
from tripost_ray.feedback.pool import read_failures, read_trajectories, run_editing
from tripost_ray.feedback.providers import MissingCredentialsError
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.outcomes import STATUSES
from tripost_ray.specs import JobSpecs, TaskSpec
from tripost_ray.serve.teacher import get_stats, openai_base_url, reset_stats, start_teacher, stop_teacher
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import parse_feedback

pytestmark = pytest.mark.integration

KEY_ENV = "TRIPOST_TEST_TEACHER_KEY"
KEY = "test-key-for-the-local-teacher"
ARITH = "multistep_arithmetic"
WORDS = "word_sorting"
DATE = "date_understanding"
LOGIC = "logical_deduction"
ROOT_OF = {ARITH: "arith", WORDS: "words", DATE: "date", LOGIC: "logic"}


@pytest.fixture(scope="module")
def teachers(ray_cluster):
    from ray import serve

    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    roots = {
        "arith": start_teacher(ARITH, name="pool-arith", route_prefix="/pool-arith", api_key=KEY),
        "words": start_teacher(WORDS, name="pool-words", route_prefix="/pool-words", api_key=KEY),
        "date": start_teacher(DATE, name="pool-date", route_prefix="/pool-date", api_key=KEY),
        "logic": start_teacher(LOGIC, name="pool-logic", route_prefix="/pool-logic", api_key=KEY),
        "faulty": start_teacher(
            ARITH, name="pool-faulty", route_prefix="/pool-faulty", api_key=KEY,
            faults="429=0.22,500=0.05,malformed=0.05,hang=0.04,hang_s=2.5,retry_after=0.05,seed=19",
        ),
        "limited": start_teacher(ARITH, name="pool-limited", route_prefix="/pool-limited", api_key=KEY),
    }
    yield roots
    serve.shutdown()
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old


def stats(root: str) -> dict:
    return get_stats(root, KEY)


def requests_made(root: str) -> int:
    return stats(root)["total"]


def provider(kind: str, root: str, **over) -> dict:
    base = openai_base_url(root) if kind == "openai" else root
    if kind == "scripted":
        return {"provider": "scripted"}
    return {"provider": kind, "model": "tripost-teacher", "base_url": base, "api_key_env": KEY_ENV, **over}


def editing_spec(cfg, task_name: str = ARITH):
    """The editing stage's spec of ``cfg``, for ``task_name``."""
    return JobSpecs(cfg).editing().model_copy(update={"task": TaskSpec(name=task_name)})


def job(fbk: dict, imp: dict, **editing):
    return build_config({"feedback": fbk, "improve": imp,
                         "editing": {"num_actors": 2, "concurrency_per_actor": 8, **editing}, "progress": "lines"})


def trajectories(out: str) -> list[dict]:
    rows = []
    for t in read_trajectories(out):
        d = t.to_dict()
        d["meta"].pop("cost_usd", None)
        rows.append(d)
    return rows


@pytest.fixture(scope="module")
def scripted_reference(ray_cluster, tmp_path_factory):
    """The in-process scripted path over the same rows (the truth the wire paths must match)."""
    out = {}
    for task_name, n in ((ARITH, 16), (WORDS, 8), (DATE, 8), (LOGIC, 8)):
        rows = corrupted_rollouts(get_task(task_name), n, seed=11)
        path = str(tmp_path_factory.mktemp("scripted") / task_name)
        summary = run_editing(rows, editing_spec(job({"provider": "scripted"}, {"provider": "scripted"}), task_name), path,
                              cache_uri=str(tmp_path_factory.mktemp("unused-cache")))
        assert summary.http_requests == 0 and summary.trajectories > 0
        out[task_name] = (rows, trajectories(path), summary)
    return out


@pytest.mark.parametrize("task_name,fbk_kind,imp_kind", [
    (ARITH, "openai", "anthropic"),
    (ARITH, "anthropic", "openai"),
    (WORDS, "openai", "anthropic"),
    (DATE, "openai", "anthropic"),
    (LOGIC, "anthropic", "openai"),
])
def test_wire_formats_give_the_scripted_trajectories_and_a_rerun_is_free(
    teachers, scripted_reference, tmp_path, task_name, fbk_kind, imp_kind
):
    rows, expected, scripted = scripted_reference[task_name]
    root = teachers[ROOT_OF[task_name]]
    cfg = job(provider(fbk_kind, root), provider(imp_kind, root), num_actors=1)
    before = requests_made(root)
    first = run_editing(rows, editing_spec(cfg, task_name), str(tmp_path / "a"), cache_uri=str(tmp_path / "cache"))
    made = requests_made(root) - before
    assert trajectories(str(tmp_path / "a")) == expected
    assert first.kinds == scripted.kinds and first.calls == scripted.calls
    llm_calls = sum(sum(c.values()) for c in first.calls.values())
    assert made == first.http_requests == llm_calls > 0  # no faults: one request per call
    assert first.cache_misses == llm_calls and first.cache_hits == 0
    usage = first.usage[f"{fbk_kind}/tripost-teacher"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0

    second = run_editing(rows, editing_spec(cfg, task_name), str(tmp_path / "b"), cache_uri=str(tmp_path / "cache"))
    assert requests_made(root) - before == made  # zero HTTP requests the second time
    assert second.http_requests == 0 and second.cache_hits == llm_calls and second.cache_misses == 0
    assert trajectories(str(tmp_path / "b")) == expected


def test_faults_end_as_ok_or_typed_failures_and_never_reach_trajectories(teachers, scripted_reference, tmp_path):
    rows, expected, scripted = scripted_reference[ARITH]
    root = teachers["faulty"]
    cfg = job(provider("openai", root, timeout_s=1.0, backoff_base_s=0.05, backoff_max_s=0.4),
              provider("anthropic", root, timeout_s=1.0, backoff_base_s=0.05, backoff_max_s=0.4))
    before = stats(root)
    summary = run_editing(rows, editing_spec(cfg), str(tmp_path / "out"), cache_uri=str(tmp_path / "cache"))
    after = stats(root)
    new_events = after["events"][len(before["events"]):]
    faults = [e[3] for e in new_events]
    assert faults.count("429") >= 0.1 * len(faults) and "500" in faults and "malformed" in faults
    assert "hang" in faults
    assert summary.http_requests == len(new_events)  # every HTTP request is accounted for by an outcome

    for role_counts in summary.calls.values():
        assert set(role_counts) <= set(STATUSES)
    by_id = {t["problem_id"]: t for t in expected}
    kept = trajectories(str(tmp_path / "out"))
    for t in kept:  # nothing a fault produced became data: each kept one is the scripted one
        assert t == by_id[t["problem_id"]]
        assert parse_feedback(t["turns"][-1]["feedback"]).is_correct
    failures = read_failures(str(tmp_path / "out"))
    assert len(kept) + len(failures) == len(rows)
    for f in failures:
        assert f["status"] in STATUSES or f["status"] == "discarded"
        assert f["reason"] and f["detail"]
    # retries succeed where they should: with <= 35% faults and 4 retries nearly all rows survive
    assert len(kept) >= len(expected) - 2
    assert summary.calls["fbk"].get("ok", 0) > 0 and summary.calls["imp"].get("ok", 0) > 0


def test_rpm_limit_holds_across_actors_per_the_servers_log(teachers, tmp_path):
    root = teachers["limited"]
    rpm = 480.0  # 8 requests/s, smooth (burst 1)
    limit = {"rate_limit": {"requests_per_minute": rpm}}
    rows = corrupted_rollouts(get_task(ARITH), 14, seed=23, correct_every=0)
    cfg = job(provider("openai", root, **limit), provider("openai", root, **limit), num_actors=3,
              concurrency_per_actor=8)
    reset_stats(root, KEY)
    cfg.editing.cache = False
    summary = run_editing(rows, editing_spec(cfg), str(tmp_path / "out"))
    times = sorted(e[0] for e in stats(root)["events"])
    assert len(times) == summary.http_requests >= 30
    # The limiter spaces *leases* exactly 60/RPM apart; the server stamps *arrivals*, which
    # a busy event loop or the Serve proxy hop can delay by up to jitter_s. So the requests
    # arriving within a window were leased within the window plus jitter_s (late ones
    # bunch up behind on-time ones), and the whole run's span may be short by one such
    # delay, never more. Without the limiter the 30+ requests arrive within about a second.
    interval = 60.0 / rpm
    jitter_s = 0.3  # measured up to ~0.2 s on a 2-core box running the whole suite (0.26 s once)
    for window in (1.0, 2.0, 4.0):
        j = 0
        for i in range(len(times)):
            while times[i] - times[j] > window:
                j += 1
            assert i - j + 1 <= (window + jitter_s) / interval + 1, f"{i - j + 1} requests within {window} s"
    span = times[-1] - times[0]
    assert span >= (len(times) - 1) * interval - jitter_s
    assert (len(times) - 1) / span >= 0.6 * rpm / 60  # and the limiter is not needlessly slow


def test_budget_stops_calls_cleanly_and_a_rerun_pays_only_for_what_is_missing(teachers, scripted_reference, tmp_path):
    rows, expected, scripted = scripted_reference[ARITH]
    root = teachers["arith"]
    prices = {"tripost-teacher": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}}
    fbk, imp = provider("openai", root, max_tokens=400), provider("openai", root, max_tokens=400)
    llm_calls = sum(sum(c.values()) for c in scripted.calls.values())
    cache = str(tmp_path / "cache")

    before = requests_made(root)
    capped = job(fbk, imp, prices=prices)
    first = run_editing(rows, editing_spec(capped), str(tmp_path / "first"), cache_uri=cache, budget_usd=1.5)
    paid_first = requests_made(root) - before
    assert first.cost_usd <= 1.5
    over = sum(c.get("over_budget", 0) for c in first.calls.values())
    assert over > 0 and first.discard_reasons.get("fbk_over_budget", 0) + first.discard_reasons.get(
        "imp_over_budget", 0) > 0
    assert all(f["status"] == "over_budget" for f in read_failures(str(tmp_path / "first")) if "over_budget" in f["reason"])
    by_id = {t["problem_id"]: t for t in expected}
    for t in trajectories(str(tmp_path / "first")):
        assert t == by_id[t["problem_id"]]
    ok_first = sum(c.get("ok", 0) for c in first.calls.values())
    assert paid_first == first.http_requests == ok_first  # no faults: every request that went out succeeded

    second = run_editing(rows, editing_spec(job(fbk, imp, prices=prices)), str(tmp_path / "second"), cache_uri=cache)
    paid_second = requests_made(root) - before - paid_first
    assert second.cache_hits == ok_first  # everything paid for the first time is reused ...
    assert paid_second == second.http_requests == llm_calls - ok_first  # ... and only the rest is paid now
    assert trajectories(str(tmp_path / "second")) == expected


def test_missing_key_fails_before_any_work(teachers, tmp_path, monkeypatch):
    root = teachers["arith"]
    monkeypatch.delenv("TRIPOST_TEST_UNSET_KEY", raising=False)
    cfg = job(provider("openai", root, api_key_env="TRIPOST_TEST_UNSET_KEY"), {"provider": "scripted"})
    before = requests_made(root)
    with pytest.raises(MissingCredentialsError, match="TRIPOST_TEST_UNSET_KEY"):
        run_editing(corrupted_rollouts(get_task(ARITH), 4, seed=1), editing_spec(cfg), str(tmp_path / "out"))
    assert requests_made(root) == before
    assert not (tmp_path / "out").exists()


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and needle.encode() in p.read_bytes():
                hits.append(str(p))
        except OSError:  # sockets, files removed while walking
            continue
    return hits


def test_a_key_reaches_the_actors_but_no_file_of_ray_or_the_run(teachers, tmp_path, monkeypatch):
    """The key is known only to this test: the actors must use it (the teacher answers
    200, never 401), and afterwards it must occur nowhere under Ray's session folder
    (every log, the runtime-env agent's included) or the editing outputs and cache."""
    import ray

    secret = "tripost-leak-probe-" + secrets.token_hex(16)
    monkeypatch.setenv("TRIPOST_TEST_LEAK_KEY", secret)
    root = start_teacher(ARITH, name="pool-leak", route_prefix="/pool-leak", api_key=secret)
    try:
        cfg = job(provider("openai", root, api_key_env="TRIPOST_TEST_LEAK_KEY"),
                  provider("anthropic", root, api_key_env="TRIPOST_TEST_LEAK_KEY"), max_actor_restarts=0)
        rows = corrupted_rollouts(get_task(ARITH), 6, seed=11, correct_every=0)
        summary = run_editing(rows, editing_spec(cfg), str(tmp_path / "editing"), cache_uri=str(tmp_path / "cache"))
        served = get_stats(root, secret)
    finally:
        stop_teacher("pool-leak")
    assert summary.trajectories > 0 and summary.http_requests >= 12, summary.table()
    assert set(served["status"]) == {"200"} and served["api"].keys() == {"openai", "anthropic"}
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session / "logs").is_dir(), session
    assert _files_containing(session, secret) == []
    assert _files_containing(tmp_path, secret) == []


@pytest.mark.parametrize("verify", [False, True])
def test_verify_direct_correct_sends_right_answers_to_the_verifier(ray_cluster, tmp_path, verify):
    """``editing.verify_direct_correct`` reaches every editing conversation: a right output
    goes through FBK exactly when it is set (scripted FBK: free either way)."""
    rows = corrupted_rollouts(get_task(ARITH), 4, seed=3, correct_every=1)  # all right
    cfg = job({"provider": "scripted"}, {"provider": "scripted"}, verify_direct_correct=verify)
    summary = run_editing(rows, editing_spec(cfg), str(tmp_path / "out"))
    assert summary.kinds == {"direct_correct": 4}
    assert summary.calls.get("fbk", {}).get("ok", 0) == (4 if verify else 0)


def test_the_budget_actor_runs_on_one_thread_and_never_overruns(ray_cluster):
    """The budget actor is synchronous: it must not ask Ray for a thread pool. With
    ``max_concurrency=10_000`` it started 10,000 threads, and on a loaded CI machine Ray's
    10 s wait for them ran out and crashed the actor in the middle of an editing stage."""
    import psutil
    import ray

    from tripost_ray.feedback.ratelimit import new_budget

    budget = new_budget(1.0)
    granted = ray.get([budget.reserve.remote(0.01) for _ in range(300)])
    assert sum(granted) == 100 and ray.get(budget.stats.remote())["reserved_usd"] == pytest.approx(1.0)
    threads = [p.num_threads() for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [""])[0].startswith("ray::_BudgetKeeper")]
    ray.kill(budget)
    assert threads and max(threads) < 100, threads
