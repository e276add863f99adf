"""Weighted fine-tuning on Ray Train (``TorchTrainer``) with DeepSpeed ZeRO.

The driver (:func:`train`) turns the examples into a Ray Dataset and starts a
``TorchTrainer``; every worker runs :func:`train_loop_per_worker`, a short driver of the
training recipe (``recipe.py``) with the DeepSpeed backend (``backends.py``):

1. reads the *whole* (small) dataset from ``ray.train.get_dataset_shard("train")`` (the
   dataset is not split: TriPosT's training sets are thousands of short texts, and a
   deterministic global batch plan is what makes restores exact and lets P ranks compute
   the same batches as one process; each rank then takes its slice of every global batch);
2. ``recipe.setup``: tokenizes it (char-span weights onto tokens, ``dataset.py``), plans
   the batches, builds the DeepSpeed engine (torch AdamW + warm-up/decay schedule,
   ``optim.py``; the config from typed fields, ``deepspeed_config.py``; ``engine.py``);
3. ``recipe.restore`` from ``ray.train.get_checkpoint()`` when Ray Train restarts the run
   (Ray Train V2 has no ``resume_from_checkpoint``), skipping the steps already taken;
4. ``recipe.train_step`` per step with the exact global weighted loss (``loss.py``), then
   ``recipe.maybe_checkpoint``: metrics through ``ray.train.report`` and a logger, and a
   DeepSpeed checkpoint from every rank every ``checkpoint_every_steps`` steps and at the
   end; then the hooks (:class:`FailureInjection`);
5. ``recipe.export``: a consolidated Hugging Face model + tokenizer (``export.py``).

Run identity: a run is (``storage_path``, ``run_name``). With ``resume=True`` an existing
run of that name continues from its latest checkpoint (a re-started driver, a re-run
pipeline); a spec file in the run folder makes sure that it is the *same* training
(model, output, hyper-parameters), and each worker checks the data fingerprint, so a
different job never resumes by accident. ``resume=False`` refuses an existing run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tripost_ray import progress
from tripost_ray.config import TrainConfig
from tripost_ray.ray_setup import init_ray
from tripost_ray.training.dataset import REQUIRED_COLUMNS, TrainingDataError, validate_row
from tripost_ray.training.deepspeed_config import (TrainSetupError, build_deepspeed_config, config_warnings,
                                                   resolve_precision)
from tripost_ray.training.recipe import StepRecord, WeightedFinetuneRecipe

log = logging.getLogger("tripost_ray.training")

SPEC_FILE = "tripost_train_spec.json"


class TrainingError(RuntimeError):
    """Training failed for good (after ``max_failures`` restores); checkpoints are kept."""


class RunExistsError(FileExistsError):
    """A fresh run (``resume=False``) was asked for, but the run folder already exists."""


@dataclass(frozen=True)
class FailureInjection:
    """Chaos hook for recovery tests and drills: SIGKILL rank ``rank``'s worker process
    ``delay_s`` seconds after optimizer step ``step`` (1-based), once: ``marker`` (a local
    file) records that it happened, so the restored attempt runs through.

    Ray Train V2 registers a reported checkpoint when its controller next polls the
    workers (every 2 s by default): a worker that dies sooner than that after a report can
    take the newest checkpoint's registration with it, and the run restores from the one
    before (still exact, just more steps redone). ``delay_s`` lets a test pin which
    checkpoint is restored."""

    step: int
    marker: str
    rank: int = 0
    delay_s: float = 0.0

    def after_step(self, record: StepRecord, rank: int) -> None:
        """The hook the worker calls after each step (and its checkpoint, if any)."""
        if record.step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"killed rank {rank} after step {record.step}\n")
        log.warning("failure injection: killing rank %d (pid %d) after step %d", rank, os.getpid(), record.step)
        time.sleep(self.delay_s)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    """What a training run produced (``history``: one dict per optimizer step)."""

    final_loss: float
    mean_loss: float
    steps: int
    tokens_trained: int
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    checkpoint_path: str | None = None
    model_path: str = ""
    run_name: str = ""
    restored_from_step: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ worker side


def _worker_threads(cfg: TrainConfig) -> int:
    return cfg.torch_threads_per_worker or max(1, int(math.floor(cfg.cpus_per_worker)))


def _load_rows_from_shard() -> list[dict]:
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False  # a small read; bars would only be noise
    shard = ray.train.get_dataset_shard("train")
    return [{k: row[k] for k in (*REQUIRED_COLUMNS, "problem_id") if k in row} for row in shard.iter_rows()]


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    import ray.train
    from ray.train import Checkpoint

    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """The per-worker training function run by ``TorchTrainer`` (see the module docstring)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from tripost_ray.storage import local_copy_dir

    logging.basicConfig(level=logging.INFO)
    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    torch.set_num_threads(_worker_threads(cfg))
    recipe = WeightedFinetuneRecipe(cfg, learning_rate=float(config["learning_rate"]),
                                    epochs=float(config["epochs"]), rank=ctx.get_world_rank(),
                                    world_size=ctx.get_world_size(), run_name=config["run_name"])
    with local_copy_dir(config["init_model"], what="init model folder") as model_dir:
        recipe.setup(_load_rows_from_shard(), model_dir, backend="deepspeed")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            recipe.restore(ckpt_dir)

    hooks = [FailureInjection(**config["inject_failure"])] if config.get("inject_failure") else []
    for step in range(recipe.start_step, recipe.total_steps):
        record = recipe.train_step(step)
        if recipe.rank == 0:
            progress.report_step(config.get("progress"), record.step, recipe.total_steps)
        recipe.maybe_checkpoint(record, _report)
        for hook in hooks:
            hook.after_step(record, recipe.rank)

    recipe.export(config["output_dir"])
    dist.barrier()
    if recipe.rank != 0:
        return None
    return {"history": [h.to_dict() for h in recipe.history], "tokens_trained": recipe.tokens_trained,
            "restored_from_step": recipe.restored_from}


# ------------------------------------------------------------------ driver side


def _storage(storage_path: str):
    """(path, pyarrow filesystem or None) for RunConfig; fsspec-only schemes are wrapped."""
    import pyarrow.fs

    from tripost_ray.storage import is_local, local_path

    if is_local(storage_path):
        return local_path(storage_path), None
    if storage_path.startswith("memory://"):
        raise TrainSetupError("storage_path memory:// lives in one process; Ray Train workers cannot share it "
                              "(use a local folder or a shared URL such as s3://, gs://)")
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
        return path, fs
    except (pyarrow.ArrowInvalid, ValueError):
        import fsspec.core

        ffs, path = fsspec.core.url_to_fs(storage_path)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(ffs))


def _run_spec(init_model: str, output_dir: str, cfg: TrainConfig, lr: float, epochs: float) -> dict:
    return {"init_model": init_model, "output_dir": output_dir, "learning_rate": lr, "epochs": epochs,
            "train": cfg.model_dump(mode="json")}


def _check_run_folder(path: str, fs, run_name: str, spec: dict, resume: bool) -> bool:
    """Refuse accidental resumes; record the spec of a new run. Returns whether it existed."""
    import pyarrow.fs

    fs = fs or pyarrow.fs.LocalFileSystem()
    run_dir = f"{path.rstrip('/')}/{run_name}"
    exists = fs.get_file_info(run_dir).type != pyarrow.fs.FileType.NotFound
    spec_path = f"{run_dir}/{SPEC_FILE}"
    if exists and not resume:
        raise RunExistsError(f"training run {run_name!r} already exists under the storage path; pass resume=True "
                             "to continue it or use a new run name")
    if exists and fs.get_file_info(spec_path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(spec_path) as f:
            old = json.loads(f.read().decode())
        if old != spec:
            diff = sorted(k for k in spec if old.get(k) != spec[k])
            raise RunExistsError(f"training run {run_name!r} exists with a different setup ({', '.join(diff)} "
                                 "differ); use a new run name")
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(spec_path) as f:
        f.write(json.dumps(spec, sort_keys=True).encode())
    return exists


def _as_dataset(examples):
    """A Ray Dataset from a Dataset, a list of ``TrainingExample.to_dict()`` rows, or a Parquet URL."""
    import ray.data

    if isinstance(examples, ray.data.Dataset):
        ds = examples
    elif isinstance(examples, str):
        path, fs = _storage(examples)
        ds = ray.data.read_parquet(path, filesystem=fs)
    elif isinstance(examples, list):
        if not examples:
            raise TrainingDataError("no training examples")
        for i, row in enumerate(examples):
            validate_row(row, i)
        ds = ray.data.from_items(examples)
    else:
        raise TypeError(f"examples must be a ray.data.Dataset, a list of dicts or a Parquet URL, "
                        f"got {type(examples).__name__}")
    ds.context.enable_progress_bars = False  # every worker reads the whole small set: bars would be noise
    # Materialize on the driver, before the workers hold their CPUs: a lazy read left for
    # the workers to trigger needs CPUs of its own and hangs a cluster the workers fill.
    ds = ds.materialize()
    names = set(ds.schema().names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TrainingDataError(f"training dataset lacks column(s) {missing}; "
                                f"expected TrainingExample.to_dict() columns {list(REQUIRED_COLUMNS)}")
    return ds


def train(examples, init_model: str, output_dir: str, cfg: TrainConfig, *, run_name: str, storage_path: str,
          learning_rate: float | None = None, epochs: float | None = None, resume: bool = True,
          inject_failure: FailureInjection | None = None) -> TrainResult:
    """Fine-tune ``init_model`` on weighted examples with Ray Train + DeepSpeed; export to ``output_dir``.

    ``examples``: a Ray Dataset, a list of ``TrainingExample.to_dict()`` rows, or a Parquet
    URL. ``learning_rate`` / ``epochs`` override ``cfg``'s (tests and benchmarks; the pipeline's
    SFT warm-up gets a ``cfg`` with its own already in it, :meth:`tripost_ray.specs.JobSpecs.sft`).
    ``output_dir`` (fsspec URL) receives a ``save_pretrained`` model + tokenizer. The run
    lives at ``storage_path``/``run_name`` (checkpoints, Ray Train state); see the module
    docstring for resume rules. Ray must be initialised (or is started locally).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    lr = float(learning_rate if learning_rate is not None else cfg.learning_rate)
    n_epochs = float(epochs if epochs is not None else cfg.epochs)
    if lr <= 0 or n_epochs <= 0:
        raise TrainSetupError(f"learning_rate ({lr}) and epochs ({n_epochs}) must be > 0")
    resolve_precision(cfg, cfg.use_gpu)
    build_deepspeed_config(cfg, cfg.num_workers, cfg.use_gpu)  # config errors before any work
    for warning in config_warnings(cfg):
        log.warning(warning)
    init_ray()  # a no-op under a running Ray
    ds = _as_dataset(examples)
    path, fs = _storage(storage_path)
    existed = _check_run_folder(path, fs, run_name, _run_spec(init_model, output_dir, cfg, lr, n_epochs), resume)
    if existed:
        log.info("training run %s exists: resuming from its latest checkpoint (if any)", run_name)

    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM") if k in os.environ}
    steps = progress.step_reporter()  # rank 0 reports each step to it; the driver shows them
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "learning_rate": lr, "epochs": n_epochs,
                           "init_model": init_model, "output_dir": output_dir, "run_name": run_name,
                           "progress": steps,
                           "inject_failure": asdict(inject_failure) if inject_failure else None},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                             worker_runtime_env={"env_vars": env} if env else None),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t0 = time.perf_counter()
    try:
        result = progress.follow_steps(steps, trainer.fit)
    except Exception as err:  # TrainingFailedError and friends: keep the cause, say how to resume
        raise TrainingError(f"training run {run_name!r} failed (max_failures={cfg.max_failures}); its checkpoints "
                            f"are kept and a re-run with the same run_name resumes it: {err}") from err
    wall = time.perf_counter() - t0
    out = result.return_value or {}
    history = out.get("history") or []
    if not history:
        raise TrainingError(f"training run {run_name!r} finished without a step history")
    losses = [h["loss"] for h in history]
    return TrainResult(
        final_loss=losses[-1], mean_loss=statistics.fmean(losses), steps=len(history),
        tokens_trained=int(out.get("tokens_trained", 0)), wall_time_s=wall, history=history,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None, model_path=output_dir,
        run_name=run_name, restored_from_step=out.get("restored_from_step"))
