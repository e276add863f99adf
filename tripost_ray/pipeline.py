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

This module only sequences stages; the work of each lives in its own module.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from tripost_ray import progress, storage
from tripost_ray.config import JobConfig, load_config
from tripost_ray.ray_setup import init_ray
from tripost_ray.stages import Run, StageNotRun
from tripost_ray.tasks import Problem, Task, get_task, load_problems
from tripost_ray.trajectory import TrainingExample, render_trajectory, Turn

log = logging.getLogger("tripost")

#: The environment variable that carries the key of the job's own teacher server.
TEACHER_KEY_ENV = "TRIPOST_TEACHER_KEY"
#: Fields of the train section the SFT warm-up does not use (it has its own, or no feedback).
SFT_OVERRIDDEN_TRAIN_FIELDS = ("learning_rate", "epochs", "feedback_weight")


# -------------------------------------------------------------------- problems


@dataclass
class Problems:
    train: list[Problem]
    sft: list[Problem]
    test: list[Problem]


def make_problems(task: Task, cfg: JobConfig) -> Problems:
    """Generate (or load) the problems of a job; deterministic under ``task.seed``."""
    tc = cfg.task
    # the SFT pool (a superset of the train problems) also supplies the gold examples of
    # rebalancing, so it exists even when the warm-up is skipped (a model fine-tuned
    # elsewhere): drawn only from the train problems, most gold examples would duplicate
    # terminal examples and be dropped
    n_gen = max(tc.n_train, cfg.sft.n_examples)
    if tc.train_file:
        pool = load_problems(task, tc.train_file, split="train")
    else:
        pool = task.generate(n_gen, "train", seed=tc.seed)
    if tc.test_file:
        test = load_problems(task, tc.test_file, split="test_seen")
    else:
        test = task.generate(tc.n_test_seen, "test_seen", seed=tc.seed) + task.generate(
            tc.n_test_unseen, "test_unseen", seed=tc.seed
        )
    return Problems(train=pool[: tc.n_train], sft=pool[: cfg.sft.n_examples], test=test)


def tokenizer_corpus(task: Task, problems: list[Problem], n_trajectories: int = 200, seed: int = 0) -> list[str]:
    """Text a tiny model's tokenizer is trained on: prompts, gold rationales, and whole
    self-improvement trajectories (a corrupted attempt, its scripted feedback, the update,
    the all-correct feedback), so the words of feedback sentences are single tokens too.
    Without them the model has to learn "Feedback" letter by letter in iteration 1."""
    import random

    from tripost_ray.feedback.synthetic import corrupt_numbers

    rng = random.Random(seed)
    corpus = [task.prompt(p) for p in problems] + [task.gold_rationale(p) for p in problems]
    for p in problems[:n_trajectories]:
        gold = task.gold_rationale(p)
        wrong = corrupt_numbers(gold, rng)
        fb = task.verify(p, wrong)
        fixed = task.improve(p, wrong, fb)
        turns = [Turn(wrong, fb.text), Turn(fixed, task.verify(p, fixed).text)]
        corpus.append(render_trajectory(p.question, turns))
    return corpus


def gold_sft_examples(task: Task, problems: list[Problem]) -> list[dict]:
    """Gold rationales without feedback, all tokens weight 1 (the SFT warm-up data)."""
    rows = []
    for p in problems:
        text = render_trajectory(p.question, [Turn(task.gold_rationale(p))])
        rows.append(TrainingExample(text=text, spans=((0, len(text), 1.0),), kind="gold", problem_id=p.id).to_dict())
    return rows


# ----------------------------------------------------------------------- stages


class Job:
    """One invocation of a TriPosT run; every public step is a resumable stage."""

    def __init__(self, cfg: JobConfig, *, force: bool = False):
        self.cfg = cfg
        self.task = get_task(cfg.task.name, **cfg.task.difficulty)
        self.run = Run(storage.join(storage.normalize(cfg.storage.path), cfg.run_name), force=force)

    # -- helpers
    def _stage(self, name: str, sections: tuple[str, ...], body, inputs: tuple[str, ...] = ()) -> dict:
        return self.run.stage(name, self.cfg.section_hash(*sections), body, inputs=inputs)

    # -- the job
    def problems(self) -> Problems:
        def body(url: str) -> dict:
            probs = make_problems(self.task, self.cfg)
            for split_name in ("train", "sft", "test"):
                storage.write_table(storage.join(url, f"{split_name}.parquet"), [p.to_dict() for p in getattr(probs, split_name)])
            return {"counts": {k: len(getattr(probs, k)) for k in ("train", "sft", "test")}}

        self._stage("problems", ("task", "sft"), body)
        url = self.run.url("problems")
        load = lambda name: [Problem.from_dict(r) for r in storage.read_table(storage.join(url, f"{name}.parquet"))]
        return Problems(train=load("train"), sft=load("sft"), test=load("test"))

    def initial_model(self, probs: Problems) -> str:
        from tripost_ray.models import prepare_model

        def body(url: str) -> dict:
            corpus = tokenizer_corpus(self.task, probs.sft) + [self.task.prompt(p) for p in probs.test]
            out = storage.join(url, "model")
            self._save_model(lambda local: prepare_model(self.cfg.model.source, self.cfg.model.tiny,
                                                         self.cfg.model.cache_dir, corpus=corpus, out_dir=local), out)
            return {"model": out, "source": self.cfg.model.source}

        return self._stage("model_init", ("model",), body, inputs=("problems",))["model"]

    def _save_model(self, build, url: str) -> None:
        """Build a model into a local folder, then publish it at ``url``."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tripost-model-") as tmp:
            build(tmp)
            storage.publish_dir(tmp, url)

    def sft(self, probs: Problems, model: str) -> tuple[str, str]:
        """Gold-rationale warm-up; returns (model, stage name)."""
        if self.cfg.sft.epochs <= 0:
            return model, "model_init"
        def body(url: str) -> dict:
            return self.train_stage(url, "sft", gold_sft_examples(self.task, probs.sft), model,
                                    learning_rate=self.cfg.sft.learning_rate, epochs=self.cfg.sft.epochs)

        # the warm-up brings its own epochs and learning rate and has no feedback tokens:
        # retuning those for the iterations must not invalidate it
        config_hash = self.cfg.section_hash("sft", "train", ignore={"train": SFT_OVERRIDDEN_TRAIN_FIELDS})
        return self.run.stage("sft", config_hash, body, inputs=("model_init",))["model"], "sft"

    def train_stage(self, url: str, stage: str, examples, model: str, **overrides) -> dict:
        """Train into ``<url>/model``; the per-step history goes to ``<url>/history.json``.

        The Ray Train run is named after the stage and its config hash: a stage killed
        midway resumes its own checkpoints, while a changed config starts a fresh run.
        """
        from tripost_ray.training import train

        run_name = f"{self.cfg.run_name}-{stage.replace('/', '-')}-{self.cfg.section_hash('train', 'sft')[:8]}"
        result = train(examples, model, storage.join(url, "model"), self.cfg.train, run_name=run_name,
                       storage_path=self.run.url("ray_train"), **overrides).to_dict()
        storage.write_json(storage.join(url, "history.json"), result.pop("history"))
        return {"model": storage.join(url, "model"), "train": result}

    def evaluate(self, t: int, model: str, probs: Problems, model_stage: str) -> dict:
        """Metrics on the test splits, plus one entry under ``extra`` per ``eval.extra_sets``."""
        from tripost_ray.evaluate import evaluate_model

        def body(url: str) -> dict:
            metrics = evaluate_model(model, self.cfg.task.name, probs.test, self.cfg,
                                     output_uri=storage.join(url, "outputs"))
            extra = {}
            for name, options in self.cfg.eval.extra_sets.items():
                task_options = {**self.cfg.task.difficulty, **options}
                problems = get_task(self.cfg.task.name, **task_options).generate(
                    self.cfg.eval.n_extra, "test_seen", seed=self.cfg.task.seed)
                extra[name] = evaluate_model(model, self.cfg.task.name, problems, self.cfg,
                                             output_uri=storage.join(url, f"outputs_{name}"),
                                             task_options=task_options)
            return {"metrics": metrics, **({"extra": extra} if extra else {})}

        return self._stage(f"iter_{t}/eval", ("eval", "rollout"), body, inputs=(model_stage, "problems"))

    def rollouts(self, t: int, p: int, model: str, probs: Problems, model_stage: str) -> str:
        from tripost_ray.rollout import run_rollouts

        name = f"iter_{t}/pass_{p}/rollouts"

        def body(url: str) -> dict:
            out = storage.join(url, "data")
            summary = run_rollouts(
                probs.train, model, self.cfg.task.name, self.cfg.rollout, out,
                self_improve=t > 1, temperature=self.cfg.rollout.temperature,
                seed=self.cfg.rollout.seed + 1000 * t + p, task_options=self.cfg.task.difficulty,
            )
            return {"data": out, "summary": summary.to_dict()}

        self._stage(name, ("rollout",), body, inputs=(model_stage, "problems"))
        return name

    def editing(self, t: int, p: int, rollout_stage: str) -> str:
        from tripost_ray.feedback.pool import run_editing

        name = f"iter_{t}/pass_{p}/editing"

        def body(url: str) -> dict:
            rows = storage.read_table(self.run.manifests[rollout_stage]["data"])
            summary = run_editing(rows, self.cfg.task.name, self.cfg, url, cache_uri=self.run.url("cache"),
                                  task_options=self.cfg.task.difficulty)
            print(summary.table())
            return {"out": url, "summary": summary.to_dict()}

        self._stage(name, ("feedback", "improve", "editing"), body, inputs=(rollout_stage,))
        return name

    def postprocess(self, t: int, editing_stages: list[str], probs: Problems, model: str) -> str:
        from tripost_ray.feedback.pool import read_trajectories
        from tripost_ray.postprocess import postprocess

        name = f"iter_{t}/postprocess"

        def body(url: str) -> dict:
            trajectories = [t for stage in editing_stages for t in read_trajectories(self.run.manifests[stage]["out"])]
            # Gold rationales come from the larger SFT pool (a superset of the train problems):
            # the terminal examples of edited trajectories already repeat most train golds.
            gold = [(pr, self.task.gold_rationale(pr)) for pr in (probs.sft or probs.train)]
            count_tokens = token_counter(model)
            result = postprocess(trajectories, gold, self.cfg.postprocess, self.cfg.train.feedback_weight,
                                 count_tokens, seed=self.cfg.postprocess.seed + t)
            out = storage.join(url, "train.parquet")
            storage.write_table(out, [e.to_dict() for e in result.examples])
            return {"data": out, "n_examples": len(result.examples), "dropped": dict(result.dropped),
                    "counts": dict(result.counts), "n_trajectories": len(trajectories)}

        self._stage(name, ("postprocess", "train"), body, inputs=("problems", *editing_stages))
        return name

    def train_iteration(self, t: int, model: str, pp_stage: str, model_stage: str) -> str:
        name = f"iter_{t}/train"

        def body(url: str) -> dict:
            return self.train_stage(url, name, self.run.manifests[pp_stage]["data"], model)

        self._stage(name, ("train",), body, inputs=(pp_stage, model_stage))
        return name

    def usable_trajectories(self, editing_stages: list[str]) -> int:
        return sum(int(self.run.manifests[s]["summary"]["trajectories"]) for s in editing_stages)


def token_counter(model: str):
    """Token counts with the model's own tokenizer (for the 1024-token filter)."""
    from transformers import AutoTokenizer

    with storage.local_copy_dir(model) as local:
        tok = AutoTokenizer.from_pretrained(local)
    return lambda text: len(tok(text)["input_ids"])


# --------------------------------------------------------------------- the job


def run_job(cfg: JobConfig, *, force: bool = False) -> dict:
    """Run (or resume) a whole TriPosT job; returns the run summary.

    Everything a run needs is checked before any work (:func:`~tripost_ray.preflight.check_job`),
    the run folder is locked while the run writes it, and the stages already on disk are
    checked before the first write: a run refused for a changed config or a damaged stage
    leaves its folder as it found it.
    """
    from tripost_ray.preflight import check_job
    from tripost_ray.report import summarize, write_report
    from tripost_ray.metrics import metrics_endpoints
    from tripost_ray.runlock import run_lock
    from tripost_ray.tracking import Tracker

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
            from tripost_ray.feedback.providers import check_credentials

            check_credentials(cfg)
            check_existing_stages(cfg, force=force)
            # from here on the run writes: a refused run (above) leaves its folder untouched
            storage.write_text_atomic(job.run.url("config.yaml"), cfg.to_yaml())
            tracker = Tracker(cfg, job.run.root)
            job.run.on_stage = tracker.on_stage
            _run_stages(job)
        except BaseException:
            if tracker is not None:
                tracker.finish(None, status="FAILED")
            raise
        finally:
            if teacher is not None:
                teacher()
        summary = summarize(job.run.root, wall_s=time.time() - started)
        write_report(job.run.root, summary)
        tracker.finish(summary)
    return summary


def check_existing_stages(cfg: JobConfig, *, force: bool = False, stages=None) -> Job:
    """Walk ``stages(job)`` (default: a TriPosT job's) over the stages already on disk
    without running or writing any: a changed config or a damaged stage raises here, before
    the caller writes anything. Returns the checking job (``run.manifests``: what it found)."""
    check = Job(cfg, force=force)
    check.run.check_only = True
    try:
        (stages or _run_stages)(check)
    except StageNotRun:
        pass
    return check


def _run_stages(job: Job) -> None:
    """The stages of a job in order (each skipped when already complete)."""
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
        n_examples = job.run.manifests[pp]["n_examples"]
        if n_examples == 0 or n_examples < cfg.postprocess.min_new_examples:
            log.warning("iteration %d yielded %d examples (< postprocess.min_new_examples=%d): stopping early",
                        t, n_examples, cfg.postprocess.min_new_examples)
            break
        trained = job.train_iteration(t, model, pp, model_stage)
        model, model_stage = job.run.manifests[trained]["model"], trained
        if cfg.eval.every_iteration or t == cfg.iterations:
            job.evaluate(t, model, probs, model_stage)


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


# ------------------------------------------------------------------------- CLI


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)


def main_run(args) -> int:
    """``tripost run CONFIG [-o key=value ...] [--dry-run] [--force]``."""
    setup_logging()
    cfg = load_config(args.config, args.override)
    print("# resolved config\n" + cfg.to_yaml())
    if args.dry_run:
        from tripost_ray.plan import print_plan
        from tripost_ray.preflight import check_job

        check_job(cfg)
        print_plan(cfg)
        return 0
    from tripost_ray.report import format_summary

    summary = run_job(cfg, force=args.force)
    print(format_summary(summary))
    return 0
