"""``initialize_engine`` keeps gloo's threads from owning OpenMP pools (training/engine.py).

Each check runs in a fresh interpreter: OpenMP pools live as long as their threads, so the
test process's own history would blur the count. A gloo process group runs two
``pt_gloo_runloop`` threads per ``gloo_tcp_loop``; an OpenMP pool that one of them creates
adds worker threads that inherit its name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import collections, json, os, sys
import torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from tripost_ray.config import TrainConfig
from tripost_ray.training.deepspeed_config import build_deepspeed_config
from tripost_ray.training.engine import initialize_engine
from tripost_ray.training.optim import build_optimizer, build_scheduler

torch.set_num_threads(2)
dist.init_process_group("gloo")
model = LlamaForCausalLM(LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                     num_attention_heads=2, vocab_size=1200))
cfg = TrainConfig(zero_stage=3, micro_batch_size=2)
optimizer = build_optimizer(model, cfg, 1e-3)
ds_config = build_deepspeed_config(cfg, 1, False)
if sys.argv[1] == "initialize_engine":
    initialize_engine(model, optimizer, build_scheduler(optimizer, cfg, 10), ds_config)
else:
    import deepspeed
    deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(json.dumps({"threads": torch.get_num_threads(), "names": names}))
dist.destroy_process_group()
"""


def _thread_names_after(mode: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
def test_zero3_setup_leaves_gloo_threads_without_openmp_pools():
    fixed = _thread_names_after("initialize_engine")
    assert fixed["threads"] == 2                                    # the caller's thread count is restored
    assert fixed["names"]["pt_gloo_runloop"] == 2 * fixed["names"]["gloo_tcp_loop"]
    # the mechanism the fix exists for: a plain deepspeed.initialize gives gloo's threads pools
    raw = _thread_names_after("deepspeed.initialize")
    assert raw["names"]["pt_gloo_runloop"] > 2 * raw["names"]["gloo_tcp_loop"]
