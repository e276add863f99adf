"""The small-model factory: where the model M comes from and how it is loaded.

Every later stage (rollouts, training, evaluation, serving) loads the small model from a
local folder in Hugging Face format with :func:`load_model_and_tokenizer`. This module
makes such a folder from any source:

* ``tiny``: a LLaMA-architecture model built from :class:`TinyModelConfig` with random
  weights, plus a tokenizer trained here on task text with the ``tokenizers`` library
  (:func:`build_tiny_model`). This is how CPU machines and tests get a model without
  downloading weights.
* a local folder: used as is;
* an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://`` ...): copied once to a
  local cache folder keyed by the URL (:func:`resolve_model_source`);
* a hub name: fetched with ``huggingface_hub`` where the hub is reachable; offline it fails
  with a :class:`ModelSourceError` that names the source and says what to do.

Tokenizers of tiny models (``TinyModelConfig.tokenizer``):

* ``numeric`` (default): every word of the corpus and every integer ``0 .. 10**d - 1`` is
  ONE token; whitespace characters and punctuation are tokens of their own. It is a
  WordPiece model whose vocabulary also holds every printable character and its ``##``
  continuation, so unseen words and longer numbers split into in-vocabulary pieces
  instead of ``<unk>``: ``decode(encode(x)) == x`` for any printable-ASCII text (and for
  every character seen in the corpus).
* ``char``: one token per character.
* ``bpe``: a BPE model trained on the corpus (merges never cross word boundaries).

All three decode by plain concatenation and give exact character offsets, which the
trainer needs to map loss-weighted character spans onto tokens. Encoding prepends
``<s>``; the trainer appends ``</s>`` itself where it wants the model to learn to stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from tripost_ray.config import TinyModelConfig

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0..3 in every tiny tokenizer
CONTINUATION = "##"
#: One pre-token per number run, word, whitespace character or punctuation character.
PRETOKEN_PATTERN = r"\d+|[^\W\d_]+|\s|[^\w\s]|_"
#: numeric_spaced: as above, but a word, signed integer or punctuation mark keeps ONE leading space.
SPACED_PRETOKEN_PATTERN = r" ?(?:-?\d+|[^\W\d_]+|[^\w\s]|_)|\s"
#: Characters every tiny tokenizer knows, so unseen text never becomes <unk>.
BASE_ALPHABET = [c for c in string.printable if c not in "\x0b\x0c"]

_COMPLETE_MARKER = ".tripost_complete"


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved or loaded; the message names the source."""


# ------------------------------------------------------------------ tokenizers


def _corpus_alphabet(corpus: list[str]) -> list[str]:
    seen = dict.fromkeys(BASE_ALPHABET)
    for text in corpus:
        seen.update(dict.fromkeys(text))
    return list(seen)


def _numeric_tokenizer(corpus: list[str], max_digits: int, spaced: bool = False):
    """WordPiece over words / integers / single characters (see the module docstring).

    ``spaced`` folds one leading space into every word, number and punctuation mark, and a
    minus sign into the number it precedes: ``" -42"`` is one token. On arithmetic
    rationales that halves the sequence, and ``-6 * -7`` becomes three lookups."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    prefixes = ["", " "] if spaced else [""]
    for tok in SPECIAL_TOKENS:
        add(tok)
    alphabet = _corpus_alphabet(corpus)
    for prefix in prefixes:
        for ch in alphabet:
            if not (prefix and ch.isspace()):
                add(prefix + ch)
    for ch in alphabet:
        if not ch.isspace():
            add(CONTINUATION + ch)
    signs = ["", "-"] if spaced else [""]
    for prefix in prefixes:
        for sign in signs:
            for i in range(10**max_digits):
                add(f"{prefix}{sign}{i}")
    word_re = re.compile(r" ?[^\W\d_]+" if spaced else r"[^\W\d_]+")
    for text in corpus:
        for word in word_re.findall(text):
            add(word)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION,
                                     max_input_chars_per_word=1_000_000))
    pattern = SPACED_PRETOKEN_PATTERN if spaced else PRETOKEN_PATTERN
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(CONTINUATION, ""), decoders.Fuse()])
    return tok


def _char_tokenizer(corpus: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in _corpus_alphabet(corpus):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _bpe_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=_corpus_alphabet(corpus), min_frequency=1, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def train_tokenizer(cfg: TinyModelConfig, corpus: Iterable[str]):
    """Train the tiny model's tokenizer on ``corpus``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("the tokenizer corpus is empty: pass task text (prompts and gold rationales)")
    if cfg.tokenizer in ("numeric", "numeric_spaced"):
        tok = _numeric_tokenizer(texts, cfg.numeric_max_digits, spaced=cfg.tokenizer == "numeric_spaced")
    elif cfg.tokenizer == "char":
        tok = _char_tokenizer(texts)
    else:
        tok = _bpe_tokenizer(texts, cfg.bpe_vocab_size)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, padding_side="left",
        model_max_length=cfg.max_position_embeddings,
    )


# ----------------------------------------------------------------------- models


def build_tiny_model(cfg: TinyModelConfig, corpus: Iterable[str], out_dir: str) -> str:
    """Build a randomly initialised LLaMA model + locally trained tokenizer in ``out_dir``.

    The folder is a normal Hugging Face model folder (``config.json``, weights, tokenizer
    files), so every stage loads it like any downloaded model. Deterministic in
    ``cfg.seed`` and the corpus. Returns the absolute folder path.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(cfg, corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _cache_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def _copy_from_url(url: str, cache_dir: str) -> str:
    """Copy a model folder at an fsspec URL into ``cache_dir/<hash of url>`` (once): a
    :func:`storage.download_dir` into a temporary folder, renamed into place when complete."""
    from tripost_ray import storage

    cache_root = Path(cache_dir).expanduser().resolve()
    target = cache_root / _cache_key(url)
    if (target / _COMPLETE_MARKER).exists():
        return str(target)
    check_model_source(url)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{uuid.uuid4().hex[:6]}-", dir=cache_root))
    try:
        storage.download_dir(url, str(tmp))
        (tmp / _COMPLETE_MARKER).write_text(url)
        if target.exists():  # a concurrent copy finished first, or a stale partial one
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _from_hub(name: str, cache_dir: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - transformers depends on it
        raise ModelSourceError(f"model source {name!r}: huggingface_hub is not installed ({err})") from None
    try:
        return snapshot_download(repo_id=name, cache_dir=str(Path(cache_dir).expanduser() / "hub"))
    except Exception as err:  # the hub client raises many types (offline, 404, auth, HTTP)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = ("HF_HUB_OFFLINE is set, so the hub is not contacted" if offline else
                "the Hugging Face Hub is unreachable or has no such model")
        raise ModelSourceError(
            f"could not get model {name!r} from the Hugging Face Hub: {hint} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "On a machine without internet, pass a local model folder or an fsspec URL "
            "(model.source=/path/to/model or s3://bucket/model), or model.source=tiny; "
            "set HF_HUB_OFFLINE=1 to fail fast without network calls."
        ) from None


def _check_config_json(fs, path: str, source: str) -> None:
    """A model folder's ``config.json`` exists and is a JSON object: a broken one would
    otherwise surface as a traceback inside every Ray worker that loads the model."""
    if not fs.isfile(path):
        raise ModelSourceError(f"model source {source!r} has no config.json: not a Hugging Face model folder")
    try:
        with fs.open(path, "rb") as f:
            config = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"model source {source!r}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"model source {source!r}: config.json is not a JSON object")


def check_model_source(source: str) -> None:
    """Fail fast, copying and downloading nothing, when ``source`` is not a usable model:
    ``tiny`` passes, a local folder or fsspec URL must hold a readable ``config.json``;
    a hub name is only checked when it is fetched. Raises :class:`ModelSourceError`."""
    from fsspec.implementations.local import LocalFileSystem

    from tripost_ray import storage

    if not source:
        raise ModelSourceError("model source is empty")
    if source == "tiny":
        return
    if "://" in source and not source.startswith("file://"):
        try:
            fs, remote = storage.fs_for(source)
        except storage.StorageError as err:
            raise ModelSourceError(f"model source {source!r}: {err}") from None
        _check_config_json(fs, f"{remote.rstrip('/')}/config.json", source)
        return
    local = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if local.exists():
        _check_config_json(LocalFileSystem(), str(local / "config.json"), source)
    elif source.startswith(("file://", ".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model source {source!r}: no such folder")


def resolve_model_source(source: str, cache_dir: str) -> str:
    """A local Hugging Face model folder for ``source``.

    ``source`` is a local folder (returned as an absolute path), an fsspec URL (copied
    once into ``cache_dir``, keyed by the URL; ``file://`` URLs are used in place) or a
    hub name (downloaded into ``cache_dir/hub``). Raises :class:`ModelSourceError`.
    """
    if source == "tiny":
        raise ModelSourceError("model source 'tiny' is built, not resolved: use prepare_model() or build_tiny_model()")
    if "://" in source and not source.startswith("file://"):
        return _copy_from_url(source, cache_dir)  # checks the source unless a copy is cached
    check_model_source(source)
    if source.startswith("file://"):
        return str(Path(source[len("file://"):]).resolve())
    local = Path(source).expanduser()
    if local.exists():
        return str(local.resolve())
    return _from_hub(source, cache_dir)


def prepare_model(source: str, tiny: TinyModelConfig, cache_dir: str, corpus: Iterable[str] | None = None,
                  out_dir: str | None = None) -> str:
    """The local model folder for a ``ModelConfig``: build the tiny model or resolve a source.

    With ``out_dir`` the model ends up in that folder (built there, or copied there from
    the resolved source), so a run owns a copy of its starting model.
    """
    if source == "tiny":
        if corpus is None or out_dir is None:
            raise ModelSourceError("model.source=tiny needs a corpus of task text and an output folder")
        return build_tiny_model(tiny, corpus, out_dir)
    local = resolve_model_source(source, cache_dir)
    if out_dir is None:
        return local
    out = Path(out_dir).expanduser().resolve()
    if out != Path(local):
        shutil.copytree(local, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(_COMPLETE_MARKER))
    return str(out)


def resolve_dtype(dtype: str, device: str):
    """``auto``: bf16 on GPU, fp32 on CPU; otherwise the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: auto, float32, bfloat16, float16") from None


def load_model_and_tokenizer(path: str, dtype: str = "auto", device: str | None = None):
    """Load a local model folder for inference: ``(model in eval mode, tokenizer)``.

    The tokenizer pads on the left (what batched generation needs) and always has a pad
    token. ``device`` None picks CUDA when available.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not _is_model_dir(path):
        raise ModelSourceError(f"model path {path!r} is not a Hugging Face model folder (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"could not load the model at {path!r}: {err}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def token_counter(model: str):
    """Token counts with the model's own tokenizer (for the 1024-token filter)."""
    from transformers import AutoTokenizer

    from tripost_ray.storage import local_copy_dir

    with local_copy_dir(model) as local:
        tok = AutoTokenizer.from_pretrained(local)
    return lambda text: len(tok(text)["input_ids"])
