"""Live metrics: scraped from the local Ray node's own Prometheus endpoint while an editing
stage talks to the project's teacher server (real openai/anthropic SDKs over HTTP), and
compared with what the teacher counted and what the stage wrote."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tripost_ray import metrics
from tripost_ray.config import build_config
from tripost_ray.feedback.pool import run_editing
from tripost_ray.specs import JobSpecs
from tripost_ray.feedback.synthetic import corrupted_rollouts
from tripost_ray.serve.teacher import get_stats, openai_base_url, start_teacher
from tripost_ray.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TRIPOST_TEST_METRICS_TEACHER_KEY"
KEY = "test-key-for-the-metrics-teacher"
ARITH = "multistep_arithmetic"
FBK_MODEL, IMP_MODEL = "gpt-4o-mini", "claude-3-5-haiku-latest"  # priced, and used by no other test


def scrape() -> dict[tuple[str, tuple], float]:
    """Every sample of every node endpoint, summed over Ray's per-process labels."""
    out: dict[tuple[str, tuple], float] = {}
    for url in metrics.metrics_endpoints():
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k in ("provider", "model", "role", "outcome", "status", "run")))
                out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == want for k, want in match.items()))


def ours(samples: dict, name: str) -> float:
    return sum(total(samples, name, model=m) for m in (FBK_MODEL, IMP_MODEL))


@pytest.fixture(scope="module")
def teacher(ray_cluster):
    from ray import serve

    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    # some 429s, so requests carry more than one outcome; latency so editing takes a while
    yield start_teacher(ARITH, name="metrics-arith", route_prefix="/metrics-arith", api_key=KEY, latency_s=0.1,
                        models=[FBK_MODEL, IMP_MODEL],
                        faults="429=0.1,seed=7")
    serve.shutdown()
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old


def teacher_requests(root: str) -> int:
    return get_stats(root, KEY)["total"]


@pytest.mark.integration
def test_request_and_usd_counters_match_the_teachers_count_and_the_manifest(teacher, tmp_path):
    fast = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "api_key_env": KEY_ENV}
    cfg = build_config({
        "run_name": "metrics-test",
        "feedback": {"provider": "openai", "model": FBK_MODEL, "base_url": openai_base_url(teacher), **fast},
        "improve": {"provider": "anthropic", "model": IMP_MODEL, "base_url": teacher, **fast},
        "editing": {"num_actors": 1, "concurrency_per_actor": 2, "max_usd": 5.0},
        "progress": "lines",
    })
    rows = corrupted_rollouts(get_task(ARITH), 24, seed=5, correct_every=0)
    before_requests, before = teacher_requests(teacher), scrape()
    assert ours(before, "ray_tripost_teacher_requests_total") == 0, "another test used this test's model names"

    out = tmp_path / "editing"
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(summary=run_editing(
        rows, JobSpecs(cfg).editing(), str(out), cache_uri=str(tmp_path / "cache"), budget_usd=cfg.editing.max_usd)))
    worker.start()
    seen_during = 0.0
    while worker.is_alive():
        seen_during = max(seen_during, ours(scrape(), "ray_tripost_teacher_requests_total"))
        time.sleep(0.5)
    worker.join()
    summary = done["summary"]
    assert seen_during > 0, "the counter never moved while the editing stage ran"

    requests = teacher_requests(teacher) - before_requests
    manifest_cost = json.loads((out / "summary.json").read_text())["cost_usd"]
    assert requests == summary.http_requests > 0 and manifest_cost > 0
    deadline = time.time() + 120  # Ray exports every metrics_report_interval_ms
    while True:
        after = scrape()
        if ours(after, "ray_tripost_teacher_requests_total") == requests or time.time() > deadline:
            break
        time.sleep(1.0)
    assert ours(after, "ray_tripost_teacher_requests_total") == requests
    assert ours(after, "ray_tripost_teacher_cost_usd_total") == pytest.approx(manifest_cost, rel=1e-9)
    outcomes = {dict(labels)["outcome"] for (n, labels), v in after.items()
                if n == "ray_tripost_teacher_requests_total" and dict(labels).get("model") in (FBK_MODEL, IMP_MODEL)}
    assert {"ok", "rate_limited"} <= outcomes
    for role, model in (("fbk", FBK_MODEL), ("imp", IMP_MODEL)):
        assert total(after, "ray_tripost_teacher_calls_total", role=role, model=model, status="ok") == \
            summary.calls[role]["ok"]
    usage = {k.split("/", 1)[1]: u for k, u in summary.usage.items()}
    for model in (FBK_MODEL, IMP_MODEL):
        assert total(after, "ray_tripost_teacher_input_tokens_total", model=model) == usage[model]["input_tokens"]
        assert total(after, "ray_tripost_teacher_output_tokens_total", model=model) == usage[model]["output_tokens"]
    assert total(after, "ray_tripost_budget_remaining_usd", run="metrics-test") == pytest.approx(5.0 - manifest_cost, rel=1e-9)
    assert ours(after, "ray_tripost_teacher_rate_limit_wait_seconds_total") > 0


def test_the_grafana_dashboard_queries_only_metrics_the_code_exports():
    dashboard = json.loads((ROOT / "clusters" / "grafana" / "tripost_dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    import re

    queried = set()
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table")
        assert panel["title"] and panel["datasource"] and panel["gridPos"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(ray_tripost_[a-z_]+)\b", target["expr"]))
            assert names, f"panel {panel['title']!r} queries no tripost metric: {target['expr']}"
            queried |= names
    assert queried <= metrics.exported_names(), queried - metrics.exported_names()
    assert queried == metrics.exported_names(), f"no panel shows {metrics.exported_names() - queried}"
