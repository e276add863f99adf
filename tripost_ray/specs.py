"""What each stage is given and what it produces, as typed objects built in one place.

A stage never sees the whole :class:`~tripost_ray.config.JobConfig`. :class:`JobSpecs`
cuts the job's config into one frozen spec per stage kind, and each stage (and every Ray
actor it starts) receives only its spec. A stage's config hash is the hash of exactly
that spec, minus the fields listed in its ``RUNTIME_ONLY`` (locations, keys' variable names,
the budget), which steer how a stage runs but never what it computes. So retuning one
stage's settings invalidates that stage and what consumes it, and nothing else, with no
hand-written list of sections or overridden fields anywhere.

The ``*Output`` models are the typed manifests: what a stage writes into its
``_MANIFEST.json`` besides the bookkeeping of :mod:`tripost_ray.stages`, read back with
:meth:`tripost_ray.pipeline.Job.output`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from tripost_ray.config import (
    EditingConfig,
    EvalConfig,
    JobConfig,
    ModelConfig,
    PostprocessConfig,
    ProviderConfig,
    RolloutConfig,
    TaskConfig,
    TinyModelConfig,
    TrainConfig,
)


class StageSpec(BaseModel):
    """Base of every stage spec: frozen, strict, hashed as a whole except ``RUNTIME_ONLY``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Dotted fields that change how a stage runs, never what it computes.
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ()
    #: Dotted fields added after run folders were written, with their default: left out of
    #: the hash at that value, so an older run's stage still matches and resumes.
    ADDED_WITH_DEFAULT: ClassVar[dict[str, Any]] = {}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self._hashed(), sort_keys=True).encode()).hexdigest()[:16]

    def _hashed(self) -> dict[str, Any]:
        """The dumped spec without its runtime-only fields (nested specs' included)."""
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, StageSpec):
                data[name] = value._hashed()
        dropped = [*self.RUNTIME_ONLY, *(dotted for dotted, default in self.ADDED_WITH_DEFAULT.items()
                                         if _get_dotted(data, dotted) == default)]
        for dotted in dropped:
            *path, last = dotted.split(".")
            node = data
            for key in path:
                node = node[key]
            node.pop(last, None)
        return data


def _get_dotted(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data


class TaskSpec(StageSpec):
    """Which task, with its options: what every stage that builds a :class:`Task` needs."""

    name: str
    options: dict[str, Any] = {}

    def build(self):
        from tripost_ray.tasks import get_task

        return get_task(self.name, **self.options)


# ------------------------------------------------------------------------ specs


class ProblemsSpec(StageSpec):
    """The train, SFT and test problems of a job."""

    task: TaskConfig
    n_sft: int


class ModelInitSpec(StageSpec):
    """The starting model: built from ``tiny`` or fetched from ``source``."""

    RUNTIME_ONLY = ("cache_dir",)

    source: str
    tiny: TinyModelConfig
    cache_dir: str


class TrainSpec(StageSpec):
    """A weighted fine-tuning stage: the trainer's settings with this stage's learning rate
    and epochs already in them (the SFT warm-up brings its own), and, for the gold-SFT
    baseline, the training tokens its data is cut to."""

    train: TrainConfig
    target_tokens: int | None = None


class ActorPoolSpec(StageSpec):
    """The rollout actor pool (``rollout.*`` minus decoding): hashed, because the torch
    threads an actor gets follow from it, and threads can change a float's last bit."""

    min_actors: int
    max_actors: int
    num_gpus_per_actor: float
    num_cpus_per_actor: float
    torch_threads_per_actor: int | None
    max_actor_restarts: int
    max_tasks_in_flight_per_actor: int
    wait_for_actors_s: int
    resources_per_actor: dict[str, float]
    vllm_cpu_kv_cache_gib: int
    vllm_gpu_memory_utilization: float

    @classmethod
    def of(cls, rollout: RolloutConfig) -> "ActorPoolSpec":
        return cls(**{name: getattr(rollout, name) for name in cls.model_fields})


class GenerationSpec(StageSpec):
    """Small-model generation on the rollout actor pool: the pool, the model's load settings,
    and this stage's decoding (rollouts sample; evaluation is greedy with its own limits).
    The engine is hashed: HF and vLLM sample different texts from the same seeds."""

    RUNTIME_ONLY = ("cache_dir",)

    engine: Literal["hf", "vllm"]
    pool: ActorPoolSpec
    task: TaskSpec
    dtype: str
    cache_dir: str
    batch_size: int
    max_new_tokens: int
    max_rounds: int
    self_improve: bool
    temperature: float
    top_p: float
    seed: int

    @classmethod
    def build(cls, rollout: RolloutConfig, task: TaskSpec, *, self_improve: bool, temperature: float, seed: int,
              model: ModelConfig | None = None, batch_size: int | None = None, max_new_tokens: int | None = None,
              max_rounds: int | None = None) -> "GenerationSpec":
        """A spec from the rollout section (pool, top-p, and the limits unless given) and the
        model section's load settings (the defaults when ``model`` is None)."""
        model = model or ModelConfig()
        return cls(engine=rollout.engine, pool=ActorPoolSpec.of(rollout), task=task, dtype=model.dtype, cache_dir=model.cache_dir,
                   batch_size=batch_size or rollout.batch_size,
                   max_new_tokens=max_new_tokens or rollout.max_new_tokens,
                   max_rounds=rollout.self_improve_rounds if max_rounds is None else max_rounds,
                   self_improve=self_improve, temperature=temperature, top_p=rollout.top_p, seed=seed)


class EvalSpec(StageSpec):
    """An evaluation: greedy generation plus the extra test sets."""

    generation: GenerationSpec
    eval: EvalConfig
    task_seed: int


class EditingSpec(StageSpec):
    """The FBK/IMP editing pool. Where an endpoint lives, which variable holds its key,
    where the responses are cached and how much money is left are runtime matters: a run
    whose teacher moved to another port, or that raises its budget, keeps its finished
    stages (the model name, prompts and sampling settings are hashed)."""

    RUNTIME_ONLY = ("feedback.base_url", "feedback.api_key_env", "improve.base_url", "improve.api_key_env",
                    "editing.cache", "editing.cache_uri", "editing.max_usd", "run_name")

    run_name: str  # labels the live metrics
    task: TaskSpec
    feedback: ProviderConfig
    improve: ProviderConfig
    editing: EditingConfig
    seed: int


class PostprocessSpec(StageSpec):
    """Filters, splitting into weighted examples, rebalancing."""

    ADDED_WITH_DEFAULT = {"postprocess.first_attempt_weight": 1.0}

    postprocess: PostprocessConfig
    seed: int


# ---------------------------------------------------------------- the builder


class JobSpecs:
    """Every stage spec of a job, cut from its config in this one place."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.task = TaskSpec(name=cfg.task.name, options=cfg.task.difficulty)

    def problems(self) -> ProblemsSpec:
        return ProblemsSpec(task=self.cfg.task, n_sft=self.cfg.sft.n_examples)

    def model_init(self) -> ModelInitSpec:
        m = self.cfg.model
        return ModelInitSpec(source=m.source, tiny=m.tiny, cache_dir=m.cache_dir)

    def sft(self) -> TrainSpec:
        s = self.cfg.sft
        return TrainSpec(train=self.cfg.train.model_copy(update={"learning_rate": s.learning_rate, "epochs": s.epochs}))

    def train(self, target_tokens: int | None = None) -> TrainSpec:
        return TrainSpec(train=self.cfg.train, target_tokens=target_tokens)

    def rollouts(self, t: int, p: int) -> GenerationSpec:
        """Iteration ``t``, pass ``p``: sampled, self-improving from iteration 2 on."""
        r = self.cfg.rollout
        return GenerationSpec.build(r, self.task, model=self.cfg.model, self_improve=t > 1,
                                    temperature=r.temperature, seed=r.seed + 1000 * t + p)

    def eval(self) -> EvalSpec:
        """Greedy self-improving inference with the eval section's limits."""
        e = self.cfg.eval
        generation = GenerationSpec.build(self.cfg.rollout, self.task, model=self.cfg.model, batch_size=e.batch_size,
                                          max_new_tokens=e.max_new_tokens, max_rounds=e.self_improve_rounds,
                                          self_improve=e.self_improve_rounds > 0, temperature=0.0,
                                          seed=self.cfg.rollout.seed)
        return EvalSpec(generation=generation, eval=e, task_seed=self.cfg.task.seed)

    def editing(self) -> EditingSpec:
        c = self.cfg
        return EditingSpec(run_name=c.run_name, task=self.task, feedback=c.feedback, improve=c.improve, editing=c.editing, seed=c.seed)

    def postprocess(self, t: int) -> PostprocessSpec:
        return PostprocessSpec(postprocess=self.cfg.postprocess, seed=self.cfg.postprocess.seed + t)


# ------------------------------------------------------------------- outputs


class StageOutput(BaseModel):
    """Base of the typed manifests; the bookkeeping fields of a manifest are ignored here."""

    model_config = ConfigDict(extra="ignore")


class ProblemsOutput(StageOutput):
    counts: dict[str, int]


class ModelOutput(StageOutput):
    """Any stage that leaves a model: model_init, sft, iter_t/train."""

    model: str


class ModelInitOutput(ModelOutput):
    source: str


class TrainOutput(ModelOutput):
    train: dict[str, Any]
    n_examples: int | None = None  # the gold-SFT baseline makes its own data
    target_tokens: int | None = None


class EvalOutput(StageOutput):
    metrics: dict[str, Any]
    extra: dict[str, Any] | None = None


class RolloutOutput(StageOutput):
    data: str
    summary: dict[str, Any]


class EditingOutput(StageOutput):
    out: str
    summary: dict[str, Any]
    budget_usd: float | None = None  # what was left of the job's editing.max_usd for this stage

    @property
    def cost_usd(self) -> float:
        return float(self.summary.get("cost_usd", 0.0))

    @property
    def trajectories(self) -> int:
        return int(self.summary["trajectories"])


class PostprocessOutput(StageOutput):
    data: str
    n_examples: int
    dropped: dict[str, int]
    counts: dict[str, int]
    n_trajectories: int
