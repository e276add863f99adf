"""The ``tripost`` command: run, experiment, eval, serve, report, submit.

Each sub-command is a thin shell over a function of the package; handlers are imported
lazily so ``tripost --help`` stays fast and a missing optional part names itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> "module:function(args) -> int"
HANDLERS = {
    "run": "tripost_ray.pipeline:main_run",
    "experiment": "tripost_ray.experiment:main_experiment",
    "eval": "tripost_ray.evaluate:main_eval",
    "serve": "tripost_ray.serve.teacher:main_serve",
    "report": "tripost_ray.report:main_report",
    "submit": "tripost_ray.submit:main_submit",
}


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
    teacher.add_argument("--task", required=True)
    teacher.add_argument("--host", default="127.0.0.1")
    teacher.add_argument("--port", type=int, default=8000)
    teacher.add_argument("--api-key-env", default=None, help="require this env var's value as bearer key")
    teacher.add_argument("--latency-s", type=float, default=0.0)
    teacher.add_argument("--faults", default="", help="fault rates, e.g. '429=0.2,500=0.05,malformed=0.05,hang=0.01'")
    teacher.add_argument("--max-body-bytes", type=int, default=None,
                         help="refuse larger request bodies (413; default: teacher.max_body_bytes)")

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # before the user's overrides, which still win
        args.override = [*QUIET_OVERRIDES, *args.override]
    module, func = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as err:
        print(f"tripost {args.command}: not available ({err})", file=sys.stderr)
        return 2
    from tripost_ray.config import ConfigError

    try:
        return int(handler(args) or 0)
    except ConfigError as err:
        print(f"tripost {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
