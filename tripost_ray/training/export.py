"""Export a consolidated Hugging Face model + tokenizer from a DeepSpeed engine.

Under ZeRO-3 no rank holds whole weights, so every rank must take part in the gather
(``_zero3_consolidated_16bit_state_dict``, which despite its name keeps the training dtype:
fp32 on CPU, bf16/fp16 on GPU); rank 0 then writes ``save_pretrained`` output. Under ZeRO
0-2 each rank has whole weights and rank 0 writes them. The folder is built locally and
then published to ``output_dir`` (any fsspec URL): a local destination is swapped in with
a rename, so a reader never sees a half-written model.
"""

from __future__ import annotations

import logging
import tempfile

from tripost_ray.storage import publish_dir

log = logging.getLogger(__name__)


def export_engine_model(engine, tokenizer, output_dir: str, rank: int) -> None:
    """Write the engine's full model + tokenizer to ``output_dir``; every rank must call it."""
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; None on ranks > 0
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="tripost-export-") as tmp:
        engine.module.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, output_dir)
    log.info("exported model to %s", output_dir)
