"""The TriPosT job end to end on a real local Ray: a reduced quickstart, resumption, and a
driver killed during editing.

The FBK/IMP teacher is the project's own Ray Serve server reached through the real
``openai`` SDK, as in the quickstart; training is DeepSpeed ZeRO-2 inside Ray Train.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tripost_ray import storage
from tripost_ray.config import load_config
from tripost_ray.feedback.pool import read_trajectories

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(model: str, storage_path: Path, run_name: str, port: int, **extra) -> list[str]:
    """The quickstart, shrunk: a pre-fine-tuned tiny model (same task difficulty as the
    quickstart), few problems, one rollout actor."""
    values = {
        "run_name": run_name, "storage.path": str(storage_path), "model.source": model, "sft.epochs": 0,
        "task.n_train": 40, "task.n_test_seen": 12, "task.n_test_unseen": 12,
        "rollout.max_actors": 1, "rollout.batch_size": 40, "rollout.max_new_tokens": 200,
        "eval.batch_size": 24, "eval.max_new_tokens": 200,
        "train.epochs": 1, "train.micro_batch_size": 8, "train.cpus_per_worker": 0.5,
        "postprocess.min_new_examples": 1, "teacher.port": port, "progress": "lines",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy is one per cluster and outlives a job: these tests start without
    one, share one port, and leave none."""
    from ray import serve

    serve.shutdown()
    yield _free_port()
    serve.shutdown()


@pytest.fixture(scope="module")
def e2e_run(sft_model_dir, tmp_path_factory, serve_port) -> tuple[Path, dict]:
    """The reduced quickstart, run once for the module: (run folder, summary)."""
    from tripost_ray.pipeline import run_job

    root = tmp_path_factory.mktemp("pipeline")
    summary = run_job(load_config(QUICKSTART, _overrides(sft_model_dir, root, "e2e", serve_port)))
    return root / "e2e", summary


def test_reduced_quickstart_end_to_end_then_resumes_without_work(sft_model_dir, e2e_run, serve_port):
    from tripost_ray.pipeline import run_job

    run, summary = e2e_run
    tmp_path, port = run.parent, serve_port

    iterations = {it["iteration"]: it for it in summary["iterations"]}
    assert set(iterations) == {0, 1, 2}, "an evaluation per iteration, the starting model's included"
    for it in iterations.values():
        acc = it["metrics"]["accuracy"]
        assert 0.0 <= acc["total"] <= 1.0 and acc["seen"] is not None and acc["unseen"] is not None
        probe = it["metrics"]["verification"]  # the verification probe runs in every evaluation
        assert set(probe) == {"seen", "unseen"} and all(probe[s]["gold"]["n"] > 0 for s in probe)
    first = iterations[1]
    # FBK/IMP went over HTTP through the openai SDK to the job's own teacher
    assert first["llm"]["http_requests"] > 0
    assert first["llm"]["trajectories"] > 0 and first["examples"] > 0

    # every training example comes from a kept trajectory or a gold rationale, never a failure
    kept = {t.problem_id for t in read_trajectories(str(run / "iter_1/pass_0/editing"))}
    examples = storage.read_table(str(run / "iter_1/postprocess/train.parquet"))
    assert {e["problem_id"] for e in examples if e["kind"] != "gold"} <= kept
    failures = [json.loads(line) for line in (run / "iter_1/pass_0/editing/failures/part-00000.jsonl")
                .read_text().splitlines() if line]
    assert not {f["problem_id"] for f in failures} & {e["problem_id"] for e in examples if e["kind"] != "gold"}

    # the model of iteration 2 is a loadable HF model
    from tripost_ray.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(run / "iter_2/train/model"))
    assert model.config.vocab_size == len(tok)

    for name in ("report.json", "report.md", "report.html", "config.yaml"):
        assert (run / name).stat().st_size > 0
    assert "Accuracy per iteration" in (run / "report.html").read_text()

    tracked = _mlflow_run(run)  # the embedded MLflow backend inside the run folder
    assert tracked["run"].info.status == "FINISHED"
    assert tracked["run"].data.params["run_name"] == "e2e" and tracked["run"].data.params["task.n_train"] == "40"
    assert tracked["run"].data.tags["tripost.model"] == str(run / "iter_2/train/model")
    accuracy = sorted((m.step, m.value) for m in tracked["accuracy"])
    assert accuracy == [(t, iterations[t]["metrics"]["accuracy"]["total"]) for t in (0, 1, 2)]
    steps = json.loads((run / "iter_1/train/_MANIFEST.json").read_text())["train"]["steps"]
    assert sorted(m.step for m in tracked["loss"]) == list(range(1, steps + 1))
    assert {"report.md", "report.html", "report.json", "plots"} <= tracked["artifacts"]

    # a second invocation finds every stage complete: nothing recomputed, nothing paid
    manifests = {p: p.read_text() for p in run.rglob("_MANIFEST.json")}
    again = run_job(load_config(QUICKSTART, _overrides(sft_model_dir, tmp_path, "e2e", port)))
    assert {p: p.read_text() for p in run.rglob("_MANIFEST.json")} == manifests
    assert [it["metrics"] for it in again["iterations"]] == [it["metrics"] for it in summary["iterations"]]
    # ... and continues the same MLflow run, logging nothing twice
    resumed = _mlflow_run(run)
    assert resumed["run"].info.run_id == tracked["run"].info.run_id and resumed["run"].info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in resumed["accuracy"]) == accuracy and len(resumed["loss"]) == steps


def test_the_verification_signal_script_scores_every_evaluated_iteration_of_a_finished_run(e2e_run, tmp_path):
    """``benchmarks/verification_signal.py`` on the reduced quickstart's run (a copy, so the
    module's run folder stays as the job left it): one row per evaluated iteration, each
    scored on the same probe items the evaluation's greedy probe judged."""
    import importlib.util
    import shutil

    run = tmp_path / "e2e"
    shutil.copytree(e2e_run[0], run)
    spec = importlib.util.spec_from_file_location("verification_signal", ROOT / "benchmarks" / "verification_signal.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.run_signal(str(run))
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert json.loads((run / "verification_signal.json").read_text()) == rows
    for row in rows:
        for split in ("seen", "unseen"):
            signal, greedy = row["signal"][split], row["greedy"][split]
            assert signal["wrong"]["n"] == greedy["wrong"]["n"] and signal["gold"]["n"] == greedy["gold"]["n"] > 0
            assert 0.0 <= signal["gold"]["mean_p_correct"] <= 1.0


def test_the_model_server_serves_the_runs_last_model_end_to_end(e2e_run, serve_port):
    """``tripost serve model <run folder>`` on the reduced quickstart's run: with the run's own
    config, the app loads iteration 2's model and answers through the openai SDK, whole and
    streamed, exactly as self-improving inference on that model does here."""
    import openai
    from ray import serve

    from tripost_ray.generation import HFGenerationEngine
    from tripost_ray.inference import self_improving_inference
    from tripost_ray.models import load_model_and_tokenizer
    from tripost_ray.serve.common import openai_base_url
    from tripost_ray.serve.model import question_problem, serve_config, served_model_source, start_model_server
    from tripost_ray.tasks import get_task

    run, _ = e2e_run
    cfg = serve_config(str(run), None, [])  # what `tripost serve model <run folder>` serves with
    assert cfg == load_config(run / "config.yaml")
    assert served_model_source(str(run)) == str(run / "iter_2/train/model")
    task = get_task(cfg.task.name, **cfg.task.difficulty)
    asked = [question_problem(p.question) for p in task.generate(3, "test_seen", seed=1)]
    model, tok = load_model_and_tokenizer(str(run / "iter_2/train/model"), dtype="float32", device="cpu")
    want = self_improving_inference(HFGenerationEngine(model, tok, batch_size=1), task, asked,
                                    max_new_tokens=cfg.eval.max_new_tokens, max_rounds=cfg.eval.self_improve_rounds)

    root = start_model_server(str(run), cfg, name="e2e-model", route_prefix="/e2e-model")
    try:
        client = openai.OpenAI(api_key="unused", base_url=openai_base_url(root), max_retries=0, timeout=600)
        for problem, expected in zip(asked, want):
            messages = [{"role": "user", "content": problem.question}]
            reply = client.chat.completions.create(model=cfg.serve.model_name, messages=messages)
            assert reply.choices[0].message.content == expected.turns[-1].attempt
            loop = reply.model_extra["tripost"]
            assert (loop["rounds"], loop["stop_reason"], loop["final_answer"]) == (
                expected.rounds, expected.stop_reason, expected.final_answer)
        stream = client.chat.completions.create(model=cfg.serve.model_name, stream=True, messages=[
            {"role": "user", "content": asked[0].question}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0].turns[-1].attempt
    finally:
        serve.delete("e2e-model")


def _mlflow_run(run: Path) -> dict:
    """The only MLflow run of a run folder, read with MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = runs[0].info.run_id
    return {"run": runs[0], "accuracy": client.get_metric_history(run_id, "eval/metrics.accuracy.total"),
            "loss": client.get_metric_history(run_id, "iter_1/train/step/loss"),
            "artifacts": {a.path for a in client.list_artifacts(run_id)}}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _numbers(summary_part):
    """What a run computed, without what measures its speed or names its folder."""
    if isinstance(summary_part, dict):
        return {k: _numbers(v) for k, v in summary_part.items()
                if not (k.endswith(("_s", "per_s", "_uri")) or k in ("wall", "started_at"))}
    if isinstance(summary_part, list):
        return [_numbers(v) for v in summary_part]
    return summary_part


def test_the_same_config_gives_the_same_numbers_and_weights_on_a_busy_machine(sft_model_dir, e2e_run, serve_port):
    """Machine load changes timing (which actor takes which batch, the order replies arrive in,
    how Ray bundles blocks) but must not change a single number: the reduced quickstart again,
    with a CPU-burning process beside it, equals the undisturbed run bit for bit. Its first
    iteration (rollouts, editing, training, evaluation with the verification probe) is
    compared with the module's run: the second repeats the same stages, at twice the time
    under the burner."""
    from tripost_ray.pipeline import run_job

    run, summary = e2e_run
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = run_job(load_config(QUICKSTART, _overrides(sft_model_dir, run.parent, "busy", serve_port,
                                                          iterations=1, **{"eval.initial": False})))
    finally:
        burner.kill()
        burner.wait()
    import torch

    numbers = lambda it: (it["iteration"], _numbers(it["metrics"]), it.get("examples"))  # noqa: E731
    assert [numbers(it) for it in busy["iterations"]] == [numbers(it) for it in summary["iterations"] if
                                                          it["iteration"] == 1]
    assert (run.parent / "busy/iter_1/postprocess/train.parquet").read_bytes() == \
        (run / "iter_1/postprocess/train.parquet").read_bytes()
    ours, theirs = _weights(run / "iter_1/train/model"), _weights(run.parent / "busy/iter_1/train/model")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_budget_is_the_jobs_across_iterations_and_resumes_and_the_cache_goes_where_configured(
        sft_model_dir, tmp_path, serve_port):
    """``editing.max_usd`` is one budget for the whole job: iteration 1 spends it, and
    iteration 2, run by a resumed invocation, gets only what is left (no paid call fits).

    Only output tokens are priced, so every call reserves the same worst case (max_tokens
    at the output price) and one editing actor with one conversation at a time spends the
    budget down until less than one reservation is left."""
    from tripost_ray.pipeline import run_job

    cache = tmp_path / "elsewhere" / "cache"
    max_usd = 0.015
    budget = {"editing.max_usd": max_usd, "editing.prices": "{tripost-teacher: {output_per_mtok: 25.0}}",
              "feedback.max_tokens": 400, "improve.max_tokens": 400, "editing.num_actors": 1,
              "editing.concurrency_per_actor": 1, "editing.cache_uri": str(cache), "task.n_train": 16,
              "task.n_test_seen": 4, "task.n_test_unseen": 4, "eval.initial": False, "eval.self_improve_rounds": 0,
              "eval.verification_per_split": 0}
    reservation = 400 * 25.0 / 1e6
    run_job(load_config(QUICKSTART, _overrides(sft_model_dir, tmp_path, "budget", serve_port, iterations=1, **budget)))
    run = tmp_path / "budget"
    first = json.loads((run / "iter_1/pass_0/editing/_MANIFEST.json").read_text())
    assert first["budget_usd"] == max_usd
    spent = first["summary"]["cost_usd"]
    assert 0 < spent <= max_usd and first["summary"]["calls"]["fbk"].get("over_budget", 0) > 0, first["summary"]
    assert max_usd - spent < reservation

    run_job(load_config(QUICKSTART, _overrides(sft_model_dir, tmp_path, "budget", serve_port, iterations=2, **budget)))
    second = json.loads((run / "iter_2/pass_0/editing/_MANIFEST.json").read_text())
    assert second["budget_usd"] == pytest.approx(max_usd - spent)
    assert second["summary"]["http_requests"] == 0 and second["summary"]["cost_usd"] == 0
    assert sum(n for role in second["summary"]["calls"].values() for n in role.values()) == \
        sum(role.get("over_budget", 0) for role in second["summary"]["calls"].values()) > 0
    # the configured cache location holds the paid replies; the run folder has no cache of its own
    assert any(p.is_file() for p in cache.rglob("*")) and not (run / "cache").exists()


#: Per multiple-choice task: overrides that shrink its CPU job further, and the SFT steps of
#: its fixture model. Logical deduction runs on 3 objects (5 unseen) so attempts stay short;
#: its longer rationales (about 250 tokens for 3 objects) need more steps, cooler sampling
#: and a larger generation budget before a tiny model writes complete attempts.
MULTIPLE_CHOICE = {
    "date_understanding": ({}, 150),
    "logical_deduction": ({"task.difficulty": "{seen_objects: [3], unseen_objects: [5]}",
                           "rollout.temperature": 0.5, "rollout.max_new_tokens": 320, "eval.max_new_tokens": 320},
                          400),
}


@pytest.fixture(scope="module", params=sorted(MULTIPLE_CHOICE))
def task_sft_model(request, tmp_path_factory) -> tuple[str, str]:
    """(task name, a tiny model of its CPU job briefly fine-tuned on its gold rationales), as
    the session's ``sft_model_dir`` is for arithmetic: a model whose attempts are well
    formed with mistakes, so editing and training have work."""
    from transformers import AutoTokenizer

    from tripost_ray.config import TrainConfig
    from tripost_ray.models import build_tiny_model
    from tripost_ray.tasks.datasets import gold_sft_examples, tokenizer_corpus
    from tripost_ray.tasks import get_task
    from tripost_ray.training.plain import train_plain

    name = request.param
    overrides, steps = MULTIPLE_CHOICE[name]
    cfg = load_config(ROOT / "jobs" / f"quickstart_{name}.yaml", [f"{k}={v}" for k, v in overrides.items()])
    task = get_task(name, **cfg.task.difficulty)
    problems = task.generate(600, "train", seed=0)
    corpus = tokenizer_corpus(task, problems) + [task.prompt(p) for s in ("test_seen", "test_unseen")
                                                 for p in task.generate(20, s, seed=0)]
    root = tmp_path_factory.mktemp(f"sft_{name}")
    base = build_tiny_model(cfg.model.tiny, corpus, str(root / "base"))
    run = train_plain(gold_sft_examples(task, problems), base,
                      TrainConfig(micro_batch_size=16, learning_rate=2e-3, warmup_ratio=0.05, num_workers=1),
                      epochs=steps * 16 / len(problems), max_steps=steps)
    out = str(root / "sft")
    run.model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return name, out


def test_the_cpu_job_of_each_multiple_choice_task_runs_end_to_end(task_sft_model, tmp_path, serve_port):
    """jobs/quickstart_<task>.yaml shrunk like the reduced quickstart above: one iteration of
    rollouts, editing through the teacher server, training and evaluation."""
    from tripost_ray.pipeline import run_job

    task_name, model = task_sft_model
    job = ROOT / "jobs" / f"quickstart_{task_name}.yaml"
    small = {"iterations": 1, "task.n_train": 24, "task.n_test_seen": 6, "task.n_test_unseen": 6,
             "rollout.max_new_tokens": 160, "eval.max_new_tokens": 160, "rollout.self_improve_rounds": 1,
             "eval.self_improve_rounds": 1, "eval.initial": False, "eval.verification_per_split": 0,
             **MULTIPLE_CHOICE[task_name][0]}
    summary = run_job(load_config(job, _overrides(model, tmp_path, task_name, serve_port, **small)))
    run = tmp_path / task_name

    iterations = {it["iteration"]: it for it in summary["iterations"]}
    assert set(iterations) == {1}
    assert iterations[1]["llm"]["http_requests"] > 0 and iterations[1]["llm"]["trajectories"] > 0
    for stage in ("iter_1/pass_0/rollouts", "iter_1/pass_0/editing", "iter_1/postprocess", "iter_1/train", "iter_1/eval"):
        assert (run / stage / "_MANIFEST.json").exists(), stage
    examples = storage.read_table(str(run / "iter_1/postprocess/train.parquet"))
    assert examples and all(r["problem_id"].startswith(task_name) for r in examples)
    acc = iterations[1]["metrics"]["accuracy"]
    assert acc["seen"] is not None and acc["unseen"] is not None


def _cache_entries(run: Path) -> int:
    return sum(1 for p in (run / "cache").rglob("*.json")) if (run / "cache").exists() else 0


def _driver(overrides: list[str], address: str, log: Path) -> subprocess.Popen:
    """``tripost run`` in its own process (and process group), joined to the test cluster."""
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tripost_ray.cli", "run", str(QUICKSTART), *sum((["-o", o] for o in overrides), [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]


def test_driver_killed_during_editing_resumes_without_repeating_llm_calls(sft_model_dir, e2e_run, tmp_path, serve_port):
    """The reference is the module's uninterrupted run: its first iteration's rollouts and
    editing are these settings' too (latency, concurrency, evaluation and tracking change how
    and where it runs, not what it computes)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    port = serve_port
    # slow teacher, low concurrency: editing lasts long enough to be interrupted; the
    # tracking server is unreachable, which must cost a warning, not the job
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    slow = {"iterations": 1, "teacher.latency_s": 0.15, "editing.concurrency_per_actor": 2, "eval.initial": False,
            "eval.self_improve_rounds": 0, "eval.verification_per_split": 0, "tracking.tracking_uri": dead}
    logs = tmp_path / "logs"
    logs.mkdir()
    killed = _driver(_overrides(sft_model_dir, tmp_path, "resumed", port, **slow), address, logs / "killed.log")
    run = tmp_path / "resumed"
    deadline = time.time() + 600
    while _cache_entries(run) < 8:
        assert killed.poll() is None, "the driver ended before it could be killed:\n" + (logs / "killed.log").read_text()
        assert time.time() < deadline, "editing never started"
        time.sleep(0.5)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    paid_before_kill = _cache_entries(run)
    assert not (run / "iter_1/pass_0/editing/_MANIFEST.json").exists()

    _finish(_driver(_overrides(sft_model_dir, tmp_path, "resumed", port, **slow), address, logs / "resumed.log"),
            logs / "resumed.log")
    editing = json.loads((run / "iter_1/pass_0/editing/_MANIFEST.json").read_text())["summary"]
    assert "MLflow tracking (start) failed, the run goes on without it" in (logs / "resumed.log").read_text()
    reference = e2e_run[0]
    full = json.loads((reference / "iter_1/pass_0/editing/_MANIFEST.json").read_text())["summary"]

    # the re-run paid only for what the killed run had not: cached calls were free
    assert editing["cache_hits"] >= paid_before_kill > 0
    assert editing["http_requests"] + paid_before_kill == full["http_requests"]
    # and it produced exactly what an uninterrupted run produces
    as_dicts = lambda p: sorted(json.dumps(t.to_dict(), sort_keys=True) for t in read_trajectories(str(p)))
    assert as_dicts(run / "iter_1/pass_0/editing") == as_dicts(reference / "iter_1/pass_0/editing")
    rows = lambda p: storage.read_table(str(p / "iter_1/postprocess/train.parquet"))
    assert rows(run) == rows(reference)
