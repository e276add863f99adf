"""The Ray Serve teacher on 127.0.0.1, spoken to with the real openai and anthropic SDKs."""

from __future__ import annotations

import json
import urllib.request

import anthropic
import openai
import pytest

from tripost_ray.config import ConfigError
from tripost_ray.feedback import prompts
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.serve.teacher import Answerer, TeacherError, _running_proxy, openai_base_url, start_teacher
from tripost_ray.tasks import get_task

pytestmark = pytest.mark.integration

ARITH = "multistep_arithmetic"
KEY = "teacher-test-key"


@pytest.fixture(scope="module")
def roots(ray_cluster):
    from ray import serve

    yield {
        "open": start_teacher(ARITH, name="srv-open", route_prefix="/srv-open"),
        "keyed": start_teacher(ARITH, name="srv-keyed", route_prefix="/srv-keyed", api_key=KEY),
        "limited": start_teacher(ARITH, name="srv-429", route_prefix="/srv-429", faults="429=1.0,retry_after=1.5"),
        "refusing": start_teacher(ARITH, name="srv-refuse", route_prefix="/srv-refuse", faults="refuse=1.0"),
    }
    serve.shutdown()


def _stats(root: str) -> dict:
    with urllib.request.urlopen(root + "/stats") as r:
        return json.load(r)


def _query():
    task = get_task(ARITH)
    row = corrupted_rollouts(task, 2, seed=4, correct_every=0)[0]
    problem = Answerer(ARITH).problem(row["question"])
    return task, problem, row["output"]


def test_both_wire_formats_answer_like_the_scripted_teachers(roots):
    task, problem, attempt = _query()
    root = roots["open"]
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 2)
    oa = openai.OpenAI(api_key="unused", base_url=openai_base_url(root), max_retries=0)
    reply = oa.chat.completions.create(model="m", messages=fbk.openai_messages(), max_tokens=300)
    expected = task.verify(problem, attempt)
    assert prompts.parse_fbk_reply(reply.choices[0].message.content).text == expected.text
    assert reply.usage.prompt_tokens == sum(len(m["content"].split()) for m in fbk.openai_messages())
    assert reply.usage.completion_tokens == len(expected.text.split())

    imp = prompts.imp_prompt(task, problem.question, attempt, expected, 2)
    an = anthropic.Anthropic(api_key="unused", base_url=root, max_retries=0)
    msg = an.messages.create(model="m", system=imp.system, messages=list(imp.messages), max_tokens=300)
    update = prompts.parse_imp_reply(attempt, expected, msg.content[0].text)
    assert update == task.improve(problem, attempt, expected)
    assert msg.usage.output_tokens == len(msg.content[0].text.split()) and msg.stop_reason == "end_turn"

    short = oa.chat.completions.create(model="m", messages=fbk.openai_messages(), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_key_check_bad_requests_and_stats(roots):
    task, problem, attempt = _query()
    root = roots["keyed"]
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=openai_base_url(root), max_retries=0).chat.completions.create(
            model="m", messages=fbk.openai_messages(), max_tokens=50)
    ok = openai.OpenAI(api_key=KEY, base_url=openai_base_url(root), max_retries=0).chat.completions.create(
        model="m", messages=fbk.openai_messages(), max_tokens=50)
    assert ok.choices[0].message.content
    an = anthropic.Anthropic(api_key=KEY, base_url=root, max_retries=0)  # x-api-key header
    assert an.messages.create(model="m", system=fbk.system, messages=list(fbk.messages), max_tokens=50).content
    with pytest.raises(anthropic.BadRequestError, match="not a TriPosT prompt"):
        an.messages.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    s = _stats(root)
    assert s["total"] == 4 and s["status"] == {"401": 1, "200": 2, "400": 1}
    assert s["api"] == {"openai": 2, "anthropic": 2} and s["role"] == {"fbk": 2}
    assert [e[4] for e in s["events"]] == [401, 200, 200, 400]


def test_injected_429_carries_retry_after_and_refusals_are_typed(roots):
    task, problem, attempt = _query()
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 1)
    with pytest.raises(openai.RateLimitError) as err:
        openai.OpenAI(api_key="x", base_url=openai_base_url(roots["limited"]), max_retries=0).chat.completions.create(
            model="m", messages=fbk.openai_messages(), max_tokens=50)
    assert err.value.response.headers["retry-after-ms"] == "1500"
    assert err.value.response.headers["retry-after"] == "1.5"
    refusal = openai.OpenAI(api_key="x", base_url=openai_base_url(roots["refusing"]), max_retries=0)
    choice = refusal.chat.completions.create(model="m", messages=fbk.openai_messages(), max_tokens=50).choices[0]
    assert choice.message.refusal and choice.message.content is None
    msg = anthropic.Anthropic(api_key="x", base_url=roots["refusing"], max_retries=0).messages.create(
        model="m", system=fbk.system, messages=list(fbk.messages), max_tokens=50)
    assert msg.stop_reason == "refusal" and msg.content == []


def test_the_http_proxy_is_cluster_wide(roots):
    host, port = _running_proxy()
    assert host == "127.0.0.1" and roots["open"] == f"http://127.0.0.1:{port}/srv-open"
    with pytest.raises(TeacherError, match="one per cluster"):
        start_teacher(ARITH, port=port + 1, name="srv-other", route_prefix="/srv-other")
    with pytest.raises(ConfigError, match="route_prefix"):
        start_teacher(ARITH, name="srv-bad", route_prefix="no-slash")
