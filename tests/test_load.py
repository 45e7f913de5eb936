"""--init-from: a Hugging Face safetensors directory read by slices (mlorc_dist.load, filled by
mlorc_dist.build.fill). One process here; FSDP2 at 1, 2 and 3 ranks and ZeRO-3 at 2 through
launch/train.py's own functions (tests/dist/eval_worker.py exports the weights as loaded), each
equal to the directory's. Bad directories: a ValueError naming the tensor or file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL_WORKER = str(ROOT / "tests" / "dist" / "eval_worker.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
VOCAB = 2048      # at least the tokenizer's (trained on the demo corpus), as train.py requires


def _make(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(7)
    if name == "gpt2-conv1d":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    # odd row counts (intermediate 67 is not a multiple of 2 or 3) reach every slicing case
    return LlamaForCausalLM(LlamaConfig(**{**llama, "intermediate_size": 67}, tie_word_embeddings=name == "llama-tied"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlorc_dist.data import default_corpus_path, train_tokenizer
    return train_tokenizer([str(default_corpus_path())], VOCAB, tmp_path_factory.mktemp("tok"))


def _directory(root: Path, name: str, tokenizer, max_shard_size=None) -> Path:
    model = _make(name)
    target = root / name
    model.save_pretrained(target, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(target)
    return target


def _files(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2-conv1d"])
@pytest.mark.parametrize("sharded", [False, True])
def test_one_process_loads_the_directory(tmp_path, tokenizer, name, sharded):
    from transformers import AutoConfig
    from mlorc_dist.build import build_model
    directory = _directory(tmp_path, name, tokenizer, "100KB" if sharded else None)
    assert (directory / "model.safetensors.index.json").is_file() == sharded
    model = build_model(AutoConfig.from_pretrained(directory), engine="single", seed=0,
                        device=torch.device("cpu"), init_from=directory)
    reference = _make(name)
    mine, theirs = model.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], theirs[k])]
    if name != "llama":
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(p.is_meta for p in model.parameters())


def test_a_file_without_the_base_model_prefix_loads(tmp_path, tokenizer):
    """GPT-2 files as OpenAI's were converted: "h.0.attn..." for the model's "transformer.h.0.attn..."."""
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from mlorc_dist.build import build_model
    directory = _directory(tmp_path, "gpt2-conv1d", tokenizer)
    tensors = {k.removeprefix("transformer."): v for k, v in _files(directory).items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model = build_model(AutoConfig.from_pretrained(directory), engine="single", seed=0,
                        device=torch.device("cpu"), init_from=directory)
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, tensors["h.1.attn.c_attn.weight"])


def _load(directory):
    from transformers import AutoConfig
    from mlorc_dist.build import build_model
    return build_model(AutoConfig.from_pretrained(directory), engine="single", seed=0, device=torch.device("cpu"),
                       init_from=directory)


def _rewrite(directory: Path, change) -> None:
    from safetensors.torch import save_file
    tensors = _files(directory)
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case,message", [
    ("missing", r"no tensor for the model's model\.layers\.1\.mlp\.up_proj\.weight"),
    ("extra", r"tensors the model has no parameter for: model\.layers\.7\.extra\.weight \(in model\.safetensors\)"),
    ("shape", r"model\.safetensors: model\.norm\.weight has shape \[31\], the model's model\.norm\.weight \[32\]"),
    ("truncated", r"model\.safetensors"),
    ("index", r"model\.safetensors\.index\.json does not match its files: lm_head\.weight"),
    ("index-file", r"names model-00009-of-00009\.safetensors, which is missing"),
    ("nothing", r"neither model\.safetensors\.index\.json nor model\.safetensors"),
])
def test_bad_directories_are_errors_naming_what_is_wrong(tmp_path, tokenizer, case, message):
    directory = _directory(tmp_path, "llama", tokenizer, "100KB" if case.startswith("index") else None)
    if case == "missing":
        _rewrite(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "extra":
        _rewrite(directory, lambda t: t.update({"model.layers.7.extra.weight": torch.zeros(3)}))
    elif case == "shape":
        _rewrite(directory, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    elif case == "truncated":
        path = directory / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case.startswith("index"):
        index_path = directory / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        files = sorted(set(index["weight_map"].values()))
        if case == "index":     # lm_head.weight said to be in a file that does not hold it
            holder = index["weight_map"]["lm_head.weight"]
            index["weight_map"]["lm_head.weight"] = next(f for f in files if f != holder)
        else:
            index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
        index_path.write_text(json.dumps(index))
    else:
        (directory / "model.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ValueError, match=message):
        _load(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before    # nothing written


# --------------------------------------------------------------------------- real engines
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _ok(cmd):
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


ENGINE_RUNS = [("fsdp2", 1, "llama-tied", 29620), ("fsdp2", 2, "llama-tied", 29621), ("fsdp2", 3, "llama-tied", 29622),
               ("fsdp2", 2, "llama", 29623), ("zero3", 2, "llama-tied", 29624), ("zero3", 2, "gpt2-conv1d", 29625),
               ("single", 1, "gpt2-conv1d", None)]


@pytest.mark.parametrize("engine,world,name,port", ENGINE_RUNS)
def test_engines_load_the_directory_each_rank_its_slices(tmp_path, tokenizer, engine, world, name, port):
    """launch/train.py's build under each engine, then its --export of the weights as loaded:
    the directory's tensors, bitwise (tied embeddings written once)."""
    directory = _directory(tmp_path, name, tokenizer, "100KB")
    flags = [str(tmp_path / "r.json"), "0", "--init-from", str(directory), "--seq-len", "16", "--global-batch", "6",
             "--micro-batch", "1", "--export", "--collective-timeout", "60", "--out", str(tmp_path / "run")]
    if engine == "fsdp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
               EVAL_WORKER, *flags, "--fsdp"]
    elif engine == "zero3":
        cmd = [DEEPSPEED, "--num_accelerators", str(world), "--master_port", str(port), EVAL_WORKER, *flags,
               "--deepspeed", str(ROOT / "ds_configs" / "mlorc_zero3.json")]
    else:
        cmd = [sys.executable, EVAL_WORKER, *flags]
    _ok(cmd)
    loaded, expected = _files(tmp_path / "run" / "export"), _files(directory)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), \
        [k for k in expected if not torch.equal(loaded[k], expected[k])]


def test_fsdp2_units_follow_the_forward_and_keep_tied_embeddings_in_the_root():
    """Untied: the embeddings, each decoder layer, then the final norm with the output projection
    (not resharded after forward); tied: the layers only (the shared weight stays in the root).
    The planner maps each parameter to the same units."""
    from mlorc_dist.build import fsdp2_units
    from mlorc_dist.memory.planner import _fsdp2_units
    untied, tied = _make("llama"), _make("llama-tied")
    units = fsdp2_units(untied)
    assert [name for name, _, _ in units] == ["embeddings", "layer 0", "layer 1", "output"]
    assert units[0][1] == [untied.model.embed_tokens] and units[-1][1] == [untied.model.norm, untied.lm_head]
    assert [reshard for _, _, reshard in units] == [True, True, True, False]
    owner = _fsdp2_units(untied)
    assert owner["model.embed_tokens.weight"] == 0 and owner["lm_head.weight"] == owner["model.norm.weight"] == 3
    assert owner["model.layers.1.mlp.up_proj.weight"] == 2
    assert [name for name, _, _ in fsdp2_units(tied)] == ["layer 0", "layer 1"]
    assert _fsdp2_units(tied)["model.embed_tokens.weight"] == -1
    with pytest.raises(ValueError, match="DecoderLayer"):
        fsdp2_units(torch.nn.Linear(2, 2))
