"""The TriPosT job: SFT warm-up, then T iterations of rollouts, editing, post-processing,
weighted training and evaluation, each a resumable stage of one run folder.

Layout of a run (``<storage.path>/<run_name>/``)::

    config.yaml                     the resolved config of the latest invocation
    _LOCK.json                      held while a run writes the folder (runlock.py)
    problems/                       train / test problems (Parquet)
    model_init/model/               the starting model (HF format)
    sft/model/                      after the gold-rationale warm-up (when enabled)
    iter_0/eval/                    the starting model's evaluation
    iter_<t>/pass_<p>/rollouts/     the small model's outputs
    iter_<t>/pass_<p>/editing/      edited trajectories + failures (dead letters)
    iter_<t>/postprocess/           weighted single-turn training examples
    iter_<t>/train/model/           the model of iteration t
    iter_<t>/eval/                  its evaluation
    cache/                          the content-addressed LLM response cache
    report.{json,md,html}

This module only composes stages: :class:`Job` has one method per stage (its spec from
:mod:`tripost_ray.specs`, its work in its own module), and :func:`tripost_stages` /
:func:`gold_sft_stages` put them in order; :func:`run_job` runs a composition with the
checks, lock, teacher, tracking and report every job gets.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable

from tripost_ray import progress, storage
from tripost_ray.config import JobConfig
from tripost_ray.models import token_counter
from tripost_ray.ray_setup import init_ray
from tripost_ray.specs import (EditingOutput, EvalOutput, JobSpecs, ModelInitOutput, PostprocessOutput,
                               ProblemsOutput, RolloutOutput, StageOutput, StageSpec, TaskSpec, TrainOutput)
from tripost_ray.stages import Run, StageNotRun
from tripost_ray.tasks.datasets import Problems, gold_rows_for_tokens, gold_sft_examples, make_problems, tokenizer_corpus

log = logging.getLogger("tripost")

#: The environment variable that carries the key of the job's own teacher server.
TEACHER_KEY_ENV = "TRIPOST_TEACHER_KEY"


class Job:
    """One invocation of a TriPosT run; every public step is a resumable stage.

    Each stage gets its typed spec from :class:`~tripost_ray.specs.JobSpecs` (its hash is
    the spec's) and returns its typed output, which is what its manifest holds.
    """

    def __init__(self, cfg: JobConfig, *, force: bool = False):
        self.cfg = cfg
        self.specs = JobSpecs(cfg)
        self.task = self.specs.task.build()
        self.run = Run(storage.join(storage.normalize(cfg.storage.path), cfg.run_name), force=force)

    def _stage(self, name: str, spec: StageSpec, body: Callable[[str], StageOutput], produces: type[StageOutput],
               inputs: tuple[str, ...] = ()):
        # unset optional fields stay out of the manifest (readers test for keys, e.g. report.summarize)
        manifest = self.run.stage(name, spec.config_hash(), lambda url: body(url).model_dump(exclude_none=True),
                                  inputs=inputs)
        return produces.model_validate(manifest)

    def model_url(self, stage: str) -> str:
        """Where a stage that leaves a model writes it."""
        return self.run.url(stage, "model")

    def output(self, name: str, produces: type[StageOutput]):
        """The typed output of a stage that has run (or was found finished)."""
        return produces.model_validate(self.run.manifests[name])

    # -- the job
    def problems(self) -> Problems:
        spec = self.specs.problems()

        def body(url: str) -> ProblemsOutput:
            return ProblemsOutput(counts=make_problems(self.task, spec.task, spec.n_sft).write(url))

        self._stage("problems", spec, body, ProblemsOutput)
        return Problems.read(self.run.url("problems"))

    def initial_model(self, probs: Problems) -> str:
        from tripost_ray.models import prepare_model

        spec = self.specs.model_init()

        def body(url: str) -> ModelInitOutput:
            corpus = tokenizer_corpus(self.task, probs.sft) + [self.task.prompt(p) for p in probs.test]
            out = self.model_url("model_init")
            with tempfile.TemporaryDirectory(prefix="tripost-model-") as tmp:
                prepare_model(spec.source, spec.tiny, spec.cache_dir, corpus=corpus, out_dir=tmp)
                storage.publish_dir(tmp, out)
            return ModelInitOutput(model=out, source=spec.source)

        return self._stage("model_init", spec, body, ModelInitOutput, inputs=("problems",)).model

    def sft(self, probs: Problems, model: str) -> tuple[str, str]:
        """Gold-rationale warm-up; returns (model, stage name)."""
        if self.cfg.sft.epochs <= 0:
            return model, "model_init"
        spec = self.specs.sft()
        body = lambda url: self.train_stage(url, "sft", spec, gold_sft_examples(self.task, probs.sft), model)
        return self._stage("sft", spec, body, TrainOutput, inputs=("model_init",)).model, "sft"

    def train_stage(self, url: str, stage: str, spec, examples, model: str, **extra) -> TrainOutput:
        """Train into ``<url>/model``; the per-step history goes to ``<url>/history.json``.

        The Ray Train run is named after the stage and its spec's hash: a stage killed
        midway resumes its own checkpoints, while a changed config starts a fresh run.
        """
        from tripost_ray.training import train

        run_name = f"{self.cfg.run_name}-{stage.replace('/', '-')}-{spec.config_hash()[:8]}"
        result = train(examples, model, self.model_url(stage), spec.train, run_name=run_name,
                       storage_path=self.run.url("ray_train")).to_dict()
        storage.write_json(storage.join(url, "history.json"), result.pop("history"))
        return TrainOutput(model=self.model_url(stage), train=result, **extra)

    def evaluate(self, t: int, model: str, probs: Problems, model_stage: str) -> EvalOutput:
        """Metrics on the test splits, plus one entry under ``extra`` per ``eval.extra_sets``."""
        from tripost_ray.evaluate import evaluate_model

        spec = self.specs.eval()

        def body(url: str) -> EvalOutput:
            metrics = evaluate_model(model, probs.test, spec.generation, output_uri=storage.join(url, "outputs"),
                                     verification_per_split=spec.eval.verification_per_split)
            extra = {}
            for name, options in spec.eval.extra_sets.items():
                task = TaskSpec(name=spec.generation.task.name, options={**spec.generation.task.options, **options})
                problems = task.build().generate(spec.eval.n_extra, "test_seen", seed=spec.task_seed)
                extra[name] = evaluate_model(model, problems, spec.generation.model_copy(update={"task": task}),
                                             output_uri=storage.join(url, f"outputs_{name}"))
            return EvalOutput(metrics=metrics, extra=extra or None)

        return self._stage(f"iter_{t}/eval", spec, body, EvalOutput, inputs=(model_stage, "problems"))

    def rollouts(self, t: int, p: int, model: str, probs: Problems, model_stage: str) -> str:
        from tripost_ray.rollout import run_rollouts

        name = f"iter_{t}/pass_{p}/rollouts"
        spec = self.specs.rollouts(t, p)

        def body(url: str) -> RolloutOutput:
            out = storage.join(url, "data")
            return RolloutOutput(data=out, summary=run_rollouts(probs.train, model, spec, out).to_dict())

        self._stage(name, spec, body, RolloutOutput, inputs=(model_stage, "problems"))
        return name

    def editing(self, t: int, p: int, rollout_stage: str) -> str:
        """FBK/IMP on one pass's rollouts, with what is left of the job's budget."""
        from tripost_ray.feedback.pool import run_editing

        name = f"iter_{t}/pass_{p}/editing"
        spec = self.specs.editing()

        def body(url: str) -> EditingOutput:
            rows = storage.read_table(self.output(rollout_stage, RolloutOutput).data)
            budget = self.budget_left()
            summary = run_editing(rows, spec, url, cache_uri=self.editing_cache(), budget_usd=budget)
            print(summary.table())
            return EditingOutput(out=url, summary=summary.to_dict(), budget_usd=budget)

        self._stage(name, spec, body, EditingOutput, inputs=(rollout_stage,))
        return name

    def editing_cache(self) -> str | None:
        """The response cache: ``editing.cache_uri``, else the run's own ``cache/`` (None when off)."""
        editing = self.cfg.editing
        return (editing.cache_uri or self.run.url("cache")) if editing.cache else None

    def budget_left(self) -> float | None:
        """``editing.max_usd`` minus what every editing stage of this run has spent so far
        (finished stages of earlier invocations included: the budget is the job's)."""
        if self.cfg.editing.max_usd is None:
            return None
        spent = sum(EditingOutput.model_validate(m).cost_usd for name, m in self.run.manifests.items()
                    if name.endswith("/editing"))
        return max(0.0, self.cfg.editing.max_usd - spent)

    def postprocess(self, t: int, editing_stages: list[str], probs: Problems, model: str) -> str:
        from tripost_ray.feedback.pool import read_trajectories
        from tripost_ray.postprocess import postprocess

        name = f"iter_{t}/postprocess"
        spec = self.specs.postprocess(t)

        def body(url: str) -> PostprocessOutput:
            trajectories = [tr for stage in editing_stages
                            for tr in read_trajectories(self.output(stage, EditingOutput).out)]
            # Gold rationales come from the larger SFT pool (a superset of the train problems):
            # the terminal examples of edited trajectories already repeat most train golds.
            gold = [(pr, self.task.gold_rationale(pr)) for pr in (probs.sft or probs.train)]
            result = postprocess(trajectories, gold, spec.postprocess, token_counter(model), seed=spec.seed)
            out = storage.join(url, "train.parquet")
            storage.write_table(out, [e.to_dict() for e in result.examples])
            return PostprocessOutput(data=out, n_examples=len(result.examples), dropped=dict(result.dropped),
                                     counts=dict(result.counts), n_trajectories=len(trajectories))

        self._stage(name, spec, body, PostprocessOutput, inputs=("problems", *editing_stages))
        return name

    def train_iteration(self, t: int, model: str, pp_stage: str, model_stage: str) -> str:
        name = f"iter_{t}/train"
        spec = self.specs.train()
        body = lambda url: self.train_stage(url, name, spec, self.output(pp_stage, PostprocessOutput).data, model)
        self._stage(name, spec, body, TrainOutput, inputs=(pp_stage, model_stage))
        return name

    def gold_train_iteration(self, t: int, target_tokens: int, model: str, probs: Problems, model_stage: str) -> str:
        """The gold-SFT baseline's iteration ``t``: gold rationales of the train problems for
        ``target_tokens`` training tokens (over ``train.epochs`` epochs)."""
        name = f"iter_{t}/train"
        spec = self.specs.train(target_tokens=target_tokens)

        def body(url: str) -> TrainOutput:
            per_epoch = int(target_tokens / spec.train.epochs)
            rows = gold_rows_for_tokens(self.task, probs.train, per_epoch, spec.train.seed + t, token_counter(model))
            return self.train_stage(url, name, spec, rows, model, n_examples=len(rows), target_tokens=target_tokens)

        self._stage(name, spec, body, TrainOutput, inputs=(model_stage, "problems"))
        return name

    def usable_trajectories(self, editing_stages: list[str]) -> int:
        return sum(self.output(s, EditingOutput).trajectories for s in editing_stages)

    def final_model(self) -> str:
        """The model of the latest stage that trained one (or the starting model)."""
        names = [n for n in self.run.manifests if n in ("model_init", "sft") or n.endswith("/train")]
        return self.output(names[-1], TrainOutput if names[-1] != "model_init" else ModelInitOutput).model


# --------------------------------------------------------------------- the job


def run_job(cfg: JobConfig, *, force: bool = False, stages: Callable[[Job], None] | None = None) -> dict:
    """Run (or resume) a whole job; returns the run summary.

    ``stages`` composes the job's stages (default: TriPosT, :func:`tripost_stages`; the
    experiment's baseline arm passes its own composition of the same stages). Everything a
    run needs is checked before any work (:func:`~tripost_ray.preflight.check_job`), the
    run folder is locked while the run writes it, and the stages already on disk are
    checked before the first write: a run refused for a changed config or a damaged stage
    leaves its folder as it found it. The summary's ``model`` is the last model trained.
    """
    from tripost_ray.metrics import metrics_endpoints
    from tripost_ray.preflight import check_job
    from tripost_ray.report import summarize, write_report
    from tripost_ray.runlock import run_lock
    from tripost_ray.tracking import Tracker

    stages = stages or tripost_stages
    check_job(cfg)
    progress.configure(cfg.progress)
    job = Job(cfg, force=force)
    with run_lock(job.run.root, cfg.storage):
        started = time.time()
        init_ray(cfg.ray)
        log.info("live metrics (Prometheus): %s", " ".join(metrics_endpoints()))
        teacher = _start_teacher_if_enabled(cfg, job.run.root)
        tracker = None
        try:
            check_existing_stages(cfg, force=force, stages=stages)
            # from here on the run writes: a refused run (above) leaves its folder untouched
            storage.write_text_atomic(job.run.url("config.yaml"), cfg.to_yaml())
            tracker = Tracker(cfg, job.run.root)
            job.run.on_stage = tracker.on_stage
            stages(job)
        except BaseException:
            if tracker is not None:
                tracker.finish(None, status="FAILED")
            raise
        finally:
            if teacher is not None:
                teacher()
        summary = summarize(job.run.root, wall_s=time.time() - started)
        summary["model"] = job.final_model()
        write_report(job.run.root, summary)
        tracker.finish(summary)
    return summary


def check_existing_stages(cfg: JobConfig, *, force: bool = False,
                          stages: Callable[[Job], None] | None = None) -> Job:
    """Walk ``stages(job)`` (default: TriPosT's) over the stages already on disk without
    running or writing any: a changed config or a damaged stage raises here, before the
    caller writes anything. Returns the checking job (``run.manifests``: what it found)."""
    check = Job(cfg, force=force)
    check.run.check_only = True
    try:
        (stages or tripost_stages)(check)
    except StageNotRun:
        pass
    return check


def tripost_stages(job: Job) -> None:
    """TriPosT: problems, model, SFT, then per iteration rollouts and editing (in passes
    until enough trajectories), post-processing, training and evaluation."""
    cfg = job.cfg
    probs = job.problems()
    model = job.initial_model(probs)
    model, model_stage = job.sft(probs, model)
    if cfg.eval.initial:
        job.evaluate(0, model, probs, model_stage)
    for t in range(1, cfg.iterations + 1):
        editing_stages = []
        for p in range(cfg.rollout.max_passes):
            r = job.rollouts(t, p, model, probs, model_stage)
            editing_stages.append(job.editing(t, p, r))
            target = cfg.rollout.target_trajectories
            if target is None or job.usable_trajectories(editing_stages) >= target:
                break
        pp = job.postprocess(t, editing_stages, probs, model)
        n_examples = job.output(pp, PostprocessOutput).n_examples
        if n_examples == 0 or n_examples < cfg.postprocess.min_new_examples:
            log.warning("iteration %d yielded %d examples (< postprocess.min_new_examples=%d): stopping early",
                        t, n_examples, cfg.postprocess.min_new_examples)
            break
        trained = job.train_iteration(t, model, pp, model_stage)
        model, model_stage = job.output(trained, TrainOutput).model, trained
        if cfg.eval.every_iteration or t == cfg.iterations:
            job.evaluate(t, model, probs, model_stage)


def gold_sft_stages(token_targets: list[int]) -> Callable[[Job], None]:
    """The gold-SFT baseline: problems and model as TriPosT's, then per iteration ``t`` gold
    rationales for ``token_targets[t-1]`` training tokens, and the same evaluation."""

    def stages(job: Job) -> None:
        probs = job.problems()
        model, model_stage = job.initial_model(probs), "model_init"
        for t, target in enumerate(token_targets, start=1):
            model_stage = job.gold_train_iteration(t, target, model, probs, model_stage)
            model = job.output(model_stage, TrainOutput).model
            job.evaluate(t, model, probs, model_stage)

    return stages


def _start_teacher_if_enabled(cfg: JobConfig, run_root: str):
    """Start the Serve teacher and point unset provider base_urls at it; returns a stopper.

    The app is named and routed after the run folder: runs on one cluster share Serve's one
    HTTP proxy but never each other's teacher, and an app under this run's name can only be
    left over from a killed driver of this run (whose lock the caller now holds), so it is
    replaced rather than refused.
    """
    if not cfg.teacher.enabled:
        return None
    import hashlib
    import secrets

    from tripost_ray.feedback.providers import served_by_job_teacher
    from tripost_ray.serve.teacher import DEFAULT_MODEL, openai_base_url, start_teacher, stop_teacher

    served = [s for s in (cfg.feedback, cfg.improve) if served_by_job_teacher(cfg, s)]
    app = "teacher-" + hashlib.sha256(run_root.encode()).hexdigest()[:10]
    # A fresh key per invocation: the teacher checks it like a hosted API would, and the
    # providers read it from the driver's environment like any other key (it is never stored).
    os.environ[TEACHER_KEY_ENV] = secrets.token_urlsafe(24)
    root = start_teacher(cfg.task.name, host=cfg.teacher.host, port=cfg.teacher.port,
                         latency_s=cfg.teacher.latency_s, faults=cfg.teacher.faults or None,
                         api_key=os.environ[TEACHER_KEY_ENV], task_options=cfg.task.difficulty,
                         models=sorted({s.model for s in served}) or [DEFAULT_MODEL],
                         max_body_bytes=cfg.teacher.max_body_bytes, name=app, route_prefix=f"/{app}",
                         replace_existing=True)
    for section in served:
        section.base_url = openai_base_url(root) if section.provider == "openai" else root
        section.api_key_env = TEACHER_KEY_ENV
    return lambda: stop_teacher(app)
