"""The Ray Serve teacher on 127.0.0.1, spoken to with the real openai and anthropic SDKs
(whole replies and their streaming helpers), raw HTTP for what the SDKs would not send,
and the ``tripost serve teacher`` command for what it refuses before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from tripost_ray.config import ConfigError
from tripost_ray.feedback import prompts
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.serve.common import running_proxy
from tripost_ray.serve.teacher import (
    DEFAULT_MODEL,
    Answerer,
    TeacherError,
    get_stats,
    openai_base_url,
    reset_stats,
    start_teacher,
)
from tripost_ray.tasks import get_task

pytestmark = pytest.mark.integration

ARITH = "multistep_arithmetic"
KEY = "teacher-test-key"
M = DEFAULT_MODEL
#: The body limit of the "open" teacher (its prompts are a few kB).
SMALL_LIMIT = 64_000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roots(ray_cluster):
    from ray import serve

    yield {
        "open": start_teacher(ARITH, name="srv-open", route_prefix="/srv-open", max_body_bytes=SMALL_LIMIT),
        "keyed": start_teacher(ARITH, name="srv-keyed", route_prefix="/srv-keyed", api_key=KEY),
        "limited": start_teacher(ARITH, name="srv-429", route_prefix="/srv-429", faults="429=1.0,retry_after=1.5"),
        "refusing": start_teacher(ARITH, name="srv-refuse", route_prefix="/srv-refuse", faults="refuse=1.0"),
    }
    serve.shutdown()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


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
    reply = oa.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=300)
    expected = task.verify(problem, attempt)
    assert prompts.parse_fbk_reply(reply.choices[0].message.content).text == expected.text
    assert reply.usage.prompt_tokens == sum(len(m["content"].split()) for m in fbk.openai_messages())
    assert reply.usage.completion_tokens == len(expected.text.split())

    imp = prompts.imp_prompt(task, problem.question, attempt, expected, 2)
    an = anthropic.Anthropic(api_key="unused", base_url=root, max_retries=0)
    msg = an.messages.create(model=M, system=imp.system, messages=list(imp.messages), max_tokens=300)
    update = prompts.parse_imp_reply(attempt, expected, msg.content[0].text)
    assert update == task.improve(problem, attempt, expected)
    assert msg.usage.output_tokens == len(msg.content[0].text.split()) and msg.stop_reason == "end_turn"

    short = oa.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_key_check_bad_requests_and_stats(roots):
    task, problem, attempt = _query()
    root = roots["keyed"]
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=openai_base_url(root), max_retries=0).chat.completions.create(
            model=M, messages=fbk.openai_messages(), max_tokens=50)
    ok = openai.OpenAI(api_key=KEY, base_url=openai_base_url(root), max_retries=0).chat.completions.create(
        model=M, messages=fbk.openai_messages(), max_tokens=50)
    assert ok.choices[0].message.content
    an = anthropic.Anthropic(api_key=KEY, base_url=root, max_retries=0)  # x-api-key header
    assert an.messages.create(model=M, system=fbk.system, messages=list(fbk.messages), max_tokens=50).content
    with pytest.raises(anthropic.BadRequestError, match="not a TriPosT prompt"):
        an.messages.create(model=M, messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    s = get_stats(root, KEY)
    assert s["total"] == 4 and s["status"] == {"401": 1, "200": 2, "400": 1}
    assert s["api"] == {"openai": 2, "anthropic": 2} and s["role"] == {"fbk": 2}
    assert [e[4] for e in s["events"]] == [401, 200, 200, 400]


def test_injected_429_carries_retry_after_and_refusals_are_typed(roots):
    task, problem, attempt = _query()
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 1)
    with pytest.raises(openai.RateLimitError) as err:
        openai.OpenAI(api_key="x", base_url=openai_base_url(roots["limited"]), max_retries=0).chat.completions.create(
            model=M, messages=fbk.openai_messages(), max_tokens=50)
    assert err.value.response.headers["retry-after-ms"] == "1500"
    assert err.value.response.headers["retry-after"] == "1.5"
    refusal = openai.OpenAI(api_key="x", base_url=openai_base_url(roots["refusing"]), max_retries=0)
    choice = refusal.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=50).choices[0]
    assert choice.message.refusal and choice.message.content is None
    msg = anthropic.Anthropic(api_key="x", base_url=roots["refusing"], max_retries=0).messages.create(
        model=M, system=fbk.system, messages=list(fbk.messages), max_tokens=50)
    assert msg.stop_reason == "refusal" and msg.content == []


def test_the_http_proxy_is_cluster_wide(roots):
    host, port = running_proxy()
    assert host == "127.0.0.1" and roots["open"] == f"http://127.0.0.1:{port}/srv-open"
    with pytest.raises(TeacherError, match="one per cluster"):
        start_teacher(ARITH, port=port + 1, name="srv-other", route_prefix="/srv-other")
    with pytest.raises(ConfigError, match="route_prefix"):
        start_teacher(ARITH, name="srv-bad", route_prefix="no-slash")


# ------------------------------------------------------------ saying no, streaming


def _fbk_body(api: str, **fields) -> bytes:
    task, problem, attempt = _query()
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 1)
    if api == "openai":
        body = {"model": M, "messages": fbk.openai_messages(), "max_tokens": 50}
    else:
        body = {"model": M, "system": fbk.system, "messages": list(fbk.messages), "max_tokens": 50}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


DROP = object()  # a field left out of the body

MALFORMED = [  # (api, body fields, what the reason must name)
    ("openai", {"max_tokens": "abc"}, "max_tokens: Input should be a valid integer"),
    ("openai", {"max_tokens": -5}, "max_tokens: Input should be greater than or equal to 1"),
    ("openai", {"stop": 5}, "stop: must be a string or a list of strings"),
    ("openai", {"n": 3}, "n=3: this teacher returns exactly one choice"),
    ("openai", {"model": "gpt-4o"}, "model 'gpt-4o' is not served here; this teacher serves: tripost-teacher"),
    ("openai", {"stream": "yes"}, "stream: Input should be a valid boolean"),
    ("openai", {"temperature": 7}, "temperature: Input should be less than or equal to 2"),
    ("openai", {"logit_bias": {}}, "logit_bias: Extra inputs are not permitted"),
    ("openai", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content: must be a string or a list"),
    ("openai", {"messages": []}, "messages: List should have at least 1 item"),
    ("anthropic", {"max_tokens": DROP}, "max_tokens: Field required"),
    ("anthropic", {"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ("anthropic", {"stop_sequences": [1]}, "stop_sequences: must be a string or a list of strings"),
    ("anthropic", {"system": 5}, "system: must be a string or a list"),
    ("anthropic", {"messages": [{"role": "system", "content": "x"}]}, "messages.0.role: Input should be"),
    ("anthropic", {"model": "claude-x"}, "model 'claude-x' is not served here"),
]


@pytest.mark.parametrize("api,fields,reason", MALFORMED, ids=[f"{a}-{r.split(':')[0]}" for a, _, r in MALFORMED])
def test_each_malformed_request_gets_a_400_with_the_reason(roots, api, fields, reason):
    path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
    status, body = _post(roots["open"] + path, _fbk_body(api, **fields))
    message = body["error"]["message"]
    assert status == 400 and reason in message, (status, message)


def test_bodies_that_are_not_json_objects_or_too_large_are_refused(roots):
    url = openai_base_url(roots["open"]) + "/chat/completions"
    assert _post(url, b"not json")[0] == 400
    status, body = _post(url, b"[1, 2]")
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    big = _fbk_body("openai", user="x" * SMALL_LIMIT)
    status, body = _post(url, big)
    assert status == 400 and f"limit of {SMALL_LIMIT} bytes" in body["error"]["message"]
    status, body = _post(roots["open"] + "/v1/messages", _fbk_body("anthropic", metadata={"x": "y" * SMALL_LIMIT}))
    assert status == 400 and body["error"]["type"] == "request_too_large"
    assert _post(url, _fbk_body("openai"))[0] == 200  # and the server still answers


def test_the_sdks_stream_from_the_teacher(roots):
    task, problem, attempt = _query()
    fbk = prompts.fbk_prompt(task, problem.question, attempt, 2)
    root = roots["open"]
    oa = openai.OpenAI(api_key="unused", base_url=openai_base_url(root), max_retries=0)
    whole = oa.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=300)
    text = whole.choices[0].message.content
    assert len(text.split()) > 3

    chunks = list(oa.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=300, stream=True,
                                             stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text and len(deltas) == len(text.split())
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with oa.chat.completions.stream(model=M, messages=fbk.openai_messages(), max_tokens=300) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == text and final.choices[0].finish_reason == "stop"
    short = list(oa.chat.completions.create(model=M, messages=fbk.openai_messages(), max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in short).split() == text.split()[:3]
    assert short[-1].choices[0].finish_reason == "length"

    an = anthropic.Anthropic(api_key="unused", base_url=root, max_retries=0)
    with an.messages.stream(model=M, system=fbk.system, messages=list(fbk.messages), max_tokens=300) as stream:
        pieces = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(pieces) == text and len(pieces) == len(text.split())
    assert message.content[0].text == text and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == whole.usage.completion_tokens
    assert message.usage.input_tokens == whole.usage.prompt_tokens

    refusing = anthropic.Anthropic(api_key="x", base_url=roots["refusing"], max_retries=0)
    with refusing.messages.stream(model=M, system=fbk.system, messages=list(fbk.messages), max_tokens=50) as stream:
        refused = stream.get_final_message()
    assert refused.stop_reason == "refusal" and refused.content == []
    oa_refusing = openai.OpenAI(api_key="x", base_url=openai_base_url(roots["refusing"]), max_retries=0)
    chunks = list(oa_refusing.chat.completions.create(model=M, messages=fbk.openai_messages(), stream=True))
    assert any(c.choices[0].delta.refusal for c in chunks) and not any(c.choices[0].delta.content for c in chunks)


def test_every_route_but_the_health_check_needs_the_key(roots):
    root = roots["keyed"]
    for path, method in (("/stats", "GET"), ("/stats/reset", "POST")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(root + path, method=method))
        assert err.value.code == 401, path
    before = get_stats(root, KEY)["total"]
    assert before > 0
    with urllib.request.urlopen(root + "/healthz") as r:
        assert json.load(r) == {"ok": True}
    reset_stats(root, KEY)
    assert get_stats(root, KEY)["total"] == 0


# ------------------------------------------------- what is refused before serving


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    """``tripost serve teacher ARGS`` in a process of its own, joining no cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "tripost_ray.cli", "serve", "teacher", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)


def _one_line_refusal(done: subprocess.CompletedProcess, reason: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and reason in lines[0], done.stderr[-2000:]
    assert "Ray" not in done.stdout + done.stderr.replace("Ray Serve instance", "")  # refused before Ray started


def test_the_command_and_a_jobs_teacher_share_their_defaults():
    """``tripost serve teacher`` with no options is the teacher a job starts (one set of
    defaults: the config's teacher section), so a user's client settings fit both."""
    from tripost_ray.cli import build_parser
    from tripost_ray.config import TeacherConfig

    args = build_parser().parse_args(["serve", "teacher", "--task", ARITH])
    section = TeacherConfig()
    assert (args.host, args.port, args.latency_s, args.faults, args.max_body_bytes) == (
        section.host, section.port, section.latency_s, section.faults, section.max_body_bytes)


def test_a_second_teacher_on_a_served_port_is_refused(roots):
    _, port = running_proxy()
    # a second `tripost serve teacher` (its own cluster) on the port this cluster's Serve holds: Serve's
    # proxy binds with SO_REUSEPORT, so without the check it would start and share the port
    _one_line_refusal(_serve_cli("--task", ARITH, "--port", str(port)), f"127.0.0.1:{port} is already in use")
    with socket.socket() as other:  # any other program
        other.bind(("127.0.0.1", 0))
        other.listen()
        held = other.getsockname()[1]
        _one_line_refusal(_serve_cli("--task", ARITH, "--port", str(held)), f"127.0.0.1:{held} is already in use")
    # on this cluster, a second app of a name that runs would replace the first
    with pytest.raises(TeacherError, match="'srv-open' already runs on this cluster"):
        start_teacher(ARITH, name="srv-open", route_prefix="/srv-open-again")


def test_an_unknown_task_and_an_open_host_without_a_key_are_refused_before_ray_starts(roots):
    _one_line_refusal(_serve_cli("--task", "nosuchtask"), "unknown task 'nosuchtask'")
    _one_line_refusal(_serve_cli("--task", ARITH, "--host", "0.0.0.0"), "host '0.0.0.0' is reachable from other")
