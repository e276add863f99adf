"""The model server under concurrent clients: requests/s, latency percentiles, and the extra
tokens self-improvement costs per request.

One local Ray, one replica of ``tripost serve model`` (HF engine, or ``--engine vllm``),
C concurrent clients (threads, each with the real openai SDK) sending R chat requests each,
once with round limit 0 (a plain attempt: the model still writes its feedback line after
it) and once with the server's default round limit. Latency is each request's wall time at
the client; requests/s is requests over the case's wall time. Tokens are the replies'
``usage`` (every round's generated tokens), so ``extra_completion_tokens_per_request`` is
what self-improvement costs on top of a plain attempt.

The default model is the tests' feedback model (tests/conftest.py, ``build_feedback_model``:
a tiny model that has memorised a wrong first attempt, its feedback and a correct update for
6 arithmetic questions, so every question runs two rounds: the cost of self-improvement
when the model does use it); ``--model`` serves another model folder or run folder.

    python benchmarks/serve.py [--clients 8] [--requests 3] [--model PATH] [--engine hf]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "multistep_arithmetic"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_case(name: str, base_url: str, questions: list[str], clients: int, per_client: int, max_rounds: int) -> dict:
    import openai

    client = openai.OpenAI(api_key="unused", base_url=base_url, max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int, int, int]:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model="tripost-model", messages=[{"role": "user", "content": questions[i % len(questions)]}],
            extra_body={"max_rounds": max_rounds})
        return (time.perf_counter() - t0, reply.usage.completion_tokens, reply.usage.prompt_tokens,
                reply.model_extra["tripost"]["rounds"])

    def session(c: int) -> list[tuple[float, int, int, int]]:
        return [one(c * per_client + k) for k in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(session, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    latencies = [d[0] for d in done]
    result = {
        "case": name, "max_rounds": max_rounds, "clients": clients, "requests": len(done), "wall_s": round(wall, 2),
        "req_per_s": round(len(done) / wall, 3),
        **{f"latency_p{q}_s": round(percentile(latencies, q), 3) for q in (50, 95, 99)},
        "completion_tokens_per_request": round(statistics.mean(d[1] for d in done), 1),
        "prompt_tokens_per_request": round(statistics.mean(d[2] for d in done), 1),
        "rounds_per_request": round(statistics.mean(d[3] for d in done), 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients C")
    parser.add_argument("--requests", type=int, default=3, help="requests per client R, one after the other")
    parser.add_argument("--model", default=None, help="model or run folder (default: build the tests' feedback model)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--rounds", type=int, default=2, help="the server's default round limit")
    parser.add_argument("--max-tokens", type=int, default=300, help="new tokens per round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from tripost_ray.config import RayConfig, build_config
    from tripost_ray.ray_setup import init_ray
    from tripost_ray.serve.common import openai_base_url
    from tripost_ray.serve.model import start_model_server

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import EASY_ARITHMETIC, build_feedback_model

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model:
            model, questions = args.model, None
        else:
            model, problems = build_feedback_model(Path(tmp))
            questions = [p.question for p in problems]
        build_s = time.perf_counter() - t0
        if questions is None:
            from tripost_ray.tasks import get_task

            questions = [p.question for p in get_task(TASK, **EASY_ARITHMETIC).generate(24, "test_seen", seed=1)]
        cfg = build_config({
            "task": {"name": TASK, "difficulty": EASY_ARITHMETIC},
            "eval": {"self_improve_rounds": args.rounds, "max_new_tokens": args.max_tokens},
            "serve": {"engine": args.engine, "max_batch_size": args.clients, "batch_wait_timeout_s": 0.05},
        })
        init_ray(RayConfig(num_cpus=4, log_to_driver=False))
        t0 = time.perf_counter()
        base_url = openai_base_url(start_model_server(model, cfg, name="bench-model", route_prefix="/bench-model"))
        start_s = time.perf_counter() - t0
        run_case("warm-up", base_url, questions, 1, 1, args.rounds)
        plain = run_case("round_limit_0", base_url, questions, args.clients, args.requests, 0)
        improving = run_case(f"round_limit_{args.rounds}", base_url, questions, args.clients, args.requests,
                             args.rounds)
        serve.shutdown()

    import torch

    report = {
        "benchmark": "serve",
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "model": args.model or "tests' feedback model (build_feedback_model)",
        "engine": args.engine, "clients": args.clients, "requests_per_client": args.requests,
        "max_new_tokens_per_round": args.max_tokens,
        "results": [plain, improving],
        "extra_completion_tokens_per_request": round(improving["completion_tokens_per_request"]
                                                     - plain["completion_tokens_per_request"], 1),
        "extra_prompt_tokens_per_request": round(improving["prompt_tokens_per_request"]
                                                 - plain["prompt_tokens_per_request"], 1),
        "latency_p50_ratio": round(improving["latency_p50_s"] / plain["latency_p50_s"], 2),
        "req_per_s_ratio": round(improving["req_per_s"] / plain["req_per_s"], 2),
        "model_build_s": round(build_s, 1), "server_start_s": round(start_s, 1),
        "total_s": round(time.time() - started, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("extra_completion_tokens_per_request", "latency_p50_ratio",
                                             "req_per_s_ratio", "total_s")}))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
