"""Creating the DeepSpeed engine in a training worker (the trainer and the benchmarks share it).

The config is ``deepspeed_config.py``'s; what this adds is about the worker's threads.
ZeRO-3's set-up all-gathers every parameter, and on CPU gloo runs the copies of those
all-gathers on its own worker threads. A thread's first parallel torch op gives it an
OpenMP pool sized by torch's thread count at that moment, and the pool lives as long as
the thread. Once the process holds more OpenMP threads than it has cores, GNU OpenMP (the
runtime of torch's CPU wheels) cuts every thread's spin-wait to a few hundred cycles: the
training threads then sleep and are woken between kernels, hundreds of times a step, and
each kernel runs longer. ``initialize_engine`` builds the engine with torch at one thread,
so gloo's threads never get a pool; the set-up's copies happen once, so one thread
costs little next to training.
Measured in benchmarks/README.md (the one-worker ZeRO-3 configuration).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, ds_config: dict[str, Any]
                      ) -> tuple[DeepSpeedEngine, torch.optim.lr_scheduler.LRScheduler]:
    """``deepspeed.initialize`` at one intra-op thread (see the module docstring).

    Returns ``(engine, scheduler)``; the engine steps the scheduler at accumulation boundaries."""
    import deepspeed

    with torch_threads(1):
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=ds_config)
    return engine, scheduler
