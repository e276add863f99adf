"""The teacher server: the task's scripted verifier and improver behind LLM wire formats.

A Ray Serve application (one FastAPI ingress replica, ``num_cpus=0``, a high
``max_ongoing_requests`` because it is I/O-bound) that speaks

* ``POST /v1/chat/completions`` (OpenAI; clients use ``base_url = <root>/v1``) and
* ``POST /v1/messages`` (Anthropic; clients use ``base_url = <root>``).

It reads the FBK or IMP prompt exactly as an LLM receives it: the last user turn of the
rendered prompt (:func:`tripost_ray.feedback.prompts.read_query`) gives question,
attempt and, for IMP, the feedback sentence. FBK is answered with the verifier's
feedback sentence, IMP with the improver's update from the wrong step on (the whole
attempt when the update does not keep the earlier steps), i.e. in the format the
prompts ask an LLM for. The problem's target is derived from the task's own gold
rationale for the question (the prompt does not carry it, just as for a hosted LLM).

**Token usage** is reported as whitespace-separated word counts: the prompt's
(system + every message) and the reply's. They are not any model's tokens, but they
are deterministic, grow with the text like real counts, and exercise every code path
that charges usage (TPM, cost, budget). ``max_tokens`` truncates a reply at that many
words (``finish_reason: length`` / ``stop_reason: max_tokens``); stop strings cut it.

**It says no rather than answer wrongly.** Each request is validated (strict pydantic
models of the fields it understands; any other field is refused; the checks, the key and
the port rules are :mod:`tripost_ray.serve.common`, shared with the model server): a malformed field,
a model name it does not serve, ``n`` other than 1 or a body that is not a JSON object
gets a 400 naming the field and the reason, as does a body over ``max_body_bytes``
(error type ``request_too_large``). ``stream: true`` is streamed as
server-sent events in each API's own format (OpenAI ``chat.completion.chunk`` deltas
and ``[DONE]``; Anthropic ``message_start`` ... ``message_stop``), so the SDKs'
streaming helpers work unchanged.

**Test and benchmark knobs**: a fixed added latency, and faults at set rates drawn from
a seeded generator (:class:`Faults`): 429 with ``retry-after`` / ``retry-after-ms``,
500, a hang past the client timeout, a malformed or empty answer, a refusal. An
optional key check accepts ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` on
every route but ``GET /healthz`` (only the key's SHA-256 is given to the replica, so no
secret sits in the Serve config); a host other than loopback is refused without one.
``GET /stats`` returns counts per API, fault and status plus one event per request
(arrival time, API, role, fault, status): the request log tests and benchmarks count
from; ``POST /stats/reset`` clears it.

The HTTP proxy of Ray Serve is cluster-wide: one host and port per Ray cluster, set by
the first ``serve.start``. :func:`start_teacher` reuses a running proxy (and refuses a
different explicit port, or a second app of the same name) and mounts each teacher
under its own ``route_prefix``. A port that any other process already listens on (a
second cluster's Serve included) is refused before Serve starts.
"""


import asyncio
import json
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Iterator, Literal, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from ray import serve

from tripost_ray.config import ConfigError, TeacherConfig
from tripost_ray.serve.common import (
    Message,
    OpenAIMessage,
    RequestError,
    ServeError,
    Stops,
    StreamOptions,
    StrictRequest,
    Text,
    Tokens,
    authorized,
    check_open_host,
    error_response,
    key_digest,
    openai_base_url,  # noqa: F401  (re-exported: the teacher's callers import it from here)
    parse_body,
    read_body,
    start_proxy,
    unauthorized,
)
from tripost_ray.serve.common import sse as _sse

DEFAULT_MODEL = "tripost-teacher"
DEFAULT_MAX_BODY_BYTES: int = TeacherConfig.model_fields["max_body_bytes"].default


# ------------------------------------------------------------------------ faults


@dataclass
class Faults:
    """Injected fault rates (each a probability per request; they must sum to <= 1)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    malformed: float = 0.0
    empty: float = 0.0
    hang: float = 0.0
    refuse: float = 0.0
    retry_after_s: float = 0.2
    hang_s: float = 30.0
    seed: int = 0

    _ALIASES = {"429": "rate_429", "500": "rate_500", "retry_after": "retry_after_s"}

    @classmethod
    def parse(cls, spec) -> "Faults":
        """From a Faults, a dict, or ``'429=0.2,500=0.05,malformed=0.05,hang=0.01,retry_after=0.5'``."""
        if spec is None or spec == "":
            return cls()
        if isinstance(spec, Faults):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in spec.split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise ConfigError(f"fault spec {part!r} is not NAME=RATE")
                k, v = part.split("=", 1)
                items[k.strip()] = v.strip()
            spec = items
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in spec.items():
            name = cls._ALIASES.get(str(key), str(key))
            if name not in known:
                raise ConfigError(f"unknown fault {key!r}; allowed: 429, 500, malformed, empty, hang, refuse, "
                                  "retry_after, hang_s, seed")
            try:
                values[name] = int(value) if name == "seed" else float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"fault {key!r} needs a number, got {value!r}") from None
        faults = cls(**values)
        rates = [faults.rate_429, faults.rate_500, faults.malformed, faults.empty, faults.hang, faults.refuse]
        if any(r < 0 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ConfigError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")
        return faults

    def draw(self, rng: random.Random) -> str:
        u = rng.random()
        for name, rate in (("429", self.rate_429), ("500", self.rate_500), ("malformed", self.malformed),
                           ("empty", self.empty), ("hang", self.hang), ("refuse", self.refuse)):
            if u < rate:
                return name
            u -= rate
        return "none"


# ------------------------------------------------------------------- answering


_WORD_RE = re.compile(r"\S+")
MALFORMED = "I looked at the answer carefully and something seems off, but I am not sure where."


def count_tokens(text: str) -> int:
    """The server's token count: whitespace-separated words."""
    return len(_WORD_RE.findall(text))


def _truncate(text: str, max_tokens: int | None) -> tuple[str, bool]:
    if not max_tokens:
        return text, False
    words = list(_WORD_RE.finditer(text))
    if len(words) <= max_tokens:
        return text, False
    return text[: words[max_tokens - 1].end()], True


class Answerer:
    """Answers FBK/IMP prompts with a task's scripted teachers (plain Python, no Serve)."""

    def __init__(self, task_name: str, task_options: dict | None = None):
        from tripost_ray.tasks import get_task

        self.task = get_task(task_name, **(task_options or {}))
        self.problem = lru_cache(maxsize=4096)(self._problem)

    def _problem(self, question: str):
        from tripost_ray.tasks.base import Problem

        draft = Problem(id="teacher", question=question, target="")
        target = self.task.extract_answer(self.task.gold_rationale(draft)) or ""
        return Problem(id="teacher", question=question, target=target)

    def answer(self, user_text: str) -> tuple[str, str]:
        """(role, reply text) for the last user turn of a prompt; raises ValueError if it is not one."""
        from tripost_ray.feedback.prompts import continuation, read_query
        from tripost_ray.trajectory import parse_feedback

        query = read_query(user_text)
        if query is None:
            raise ValueError("the last user message is not a TriPosT prompt ('Q: ...\\nAnswer: ...')")
        problem = self.problem(query.question)
        if query.feedback is None:
            return "fbk", self.task.verify(problem, query.attempt).text
        feedback = parse_feedback(query.feedback)
        if feedback is None or feedback.is_correct:
            raise ValueError("the IMP prompt's feedback is not a feedback naming a wrong step")
        updated = self.task.improve(problem, query.attempt, feedback)
        return "imp", continuation(query.attempt, feedback, updated)


# ---------------------------------------------------------------------- requests


class AnthropicMessage(Message):
    role: Literal["user", "assistant"]
    content: Text


class OpenAIRequest(StrictRequest):
    """The fields of a chat completion this teacher understands (any other is refused)."""

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: Tokens = None
    max_completion_tokens: Tokens = None
    stop: Stops = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = None
    user: Optional[str] = None


class AnthropicRequest(StrictRequest):
    """The fields of a Messages request this teacher understands (any other is refused)."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: Text = ""
    stop_sequences: Stops = None
    stream: bool = False
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    metadata: Optional[dict] = None


def parse_request(api: str, raw: bytes, models: tuple[str, ...]) -> OpenAIRequest | AnthropicRequest:
    """The validated request, or a :class:`RequestError` naming the first bad field."""
    req = parse_body(raw, OpenAIRequest if api == "openai" else AnthropicRequest)
    if req.model not in models:
        raise RequestError(f"model {req.model!r} is not served here; this teacher serves: {', '.join(models)}")
    if isinstance(req, OpenAIRequest) and req.n != 1:
        raise RequestError(f"n={req.n}: this teacher returns exactly one choice per request (send n=1 or omit it)")
    return req


@dataclass
class Completion:
    """One answer, ready to be sent in either wire format (whole or streamed)."""

    text: str
    refused: bool
    truncated: bool
    prompt_tokens: int
    completion_tokens: int
    model: str
    created: int


_PIECE_RE = re.compile(r"\s*\S+\s*")
REFUSAL = "I can't help with that."


def _pieces(text: str) -> list[str]:
    """A reply cut into word-sized deltas (what a streaming client reassembles)."""
    return _PIECE_RE.findall(text) or ([text] if text else [])


def openai_body(c: Completion) -> dict:
    message = {"role": "assistant", "content": None if c.refused else c.text,
               "refusal": REFUSAL if c.refused else None}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": c.created,
        "model": c.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "length" if c.truncated else "stop"}],
        "usage": _openai_usage(c),
    }


def _openai_usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def openai_events(c: Completion, include_usage: bool) -> Iterator[str]:
    """``chat.completion.chunk`` server-sent events, ``[DONE]`` last (OpenAI streaming)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": c.created,
            "model": c.model}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    if c.refused:
        yield chunk({"refusal": REFUSAL})
    for piece in [] if c.refused else _pieces(c.text):
        yield chunk({"content": piece})
    yield chunk({}, "length" if c.truncated else "stop")
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _openai_usage(c)})
    yield _sse("[DONE]")


def anthropic_body(c: Completion) -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": c.model,
        "content": [] if c.refused else [{"type": "text", "text": c.text}],
        "stop_reason": _stop_reason(c), "stop_sequence": None,
        "usage": {"input_tokens": c.prompt_tokens, "output_tokens": c.completion_tokens},
    }


def _stop_reason(c: Completion) -> str:
    return "refusal" if c.refused else ("max_tokens" if c.truncated else "end_turn")


def anthropic_events(c: Completion) -> Iterator[str]:
    """Messages streaming events: message_start, one text block's deltas, message_delta, message_stop."""
    start = {**anthropic_body(c), "content": [], "stop_reason": None,
             "usage": {"input_tokens": c.prompt_tokens, "output_tokens": 0}}
    yield _sse({"type": "message_start", "message": start}, "message_start")
    if not c.refused:
        yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")
        for piece in _pieces(c.text):
            yield _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                       "content_block_delta")
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    yield _sse({"type": "message_delta", "delta": {"stop_reason": _stop_reason(c), "stop_sequence": None},
                "usage": {"output_tokens": c.completion_tokens}}, "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")


# ---------------------------------------------------------------------- the app

app = FastAPI(title="tripost teacher")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000, num_replicas=1,
                  health_check_period_s=5)
@serve.ingress(app)
class TeacherServer:
    """The Serve replica (one per teacher app, so its request log is complete)."""

    def __init__(self, task_name: str, task_options: dict, latency_s: float, faults: dict,
                 key_sha256: str | None, models: list[str], max_body_bytes: int):
        self.answerer = Answerer(task_name, task_options)
        self.latency_s = latency_s
        self.faults = Faults.parse(faults)
        self.rng = random.Random(self.faults.seed)
        self.key_sha256 = key_sha256
        self.models = tuple(models)
        self.max_body_bytes = max_body_bytes
        self.reset()

    def reset(self) -> None:
        self.events: list[list] = []
        self.counts = {"api": Counter(), "fault": Counter(), "status": Counter(), "role": Counter()}

    # ----------------------------------------------------------------- helpers

    def _log(self, event: list, status: int) -> None:
        event[4] = status
        self.counts["status"][str(status)] += 1

    # ---------------------------------------------------------------- handling

    async def _handle(self, api: str, request: Request) -> Response:
        arrived = time.time()
        event = [arrived, api, "?", "none", 0]
        self.events.append(event)
        self.counts["api"][api] += 1
        if not authorized(request, self.key_sha256):
            self._log(event, 401)
            return unauthorized(api)
        try:
            req = parse_request(api, await read_body(request, self.max_body_bytes, "teacher.max_body_bytes"),
                                self.models)
            if isinstance(req, OpenAIRequest):
                system = "\n".join(m.content for m in req.messages if m.role in ("system", "developer"))
                messages = [m for m in req.messages if m.role not in ("system", "developer")]
            else:
                system, messages = req.system, req.messages
            users = [m for m in messages if m.role == "user"]
            if not users:
                raise RequestError("messages: no user message")
            role, text = self.answerer.answer(users[-1].content)
        except RequestError as err:
            self._log(event, err.status)
            return error_response(api, err.status, err.kind, str(err))
        except ValueError as err:  # not a TriPosT prompt: the reason, never a crash
            self._log(event, 400)
            return error_response(api, 400, "invalid_request_error", f"bad request: {err}")
        event[2] = role
        self.counts["role"][role] += 1
        fault = self.faults.draw(self.rng)
        event[3] = fault
        self.counts["fault"][fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "429":
            self._log(event, 429)
            ra = self.faults.retry_after_s
            headers = {"retry-after": f"{ra:g}", "retry-after-ms": str(int(ra * 1000))}
            kind = "rate_limit_error" if api == "anthropic" else "rate_limit_exceeded"
            return error_response(api, 429, kind, "rate limited (injected)", headers)
        if fault == "500":
            self._log(event, 500)
            return error_response(api, 500, "api_error", "internal error (injected)")
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
        if fault == "malformed":
            text = MALFORMED
        elif fault == "empty":
            text = ""
        stops = req.stop if isinstance(req, OpenAIRequest) else req.stop_sequences
        for stop in stops or []:
            if stop and stop in text:
                text = text[: text.index(stop)]
        max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None)
        text, truncated = _truncate(text, max_tokens)
        refused = fault == "refuse"
        completion = Completion(
            text=text, refused=refused, truncated=truncated,
            prompt_tokens=count_tokens(system) + sum(count_tokens(m.content) for m in messages),
            completion_tokens=0 if refused else count_tokens(text), model=req.model, created=int(arrived),
        )
        self._log(event, 200)
        if req.stream:
            events = (anthropic_events(completion) if api == "anthropic" else
                      openai_events(completion, bool(req.stream_options and req.stream_options.include_usage)))
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(anthropic_body(completion) if api == "anthropic" else openai_body(completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("openai", request)

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        return await self._handle("anthropic", request)

    @app.get("/stats")
    async def stats(self, request: Request, events: int = 1) -> Response:
        if not authorized(request, self.key_sha256):
            return unauthorized("openai")
        out = {"total": len(self.events), **{k: dict(v) for k, v in self.counts.items()},
               "faults": asdict(self.faults), "latency_s": self.latency_s}
        if events:
            out["events"] = [list(e) for e in self.events]
        return JSONResponse(out)

    @app.post("/stats/reset")
    async def reset_stats(self, request: Request) -> Response:
        if not authorized(request, self.key_sha256):
            return unauthorized("openai")
        self.reset()
        return JSONResponse({"ok": True})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}


# ------------------------------------------------------------------- lifecycle


#: The teacher's refusals to start (the shared :class:`~tripost_ray.serve.common.ServeError`).
TeacherError = ServeError


def check_teacher_args(task_name: str, task_options: dict | None, host: str, api_key: str | None) -> None:
    """What can be refused before Ray starts: an unknown task or option, an open host without a key."""
    from tripost_ray.tasks import UnknownTaskError, get_task

    try:
        get_task(task_name, **(task_options or {}))
    except (UnknownTaskError, ValueError, TypeError) as err:
        raise TeacherError(err.args[0] if err.args else str(err)) from None
    check_open_host(host, api_key)


def start_teacher(
    task_name: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    latency_s: float = 0.0,
    faults: Faults | dict | str | None = None,
    api_key: str | None = None,
    route_prefix: str = "/",
    name: str = "teacher",
    *,
    models: Sequence[str] = (DEFAULT_MODEL,),
    task_options: dict | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    replace_existing: bool = False,
) -> str:
    """Deploy a teacher app and return its root URL ``http://host:port<route_prefix>``.

    OpenAI clients use ``<root>/v1`` as ``base_url``, Anthropic clients ``<root>``
    (for a host of ``0.0.0.0`` the root names 127.0.0.1, where this machine's clients
    reach it). Starts Serve (binding ``host``; ``port`` or a free one, refused when any
    process already listens there) unless it is running in this cluster, in which case
    its proxy is reused: asking for another explicit host/port is an error because the
    proxy is cluster-wide. Several teachers coexist under different ``name`` and
    ``route_prefix``; a second app of the same name is refused. ``models``: the model
    names it answers to (others get a 400). A non-loopback host needs ``api_key``.
    An app already deployed under ``name`` is refused, unless ``replace_existing``: for a
    caller that knows such an app can only be its own leftover (the pipeline, which holds its
    run folder's lock and names its app after the run, after a killed driver).
    Uses the running Ray (or starts a local one).
    """
    from tripost_ray.ray_setup import init_ray

    fault_cfg = Faults.parse(faults)
    check_teacher_args(task_name, task_options, host, api_key)
    init_ray()
    root = start_proxy(host, port, name, route_prefix, replace_existing=replace_existing,
                       setting="--port / teacher.port")
    key_sha = key_digest(api_key)
    deployment = TeacherServer.bind(task_name, dict(task_options or {}), float(latency_s), asdict(fault_cfg),
                                    key_sha, list(models), int(max_body_bytes))
    serve.run(deployment, name=name, route_prefix=route_prefix, blocking=False)
    return root


def stop_teacher(name: str = "teacher") -> None:
    """Delete one teacher app (Serve itself keeps running; ``serve.shutdown()`` stops it)."""
    serve.delete(name)


def _stats_request(root: str, path: str, api_key: str | None, method: str) -> dict:
    import urllib.request

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(root + path, method=method, headers=headers)) as r:
        return json.load(r)


def get_stats(root: str, api_key: str | None = None) -> dict:
    """A teacher's ``GET /stats`` (its request log), with the key it checks."""
    return _stats_request(root, "/stats", api_key, "GET")


def reset_stats(root: str, api_key: str | None = None) -> None:
    """A teacher's ``POST /stats/reset``, with the key it checks."""
    _stats_request(root, "/stats/reset", api_key, "POST")
