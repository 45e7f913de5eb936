"""mlorc_dist.export.write_hf_model: a plain HF directory written one parameter at a time, in
shards with an index when it is large, loadable by from_pretrained with the same weights."""
from __future__ import annotations

import json

import pytest
import torch


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return {"llama": lambda: LlamaForCausalLM(LlamaConfig(**llama)),
            "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**llama, tie_word_embeddings=True)),
            "gpt2-conv1d": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                             n_positions=64))}


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2-conv1d"])
@pytest.mark.parametrize("max_shard_bytes", [10_000, 1 << 30])
def test_export_loads_with_the_same_weights(tmp_path, name, max_shard_bytes):
    from transformers import AutoModelForCausalLM
    from mlorc_dist.export import write_hf_model
    torch.manual_seed(0)
    model = _models()[name]()
    target = write_hf_model(model.named_parameters(), model.config, tmp_path / "export",
                            max_shard_bytes=max_shard_bytes)
    index = target / "model.safetensors.index.json"
    if max_shard_bytes == 10_000:
        shards = sorted(p.name for p in target.glob("model-*.safetensors"))
        assert len(shards) > 2 and index.is_file()
        assert set(json.loads(index.read_text())["weight_map"].values()) == set(shards)
    else:
        assert (target / "model.safetensors").is_file() and not index.exists()
    loaded = AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    mine, theirs = dict(model.state_dict()), dict(loaded.state_dict())
    assert set(mine) == set(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    if name == "llama-tied":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not (tmp_path / "export.tmp").exists()


def test_a_failed_export_leaves_the_previous_one(tmp_path):
    from mlorc_dist.export import write_hf_model
    model = _models()["llama"]()
    target = write_hf_model(model.named_parameters(), model.config, tmp_path / "export")
    before = sorted(p.name for p in target.iterdir())

    def failing():
        yield from list(model.named_parameters())[:3]
        raise RuntimeError("a gather failed")
    with pytest.raises(RuntimeError, match="a gather failed"):
        write_hf_model(failing(), model.config, tmp_path / "export")
    assert sorted(p.name for p in target.iterdir()) == before


def test_the_stream_writes_what_safetensors_reads(tmp_path):
    """SafetensorsStream (one tensor held at a time) against safetensors' own reader: every dtype
    an export writes, an empty tensor, a 0-d one; nothing left beside the file."""
    from safetensors.torch import load_file
    from mlorc_dist.export import SafetensorsStream
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "h": torch.randn(2, 2, generator=g).half(), "d": torch.randn(3, generator=g).double(),
               "i": torch.arange(9).reshape(3, 3), "mask": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "t": torch.randn(4, 6, generator=g).t()}
    stream = SafetensorsStream(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        stream.add(name, value)
    stream.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    with pytest.raises(ValueError, match="complex64"):
        SafetensorsStream(tmp_path / "y.safetensors").add("c", torch.zeros(2, dtype=torch.complex64))
