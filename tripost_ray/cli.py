"""The ``tripost`` command: run, experiment, eval, serve, report, submit.

Every handler lives here and is a thin shell over functions of the package: parse, call,
print, exit code. The package is imported inside the handlers, so ``tripost --help``
stays fast and a missing optional part names itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tripost_ray.config import ServeConfig, TeacherConfig

#: What ``--quiet`` sets: progress as one log line per stage at start and end, no bars (CI logs).
QUIET_OVERRIDES = ("progress=lines",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tripost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a TriPosT job (resumes an existing run)")
    run.add_argument("config", help="job YAML (see jobs/)")
    run.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. -o train.epochs=2 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print config, resource plan and cost estimate; run nothing")
    run.add_argument("--force", action="store_true", help="recompute finished stages whose config changed")
    run.add_argument("--quiet", action="store_true", help="no progress bars (CI logs): " + " ".join(QUIET_OVERRIDES))

    exp = sub.add_parser("experiment", help="TriPosT against an equal-token gold-SFT baseline, over seeds")
    exp.add_argument("config", help="job YAML with an experiment section (see jobs/reproduce_cpu.yaml)")
    exp.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. -o experiment.seeds=[0] (repeatable)")
    exp.add_argument("--force", action="store_true", help="recompute finished stages whose config changed")
    exp.add_argument("--quiet", action="store_true", help="no progress bars (CI logs): " + " ".join(QUIET_OVERRIDES))

    ev = sub.add_parser("eval", help="evaluate a model with self-improving inference")
    ev.add_argument("--model", required=True, help="model path, fsspec URL or hub name")
    ev.add_argument("--task", required=True)
    ev.add_argument("--problems", help="JSON/JSONL problem file (BIG-Bench format accepted); default: the test splits")
    ev.add_argument("--out", required=True, help="metrics JSON to write (fsspec URL)")
    ev.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")

    serve = sub.add_parser("serve", help="serve an application")
    serve_sub = serve.add_subparsers(dest="app", required=True)
    teacher = serve_sub.add_parser("teacher", help="the scripted teacher behind OpenAI + Anthropic wire formats")
    defaults = TeacherConfig()  # the job's teacher section: one set of defaults for both ways to start it
    teacher.add_argument("--task", required=True)
    teacher.add_argument("--host", default=defaults.host)
    teacher.add_argument("--port", type=int, default=defaults.port)
    teacher.add_argument("--api-key-env", default=None, help="require this env var's value as bearer key")
    teacher.add_argument("--latency-s", type=float, default=defaults.latency_s)
    teacher.add_argument("--faults", default=defaults.faults,
                         help="fault rates, e.g. '429=0.2,500=0.05,malformed=0.05,hang=0.01'")
    teacher.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                         help="refuse larger request bodies (400)")

    served = serve_sub.add_parser("model", help="a trained model behind the OpenAI API, answering with "
                                  "self-improving inference")
    served.add_argument("model", metavar="MODEL_OR_RUN",
                        help="model folder, fsspec URL, or run folder (serves its last trained model)")
    served.add_argument("--task", default=None,
                        help="the task the model answers (default for a run folder: its config's; then the "
                        "run's config.yaml is the base config too)")
    served.add_argument("--host", default=None, help=f"bind address (default serve.host: {ServeConfig().host})")
    served.add_argument("--port", type=int, default=None, help=f"port (default serve.port: {ServeConfig().port})")
    served.add_argument("--api-key-env", default=None, help="require this env var's value as bearer key")
    served.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. -o serve.max_replicas=4 -o rollout.engine=vllm (repeatable)")

    rep = sub.add_parser("report", help="(re)write and print a run's report")
    rep.add_argument("run", help="run folder (fsspec URL)")

    sb = sub.add_parser("submit", help="submit a job to a Ray cluster as a Ray job")
    sb.add_argument("config")
    sb.add_argument("--address", required=True, help="Ray dashboard / job server address, e.g. http://127.0.0.1:8265")
    sb.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    sb.add_argument("--no-wait", action="store_true", help="return after submission instead of following the logs")
    sb.add_argument("--runtime-env-pip", action="append", default=[], metavar="REQUIREMENT",
                    help="pip requirement installed in the job's runtime env (repeatable; default: none, "
                         "the cluster image has the dependencies)")
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)


def cmd_run(args) -> int:
    """``tripost run CONFIG [-o key=value ...] [--dry-run] [--force] [--quiet]``."""
    from tripost_ray.config import load_config

    setup_logging()
    cfg = load_config(args.config, args.override)
    print("# resolved config\n" + cfg.to_yaml())
    if args.dry_run:
        from tripost_ray.plan import print_plan
        from tripost_ray.preflight import check_job

        check_job(cfg)
        print_plan(cfg)
        return 0
    from tripost_ray.pipeline import run_job
    from tripost_ray.report import format_summary

    print(format_summary(run_job(cfg, force=args.force)))
    return 0


def cmd_experiment(args) -> int:
    """``tripost experiment CONFIG [-o key=value ...] [--force] [--quiet]``."""
    from tripost_ray.config import load_config
    from tripost_ray.experiment import format_experiment, run_experiment

    setup_logging()
    cfg = load_config(args.config, args.override)
    print("# resolved config\n" + cfg.to_yaml())
    print(format_experiment(run_experiment(cfg, force=args.force)))
    return 0


def cmd_eval(args) -> int:
    """``tripost eval --model PATH --task NAME [--problems FILE] --out FILE.json [-o k=v]``."""
    from tripost_ray import progress, storage
    from tripost_ray.config import load_config
    from tripost_ray.evaluate import evaluate_model, format_metrics
    from tripost_ray.models import ModelSourceError, resolve_model_source
    from tripost_ray.preflight import check_engine, check_output_file
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.specs import JobSpecs
    from tripost_ray.tasks import ProblemFormatError, UnknownTaskError, get_task, load_problems

    cfg = load_config(None, list(args.override) + [f"task.name={args.task}"])  # ConfigError: main() reports it
    check_output_file(args.out, "--out")  # before the evaluation, not after it
    check_engine(cfg.rollout.engine)
    try:
        task = get_task(args.task, **cfg.task.difficulty)
        if args.problems:
            problems = load_problems(task, args.problems)
        else:
            problems = (task.generate(cfg.task.n_test_seen, "test_seen", seed=cfg.task.seed)
                        + task.generate(cfg.task.n_test_unseen, "test_unseen", seed=cfg.task.seed))
        model = resolve_model_source(args.model, cfg.model.cache_dir)
    except (UnknownTaskError, ProblemFormatError, ModelSourceError) as err:
        print(f"tripost eval: {err}", file=sys.stderr)
        return 2
    if not problems:
        print(f"tripost eval: no problems to evaluate ({args.problems or 'generated test splits'})", file=sys.stderr)
        return 2
    init_ray(cfg.ray)
    progress.configure(cfg.progress)
    with progress.stage("eval"):
        metrics = evaluate_model(model, problems, JobSpecs(cfg).eval().generation,
                                 verification_per_split=cfg.eval.verification_per_split)
    metrics.update(model=args.model, task=task.name, problems=args.problems or "generated test splits")
    storage.write_json(args.out, metrics)
    print(f"{task.name}: {len(problems)} problems, model {args.model}")
    print(format_metrics(metrics))
    print(f"metrics written to {args.out}")
    return 0


def _serve_key(args) -> str | None:
    """The key ``--api-key-env`` names (None without it); an unset variable is refused."""
    from tripost_ray.config import ConfigError

    if not args.api_key_env:
        return None
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return api_key


def _serve_until_interrupted() -> None:
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def cmd_serve(args) -> int:
    """``tripost serve teacher`` / ``tripost serve model``: serve until Ctrl-C. Everything that
    can be refused (task, model, host without a key, a taken port) is refused in one line
    before Ray starts."""
    if args.app == "model":
        return cmd_serve_model(args)
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.serve.common import check_port_free, openai_base_url
    from tripost_ray.serve.teacher import DEFAULT_MODEL, Faults, check_teacher_args, start_teacher

    api_key = _serve_key(args)
    faults = Faults.parse(args.faults)
    check_teacher_args(args.task, None, args.host, api_key)
    if not os.environ.get("RAY_ADDRESS"):  # a fresh local cluster has no Serve: whoever holds the port is someone else
        check_port_free(args.host, args.port, "--port / teacher.port")
    init_ray()  # joins the cluster in RAY_ADDRESS, else starts a local one
    root = start_teacher(args.task, host=args.host, port=args.port, latency_s=args.latency_s, faults=faults,
                         api_key=api_key, max_body_bytes=args.max_body_bytes)
    where = "all interfaces" if args.host in ("0.0.0.0", "::") else "this address only"
    print(f"teacher for {args.task} listening on {args.host}:{args.port} ({where}); "
          f"key {'required' if api_key else 'not required'}")
    print(f"  OpenAI:    base_url={openai_base_url(root)}  (POST /v1/chat/completions; from this machine)")
    print(f"  Anthropic: base_url={root}  (POST /v1/messages; from this machine)")
    print(f"  model:     {DEFAULT_MODEL} ; stats: GET {root}/stats ; Ctrl-C to stop", flush=True)
    _serve_until_interrupted()
    return 0


def cmd_serve_model(args) -> int:
    """``tripost serve model MODEL_OR_RUN [--task NAME] [--host H] [--port P] [--api-key-env V] [-o k=v]``."""
    from tripost_ray.preflight import check_engine
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.serve.common import check_open_host, check_port_free, openai_base_url
    from tripost_ray.serve.model import serve_config, served_engine, served_model_source, start_model_server

    api_key = _serve_key(args)
    cfg = serve_config(args.model, args.task, args.override)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    check_open_host(host, api_key)
    check_engine(cfg.serve.engine, "serve.engine")
    model = served_model_source(args.model)
    if not os.environ.get("RAY_ADDRESS"):  # a fresh local cluster has no Serve: whoever holds the port is someone else
        check_port_free(host, port, "--port / serve.port")
    init_ray(cfg.ray)  # joins the cluster in RAY_ADDRESS or ray.address, else starts a local one
    root = start_model_server(model, cfg, host=host, port=port, api_key=api_key)
    where = "all interfaces" if host in ("0.0.0.0", "::") else "this address only"
    print(f"model {model} ({cfg.task.name}, engine {served_engine(cfg)}) listening on {host}:{port} "
          f"({where}); key {'required' if api_key else 'not required'}")
    print(f"  OpenAI: base_url={openai_base_url(root)}  (POST /v1/chat/completions, /v1/completions; "
          "from this machine)")
    print(f"  model:  {cfg.serve.model_name} ; round limit: extra_body={{'max_rounds': N}} "
          f"(default {cfg.eval.self_improve_rounds}) ; Ctrl-C to stop", flush=True)
    _serve_until_interrupted()
    return 0


def cmd_report(args) -> int:
    """``tripost report RUN``: rebuild and print a run's report."""
    from tripost_ray.report import format_summary, rebuild_report

    print(format_summary(rebuild_report(args.run)))
    return 0


def cmd_submit(args) -> int:
    """``tripost submit CONFIG --address URL [-o key=value ...] [--no-wait]
    [--runtime-env-pip REQ ...]``; exit code 0 only for SUCCEEDED."""
    from tripost_ray.submit import SubmitError, submit_job

    try:
        submission_id, status = submit_job(args.config, args.address, args.override, wait=not args.no_wait,
                                           pip=args.runtime_env_pip or None)
    except SubmitError as err:
        print(f"tripost submit: {err}", file=sys.stderr)
        return 2
    print(f"{submission_id}: {status}")
    if args.no_wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {submission_id}")
        return 0
    return 0 if status == "SUCCEEDED" else 1


HANDLERS = {"run": cmd_run, "experiment": cmd_experiment, "eval": cmd_eval, "serve": cmd_serve,
            "report": cmd_report, "submit": cmd_submit}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # before the user's overrides, which still win
        args.override = [*QUIET_OVERRIDES, *args.override]
    from tripost_ray.config import ConfigError

    try:
        return int(HANDLERS[args.command](args) or 0)
    except ModuleNotFoundError as err:  # an optional part that is not installed
        print(f"tripost {args.command}: not available ({err})", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"tripost {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
