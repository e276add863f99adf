"""The rollout stage: the small model answers many problems on a Ray Data actor pool.

    problems --from_arrow--> map_batches(GeneratorActor, ActorPoolStrategy(min, max))
             --iter_batches (driver)--> Parquet parts on any fsspec URL

Each actor loads the model once into the engine ``rollout.engine`` names (HF ``generate`` or
one vLLM engine per actor; a GPU each where ``num_gpus_per_actor`` > 0, else a fractional
CPU so Ray Data's own tasks still get a core) and runs
:func:`tripost_ray.inference.self_improving_inference` on its batches.

Reproducibility across any sharding: every problem's sampling seed is derived from
``(seed, problem_id, round)``, never from its batch or actor, and the dataset is cut into
fixed batches (one block each, ``batch_size`` problems in input order) whichever actor or
node takes them. So a run on two nodes writes the same rows as a run on one (tested with
``ray.cluster_utils.Cluster``), and so does a plain loop over the same batches.

Exactly once: the driver consumes the stream and writes each output block as one Parquet
part (atomically); a failed actor is restarted and its batch retried by Ray Data
(``max_restarts`` / ``max_task_retries``), and the written ids are checked against the
input ids at the end. The driver-side write works the same for local folders, object
stores and ``memory://`` (which a worker process could not see).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tripost_ray import progress, storage
from tripost_ray.metrics import record_rollout_batch
from tripost_ray.specs import ActorPoolSpec, GenerationSpec
from tripost_ray.tasks.base import Problem

if TYPE_CHECKING:
    from tripost_ray.generation import GenerationEngine

ROLLOUT_SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("question", pa.string()),
    ("target", pa.string()),
    ("split", pa.string()),
    ("meta_json", pa.string()),
    ("output", pa.string()),
    ("attempts", pa.list_(pa.string())),
    ("feedbacks", pa.list_(pa.string())),
    ("n_turns", pa.int64()),
    ("first_answer", pa.string()),
    ("final_answer", pa.string()),
    ("first_correct", pa.bool_()),
    ("correct", pa.bool_()),
    ("stop_reason", pa.string()),
    ("rounds", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("generated_tokens", pa.int64()),
    ("gen_time_s", pa.float64()),
    ("self_improve", pa.bool_()),
    ("temperature", pa.float64()),
    ("seed", pa.int64()),
    ("node_id", pa.string()),
    ("actor_id", pa.string()),
    ("batch_started_at", pa.float64()),  # unix time the actor began this problem's batch
    ("batch_finished_at", pa.float64()),
])


class RolloutError(RuntimeError):
    """The rollout stage lost or duplicated problems, or could not start."""


@dataclass
class RolloutSummary:
    """Counts, tokens and throughput of one rollout stage."""

    n_problems: int
    n_written: int
    n_correct: int
    n_self_improved: int
    prompt_tokens: int
    generated_tokens: int
    wall_time_s: float
    gen_time_s: float
    tokens_per_s: float
    problems_per_s: float
    n_actors_seen: int
    n_nodes_seen: int
    output_uri: str
    stop_reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------- actor


class GeneratorActor:
    """A Ray Data UDF class: loads the model once (in the spec's dtype, from its cache),
    answers batches of problems with the spec's decoding.

    ``fault_marker`` is a test hook for Ray's fault tolerance: when set and the file does
    not exist yet, the actor creates it and kills its own process on its first batch, so
    Ray Data must restart the actor and retry that batch.
    """

    def __init__(self, spec: GenerationSpec, model_path: str, fault_marker: str | None = None):
        import ray

        from tripost_ray.models import resolve_model_source

        self.engine = build_engine(spec, resolve_model_source(model_path, spec.cache_dir))
        self.task = spec.task.build()
        self.spec = spec
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.actor_id = ctx.get_actor_id() or f"pid-{os.getpid()}"
        self.fault_marker = fault_marker

    def _maybe_fail(self) -> None:
        if self.fault_marker and not os.path.exists(self.fault_marker):
            with open(self.fault_marker, "w") as f:
                f.write(self.actor_id)
            os._exit(1)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        from tripost_ray.inference import self_improving_inference

        self._maybe_fail()
        problems = [
            Problem(id=str(pid), question=str(q), target=str(t), split=str(s), meta=json.loads(m))
            for pid, q, t, s, m in zip(batch["problem_id"], batch["question"], batch["target"], batch["split"],
                                       batch["meta_json"])
        ]
        started = time.time()
        spec = self.spec
        results = self_improving_inference(self.engine, self.task, problems, max_new_tokens=spec.max_new_tokens,
                                           max_rounds=spec.max_rounds, temperature=spec.temperature, top_p=spec.top_p,
                                           seed=spec.seed, self_improve=spec.self_improve)
        finished = time.time()
        rows = []
        for p, r in zip(problems, results):
            rows.append({
                "problem_id": p.id, "question": p.question, "target": p.target, "split": p.split,
                "meta_json": json.dumps(p.meta, sort_keys=True), "output": r.output,
                "attempts": [t.attempt for t in r.turns], "feedbacks": [t.feedback for t in r.turns],
                "n_turns": r.n_turns, "first_answer": r.first_answer, "final_answer": r.final_answer,
                "first_correct": r.first_correct, "correct": r.correct, "stop_reason": r.stop_reason,
                "rounds": r.rounds, "prompt_tokens": r.prompt_tokens, "generated_tokens": r.generated_tokens,
                "gen_time_s": r.gen_time_s, "self_improve": spec.self_improve,
                "temperature": float(spec.temperature), "seed": int(spec.seed),
                "node_id": self.node_id, "actor_id": self.actor_id,
                "batch_started_at": started, "batch_finished_at": finished,
            })
        record_rollout_batch(rows, spec.self_improve)
        return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


# --------------------------------------------------------------------- stage


def build_engine(spec: GenerationSpec, local_model: str) -> GenerationEngine:
    """The engine ``spec.engine`` names, on a GPU when the pool gives actors one, with this
    actor's share of the cores on CPU."""
    use_gpu = spec.pool.num_gpus_per_actor > 0
    threads = None if use_gpu else torch_threads_for(spec.pool)
    if spec.engine == "vllm":
        from tripost_ray.vllm_engine import VLLMGenerationEngine

        return VLLMGenerationEngine(local_model, dtype=spec.dtype, use_gpu=use_gpu, threads=threads,
                                    cpu_kv_cache_gib=spec.pool.vllm_cpu_kv_cache_gib,
                                    gpu_memory_utilization=spec.pool.vllm_gpu_memory_utilization)
    import torch

    from tripost_ray.generation import HFGenerationEngine
    from tripost_ray.models import load_model_and_tokenizer

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model_and_tokenizer(local_model, dtype=spec.dtype, device="cuda" if use_gpu else "cpu")
    return HFGenerationEngine(model, tokenizer, batch_size=spec.batch_size)


def torch_threads_for(cfg: ActorPoolSpec) -> int:
    """Intra-op threads per actor: the configured number, or this machine's cores / actors."""
    if cfg.torch_threads_per_actor:
        return cfg.torch_threads_per_actor
    return max(1, (os.cpu_count() or 1) // cfg.max_actors)


def _problem_items(problems: list[Problem]) -> list[dict]:
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RolloutError(f"problem ids must be unique; duplicated: {dupes}")
    return [{"problem_id": p.id, "question": p.question, "target": p.target, "split": p.split,
             "meta_json": json.dumps(p.meta, sort_keys=True, default=str)} for p in problems]


def run_rollouts(problems: list[Problem], model_path: str, spec: GenerationSpec, output_uri: str, *,
                 fault_marker: str | None = None) -> RolloutSummary:
    """Generate for every problem on a Ray Data actor pool; write Parquet to ``output_uri``.

    ``model_path`` is a local model folder or an fsspec URL (each actor copies it to
    ``spec.cache_dir`` on its node). Existing contents of ``output_uri`` are replaced.
    Raises :class:`RolloutError` if any problem is missing or duplicated in the output.
    """
    import ray

    if not ray.is_initialized():
        raise RolloutError("Ray is not initialised: call tripost_ray.ray_setup.init_ray() first")
    items = _problem_items(problems)
    output_uri = storage.normalize(output_uri)
    storage.remove(output_uri)
    if not items:
        return _summary([], 0, 0.0, output_uri)
    # One block per batch, cut in problem order: every batch holds the same problems whatever
    # actor, node or machine load runs it (the exact promise of tripost_ray.generation).
    ds = ray.data.from_arrow([pa.Table.from_pylist(items[i:i + spec.batch_size])
                              for i in range(0, len(items), spec.batch_size)])
    ds.context.wait_for_min_actors_s = spec.pool.wait_for_actors_s or -1
    ds = _map_generators(ds, spec, model_path, fault_marker)
    t0 = time.perf_counter()
    rows: list[dict] = []
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    for part, table in enumerate(progress.iterate(batches, "rollouts", len(items), "problems", lambda t: t.num_rows)):
        if table.num_rows == 0:
            continue
        table = table.select(ROLLOUT_SCHEMA.names).cast(ROLLOUT_SCHEMA)
        batch_rows = table.to_pylist()
        storage.write_table(storage.join(output_uri, f"part-{part:05d}.parquet"), batch_rows, schema=ROLLOUT_SCHEMA)
        rows.extend(batch_rows)
    wall = time.perf_counter() - t0
    _check_exactly_once(items, rows)
    return _summary(rows, len(items), wall, output_uri)


def actor_resources(spec: GenerationSpec) -> dict:
    """What Ray reserves for each generator actor. vLLM on CPU allocates its whole KV cache
    in host memory when it starts, so that memory is reserved too: otherwise Ray packs more
    engines onto a node than its memory holds, and they die out of memory instead of waiting
    for room. (On GPU the cache lives in the GPU's memory, which ``num_gpus`` already claims.)"""
    pool = spec.pool
    use_gpu = pool.num_gpus_per_actor > 0
    kv_cache_on_host = spec.engine == "vllm" and not use_gpu
    return {"num_cpus": pool.num_cpus_per_actor,
            "num_gpus": pool.num_gpus_per_actor if use_gpu else None,
            "memory": pool.vllm_cpu_kv_cache_gib * 2**30 if kv_cache_on_host else None,
            "resources": dict(pool.resources_per_actor) or None}


def _map_generators(ds, spec: GenerationSpec, model_path: str, fault_marker: str | None):
    import ray

    pool = spec.pool
    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args but has no named parameter for actor restarts
        # yet; its default is unlimited restarts, which turns a crash loop into a hang.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            GeneratorActor,
            fn_constructor_args=(spec, model_path, fault_marker),
            batch_size=spec.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                               max_tasks_in_flight_per_actor=pool.max_tasks_in_flight_per_actor),
            **actor_resources(spec),
            max_restarts=pool.max_actor_restarts,
            max_task_retries=pool.max_actor_restarts,
        )


def _check_exactly_once(items: list[dict], rows: list[dict]) -> None:
    want = {i["problem_id"] for i in items}
    got = [r["problem_id"] for r in rows]
    missing = want - set(got)
    dupes = {g for g in got if got.count(g) > 1} if len(got) != len(set(got)) else set()
    if missing or dupes or len(got) != len(want):
        raise RolloutError(f"rollout output is not exactly once: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                           f"{len(dupes)} duplicated (e.g. {sorted(dupes)[:3]})")


def _summary(rows: list[dict], n_problems: int, wall: float, output_uri: str) -> RolloutSummary:
    gen_tokens = sum(r["generated_tokens"] for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    return RolloutSummary(
        n_problems=n_problems, n_written=len(rows), n_correct=sum(bool(r["correct"]) for r in rows),
        n_self_improved=sum(r["n_turns"] > 1 for r in rows),
        prompt_tokens=sum(r["prompt_tokens"] for r in rows), generated_tokens=gen_tokens,
        wall_time_s=wall, gen_time_s=sum(r["gen_time_s"] for r in rows),
        tokens_per_s=gen_tokens / wall if wall > 0 else 0.0,
        problems_per_s=len(rows) / wall if wall > 0 else 0.0,
        n_actors_seen=len({r["actor_id"] for r in rows}), n_nodes_seen=len({r["node_id"] for r in rows}),
        output_uri=output_uri, stop_reasons=reasons,
    )


def read_rollouts(output_uri: str) -> list[dict]:
    """All rows of a rollout output, sorted by problem id."""
    if not storage.exists(output_uri):
        raise FileNotFoundError(f"no rollout output at {output_uri}")
    return sorted(storage.read_table(output_uri), key=lambda r: r["problem_id"])
