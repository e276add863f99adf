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

**Test and benchmark knobs**: a fixed added latency, and faults at set rates drawn from
a seeded generator (:class:`Faults`): 429 with ``retry-after`` / ``retry-after-ms``,
500, a hang past the client timeout, a malformed or empty answer, a refusal. An
optional key check accepts ``Authorization: Bearer <key>`` or ``x-api-key: <key>``
(only the key's SHA-256 is given to the replica, so no secret sits in the Serve
config). ``GET /stats`` returns counts per API, fault and status plus one event per
request (arrival time, API, role, fault, status): the request log tests and
benchmarks count from; ``POST /stats/reset`` clears it.

The HTTP proxy of Ray Serve is cluster-wide: one host and port per Ray cluster, set by
the first ``serve.start``. :func:`start_teacher` reuses a running proxy (and refuses a
different explicit port) and mounts each teacher under its own ``route_prefix``.
"""



import asyncio
import hashlib
import hmac
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from tripost_ray.config import ConfigError

DEFAULT_MODEL = "tripost-teacher"


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


def _content_text(content) -> str:
    """A message's text: a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


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


# ---------------------------------------------------------------------- the app

app = FastAPI(title="tripost teacher")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000, num_replicas=1,
                  health_check_period_s=5)
@serve.ingress(app)
class TeacherServer:
    """The Serve replica (one per teacher app, so its request log is complete)."""

    def __init__(self, task_name: str, task_options: dict, latency_s: float, faults: dict,
                 key_sha256: str | None, model: str):
        self.answerer = Answerer(task_name, task_options)
        self.latency_s = latency_s
        self.faults = Faults.parse(faults)
        self.rng = random.Random(self.faults.seed)
        self.key_sha256 = key_sha256
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.events: list[list] = []
        self.counts = {"api": Counter(), "fault": Counter(), "status": Counter(), "role": Counter()}

    # ----------------------------------------------------------------- helpers

    def _authorized(self, request: Request) -> bool:
        if self.key_sha256 is None:
            return True
        presented = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            presented = presented or auth[7:].strip()
        digest = hashlib.sha256(presented.encode()).hexdigest()
        return hmac.compare_digest(digest, self.key_sha256)

    def _log(self, event: list, status: int) -> None:
        event[4] = status
        self.counts["status"][str(status)] += 1

    @staticmethod
    def _error(api: str, status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        if api == "anthropic":
            body = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            body = {"error": {"message": message, "type": kind, "code": status}}
        return JSONResponse(body, status_code=status, headers=headers)

    # ---------------------------------------------------------------- handling

    async def _handle(self, api: str, request: Request) -> JSONResponse:
        arrived = time.time()
        event = [arrived, api, "?", "none", 0]
        self.events.append(event)
        self.counts["api"][api] += 1
        if not self._authorized(request):
            self._log(event, 401)
            kind = "authentication_error" if api == "anthropic" else "invalid_api_key"
            return self._error(api, 401, kind, "invalid or missing API key")
        try:
            body = await request.json()
            messages = list(body.get("messages") or [])
            system = _content_text(body.get("system") or "")
            if api == "openai":
                system = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system")
                messages = [m for m in messages if m.get("role") != "system"]
            users = [m for m in messages if m.get("role") == "user"]
            if not users:
                raise ValueError("no user message")
            role, text = self.answerer.answer(_content_text(users[-1].get("content")))
        except Exception as err:  # any bad request becomes a 400 with the reason, never a crash
            self._log(event, 400)
            return self._error(api, 400, "invalid_request_error", f"bad request: {err}")
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
            return self._error(api, 429, kind, "rate limited (injected)", headers)
        if fault == "500":
            self._log(event, 500)
            return self._error(api, 500, "api_error", "internal error (injected)")
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
        if fault == "malformed":
            text = MALFORMED
        elif fault == "empty":
            text = ""
        stops = body.get("stop") if api == "openai" else body.get("stop_sequences")
        for stop in ([stops] if isinstance(stops, str) else stops or []):
            if stop and stop in text:
                text = text[: text.index(stop)]
        text, truncated = _truncate(text, body.get("max_tokens") or body.get("max_completion_tokens"))
        prompt_tokens = count_tokens(system) + sum(count_tokens(_content_text(m.get("content"))) for m in messages)
        completion_tokens = 0 if fault == "refuse" else count_tokens(text)
        self._log(event, 200)
        model = body.get("model") or self.model
        if api == "anthropic":
            refused = fault == "refuse"
            return JSONResponse({
                "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
                "content": [] if refused else [{"type": "text", "text": text}],
                "stop_reason": "refusal" if refused else ("max_tokens" if truncated else "end_turn"),
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            })
        message = {"role": "assistant", "content": None if fault == "refuse" else text,
                   "refusal": "I can't help with that." if fault == "refuse" else None}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(arrived),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "length" if truncated else "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        return await self._handle("openai", request)

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> JSONResponse:
        return await self._handle("anthropic", request)

    @app.get("/stats")
    async def stats(self, events: int = 1) -> dict:
        out = {"total": len(self.events), **{k: dict(v) for k, v in self.counts.items()},
               "faults": asdict(self.faults), "latency_s": self.latency_s}
        if events:
            out["events"] = [list(e) for e in self.events]
        return out

    @app.post("/stats/reset")
    async def reset_stats(self) -> dict:
        self.reset()
        return {"ok": True}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True, "task": self.answerer.task.name}


# ------------------------------------------------------------------- lifecycle


class TeacherError(RuntimeError):
    """The teacher could not be started as asked."""


def _running_proxy() -> Optional[Tuple[str, int]]:
    """(host, port) of the cluster's Serve HTTP proxy when Serve is running, else None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return http.host, int(http.port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    model: str = DEFAULT_MODEL,
    task_options: dict | None = None,
) -> str:
    """Deploy a teacher app and return its root URL ``http://host:port<route_prefix>``.

    OpenAI clients use ``<root>/v1`` as ``base_url``, Anthropic clients ``<root>``. Starts
    Serve (binding ``host``; ``port`` or a free one) unless it is running, in which case
    its proxy is reused: asking for another explicit host/port is an error because the
    proxy is cluster-wide. Several teachers coexist under different ``name`` and
    ``route_prefix``. Uses the running Ray (or starts a local one).
    """
    import ray

    if not route_prefix.startswith("/"):
        raise ConfigError(f"route_prefix must start with '/', got {route_prefix!r}")
    fault_cfg = Faults.parse(faults)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    running = _running_proxy()
    if running is None:
        port = port or free_port(host)
        serve.start(http_options={"host": host, "port": port})
    else:
        run_host, run_port = running
        if (port is not None and port != run_port) or host != run_host:
            raise TeacherError(
                f"Ray Serve already runs its HTTP proxy on {run_host}:{run_port} (one per cluster); "
                f"cannot serve on {host}:{port}. Leave port unset to reuse it, or serve.shutdown() first."
            )
        host, port = run_host, run_port
    key_sha = hashlib.sha256(api_key.encode()).hexdigest() if api_key else None
    deployment = TeacherServer.bind(task_name, dict(task_options or {}), float(latency_s), asdict(fault_cfg),
                                    key_sha, model)
    serve.run(deployment, name=name, route_prefix=route_prefix, blocking=False)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{url_host}:{port}{route_prefix.rstrip('/')}"


def stop_teacher(name: str = "teacher") -> None:
    """Delete one teacher app (Serve itself keeps running; ``serve.shutdown()`` stops it)."""
    serve.delete(name)


def openai_base_url(root: str) -> str:
    return root.rstrip("/") + "/v1"


def main_serve(args) -> int:
    """``tripost serve teacher``: serve until Ctrl-C."""
    import ray

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    faults = Faults.parse(args.faults)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    root = start_teacher(args.task, host=args.host, port=args.port, latency_s=args.latency_s, faults=faults,
                         api_key=api_key)
    print(f"teacher for {args.task} serving on {root}")
    print(f"  OpenAI:    base_url={openai_base_url(root)}  (POST /v1/chat/completions)")
    print(f"  Anthropic: base_url={root}  (POST /v1/messages)")
    print(f"  stats:     GET {root}/stats ; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
