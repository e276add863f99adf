"""One typed configuration for a TriPosT job.

Every default of the system lives in this file and nowhere else: stages receive their
section of a validated :class:`JobConfig` and never invent values of their own. A job is
a YAML file plus dotted ``-o key=value`` overrides; unknown keys and bad values fail
before any work starts, with an error that names the field and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job configuration that cannot be used; the message names the field."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- task


class TaskConfig(Section):
    """Which task, and how many problems of each split are generated (or loaded)."""

    name: str = Field("multistep_arithmetic", description="Task name, see tripost_ray.tasks.TASKS.")
    n_train: int = Field(1000, ge=1, description="Training problems (seen difficulty).")
    n_test_seen: int = Field(200, ge=0, description="Test problems of the seen difficulty.")
    n_test_unseen: int = Field(200, ge=0, description="Test problems of the unseen difficulty.")
    seed: int = Field(0, description="Seed of problem generation; splits never overlap.")
    train_file: str | None = Field(
        None, description="Optional JSON/JSONL problem file (fsspec URL) used instead of generated training problems."
    )
    test_file: str | None = Field(
        None, description="Optional JSON/JSONL problem file (fsspec URL) used instead of the generated test splits."
    )
    difficulty: dict[str, Any] = Field(
        default_factory=dict,
        description="Task options, e.g. seen_group_sizes, seen_nestings, operand_range (arithmetic); seen_sizes (word "
        "sorting); seen_steps, unseen_steps, years (date understanding); seen_objects, unseen_objects (logical deduction).",
    )


# -------------------------------------------------------------------------- model


class TinyModelConfig(Section):
    """A from-scratch LLaMA-architecture model for CPU machines and tests."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_position_embeddings: int = Field(1024, ge=64)
    tokenizer: Literal["numeric", "numeric_spaced", "char", "bpe"] = Field(
        "numeric",
        description="numeric: integers and words as single tokens; numeric_spaced: the same with one leading space "
        "and a number's sign folded in (' -42' is one token; about half as many tokens); char: one token per "
        "character; bpe: trained BPE.",
    )
    bpe_vocab_size: int = Field(512, ge=64, description="Vocabulary size when tokenizer=bpe.")
    numeric_max_digits: int = Field(
        4, ge=1, le=6,
        description="numeric tokenizer: every integer 0 .. 10**d - 1 is one token even if unseen in the corpus; "
        "longer digit runs split into in-vocabulary pieces (never <unk>).",
    )
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and LM head (halves a large vocab's cost).")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(Section):
    """Where the small model comes from."""

    source: str = Field(
        "tiny",
        description="'tiny' (built from model.tiny), a local path, an fsspec URL, or a hub name.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    cache_dir: str = Field("~/.cache/tripost_ray/models", description="Local cache for models fetched from URLs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )


# ------------------------------------------------------------------------ rollout


class RolloutConfig(Section):
    """Small-model generation on a Ray Data actor pool."""

    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate; vllm: continuous batching, one engine per actor "
        "(installed by scripts/setup_env.sh; `pip install '.[vllm]'` on CUDA).")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(0.5, gt=0, description="Fractional on CPU so task stages still get a core.")
    torch_threads_per_actor: int | None = Field(None, ge=1, description="None: cores split evenly across actors.")
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(384, ge=1)
    temperature: float = Field(1.0, ge=0, description="Iteration-1 sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_passes: int = Field(5, ge=1, description="Passes with different seeds until enough data.")
    target_trajectories: int | None = Field(
        None, ge=1, description="Stop passing once this many usable trajectories exist (None: one pass per problem)."
    )
    self_improve_rounds: int = Field(3, ge=0, description="Max 'Updated Answer' rounds in self-improving inference.")
    max_actor_restarts: int = Field(
        3, ge=-1, description="Restarts of a dead generator actor (its batch is retried); -1: unlimited.")
    max_tasks_in_flight_per_actor: int = Field(
        1, ge=1, description="Batches queued per actor; 1 spreads long generation batches evenly over the pool.")
    wait_for_actors_s: int = Field(
        600, ge=0, description="Start only once min_actors are up (so the first actor does not take every "
        "batch); fails if they are not up in this time. 0: start with whatever is ready.")
    resources_per_actor: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each generator actor needs (e.g. to pin a node type).")
    vllm_cpu_kv_cache_gib: int = Field(1, ge=1, description="vllm on CPU: KV cache per actor, GiB (reserved as Ray memory for the actor).")
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm on GPU: share of the GPU's memory an actor's engine takes "
        "(lower it when num_gpus_per_actor < 1 puts several actors on one GPU).")
    seed: int = 0

    @model_validator(mode="after")
    def _pool_bounds(self) -> "RolloutConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self


# ---------------------------------------------------------------------- providers


class RateLimitConfig(Section):
    """Cluster-wide limits of one provider + model, enforced by a named Ray actor."""

    requests_per_minute: float | None = Field(
        None, gt=0, description="RPM; requests are spaced 60/RPM seconds apart after the first `burst`."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="TPM over a sliding 60 s window, charged with the usage each reply reports."
    )
    max_in_flight: int | None = Field(None, ge=1, description="Requests in flight at once, cluster-wide.")
    burst: int = Field(
        1, ge=1, description="Requests that may start back to back before RPM spacing applies (1: strictly even)."
    )


class ProviderConfig(Section):
    """One FBK or IMP endpoint."""

    provider: Literal["scripted", "openai", "anthropic"] = "scripted"
    model: str = Field("scripted", description="Model name sent to the endpoint.")
    base_url: str | None = Field(None, description="Override the SDK's endpoint (vLLM, Ray Serve, the teacher).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key (default OPENAI_API_KEY / ANTHROPIC_API_KEY)."
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] = Field(default_factory=list)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    parse_retries: int = Field(
        1, ge=0, description="Extra asks after a malformed or empty reply (on top of max_retries for API errors)."
    )
    few_shot: int = Field(3, ge=0, description="Few-shot examples in LLM prompts (built from the task's gold rationales).")
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)


class Price(Section):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class EditingConfig(Section):
    """The async editing pool that runs FBK/IMP conversations."""

    max_improve_rounds: int = Field(5, ge=0)
    num_actors: int = Field(1, ge=1)
    concurrency_per_actor: int = Field(16, ge=1)
    num_cpus_per_actor: float = Field(0.25, ge=0)
    max_actor_restarts: int = Field(2, ge=0, description="Restarts of a crashed pool actor; its edits are retried.")
    cache: bool = Field(True, description="Content-addressed response cache under <storage>/cache.")
    verify_direct_correct: bool = Field(
        False,
        description="Send right, consistent model outputs through FBK too (the paper does not): a right answer "
        "reached by wrong steps is then edited, not taught as correct. Free with a scripted FBK.",
    )
    cache_uri: str | None = Field(None, description="Cache location (fsspec URL); None: the run's own cache/ folder.")
    max_usd: float | None = Field(
        None, ge=0, description="The job's budget in USD, across passes, iterations and resumes (spent money is read "
        "from the editing manifests); calls past it end as over_budget.")
    prices: dict[str, Price] = Field(
        default_factory=lambda: {
            "scripted": Price(),
            "tripost-teacher": Price(),  # the project's own teacher server: free
            "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.60),
            "gpt-4o": Price(input_per_mtok=2.5, output_per_mtok=10.0),
            "claude-3-5-haiku-latest": Price(input_per_mtok=0.8, output_per_mtok=4.0),
            "claude-sonnet-4-5": Price(input_per_mtok=3.0, output_per_mtok=15.0),
        },
        description="Price table keyed by model name.",
    )


# -------------------------------------------------------------------- postprocess


class PostprocessConfig(Section):
    """Filters, the split into single-turn examples, and rebalancing."""

    feedback_weight: float = Field(1.5, ge=0, description="w: loss weight of tokens from the first 'Feedback:' on.")
    rebalance_ratio: float = Field(1.5, description="r; <= 0 turns rebalancing off.")
    first_attempt_weight: float = Field(
        1.0, ge=0, description="Loss weight of the wrong first attempt of a self-improvement example (after "
        "'Answer:', up to its feedback); 0 trains the feedback and the update without training the model to "
        "repeat its mistake (an ablation beyond the paper, which weights it 1).")
    max_attempt_words: int = Field(512, ge=1)
    max_example_tokens: int = Field(1024, ge=1)
    min_new_examples: int = Field(8, ge=0, description="Early stop when an iteration yields fewer examples.")
    seed: int = 0


# -------------------------------------------------------------------------- train


class TrainConfig(Section):
    """Weighted fine-tuning on Ray Train + DeepSpeed."""

    epochs: float = Field(4.0, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.2, ge=0, le=1)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    max_seq_len: int = Field(1024, ge=16)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: only at the end of training.")
    max_failures: int = Field(2, ge=0)
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    torch_threads_per_worker: int | None = Field(
        None, ge=1, description="Intra-op threads of each training worker (None: max(1, floor(cpus_per_worker))).")
    length_bucket_window: int = Field(
        16, ge=1,
        description="Length bucketing: examples are shuffled, then sorted by length within windows of this many "
        "global batches (less padding), and the batches of a window are shuffled again.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    checkpoints_to_keep: int | None = Field(
        2, ge=1, description="Checkpoints kept in storage per run (None: all); the latest is always kept.")

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "feedback_weight" in data:
            raise ValueError("feedback_weight moved to postprocess.feedback_weight (post-processing writes the "
                             "weights into the examples; the trainer only reads them)")
        return data


class SftConfig(Section):
    """The gold-rationale warm-up that makes the starting model (TRIPOST.md: "M fine-tuned
    on gold rationales"). It uses the train section's trainer settings, with its own
    epochs and learning rate; a from-scratch model needs far more than lr 1e-6."""

    epochs: float = Field(4.0, ge=0, description="0 skips the warm-up (the model is already fine-tuned).")
    learning_rate: float = Field(1e-3, gt=0)
    n_examples: int = Field(1000, ge=1, description="Gold rationales (train split) used for the warm-up.")


# --------------------------------------------------------------------------- eval


class EvalConfig(Section):
    """Evaluation with self-improving inference."""

    self_improve_rounds: int = Field(3, ge=0)
    max_new_tokens: int = Field(384, ge=1)
    batch_size: int = Field(64, ge=1)
    every_iteration: bool = True
    initial: bool = Field(True, description="Evaluate the starting model (iteration 0).")
    extra_sets: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named extra test sets, each the task's seen-split generator under other task options, e.g. "
        "{bbh_style: {seen_group_sizes: [4], seen_nestings: ['2']}}; each set gets its own metrics.",
    )
    n_extra: int = Field(100, ge=1, description="Problems per extra test set.")
    verification_per_split: int = Field(
        50, ge=0, description="Verification probe (tripost_ray/verification.py): up to this many of the model's own "
        "wrong first attempts and as many gold attempts per split, teacher-forced, and the feedback the model writes "
        "on each judged. 0: off.")


# ------------------------------------------------------------------------ teacher


class TeacherConfig(Section):
    """The project's own teacher server (Ray Serve), started by the job when enabled.

    It answers FBK/IMP prompts over the OpenAI and Anthropic wire formats with the task's
    scripted verifier and improver, so a run without API keys still exercises the same
    client path as a hosted LLM. Providers whose ``base_url`` is unset are pointed at it.
    """

    enabled: bool = False
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8123, ge=1, le=65535)
    latency_s: float = Field(0.0, ge=0, description="Added latency per request (benchmarks).")
    faults: str = Field("", description="Injected fault rates, e.g. '429=0.2,500=0.05' (tests).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies are refused (400).")


# -------------------------------------------------------------------------- serve


class ServeConfig(Section):
    """``tripost serve model``: a trained model behind the OpenAI API, answering with
    self-improving inference (:mod:`tripost_ray.serve.model`).

    It decodes as ``tripost eval`` does, with its own engine choice: dtype and per-replica
    torch threads are the model and rollout sections', and a request's defaults are the eval
    section's (``self_improve_rounds``, ``max_new_tokens``, greedy). No stage hashes this section.
    """

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vllm where it is installed, else hf. A server starts its engine once, so "
        "vLLM's start-up (the reason the quickstart's short stages keep hf) is paid once for every request.")
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise (then a key is needed).")
    port: int = Field(8124, ge=1, le=65535)
    model_name: str = Field("tripost-model", min_length=1, description="The model name requests must send.")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(
        None, ge=1, description="Autoscaling between min and max replicas on ongoing requests. None: one replica per "
        "GPU of the cluster when replicas take GPUs, else min_replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target per replica.")
    num_gpus_per_replica: float | None = Field(
        None, ge=0, description="None: 1 where the Ray cluster has GPUs (one replica per GPU), else 0.")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica holds at once (queued or batched).")
    max_batch_size: int = Field(
        16, ge=1, description="Requests of many clients answered by one engine call (a round of every request in it "
        "batched together; vLLM schedules them continuously).")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits for more requests.")
    max_rounds_limit: int = Field(8, ge=0, description="The largest round limit a request may ask for.")
    max_tokens_limit: int = Field(2048, ge=1, description="The largest max_tokens (per round) a request may ask for.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies are refused (400).")

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeConfig":
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


# ------------------------------------------------------------------------ storage


class StorageConfig(Section):
    """Where runs live: any fsspec URL (local directory, s3://, gs://, memory://)."""

    path: str = Field("./runs", description="Root of all runs.")
    lock_heartbeat_s: float = Field(
        30.0, gt=0, description="Object stores only: how often a run rewrites its lock file's heartbeat."
    )
    lock_stale_s: float = Field(
        300.0, gt=0, description="Object stores only: a run lock whose heartbeat is older than this is taken over."
    )

    @model_validator(mode="after")
    def _stale_after_missed_heartbeats(self) -> "StorageConfig":
        if self.lock_stale_s <= 2 * self.lock_heartbeat_s:
            raise ValueError(f"lock_stale_s ({self.lock_stale_s}) must be more than twice lock_heartbeat_s "
                             f"({self.lock_heartbeat_s}), or a live run's lock is taken over")
        return self


class RayConfig(Section):
    """How to reach (or start) Ray."""

    address: str | None = Field(None, description="None/'local': start a local Ray; 'auto' or ray://... to join one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all).")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs of a local Ray (None: all it detects; 0: none, e.g. to keep a GPU free)."
    )
    include_dashboard: bool = False
    log_to_driver: bool | None = Field(
        None, description="Stream the workers' stdout/stderr to the driver (False: only into Ray's log files; "
        "None: Ray's default, on unless RAY_LOG_TO_DRIVER=0)."
    )
    no_progress_timeout_s: float | None = Field(
        None, gt=0, description="Fail a Ray Data stage that makes no progress for this long."
    )


class TrackingConfig(Section):
    """Experiment tracking with MLflow (:mod:`tripost_ray.tracking`). Purely observational:
    no stage hashes this section, so changing it never invalidates a finished stage. (Live
    metrics need no settings: :mod:`tripost_ray.metrics` always exports through Ray.)"""

    mlflow: bool = Field(True, description="Log the run to MLflow (params, per-stage and per-step metrics, artifacts).")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://..., databricks, sqlite:///...). None: an embedded SQLite "
        "backend inside a local run folder (<run>/mlflow.db, artifacts in <run>/mlartifacts; `mlflow ui` opens it).")
    experiment: str = Field("tripost", min_length=1, description="MLflow experiment the run is logged under.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the MLflow run (team, ticket, ...).")
    http_timeout_s: int = Field(10, ge=1, description="Timeout of one request to a remote tracking server.")
    http_retries: int = Field(
        1, ge=0, description="Retries of a failed request to a remote tracking server; after that a warning and the "
        "run goes on without tracking.")


# ---------------------------------------------------------------------------- job


#: Sections an experiment's variant may override: the method, not what its arms share.
VARIANT_SECTIONS = ("rollout", "feedback", "improve", "teacher", "editing", "postprocess", "train")


class ExperimentConfig(Section):
    """``tripost experiment``: TriPosT against an equal-token gold-SFT baseline, from one
    shared SFT model, over several seeds (see :mod:`tripost_ray.experiment`)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="One TriPosT run and one baseline run per seed.")
    baseline: bool = Field(True, description="Run the arm that keeps fine-tuning on gold rationales.")
    variants: dict[str, dict[str, Any]] = Field(
        {}, description="Ablations: named TriPosT arms, each the job's settings with these dotted overrides "
        "(e.g. {w1: {postprocess.feedback_weight: 1.0}}), run for every seed from the same SFT model as "
        "'tripost_<name>'. Only the method's own sections may change: " + ", ".join(VARIANT_SECTIONS) + ".")
    variant_seeds: list[int] | None = Field(
        None, description="Seeds the variants run with (a subset of seeds; None: all of them): e.g. [0] screens "
        "every variant on one seed while tripost and the baseline get their mean and standard deviation.")

    @field_validator("variants")
    @classmethod
    def _variant_names_and_keys(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in variants.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"variant name {name!r}: use letters, digits and '_' (it names run folders)")
            if not overrides:
                raise ValueError(f"variant {name!r} overrides nothing: it would repeat the tripost arm")
            for dotted in overrides:
                if dotted.split(".", 1)[0] not in VARIANT_SECTIONS:
                    raise ValueError(f"variant {name!r}: {dotted!r} is not a setting a variant may change; "
                                     f"allowed: {', '.join(VARIANT_SECTIONS)} (every arm shares the task, "
                                     "the SFT model and the evaluation)")
        return variants

    @model_validator(mode="after")
    def _variant_seeds_are_seeds(self) -> "ExperimentConfig":
        if self.variant_seeds is not None and (not self.variant_seeds or set(self.variant_seeds) - set(self.seeds)):
            raise ValueError(f"variant_seeds {self.variant_seeds} must be a non-empty subset of seeds {self.seeds}")
        return self


class JobConfig(Section):
    """A whole TriPosT job."""

    run_name: str = Field("quickstart", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(3, ge=0, description="T: TriPosT iterations.")
    seed: int = 0
    progress: Literal["bars", "lines"] = Field(
        "bars", description="How the driver shows the progress of rollouts, editing, training steps and evaluation "
        "(tripost_ray.progress): bars: a progress bar per stage; lines: one log line per stage at start and end, "
        "for CI logs (--quiet). No stage hashes it.")
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    feedback: ProviderConfig = Field(default_factory=ProviderConfig)
    improve: ProviderConfig = Field(default_factory=ProviderConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    editing: EditingConfig = Field(default_factory=EditingConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: TaskConfig) -> TaskConfig:
        from tripost_ray.tasks import TASKS, get_task

        if task.name not in TASKS:
            raise ValueError(f"unknown task {task.name!r}; allowed: {sorted(TASKS)}")
        try:  # task options are checked by the task itself, before any work starts
            get_task(task.name, **task.difficulty)
        except (TypeError, ValueError) as err:
            raise ValueError(f"task.difficulty: {err}") from None
        return task

    @model_validator(mode="after")
    def _known_extra_sets(self) -> "JobConfig":
        from tripost_ray.tasks import get_task

        for name, options in self.eval.extra_sets.items():
            try:
                get_task(self.task.name, **{**self.task.difficulty, **options})
            except (TypeError, ValueError) as err:
                raise ValueError(f"eval.extra_sets.{name}: {err}") from None
        return self

    @model_validator(mode="after")
    def _valid_variants(self) -> "JobConfig":
        for name in self.experiment.variants:
            try:
                self.variant(name)
            except ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"experiment.variants.{name}: {problems}") from None
        return self

    # ------------------------------------------------------------------ helpers

    def variant(self, name: str) -> "JobConfig":
        """This config with experiment variant ``name``'s overrides applied (and no variants)."""
        data = self.model_dump(mode="json")
        data["experiment"]["variants"] = {}
        for dotted, value in self.experiment.variants[name].items():
            set_dotted(data, dotted, value)
        return JobConfig.model_validate(data)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what is printed at start and saved with the run)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------ loading


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted="a.b.c"`` in a raw config mapping,
    creating missing sections (validation happens later, on the whole mapping)."""
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {dotted!r} names no field")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key.sub=value`` overrides (values parsed as YAML scalars) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, value = item.split("=", 1)
        set_dotted(data, dotted, _parse_scalar(value))
    return data


def _section_fields(loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc`` (a section path, dict keys included), or None."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            if field is None:
                return None
            model = field.annotation
        elif get_origin(model) is dict:  # a key of e.g. editing.prices: step into the value type
            model = get_args(model)[1]
        else:
            return None
    if get_origin(model) is dict:
        return None
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else None


#: Fields that were replaced: an old job file names them, and the error says what to write instead.
REPLACED = {
    "editing.progress": "progress (top level): bars | lines; --quiet sets lines",
    "ray.data_progress_bars": "progress (top level): bars | lines; --quiet sets lines",
}


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and loc in REPLACED:
            msg = f"replaced by {REPLACED[loc]}"
        elif e["type"] == "extra_forbidden":
            allowed = _section_fields(tuple(e["loc"][:-1]))
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid job config:\n" + "\n".join(lines)


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Validate a raw mapping (plus overrides) into a :class:`JobConfig`."""
    raw = apply_overrides(copy.deepcopy(dict(data or {})), list(overrides or []))  # never edit the caller's dict
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_config_yaml(text: str | bytes, where: str) -> dict[str, Any]:
    """A job config's YAML text as a mapping (empty text: no settings); ``where`` names its
    file in the error."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{where}: a job config must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job YAML (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, not text
            raise ConfigError(f"cannot read config file {p}: {err}") from None
        data = parse_config_yaml(text, str(p))
    return build_config(data, overrides)
