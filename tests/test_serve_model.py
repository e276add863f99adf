"""The model server (``tripost serve model``) on 127.0.0.1, serving a model that writes its own
feedback, spoken to with the real openai SDK (whole replies and streams) and raw HTTP for
what the SDK would not send; its answers are checked against
:func:`tripost_ray.inference.self_improving_inference` run here on the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import openai
import pytest

from tripost_ray.config import ConfigError, build_config
from tripost_ray.generation import HFGenerationEngine
from tripost_ray.inference import InferenceResult, self_improving_inference
from tripost_ray.models import load_model_and_tokenizer
from tripost_ray.serve.common import openai_base_url
from tripost_ray.serve.model import question_problem, replicas, serve_config, served_model_source, start_model_server
from tripost_ray.stages import Run
from tripost_ray.tasks import get_task

from conftest import EASY_ARITHMETIC

pytestmark = pytest.mark.integration

TASK = "multistep_arithmetic"
MODEL = "tripost-model"
KEY = "model-test-key"
APPS = {"open": "srv-model", "keyed": "srv-model-keyed"}
ROUNDS, TOKENS = 2, 300  # the served default round limit; an attempt is ~200 tokens with this tokenizer
ROOT = Path(__file__).resolve().parents[1]


def _config(engine: str = "hf"):
    """The served config; the reference runs HF here, so sampled answers compare only on HF."""
    return build_config({
        "task": {"name": TASK, "difficulty": EASY_ARITHMETIC},
        "rollout": {"torch_threads_per_actor": 1},
        "eval": {"self_improve_rounds": ROUNDS, "max_new_tokens": TOKENS},
        # a long batch wait, so the concurrent requests of a test are answered together
        "serve": {"engine": engine, "num_cpus_per_replica": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.5},
    })


@pytest.fixture(scope="module")
def served(ray_cluster, feedback_model_dir):
    from ray import serve

    path, problems = feedback_model_dir
    cfg = _config()
    roots = {"open": start_model_server(path, cfg, name=APPS["open"], route_prefix="/srv-model"),
             "keyed": start_model_server(path, cfg, api_key=KEY, name=APPS["keyed"], route_prefix="/srv-model-keyed")}
    yield roots, problems
    for name in APPS.values():  # our apps only: Serve and other modules' apps keep running
        serve.delete(name)


@pytest.fixture(scope="module")
def reference(feedback_model_dir):
    """``reference(problems, **options)``: self-improving inference here, on the served model."""
    path, _ = feedback_model_dir
    model, tok = load_model_and_tokenizer(path, dtype="float32", device="cpu")
    engine = HFGenerationEngine(model, tok, batch_size=8)
    task = get_task(TASK, **EASY_ARITHMETIC)
    return lambda problems, **kw: self_improving_inference(engine, task, problems, max_new_tokens=TOKENS, **kw)


def _client(root: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=openai_base_url(root), max_retries=0, timeout=600)


def _ask(client: openai.OpenAI, question: str, **options):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **options)


def _check(reply_trajectory: dict, want: InferenceResult, question: str) -> None:
    """A reply's ``tripost`` field holds the reference run's whole loop."""
    got = reply_trajectory
    assert got["question"] == question and got["problem_id"] == question_problem(question).id
    assert got["turns"] == [asdict(t) for t in want.turns]
    assert (got["rounds"], got["stop_reason"], got["first_answer"], got["final_answer"], got["output"]) == (
        want.rounds, want.stop_reason, want.first_answer, want.final_answer, want.output)


def test_answers_and_trajectories_equal_self_improving_inference(served, reference):
    roots, problems = served
    want = reference(problems, max_rounds=ROUNDS)
    assert any(r.rounds > 1 for r in want), "no problem ran a second round: the test would prove nothing"
    client = _client(roots["open"])
    with ThreadPoolExecutor(len(problems)) as pool:  # concurrent clients, answered in one batch
        replies = list(pool.map(lambda p: _ask(client, p.question), problems))
    for p, w, reply in zip(problems, want, replies):
        assert reply.choices[0].message.content == w.turns[-1].attempt
        assert reply.choices[0].finish_reason == "stop" and reply.model == MODEL
        _check(reply.model_extra["tripost"], w, p.question)
        assert reply.model_extra["tripost"]["max_rounds"] == ROUNDS
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (w.prompt_tokens, w.generated_tokens)
    completion = client.completions.create(model=MODEL, prompt=problems[0].question)
    assert completion.choices[0].text == want[0].turns[-1].attempt
    _check(completion.model_extra["tripost"], want[0], problems[0].question)


def test_sampling_options_and_seed_reach_the_engine(served, reference):
    roots, problems = served
    asked = [question_problem(p.question) for p in problems[:3]]
    options = dict(temperature=1.0, top_p=0.9, seed=11)
    want = reference(asked, max_rounds=1, **options)
    client = _client(roots["open"])
    with ThreadPoolExecutor(len(asked)) as pool:
        replies = list(pool.map(lambda p: _ask(client, p.question, extra_body={"max_rounds": 1}, **options), asked))
    for p, w, reply in zip(asked, want, replies):
        _check(reply.model_extra["tripost"], w, p.question)
        assert reply.model_extra["tripost"]["round_seeds"] == w.round_seeds


def test_a_vllm_replica_batches_concurrent_clients_and_answers_as_hf_does(served, reference, feedback_model_dir):
    """``serve.engine: vllm``: one vLLM engine in the replica, concurrent requests scheduled on
    it together; greedy answers and whole loops equal HF's on this fp32 model."""
    from ray import serve

    from conftest import require_vllm

    require_vllm()
    roots, problems = served
    want = reference(problems, max_rounds=ROUNDS)
    root = start_model_server(feedback_model_dir[0], _config("vllm"), name="srv-model-vllm",
                              route_prefix="/srv-model-vllm")
    try:
        client = _client(root)
        with ThreadPoolExecutor(len(problems)) as pool:
            replies = list(pool.map(lambda p: _ask(client, p.question), problems))
        for p, w, reply in zip(problems, want, replies):
            assert reply.choices[0].message.content == w.turns[-1].attempt
            _check(reply.model_extra["tripost"], w, p.question)
        stream = _ask(client, problems[0].question, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0].turns[-1].attempt
    finally:
        serve.delete("srv-model-vllm")


def test_auto_serves_with_vllm_where_it_is_installed():
    from tripost_ray.serve.model import served_engine
    from tripost_ray.vllm_engine import vllm_installed

    assert served_engine(build_config({})) == ("vllm" if vllm_installed() else "hf")
    assert served_engine(build_config({"serve": {"engine": "hf"}})) == "hf"


def test_round_limit_0_is_a_plain_attempt(served, reference):
    roots, problems = served
    want = reference(problems, max_rounds=0, self_improve=False)
    client = _client(roots["open"])
    for p, w in zip(problems[:3], want):
        reply = _ask(client, p.question, extra_body={"max_rounds": 0})
        assert reply.choices[0].message.content == w.turns[0].attempt
        _check(reply.model_extra["tripost"], w, p.question)
        assert reply.model_extra["tripost"]["rounds"] == 1 and not reply.model_extra["tripost"]["self_improve"]
    assert any(w.stop_reason == "single_pass" for w in want[:3]), "no first attempt was flagged: proves nothing"


def test_streaming_sends_the_same_answer_and_trajectory(served, reference):
    roots, problems = served
    question = problems[0].question
    want = reference(problems[:1], max_rounds=ROUNDS)[0]
    client = _client(roots["open"])
    chunks = list(_ask(client, question, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == want.turns[-1].attempt and len(deltas) > 1
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == "stop"
    _check(finished[0].model_extra["tripost"], want, question)
    assert chunks[-1].usage.completion_tokens == want.generated_tokens
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": question}]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == want.turns[-1].attempt
    pieces = list(client.completions.create(model=MODEL, prompt=question, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == want.turns[-1].attempt
    _check([c for c in pieces if c.choices[0].finish_reason][0].model_extra["tripost"], want, question)


# ------------------------------------------------------------------- saying no


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


DROP = object()  # a field left out of the body

MALFORMED = [  # (route, body fields, what the reason must name)
    ("chat", {"model": "gpt-4o"}, "model 'gpt-4o' is not served here; this server serves: tripost-model"),
    ("chat", {"n": 2}, "n=2: this server returns exactly one choice"),
    ("chat", {"temperature": 5}, "temperature: Input should be less than or equal to 2"),
    ("chat", {"top_p": 0}, "top_p: Input should be greater than 0"),
    ("chat", {"max_rounds": -1}, "max_rounds: Input should be greater than or equal to 0"),
    ("chat", {"max_rounds": 9}, "max_rounds: 9 is more than this server allows (8, serve.max_rounds_limit)"),
    ("chat", {"max_rounds": "2"}, "max_rounds: Input should be a valid integer"),
    ("chat", {"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ("chat", {"max_tokens": 5000}, "max_tokens: 5000 is more than this server allows per round"),
    ("chat", {"logit_bias": {}}, "logit_bias: Extra inputs are not permitted"),
    ("chat", {"messages": []}, "messages: List should have at least 1 item"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages: no user message"),
    ("chat", {"messages": [{"role": "user", "content": "  "}]}, "the question (the last user message, or prompt) is empty"),
    ("chat", {"messages": DROP}, "messages: Field required"),
    ("completion", {"prompt": ["a", "b"]}, "prompt: Input should be a valid string"),
    ("completion", {"suffix": "x"}, "suffix: Extra inputs are not permitted"),
]


def _body(route: str, **fields) -> bytes:
    body = {"model": MODEL, "max_tokens": 20}
    body.update({"messages": [{"role": "user", "content": "2 + 3 ="}]} if route == "chat" else {"prompt": "2 + 3 ="})
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def _url(root: str, route: str) -> str:
    return openai_base_url(root) + ("/chat/completions" if route == "chat" else "/completions")


@pytest.mark.parametrize("route,fields,reason", MALFORMED, ids=[f"{r}-{m.split(':')[0]}" for r, _, m in MALFORMED])
def test_each_malformed_request_gets_a_400_with_the_reason(served, route, fields, reason):
    status, body = _post(_url(served[0]["open"], route), _body(route, **fields))
    assert status == 400 and reason in body["error"]["message"], (status, body)


def test_bodies_that_are_not_json_objects_or_too_large_are_refused(served):
    url = _url(served[0]["open"], "chat")
    assert _post(url, b"not json")[0] == 400
    status, body = _post(url, b"[1, 2]")
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    status, body = _post(url, _body("chat", user="x" * 1_000_001))
    assert status == 400 and "(serve.max_body_bytes)" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_rounds"):
        _ask(_client(served[0]["open"]), "2 + 3 =", extra_body={"max_rounds": 99})


def test_the_key_is_checked_as_for_the_teacher(served):
    roots, problems = served
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(roots["keyed"], "wrong"), problems[0].question, extra_body={"max_rounds": 0})
    assert _post(_url(roots["keyed"], "chat"), _body("chat"))[0] == 401  # no key at all
    reply = _ask(_client(roots["keyed"], KEY), problems[0].question, extra_body={"max_rounds": 0})
    assert reply.choices[0].message.content
    status, body = _post(_url(roots["keyed"], "completion"), _body("completion", max_rounds=0), {"x-api-key": KEY})
    assert status == 200 and body["object"] == "text_completion"
    with urllib.request.urlopen(roots["keyed"] + "/healthz") as r:  # the health check needs no key
        assert json.load(r) == {"ok": True}
    assert _client(roots["keyed"], KEY).models.list().data[0].id == MODEL


# ------------------------------------------------- what is served, what is refused


def test_a_run_folder_serves_its_last_trained_model(tmp_path, feedback_model_dir):
    path, _ = feedback_model_dir
    run = Run(str(tmp_path / "run"))
    run.stage("model_init", "h0", lambda url: {"model": str(tmp_path / "first")})
    run.stage("sft", "h1", lambda url: {"model": str(tmp_path / "sft")})
    run.stage("iter_1/train", "h2", lambda url: {"model": path})
    run.stage("iter_1/eval", "h3", lambda url: {"metrics": {}})
    assert served_model_source(str(tmp_path / "run")) == path
    assert served_model_source(path) == os.path.realpath(path)
    (tmp_path / "empty").mkdir()
    for neither in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="neither a model folder"):
            served_model_source(str(neither))


@pytest.mark.parametrize("overrides,gpus,expected", [
    ([], 0, (0.0, 1, 1)),                                   # CPU: one replica, no GPU
    ([], 8, (1.0, 1, 8)),                                   # one replica per GPU, autoscaled from 1
    (["serve.min_replicas=2"], 8, (1.0, 2, 8)),
    (["serve.max_replicas=3"], 8, (1.0, 1, 3)),
    (["serve.num_gpus_per_replica=0.5"], 2, (0.5, 1, 4)),
    (["serve.num_gpus_per_replica=0", "serve.max_replicas=2"], 8, (0.0, 1, 2)),
])
def test_replicas_follow_the_gpus_and_the_config(overrides, gpus, expected):
    assert replicas(build_config(None, overrides), gpus) == expected


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "tripost_ray.cli", "serve", "model", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_run_folder_is_served_with_its_own_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(build_config({"task": {"name": "word_sorting"},
                                                   "eval": {"max_new_tokens": 77}}).to_yaml())
    cfg = serve_config(str(run), None, ["serve.port=9000"])
    assert (cfg.task.name, cfg.eval.max_new_tokens, cfg.serve.port) == ("word_sorting", 77, 9000)
    assert serve_config(str(run), TASK, []).task.name == TASK  # --task wins
    model = tmp_path / "model"  # a model folder (what tells it from a run): the defaults, and --task is needed
    model.mkdir()
    (model / "config.json").write_text("{}")
    model = str(model)
    assert serve_config(model, TASK, []).eval.max_new_tokens == build_config({}).eval.max_new_tokens
    with pytest.raises(ConfigError, match="--task is required"):
        serve_config(model, None, [])
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="a job config must be a mapping"):
        serve_config(str(run), None, [])


@pytest.mark.parametrize("args,reason", [
    (["{model}", "--task", TASK, "--host", "0.0.0.0"], "host '0.0.0.0' is reachable from other machines"),
    (["{model}"], "--task is required"),
    (["{tmp}", "--task", TASK], "is neither a model folder"),
    (["{model}", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["{model}", "--task", TASK, "-o", "serve.min_replicas=3", "-o", "serve.max_replicas=2"],
     "min_replicas (3) must be <= max_replicas (2)"),
], ids=["open-host-without-key", "no-task-for-a-model-folder", "not-a-model", "unknown-task", "replica-bounds"])
def test_the_command_refuses_before_ray_starts(tmp_path, feedback_model_dir, args, reason):
    done = _serve_cli(*[a.format(model=feedback_model_dir[0], tmp=tmp_path) for a in args])
    assert done.returncode == 2 and reason in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("tripost serve: ") and "Traceback" not in done.stderr
    assert "Ray" not in done.stdout + done.stderr  # refused before Ray started
