"""Fast tests of mlorc_dist.data (corpus, tokenizer, token ids, batches) and mlorc_dist.models."""

from __future__ import annotations

import io

import pytest
import torch

from mlorc_dist.data import (
    PackedBatches,
    contiguous_windows,
    default_corpus_path,
    load_token_ids,
    split_train_eval,
    train_tokenizer,
)
from mlorc_dist.models import LLAMA2_VOCAB_SIZE, build_model, llama_config

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Optimizers keep state: AdamW keeps two moments per parameter, MLorc compresses them.\n"
    "\n"
    "Unicode survives byte-level BPE: naïve café, 数据, emoji 🙂.\n"
) * 40
VOCAB_SIZE = 300


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def tokenizer(text_file, tmp_path):
    return train_tokenizer([str(text_file)], vocab_size=VOCAB_SIZE, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- corpus / tokenizer


def test_default_corpus_is_english_prose(tmp_path, monkeypatch):
    monkeypatch.setenv("MLORC_CACHE", str(tmp_path))
    path = default_corpus_path()
    assert path == tmp_path / "pydoc_topics.txt"
    text = path.read_text(encoding="utf-8")
    assert len(text) > 100_000
    assert "statement" in text and "The " in text
    assert default_corpus_path() == path  # second call reuses the file


def test_tokenizer_round_trips_text(tokenizer):
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SAMPLE_TEXT
    assert len(ids) < 0.8 * len(SAMPLE_TEXT.encode("utf-8"))  # BPE learned merges, not just bytes
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    unseen = "Zebra quiz: ¿jalapeño? ✓"
    assert tokenizer.decode(tokenizer(unseen, add_special_tokens=False)["input_ids"]) == unseen


def test_tokenizer_is_cached(text_file, tmp_path):
    cache = tmp_path / "cache"
    first = train_tokenizer([str(text_file)], vocab_size=VOCAB_SIZE, cache_dir=cache)
    cached_files = sorted(cache.glob("tokenizer-*.json"))
    second = train_tokenizer([str(text_file)], vocab_size=VOCAB_SIZE, cache_dir=cache)
    assert sorted(cache.glob("tokenizer-*.json")) == cached_files and len(cached_files) == 1
    assert first.get_vocab() == second.get_vocab()
    train_tokenizer([str(text_file)], vocab_size=VOCAB_SIZE + 10, cache_dir=cache)
    assert len(list(cache.glob("tokenizer-*.json"))) == 2  # another vocab size is another key


def test_tokenizer_rejects_too_small_vocab(text_file, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([str(text_file)], vocab_size=100, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- token ids


def test_load_token_ids_decodes_to_file_and_is_cached(text_file, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    ids = load_token_ids(text_file, tokenizer, cache_dir=cache)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[-1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1].tolist()) == SAMPLE_TEXT
    cached_files = list(cache.glob("ids-*.pt"))
    assert len(cached_files) == 1
    again = load_token_ids(text_file, tokenizer, cache_dir=cache)
    assert torch.equal(ids, again)
    assert list(cache.glob("ids-*.pt")) == cached_files


def test_edited_file_is_retokenized(text_file, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    before = load_token_ids(text_file, tokenizer, cache_dir=cache)
    text_file.write_text("A different text entirely.\n", encoding="utf-8")
    after = load_token_ids(text_file, tokenizer, cache_dir=cache)
    assert tokenizer.decode(after[:-1].tolist()) == "A different text entirely.\n"
    assert after.numel() < before.numel()


def test_missing_file_raises(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_token_ids(tmp_path / "no_such_file.txt", tokenizer, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        train_tokenizer([str(tmp_path / "no_such_file.txt")], vocab_size=VOCAB_SIZE, cache_dir=tmp_path)


def test_empty_file_raises(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_token_ids(empty, tokenizer, cache_dir=tmp_path)


def test_split_train_eval_keeps_every_token_once():
    ids = torch.arange(1000)
    train, held_out = split_train_eval(ids, eval_fraction=0.1)
    assert held_out.numel() == 100
    assert torch.equal(torch.cat([train, held_out]), ids)
    with pytest.raises(ValueError):
        split_train_eval(ids, eval_fraction=0.0)


def test_contiguous_windows_tile_without_overlap():
    windows = contiguous_windows(torch.arange(10), seq_len=3)
    assert torch.equal(windows, torch.arange(9).view(3, 3))


# ----------------------------------------------------------------------------- batches


def test_packed_batches_are_deterministic_windows():
    ids = torch.arange(500)
    first = [next(PackedBatches(ids, batch_size=4, seq_len=16, seed=7)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    batch = first[0]
    assert batch.shape == (4, 16) and batch.dtype == torch.long
    # Every row is a contiguous run of the (here strictly increasing) token ids.
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 15, dtype=torch.long))
    other_seed = next(PackedBatches(ids, batch_size=4, seq_len=16, seed=8))
    assert not torch.equal(batch, other_seed)


def test_packed_batches_resume_exactly_from_state_dict():
    ids = torch.arange(10_000)
    uninterrupted = PackedBatches(ids, batch_size=3, seq_len=8, seed=0)
    expected = [next(uninterrupted) for _ in range(10)]

    interrupted = PackedBatches(ids, batch_size=3, seq_len=8, seed=0)
    for _ in range(4):
        next(interrupted)
    saved = interrupted.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # the state survives a real checkpoint round trip
    buffer.seek(0)
    resumed = PackedBatches(ids, batch_size=3, seq_len=8, seed=123)  # seed is overridden by the state
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.batches_drawn == 4
    for step in range(4, 10):
        assert torch.equal(next(resumed), expected[step])
    assert resumed.batches_drawn == 10


def test_packed_batches_reject_mismatched_state():
    ids = torch.arange(100)
    state = PackedBatches(ids, batch_size=2, seq_len=8, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(ids, batch_size=2, seq_len=9, seed=0).load_state_dict(state)


def test_packed_batches_reject_too_short_ids():
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedBatches(torch.arange(5), batch_size=2, seq_len=8, seed=0)


# ----------------------------------------------------------------------------- models


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown model shape 'llama-8b'.*tiny.*llama-70b"):
        llama_config("llama-8b", vocab_size=1000)


def test_tiny_model_forward_backward():
    config = llama_config("tiny", vocab_size=VOCAB_SIZE)
    model = build_model(config, seed=0)
    input_ids = torch.randint(VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB_SIZE))).item()) < 1.0  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    config = llama_config("tiny", vocab_size=VOCAB_SIZE)
    torch.manual_seed(1)
    expected_draw = torch.rand(1)
    torch.manual_seed(1)
    first, second = build_model(config, seed=3), build_model(config, seed=3)
    assert torch.rand(1) == expected_draw
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    third = build_model(config, seed=4)
    assert not torch.equal(first.lm_head.weight, third.lm_head.weight)


def test_build_model_casts_dtype():
    model = build_model(llama_config("tiny", vocab_size=VOCAB_SIZE), seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "name, published_params",
    [("llama-7b", 6.74e9), ("llama-13b", 13.02e9), ("llama-70b", 68.98e9)],
)
def test_llama2_shapes_match_published_parameter_counts(name, published_params):
    config = llama_config(name, vocab_size=LLAMA2_VOCAB_SIZE)
    with torch.device("meta"):
        model = build_model(config, seed=0)
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params - published_params) / published_params < 0.02
