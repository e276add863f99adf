"""The model factory: tiny models and tokenizers, source resolution, loading."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch

from tripost_ray.config import TinyModelConfig
from tripost_ray.models import (
    ModelSourceError,
    check_model_source,
    build_tiny_model,
    load_model_and_tokenizer,
    prepare_model,
    resolve_model_source,
    train_tokenizer,
)
from tripost_ray.tasks import get_task

TEXTS = [
    "Q: ((7 - -1 + -1 + -4) - (9 * 2 - 3)) =\nAnswer: Let's think step by step.\n"
    '(1) This equation can be written as "(A - B)", where A = (7 - -1 + -1 + -4) and B = (9 * 2 - 3).\n'
    "(Final response) So the answer is -12.",
    "Feedback: Step (1) to step (2) are correct. In step (3) the part \"8 + -1 = 9\" is incorrect. "
    "This is because 8 + -1 = 7.",
    # unseen words, a long number, tabs, double spaces and punctuation the corpus never had
    "Sort: zebra quokka aardvark\t 123456789  ~{[ok]}!",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    task = get_task("multistep_arithmetic")
    problems = task.generate(10, "train", seed=1)
    return [task.prompt(p) for p in problems] + [task.gold_rationale(p) for p in problems]


def _tiny(tokenizer: str, **kw) -> TinyModelConfig:
    return TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tokenizer,
                           bpe_vocab_size=200, **kw)


@pytest.mark.parametrize("kind", ["numeric", "numeric_spaced", "char", "bpe"])
def test_tokenizer_round_trips_text_exactly_and_offsets_cover_it(kind, corpus):
    tok = train_tokenizer(_tiny(kind), corpus)
    for text in TEXTS + corpus[:3]:
        enc = tok(text, return_offsets_mapping=True)
        assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
        assert tok.unk_token_id not in enc["input_ids"]
        assert enc["input_ids"][0] == tok.bos_token_id and enc["offset_mapping"][0] == (0, 0)
        spans = enc["offset_mapping"][1:]
        # offsets are contiguous, in order, and their pieces concatenate to the text
        assert "".join(text[s:e] for s, e in spans) == text
        assert all(e > s for s, e in spans)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_numeric_tokenizer_gives_integers_and_words_one_token_each(corpus):
    tok = train_tokenizer(_tiny("numeric", numeric_max_digits=4), corpus)
    text = "Let's calculate A = 9876 - 0 = 42 step"
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    # 9876 never occurs in the corpus but is in the configured integer range
    assert tokens == ["Let", "'", "s", " ", "calculate", " ", "A", " ", "=", " ", "9876", " ", "-", " ", "0", " ",
                      "=", " ", "42", " ", "step"]
    # a number past the range splits into in-vocabulary pieces, never <unk>
    pieces = tok.convert_ids_to_tokens(tok("123456", add_special_tokens=False)["input_ids"])
    assert pieces == ["1234", "##5", "##6"]


def test_numeric_spaced_tokenizer_folds_the_leading_space_and_the_sign_in(corpus):
    tok = train_tokenizer(_tiny("numeric_spaced", numeric_max_digits=2), corpus)
    tokens = tok.convert_ids_to_tokens(tok("A = (-6 * -7 - 0) = 42.\n", add_special_tokens=False)["input_ids"])
    assert tokens == ["A", " =", " (", "-6", " *", " -7", " -", " 0", ")", " =", " 42", ".", "\n"]
    # past the integer range, and unseen words with their space, split into known pieces
    assert tok.convert_ids_to_tokens(tok(" -123", add_special_tokens=False)["input_ids"]) == [" -12", "##3"]
    assert tok.unk_token_id not in tok(" zebra", add_special_tokens=False)["input_ids"]
    # about half the tokens of the plain numeric tokenizer on a rationale
    plain = train_tokenizer(_tiny("numeric", numeric_max_digits=2), corpus)
    assert len(tok(corpus[0])["input_ids"]) < 0.75 * len(plain(corpus[0])["input_ids"])


def test_tiny_model_round_trips_through_save_and_load(tmp_path, corpus):
    cfg = _tiny("numeric", seed=7)
    path = build_tiny_model(cfg, corpus, str(tmp_path / "m"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    model, tok = load_model_and_tokenizer(path)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert model.dtype == torch.float32 and tok.padding_side == "left" and tok.pad_token == "<pad>"
    ids = tok(corpus[:2], return_tensors="pt", padding=True)
    logits = model(**ids).logits

    # the same seed builds the same weights; save_pretrained + plain from_pretrained reload them
    again = build_tiny_model(cfg, corpus, str(tmp_path / "m2"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m2 = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32)
    t2 = AutoTokenizer.from_pretrained(again)
    assert t2(corpus[0])["input_ids"] == tok(corpus[0])["input_ids"]
    m2.save_pretrained(tmp_path / "m3")
    t2.save_pretrained(tmp_path / "m3")
    m3, _ = load_model_and_tokenizer(str(tmp_path / "m3"))
    torch.testing.assert_close(m3(**ids).logits, logits)

    other = build_tiny_model(_tiny("numeric", seed=8), corpus, str(tmp_path / "m4"))
    m4, _ = load_model_and_tokenizer(other)
    assert not torch.allclose(m4(**ids).logits, logits)


def test_resolve_local_file_url_and_memory_url(tmp_path, tiny_model_dir):
    assert resolve_model_source(tiny_model_dir, str(tmp_path / "cache")) == tiny_model_dir
    assert resolve_model_source("file://" + tiny_model_dir, str(tmp_path / "cache")) == tiny_model_dir

    fs = fsspec.filesystem("memory")
    url = "memory://models/tiny-for-resolve"
    fs.put(tiny_model_dir, "/models/tiny-for-resolve", recursive=True)
    local = resolve_model_source(url, str(tmp_path / "cache"))
    assert local.startswith(str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer(local)
    ref, _ = load_model_and_tokenizer(tiny_model_dir)
    ids = tok(["Q: 1 + 2 ="], return_tensors="pt")
    torch.testing.assert_close(model(**ids).logits, ref(**ids).logits)
    # cached: a second resolve does not copy again, even when the source is gone
    fs.rm("/models/tiny-for-resolve", recursive=True)
    assert resolve_model_source(url, str(tmp_path / "cache")) == local


def test_bad_sources_fail_with_clear_errors(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="not_a_model.*no config.json"):
        resolve_model_source(str(empty), str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="no such folder"):
        resolve_model_source(str(tmp_path / "missing"), str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="memory://nowhere/model.*no config.json"):
        resolve_model_source("memory://nowhere/model", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="not a Hugging Face model folder"):
        load_model_and_tokenizer(str(empty))


def test_hub_name_offline_fails_naming_the_source(tmp_path):
    # No internet on this machine: the real hub client fails, and the error says so.
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source("tripost-test-org/no-such-model", str(tmp_path / "cache"))
    msg = str(err.value)
    assert "tripost-test-org/no-such-model" in msg and "Hugging Face Hub" in msg and "HF_HUB_OFFLINE" in msg


def test_prepare_model_builds_tiny_or_copies_a_source(tmp_path, corpus, tiny_model_dir):
    built = prepare_model("tiny", _tiny("char"), str(tmp_path / "cache"), corpus=corpus, out_dir=str(tmp_path / "a"))
    assert os.path.exists(os.path.join(built, "config.json"))
    copied = prepare_model(tiny_model_dir, _tiny("char"), str(tmp_path / "cache"), out_dir=str(tmp_path / "b"))
    assert copied == str(tmp_path / "b") and os.path.exists(os.path.join(copied, "model.safetensors"))
    with pytest.raises(ModelSourceError, match="corpus"):
        prepare_model("tiny", _tiny("char"), str(tmp_path / "cache"))


def test_broken_config_json_is_caught_without_copying(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/broken/config.json", b'{"model_type": "llama",')
    fs.pipe("/models/broken/model.safetensors", b"weights")
    with pytest.raises(ModelSourceError, match=r"memory://models/broken.*config.json is not valid JSON"):
        resolve_model_source("memory://models/broken", str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists(), "nothing copied for a source that cannot load"
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("[]")
    with pytest.raises(ModelSourceError, match="not a JSON object"):
        check_model_source(str(local))
    check_model_source("tiny")
    check_model_source("some-org/some-model")  # a hub name: checked when fetched
