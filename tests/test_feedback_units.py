"""Pure parts of the feedback stack, no Ray: limiter and budget logic, cache, prompts and
parsers, fault specs, credentials, backoff, and the call loop's typed outcomes."""

from __future__ import annotations

import asyncio
import random

import pytest

from tripost_ray.config import ConfigError, Price, ProviderConfig, RateLimitConfig, build_config
from tripost_ray.feedback import prompts
from tripost_ray.feedback.cache import CachedReply, ResponseCache, cache_key
from tripost_ray.feedback.calls import LLMTeacher, backoff_s
from tripost_ray.feedback.costs import cost_usd, require_price, reservation
from tripost_ray.feedback.providers import MissingCredentialsError, ProviderError, Reply, check_credentials
from tripost_ray.feedback.ratelimit import Budget, LimiterState
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.serve.teacher import Answerer, Faults, count_tokens
from tripost_ray.tasks import get_task
from tripost_ray.trajectory import Feedback

TASKS = ["multistep_arithmetic", "word_sorting", "date_understanding", "logical_deduction"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# ------------------------------------------------------------------- rate limiter


def test_rpm_spaces_requests_evenly_after_burst():
    clock = Clock()
    state = LimiterState(RateLimitConfig(requests_per_minute=120, burst=2), clock=clock)
    granted = []
    for _ in range(200):  # a 10 s simulation in 50 ms ticks, always asking
        while True:
            lease, wait = state.try_acquire(1)
            if lease is None:
                assert wait is not None and wait > 0
                break
            granted.append(clock.t)
            state.release(lease)
        clock.t += 0.05
    # 2 at once, then one every 0.5 s: about 2 + 10 / 0.5 in 10 s, never more
    assert 20 <= len(granted) <= 22
    for i in range(2, len(granted)):
        assert granted[i] - granted[i - 2] >= 0.5 - 1e-9


def test_max_in_flight_and_release():
    state = LimiterState(RateLimitConfig(max_in_flight=2), clock=Clock())
    a, _ = state.try_acquire(1)
    b, _ = state.try_acquire(1)
    c, wait = state.try_acquire(1)
    assert a and b and c is None and wait is None  # None: wait for a release
    state.release(a)
    assert state.try_acquire(1)[0] is not None


def test_tpm_charges_actual_usage_and_window_expires():
    clock = Clock()
    state = LimiterState(RateLimitConfig(tokens_per_minute=1000), clock=clock)
    lease, _ = state.try_acquire(900)  # reservation: estimate
    assert state.try_acquire(200)[0] is None  # 900 reserved + 200 > 1000
    state.release(lease, used_tokens=100)  # the reply used only 100
    second, _ = state.try_acquire(800)
    assert second is not None
    state.release(second, used_tokens=800)
    blocked, wait = state.try_acquire(500)
    assert blocked is None and 59 < wait <= 60  # until the first usage leaves the window
    clock.t += 61
    assert state.try_acquire(500)[0] is not None


def test_retry_after_pauses_everyone_and_dead_leases_expire():
    clock = Clock()
    state = LimiterState(RateLimitConfig(max_in_flight=1), lease_ttl_s=30, clock=clock)
    lease, _ = state.try_acquire(1)
    state.release(lease, retry_after_s=2.0)
    blocked, wait = state.try_acquire(1)
    assert blocked is None and wait == pytest.approx(2.0)
    clock.t += 2.01
    held, _ = state.try_acquire(1)  # taken and never released (its holder "died")
    assert held is not None and state.try_acquire(1)[0] is None
    clock.t += 31
    assert state.try_acquire(1)[0] is not None


def test_budget_reservations_never_overrun():
    budget = Budget(1.0)
    assert budget.reserve(0.6)
    assert not budget.reserve(0.6)  # 0.6 reserved + 0.6 > 1.0
    budget.settle(0.6, 0.1)  # the call cost less than reserved
    assert budget.reserve(0.6) and budget.spent == pytest.approx(0.1)
    assert Budget(None).reserve(1e9)


def test_costs_and_reservations():
    price = Price(input_per_mtok=1.0, output_per_mtok=10.0)
    assert cost_usd(price, 1_000_000, 100_000) == pytest.approx(2.0)
    tokens, usd = reservation(price, "x" * 300, 50)
    assert tokens == 150 and usd == pytest.approx((100 * 1 + 50 * 10) / 1e6)
    cfg = ProviderConfig(provider="openai", model="unlisted-model")
    with pytest.raises(ConfigError, match="unlisted-model"):
        require_price({}, cfg, "improve")


# ------------------------------------------------------------------------ cache


def _key(**over):
    base = dict(provider="openai", model="m", system="s", messages=[{"role": "user", "content": "q"}],
                temperature=0.0, max_tokens=10, stop=[], prompt_version="v1")
    base.update(over)
    return cache_key(**base)


def test_cache_key_covers_what_determines_a_reply():
    k = _key()
    assert k == _key()
    for change in [dict(provider="anthropic"), dict(model="m2"), dict(system="s2"),
                   dict(messages=[{"role": "user", "content": "q2"}]), dict(temperature=0.5), dict(max_tokens=11),
                   dict(stop=["\n"]), dict(prompt_version="v2")]:
        assert _key(**change) != k, change


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_cache_roundtrip_atomic_and_corrupt_entries_are_misses(tmp_path, scheme):
    uri = str(tmp_path / "cache") if scheme == "file" else f"memory://cache-{random.random()}"
    cache = ResponseCache(uri)
    key = _key()
    assert cache.get(key) is None
    cache.put(key, CachedReply("hello", 3, 1))
    assert cache.get(key) == CachedReply("hello", 3, 1)
    assert cache.path(key).endswith(f"/{key[:2]}/{key}.json")
    assert [p for p in cache.fs.find(cache.root) if ".tmp-" in p] == []
    with cache.fs.open(cache.path(key), "wb") as f:
        f.write(b"{not json")
    assert cache.get(key) is None
    assert (cache.hits, cache.misses) == (1, 2)


# ---------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task_name", TASKS)
def test_few_shot_examples_are_deterministic_and_right(task_name):
    task = get_task(task_name)
    prompts.examples.cache_clear()
    first = prompts.examples(task_name, 4)
    prompts.examples.cache_clear()
    assert prompts.examples(task_name, 4) == first and len(first) == 4
    kinds = [ex.feedback.is_correct for ex in first]
    assert kinds.count(True) == 1 and kinds.count(False) == 3
    for ex in first:
        problem = Answerer(task_name).problem(ex.question)
        assert task.verify(problem, ex.attempt).text == ex.feedback.text
        if ex.updated is not None:
            assert task.is_correct(problem, task.extract_answer(ex.updated))


@pytest.mark.parametrize("task_name", TASKS)
def test_prompt_roundtrip_through_the_teacher_equals_the_scripted_teachers(task_name):
    """Render the prompt an LLM gets, answer it as the teacher server does, parse the reply:
    the result is exactly what the in-process verifier and improver return."""
    task = get_task(task_name)
    answerer = Answerer(task_name)
    for row in corrupted_rollouts(task, 12, seed=5, correct_every=4):
        problem = answerer.problem(row["question"])
        assert task.is_correct(problem, row["target"])
        attempt = row["output"]
        p = prompts.fbk_prompt(task, row["question"], attempt, 3)
        assert p.version == f"{task_name}/fbk/{prompts.PROMPT_VERSION}"
        role, reply = answerer.answer(p.messages[-1]["content"])
        expected = task.verify(problem, attempt)
        assert role == "fbk" and prompts.parse_fbk_reply(reply).text == expected.text
        if expected.is_correct:
            continue
        q = prompts.imp_prompt(task, row["question"], attempt, expected, 3)
        role, reply = answerer.answer(q.messages[-1]["content"])
        assert role == "imp"
        assert prompts.parse_imp_reply(attempt, expected, reply) == task.improve(problem, attempt, expected)


def test_fbk_parser_is_lenient_about_decoration_and_strict_about_content():
    fb = Feedback("3", 'the "x" = 5', "5 is wrong", "2")
    text = fb.text
    for reply in [text, f"  {text}  \n", f"```\n{text}\n```", f"Feedback: {text}", f"**Feedback:** {text}",
                  f"Sure! Here is my check.\n{text}\nLet me know if you need more.",
                  "Step (1) to step (2) are correct.\n" + text.split("correct. ", 1)[1]]:
        parsed = prompts.parse_fbk_reply(reply)
        assert parsed is not None and parsed.text == text, reply
    ok = Feedback.all_correct("4").text
    assert prompts.parse_fbk_reply(f"```text\n{ok}\n```").is_correct
    for bad in ["", "   ", "The answer looks wrong somewhere.", "In step three something is off."]:
        assert prompts.parse_fbk_reply(bad) is None


def test_imp_parser_rebuilds_the_whole_attempt():
    attempt = "Let's think step by step.\n(1) a = 1.\n(2) b = 3.\n(3) c = 4.\n(Final response) So the answer is 4."
    fb = Feedback("2", "b = 3", "b is 2", "1")
    fixed = "Let's think step by step.\n(1) a = 1.\n(2) b = 2.\n(3) c = 3.\n(Final response) So the answer is 3."
    cont = "(2) b = 2.\n(3) c = 3.\n(Final response) So the answer is 3."
    for reply in [cont, f"```\n{cont}\n```", f"Here is the fix:\n{cont}\nHope this helps!", fixed,
                  f"Updated Answer: {fixed}", "(1) a = 1.\n" + cont]:
        assert prompts.parse_imp_reply(attempt, fb, reply) == fixed, reply
    assert prompts.parse_imp_reply(attempt, fb, "I cannot do that.") is None
    assert prompts.parse_imp_reply(attempt, fb, "") is None
    assert prompts.parse_imp_reply(attempt, Feedback("9", "", "x"), "(7) z.\n(Final response) So the answer is 1.") is None


def test_read_query_splits_question_attempt_feedback():
    text = prompts.query_text("1 + 1 =", "Let's think.\n(1) x", "In step (1) the part \"x\" is incorrect.")
    q = prompts.read_query(text)
    assert (q.question, q.attempt, q.role) == ("1 + 1 =", "Let's think.\n(1) x", "imp")
    assert prompts.read_query(prompts.query_text("q", "a")).role == "fbk"
    assert prompts.read_query("hello") is None


# ------------------------------------------------------------ faults, credentials


def test_fault_spec_parsing_and_rates():
    f = Faults.parse("429=0.25,500=0.05,malformed=0.05,hang=0.02,retry_after=0.3,seed=7")
    assert (f.rate_429, f.rate_500, f.malformed, f.hang, f.retry_after_s, f.seed) == (0.25, 0.05, 0.05, 0.02, 0.3, 7)
    rng = random.Random(f.seed)
    draws = [f.draw(rng) for _ in range(20000)]
    assert abs(draws.count("429") / 20000 - 0.25) < 0.02
    assert abs(draws.count("none") / 20000 - 0.63) < 0.02
    for bad in ["429", "teapot=0.1", "429=lots", "429=0.7,500=0.5"]:
        with pytest.raises(ConfigError):
            Faults.parse(bad)
    assert count_tokens(" a  b\nc ") == 3


def test_missing_key_is_a_clear_error_before_work(monkeypatch):
    monkeypatch.delenv("TRIPOST_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    job = build_config({"feedback": {"provider": "openai", "api_key_env": "TRIPOST_TEST_NO_SUCH_KEY"},
                        "improve": {"provider": "anthropic"}})
    with pytest.raises(MissingCredentialsError) as err:
        check_credentials(job)
    assert "TRIPOST_TEST_NO_SUCH_KEY" in str(err.value) and "ANTHROPIC_API_KEY" in str(err.value)
    monkeypatch.setenv("TRIPOST_TEST_NO_SUCH_KEY", "sk-secret-value")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-other-secret")
    assert check_credentials(job) == ["TRIPOST_TEST_NO_SUCH_KEY", "ANTHROPIC_API_KEY"]
    assert check_credentials(build_config({})) == []  # scripted needs no key
    assert "sk-secret" not in job.to_yaml()


def test_backoff_is_exponential_jittered_capped_and_honours_retry_after():
    cfg = ProviderConfig(backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(0)
    for n, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [backoff_s(cfg, n, None, rng) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap and max(delays) - min(delays) > cap / 4
    assert backoff_s(cfg, 1, 5.0, rng) == 5.0


# ------------------------------------------------ the call loop (no Ray, no HTTP)


class ScriptedReplies:
    """A stand-in for a hosted LLM (which cannot exist here): replays a fixed list of
    replies / errors, so each outcome status of the loop is reached deterministically."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    async def complete(self, prompt):
        self.calls += 1
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def _teacher(script, tmp_path=None, **cfg):
    task = get_task("multistep_arithmetic")
    config = ProviderConfig(provider="openai", model="m", backoff_base_s=0.001, backoff_max_s=0.002, **cfg)
    cache = ResponseCache(str(tmp_path)) if tmp_path else None
    provider = ScriptedReplies(script)
    return LLMTeacher(task, config, Price(input_per_mtok=1, output_per_mtok=2), cache=cache, provider=provider), provider


def _query():
    task = get_task("multistep_arithmetic")
    row = corrupted_rollouts(task, 2, seed=1, correct_every=0)[0]
    problem = Answerer("multistep_arithmetic").problem(row["question"])
    return problem, row["output"], task.verify(problem, row["output"])


def test_call_loop_outcomes(tmp_path):
    problem, attempt, fb = _query()
    good = Reply(fb.text, 100, 10)
    run = asyncio.run

    teacher, p = _teacher([ProviderError("rate_limited", "slow down", 429, 0.001), ProviderError("server", "x", 500),
                           good], tmp_path)
    out = run(teacher.fbk(problem, attempt))
    assert out.status == "ok" and out.value.text == fb.text and out.attempts == 3
    assert (out.input_tokens, out.output_tokens) == (100, 10) and out.cost_usd == pytest.approx(120 / 1e6)
    again = run(teacher.fbk(problem, attempt))  # served by the cache: no call
    assert again.cached and again.attempts == 0 and p.calls == 3 and again.value.text == fb.text

    teacher, _ = _teacher([ProviderError("timeout", "t")] * 3, max_retries=2)
    out = run(teacher.fbk(problem, attempt))
    assert out.status == "timeout" and out.attempts == 3

    teacher, _ = _teacher([ProviderError("client", "bad request", 400)], max_retries=5)
    out = run(teacher.fbk(problem, attempt))
    assert out.status == "api_error" and out.attempts == 1  # a 400 is not retried

    teacher, _ = _teacher([Reply("no idea", 5, 2), Reply("", 5, 0)], parse_retries=1)
    out = run(teacher.fbk(problem, attempt))
    assert out.status == "parse_error" and out.attempts == 2 and out.input_tokens == 10 and "empty" in out.detail

    teacher, _ = _teacher([Reply("", 5, 0, refused=True)])
    out = run(teacher.fbk(problem, attempt))
    assert out.status == "refused" and out.attempts == 1

    # a malformed reply was never cached: the same prompt asks again
    teacher, p = _teacher([good], tmp_path)
    assert run(teacher.fbk(problem, attempt)).cached  # (the ok reply from the first case)
    imp_teacher, p = _teacher([Reply("garbage", 1, 1), Reply("garbage", 1, 1)], tmp_path, parse_retries=1)
    assert run(imp_teacher.imp(problem, attempt, fb)).status == "parse_error"
    assert ResponseCache(str(tmp_path)).get(imp_teacher.key(prompts.imp_prompt(
        imp_teacher.task, problem.question, attempt, fb, 3))) is None
