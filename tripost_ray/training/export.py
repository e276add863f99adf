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
import os
import tempfile

import fsspec.core

from tripost_ray.storage import is_local, local_path, publish_dir

log = logging.getLogger(__name__)


def localize_model(url: str) -> str:
    """A local folder holding the model at ``url`` (downloaded to a temp dir for remote URLs)."""
    if is_local(url):
        path = local_path(url)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"init model folder not found: {url}")
        return path
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"init model not found: {url}")
    dst = tempfile.mkdtemp(prefix="tripost-model-")
    fs.get(path.rstrip("/") + "/", dst, recursive=True)
    return dst


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
