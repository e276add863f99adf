"""Run reports: a summary built from a run folder's stage manifests alone.

Because every stage leaves a manifest, the report of a run (``report.json``,
``report.md`` and ``report.html`` with plots) can be rebuilt at any time, also for a
run that is still going or was interrupted: ``tripost report RUN``.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

from tripost_ray import storage
from tripost_ray.config import ConfigError
from tripost_ray.stages import MANIFEST


class NotARunError(ConfigError):
    """``tripost report`` pointed at a folder that holds no run."""


def load_manifests(root: str) -> dict[str, dict]:
    """Every stage manifest under a run folder, keyed by stage name."""
    fs, path = storage.fs_for(root)
    out = {}
    for file in sorted(fs.glob(f"{path.rstrip('/')}/**/{MANIFEST}")):
        manifest = storage.read_json(storage.join(root, file[len(path.rstrip("/")):]))  # damaged: names the file
        out[manifest.get("stage", file)] = manifest
    return out


def _iteration_of(stage: str) -> int | None:
    m = re.match(r"iter_(\d+)/", stage)
    return int(m.group(1)) if m else None


def _sum_nested(dicts: list[dict], key: str) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in (d.get(key) or {}).items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def summarize(root: str, wall_s: float | None = None) -> dict[str, Any]:
    """The run's summary: accuracy per iteration, self-improvement metrics, LLM usage, times."""
    manifests = load_manifests(root)
    iterations: dict[int, dict] = {}
    for stage, m in manifests.items():
        t = _iteration_of(stage)
        if t is None:
            continue
        it = iterations.setdefault(t, {"iteration": t, "editing": []})
        if stage.endswith("/eval"):
            it["metrics"] = m.get("metrics", {})
            if m.get("extra"):
                it["extra"] = m["extra"]
        elif stage.endswith("/editing"):
            it["editing"].append(m.get("summary", {}))
        elif stage.endswith("/postprocess"):
            it["examples"] = m.get("n_examples")
            it["dropped"] = m.get("dropped", {})
            it["example_counts"] = m.get("counts", {})
        elif stage.endswith("/train"):
            it["train"] = {k: v for k, v in (m.get("train") or {}).items() if k != "history"}
            if "n_examples" in m:  # a train stage that made its own data (the gold-SFT baseline)
                it["examples"] = m["n_examples"]
    rows = []
    for t in sorted(iterations):
        it = iterations[t]
        eds = it.pop("editing")
        usage = [u for e in eds for u in (e.get("usage") or {}).values()]
        it["llm"] = {
            "calls": sum(sum(statuses.values()) for e in eds for statuses in (e.get("calls") or {}).values()),
            "http_requests": sum(int(e.get("http_requests", 0)) for e in eds),
            "cache_hits": sum(int(e.get("cache_hits", 0)) for e in eds),
            "input_tokens": int(sum(u.get("input_tokens", 0) for u in usage)),
            "output_tokens": int(sum(u.get("output_tokens", 0) for u in usage)),
            "cost_usd": round(sum(float(e.get("cost_usd", 0.0)) for e in eds), 6),
            "rollouts": sum(int(e.get("rows", 0)) for e in eds),
            "trajectories": sum(int(e.get("trajectories", 0)) for e in eds),
            "trajectory_kinds": _sum_nested(eds, "kinds"),
            "discard_reasons": _sum_nested(eds, "discard_reasons"),
        }
        rows.append(it)
    in_order = sorted(manifests.items(), key=lambda kv: kv[1].get("started_at", 0.0))
    stage_times = {stage: m.get("wall_s", 0.0) for stage, m in in_order}
    return {
        "run": root,
        "iterations": rows,
        "stage_times_s": stage_times,
        "total_stage_time_s": round(sum(stage_times.values()), 1),
        "wall_s": None if wall_s is None else round(wall_s, 1),
    }


# ----------------------------------------------------------------- formatting


def _pct(x: Any) -> str:
    return f"{100 * x:5.1f}%" if isinstance(x, (int, float)) else "    -"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def accuracy_rows(summary: dict) -> list[list[Any]]:
    rows = []
    for it in summary["iterations"]:
        m = it.get("metrics") or {}
        acc = m.get("accuracy", {})
        si = m.get("self_improvement", {})
        llm = it["llm"]
        rows.append([
            it["iteration"], _pct(acc.get("seen")), _pct(acc.get("unseen")), _pct(acc.get("total")),
            _pct(si.get("attempt_rate")), _pct(si.get("fixed_rate")), _pct(si.get("broken_correct_rate")),
            it.get("examples", "-") if it["iteration"] else "-",
            llm["calls"], llm["cache_hits"], llm["input_tokens"] + llm["output_tokens"], f"{llm['cost_usd']:.4f}",
        ])
    return rows


ACCURACY_HEADERS = ["iter", "seen", "unseen", "total", "SI attempted", "SI fixed", "correct->wrong",
                    "train ex.", "LLM calls", "cache hits", "tokens", "USD"]


def verification_rows(summary: dict) -> list[list[Any]]:
    """The verification probe per iteration and split (iterations evaluated without it are left out)."""
    rows = []
    for it in summary["iterations"]:
        probe = (it.get("metrics") or {}).get("verification")
        for split in ("seen", "unseen") if probe else ():
            w, g = probe[split]["wrong"], probe[split]["gold"]
            rows.append([it["iteration"], split, w["n"], _pct(w["right_step"]), _pct(w["wrong_step"]),
                         _pct(w["missed"]), _pct(w["malformed"]), g["n"], _pct(g["false_alarm"]),
                         _pct(g["malformed"])])
    return rows


VERIFICATION_HEADERS = ["iter", "split", "own wrong", "flagged: right step", "other step", "called correct",
                        "malformed", "gold", "false alarm", "malformed"]


def format_summary(summary: dict) -> str:
    """The end-of-run summary table (accuracy, self-improvement, LLM usage, stage times)."""
    parts = ["", "## TriPosT summary: " + summary["run"], "", _table(ACCURACY_HEADERS, accuracy_rows(summary)), ""]
    probe = verification_rows(summary)
    if probe:  # can the model tell its own wrong attempts from gold ones (tripost_ray/verification.py)
        parts += ["verification probe (feedback the model writes on attempts of known verdict):",
                  _table(VERIFICATION_HEADERS, probe), ""]
    times = [[stage, f"{secs:.1f}"] for stage, secs in summary["stage_times_s"].items()]
    parts += [_table(["stage", "seconds"], times), ""]
    if summary.get("wall_s") is not None:
        parts.append(f"wall time of this invocation: {summary['wall_s']:.1f}s "
                     f"(all stages, incl. earlier invocations: {summary['total_stage_time_s']:.1f}s)")
    return "\n".join(parts)


def plots_png(summary: dict) -> tuple[str, str]:
    """Base64 PNGs: accuracy per iteration, time per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def encode(fig) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    its = [it for it in summary["iterations"] if it.get("metrics")]
    for key in ("seen", "unseen", "total"):
        ax.plot([it["iteration"] for it in its], [100 * it["metrics"].get("accuracy", {}).get(key, 0) for it in its],
                marker="o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per iteration")
    ax.legend()
    acc_png = encode(fig)

    stages = list(summary["stage_times_s"].items())
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(stages) + 1))
    ax.barh([s for s, _ in stages], [v for _, v in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage")
    time_png = encode(fig)
    return acc_png, time_png


def write_report(root: str, summary: dict) -> None:
    """Write report.json, report.md and report.html (with plots) into the run folder."""
    storage.write_json(storage.join(root, "report.json"), summary)
    md = "# TriPosT run report\n" + format_summary(summary) + "\n"
    storage.write_text_atomic(storage.join(root, "report.md"), md)
    acc_png, time_png = plots_png(summary)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>TriPosT run report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:1em}</style>"
        f"</head><body><h1>TriPosT run report</h1><pre>{html.escape(format_summary(summary))}</pre>"
        f"<h2>Accuracy per iteration</h2><img alt='accuracy per iteration' src='data:image/png;base64,{acc_png}'>"
        f"<h2>Time per stage</h2><img alt='time per stage' src='data:image/png;base64,{time_png}'>"
        "</body></html>"
    )
    storage.write_text_atomic(storage.join(root, "report.html"), page)


def rebuild_report(run: str) -> dict[str, Any]:
    """Rewrite a run's report from its manifests; returns its summary. Refuses (and writes
    nothing into) a folder that is not a run."""
    root = storage.normalize(run)
    if not storage.exists(root):
        raise NotARunError(f"no run at {root}")
    if not storage.exists(storage.join(root, "config.yaml")) and not load_manifests(root):
        raise NotARunError(f"{root} is not a run folder (no config.yaml, no stage {MANIFEST}); nothing written")
    summary = summarize(root)
    write_report(root, summary)
    return summary
