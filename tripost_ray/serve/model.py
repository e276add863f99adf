"""The trained model behind the OpenAI API: a Ray Serve app that answers with self-improving inference.

``POST /v1/chat/completions`` and ``POST /v1/completions`` in the OpenAI wire format (clients
use ``base_url = <root>/v1``), whole or streamed. A chat request's last user message (a
completion request's ``prompt``) is the question: the model answers it in the task's prompt
format, writes its own feedback, and updates its answer until the feedback calls it correct
or a stop rule ends it (:func:`tripost_ray.inference.self_improving_inference`, exactly as
``tripost eval`` runs it). The reply's content is the **final attempt**; the whole
trajectory comes back in the extra field ``tripost`` of the reply (streamed: of the chunk
that carries the ``finish_reason``)::

    "tripost": {"question", "problem_id", "turns": [{"attempt", "feedback"}, ...],
                "first_answer", "final_answer", "rounds", "stop_reason", "max_rounds",
                "self_improve", "output", "round_seeds"}

``feedback`` is the model's own feedback on that attempt (null when it wrote none);
``stop_reason`` says why the loop ended (``correct_feedback``, ``no_feedback``,
``bad_feedback``, ``repetition``, ``no_progress``, ``round_limit``, or ``single_pass`` for a
round limit of 0); ``output`` is the model's whole text after ``Answer:``.

Request options (OpenAI fields, plus one of this server's own): ``max_rounds`` (send it with
the SDK's ``extra_body``): the number of ``Updated Answer`` rounds after the first attempt,
0 for a plain single attempt (default ``eval.self_improve_rounds``, at most
``serve.max_rounds_limit``); ``temperature`` (default 0: greedy, as evaluation), ``top_p``,
``seed`` (a question's sample is fixed by the seed: round ``r`` draws from
``derive_seed(seed, problem_id, r)``, ``problem_id`` being a hash of the question);
``max_tokens`` / ``max_completion_tokens``: the new tokens of **each round** (default
``eval.max_new_tokens``). ``usage`` counts every round: ``prompt_tokens`` the prompt of each
round (it grows with the answer), ``completion_tokens`` every generated token, so the
extra tokens self-improvement costs are in it. Any other field, ``n`` other than 1, or a
model name other than ``serve.model_name`` is a 400 naming the field
(:mod:`tripost_ray.serve.common`, shared with the teacher, as are the key check, the
loopback default and the port check).

**Streaming** sends the final attempt in word-sized deltas once the loop has ended: the
final attempt is known only when the model's own feedback has judged it, so there is
nothing truthful to stream before (the time to the first token is the whole answer's).

**Batching.** Concurrent requests on a replica are gathered (``serve.max_batch_size``,
``serve.batch_wait_timeout_s``) and answered by one inference call per set of decoding
options, so each round of every request in the batch is one engine call: HF ``generate``
batches, vLLM schedules them continuously. Each replica owns one engine
(:func:`tripost_ray.rollout.build_engine`; ``serve.engine``: vLLM where installed, else HF), called from one
thread of its own; replicas take ``serve.num_gpus_per_replica`` GPUs (one per GPU on GPU
clusters) and autoscale between ``serve.min_replicas`` and ``serve.max_replicas``.
"""

import asyncio
import hashlib
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from ray import serve

from tripost_ray.config import JobConfig
from tripost_ray.inference import InferenceResult
from tripost_ray.serve.common import (
    OpenAIMessage,
    RequestError,
    ServeError,
    StreamOptions,
    StrictRequest,
    Tokens,
    authorized,
    check_open_host,
    error_response,
    key_digest,
    parse_body,
    read_body,
    sse,
    start_proxy,
    unauthorized,
)
from tripost_ray.specs import GenerationSpec, JobSpecs
from tripost_ray.tasks.base import Problem

# ---------------------------------------------------------------------- requests


class _Options(StrictRequest):
    """The fields both routes understand (any other is refused)."""

    model: str
    max_tokens: Tokens = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    user: Optional[str] = None
    max_rounds: Optional[int] = Field(None, ge=0)


class ChatRequest(_Options):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: Tokens = None


class CompletionRequest(_Options):
    prompt: str


@dataclass(frozen=True)
class Decoding:
    """One request's decoding: requests with equal decodings share an inference call."""

    max_new_tokens: int
    max_rounds: int
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class Limits:
    """What a replica allows and assumes: the served name, the defaults and the caps."""

    model_name: str
    max_new_tokens: int
    max_rounds: int
    seed: int
    max_rounds_limit: int
    max_tokens_limit: int


def question_problem(question: str) -> Problem:
    """The problem a served question is answered as: its id is a hash of the question, so
    a question's samples are fixed by the request's seed (the target is unknown)."""
    return Problem(id="q-" + hashlib.sha256(question.encode()).hexdigest()[:16], question=question, target="")


def parse_model_request(route: str, raw: bytes, limits: Limits) -> tuple[ChatRequest | CompletionRequest, str,
                                                                          Decoding]:
    """The validated request, its question and its decoding; :class:`RequestError` names what is wrong."""
    req = parse_body(raw, ChatRequest if route == "chat" else CompletionRequest)
    if req.model != limits.model_name:
        raise RequestError(f"model {req.model!r} is not served here; this server serves: {limits.model_name}")
    if req.n != 1:
        raise RequestError(f"n={req.n}: this server returns exactly one choice per request (send n=1 or omit it)")
    if isinstance(req, ChatRequest):
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise RequestError("messages: no user message (the last user message is the question)")
        question = users[-1].content
    else:
        question = req.prompt
    if not question.strip():
        raise RequestError("the question (the last user message, or prompt) is empty")
    rounds = limits.max_rounds if req.max_rounds is None else req.max_rounds
    if rounds > limits.max_rounds_limit:
        raise RequestError(f"max_rounds: {rounds} is more than this server allows ({limits.max_rounds_limit}, "
                           "serve.max_rounds_limit)")
    tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or limits.max_new_tokens
    if tokens > limits.max_tokens_limit:
        raise RequestError(f"max_tokens: {tokens} is more than this server allows per round "
                           f"({limits.max_tokens_limit}, serve.max_tokens_limit)")
    decoding = Decoding(max_new_tokens=tokens, max_rounds=rounds,
                        temperature=0.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        seed=limits.seed if req.seed is None else req.seed)
    return req, question, decoding


# ---------------------------------------------------------------------- replies


def trajectory(question: str, problem_id: str, result: InferenceResult, decoding: Decoding) -> dict[str, Any]:
    """The reply's ``tripost`` field: the whole self-improvement loop of one question."""
    return {"question": question, "problem_id": problem_id, "turns": [asdict(t) for t in result.turns],
            "first_answer": result.first_answer, "final_answer": result.final_answer, "rounds": result.rounds,
            "stop_reason": result.stop_reason, "max_rounds": decoding.max_rounds,
            "self_improve": decoding.max_rounds > 0, "output": result.output, "round_seeds": result.round_seeds}


@dataclass
class Answer:
    """One answered request, ready to be sent whole or streamed."""

    route: Literal["chat", "completion"]
    model: str
    created: int
    content: str
    prompt_tokens: int
    completion_tokens: int
    tripost: dict[str, Any]

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.route == "chat":
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion.chunk" if chunk else "chat.completion",
                    "created": self.created, "model": self.model}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": self.created,
                "model": self.model}

    def body(self) -> dict[str, Any]:
        if self.route == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": self.content, "refusal": None},
                      "logprobs": None, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": self.content, "logprobs": None, "finish_reason": "stop"}
        return {**self._head(False), "choices": [choice], "usage": self.usage(), "tripost": self.tripost}

    def events(self, include_usage: bool) -> Iterator[str]:
        """Server-sent chunks: the content in word-sized deltas, then the finish chunk with
        the trajectory, the usage chunk when asked for, and ``[DONE]``."""
        head = self._head(True)

        def chunk(piece: str | None, finish: str | None = None, **extra: Any) -> str:
            if self.route == "chat":
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice], **extra})

        if self.route == "chat":
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        for piece in re.findall(r"\s*\S+\s*", self.content) or [self.content]:
            yield chunk(piece)
        yield chunk(None, "stop", tripost=self.tripost)
        if include_usage:
            yield sse({**head, "choices": [], "usage": self.usage()})
        yield sse("[DONE]")


# ---------------------------------------------------------------------- the app

app = FastAPI(title="tripost model")


@serve.deployment(health_check_period_s=10, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class ModelServer:
    """One replica: one engine on the served model, answering batches of requests."""

    def __init__(self, spec: GenerationSpec, model: str, limits: Limits, key_sha256: str | None,
                 max_body_bytes: int, max_batch_size: int, batch_wait_timeout_s: float):
        from tripost_ray.models import resolve_model_source
        from tripost_ray.rollout import build_engine

        # one thread owns the engine: built there (torch's thread count is per thread) and
        # called there, so batches never run the engine concurrently
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        local = resolve_model_source(model, spec.cache_dir)
        self.engine = self.executor.submit(build_engine, spec, local).result()
        self.task = spec.task.build()
        self.limits = limits
        self.key_sha256 = key_sha256
        self.max_body_bytes = max_body_bytes
        self.answer_batch.set_max_batch_size(max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _infer(self, jobs: list[tuple[Problem, Decoding]]) -> list[InferenceResult]:
        """One inference call per distinct decoding among the batch's requests; input order."""
        from tripost_ray.inference import self_improving_inference

        results: list[InferenceResult | None] = [None] * len(jobs)
        for decoding in dict.fromkeys(d for _, d in jobs):
            idx = [i for i, (_, d) in enumerate(jobs) if d == decoding]
            out = self_improving_inference(
                self.engine, self.task, [jobs[i][0] for i in idx], max_new_tokens=decoding.max_new_tokens,
                max_rounds=decoding.max_rounds, temperature=decoding.temperature, top_p=decoding.top_p,
                seed=decoding.seed, self_improve=decoding.max_rounds > 0)
            for i, r in zip(idx, out):
                results[i] = r
        return results  # type: ignore[return-value]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def answer_batch(self, jobs: list[tuple[Problem, Decoding]]) -> list[InferenceResult]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._infer, jobs)

    async def _handle(self, route: Literal["chat", "completion"], request: Request) -> Response:
        if not authorized(request, self.key_sha256):
            return unauthorized("openai")
        try:
            raw = await read_body(request, self.max_body_bytes, "serve.max_body_bytes")
            req, question, decoding = parse_model_request(route, raw, self.limits)
        except RequestError as err:
            return error_response("openai", err.status, err.kind, str(err))
        created = int(time.time())
        problem = question_problem(question)
        result = await self.answer_batch((problem, decoding))
        answer = Answer(route=route, model=req.model, created=created, content=result.turns[-1].attempt,
                        prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                        tripost=trajectory(question, problem.id, result, decoding))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(answer.events(include_usage), media_type="text/event-stream")
        return JSONResponse(answer.body())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle("completion", request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if not authorized(request, self.key_sha256):
            return unauthorized("openai")
        return JSONResponse({"object": "list", "data": [{"id": self.limits.model_name, "object": "model",
                                                         "created": 0, "owned_by": "tripost"}]})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}


# ------------------------------------------------------------------- lifecycle


def served_model_source(source: str) -> str:
    """The model a source serves: a model folder or fsspec URL as it is; a run folder's last
    trained model (the latest-started of its model_init, sft and ``*/train`` stages).
    Raises :class:`ServeError` when it is neither, naming what was looked for."""
    from tripost_ray import storage
    from tripost_ray.models import ModelSourceError, check_model_source
    from tripost_ray.report import load_manifests

    source = storage.normalize(source)  # a replica may run on another node, in another folder
    try:
        if storage.exists(storage.join(source, "config.json")):
            check_model_source(source)
            return source
        manifests = load_manifests(source) if storage.exists(source) else {}
    except (ModelSourceError, storage.StorageError) as err:
        raise ServeError(str(err)) from None
    trained = [m for name, m in manifests.items()
               if "model" in m and (name in ("model_init", "sft") or name.endswith("/train"))]
    if not trained:
        raise ServeError(f"{source} is neither a model folder (no config.json) nor a run folder with a trained "
                         "model (no model_init, sft or iter_*/train stage manifest)")
    return max(trained, key=lambda m: m.get("started_at", 0.0))["model"]


def serve_config(source: str, task: Optional[str], overrides: list[str]) -> JobConfig:
    """The config ``source`` is served with: a run folder's own ``config.yaml`` (its task, task
    difficulty, decoding and load settings), else the defaults; then ``task`` when given, and
    ``overrides``. Raises :class:`ServeError` when neither names a task, a ConfigError for a
    damaged ``config.yaml``."""
    from tripost_ray import storage
    from tripost_ray.config import build_config, parse_config_yaml

    source = storage.normalize(source)
    run_config = storage.join(source, "config.yaml")
    data: dict[str, Any] = {}
    if not storage.exists(storage.join(source, "config.json")) and storage.exists(run_config):
        fs, path = storage.fs_for(run_config)
        data = parse_config_yaml(fs.cat_file(path), run_config)
    elif task is None:
        raise ServeError(f"--task is required for {source}: it is not a run folder (a run's config.yaml names "
                         "its task)")
    return build_config(data, list(overrides) + ([f"task.name={task}"] if task else []))


def served_engine(cfg: JobConfig) -> Literal["hf", "vllm"]:
    """The engine ``serve.engine`` names; ``auto`` is vLLM where it is installed, else HF."""
    from tripost_ray.vllm_engine import vllm_installed

    if cfg.serve.engine == "auto":
        return "vllm" if vllm_installed() else "hf"
    return cfg.serve.engine


def replicas(cfg: JobConfig, gpus: float) -> tuple[float, int, int]:
    """(GPUs per replica, min replicas, max replicas) on a cluster with ``gpus`` GPUs: one
    replica per GPU where it has GPUs, unless the serve section says otherwise."""
    s = cfg.serve
    per_replica = s.num_gpus_per_replica if s.num_gpus_per_replica is not None else (1.0 if gpus >= 1 else 0.0)
    if s.max_replicas is not None:
        most = s.max_replicas
    elif per_replica > 0:
        most = max(s.min_replicas, int(gpus // per_replica))
    else:
        most = s.min_replicas
    return per_replica, s.min_replicas, most


def start_model_server(model: str, cfg: JobConfig, host: str = "127.0.0.1", port: int | None = None,
                       api_key: str | None = None, name: str = "tripost-model", route_prefix: str = "/", *,
                       replace_existing: bool = False) -> str:
    """Deploy the model app and return its root URL (OpenAI clients use ``<root>/v1``).

    ``model``: a model folder, an fsspec URL or a run folder (:func:`served_model_source`).
    ``cfg``: its task, engine (:func:`served_engine`), load settings, the eval section's decoding
    defaults and the serve section's replicas, batching and limits. Serve's proxy is started
    on ``host:port`` or the cluster's running one reused, as for the teacher
    (:func:`tripost_ray.serve.common.start_proxy`); a non-loopback host needs ``api_key``.
    Uses the running Ray (or starts a local one with the defaults; ``tripost serve model``
    starts it from ``cfg.ray``); returns once every replica has loaded.
    """
    from tripost_ray.ray_setup import init_ray

    check_open_host(host, api_key)
    source = served_model_source(model)
    init_ray()
    root = start_proxy(host, port, name, route_prefix, replace_existing=replace_existing,
                       setting="--port / serve.port")
    import ray

    gpus, least, most = replicas(cfg, float(ray.cluster_resources().get("GPU", 0)))
    s = cfg.serve
    generation = JobSpecs(cfg).eval().generation
    spec = generation.model_copy(update={"engine": served_engine(cfg), "pool": generation.pool.model_copy(update={
        "num_gpus_per_actor": gpus, "num_cpus_per_actor": s.num_cpus_per_replica, "max_actors": most})})
    limits = Limits(model_name=s.model_name, max_new_tokens=cfg.eval.max_new_tokens,
                    max_rounds=cfg.eval.self_improve_rounds, seed=cfg.rollout.seed,
                    max_rounds_limit=s.max_rounds_limit, max_tokens_limit=s.max_tokens_limit)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": gpus},
                               "max_ongoing_requests": s.max_ongoing_requests}
    if most > least:
        options["autoscaling_config"] = {"min_replicas": least, "max_replicas": most,
                                         "target_ongoing_requests": s.target_ongoing_requests}
    else:
        options["num_replicas"] = least
    deployment = ModelServer.options(**options).bind(spec, source, limits, key_digest(api_key), s.max_body_bytes,
                                                     s.max_batch_size, s.batch_wait_timeout_s)
    serve.run(deployment, name=name, route_prefix=route_prefix, blocking=False)
    return root
