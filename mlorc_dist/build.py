"""Building a model whose initial weights do not depend on how it is sharded.

    model = meta_model(config)                       # parameters on the meta device, buffers real
    fully_shard(...)                                 # FSDP2 shards the meta parameters
    materialize(model, seed)                         # each rank allocates and fills only its rows

    model = AutoModelForCausalLM.from_config(config) # or a whole model, in one process
    init_weights(model, seed)                        # the same values

Each parameter is drawn from a generator seeded by (seed, its name), whole, then this rank keeps
its rows of it: the values are the same at every world size, and in one process, while a rank
never holds more than its shard plus one whole parameter. The rules are Hugging Face's
`_init_weights` for the model types in SHARDED_INIT_MODEL_TYPES (normal(0, initializer_range)
for Linear and Embedding weights, the padding row of an embedding zero, biases zero, norm
weights one); a parameter of any other module is a ValueError naming it.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["meta_model", "materialize", "init_weights", "parameter_values", "has_sharded_init",
           "SHARDED_INIT_MODEL_TYPES"]

# Model types whose Hugging Face `_init_weights` these rules reproduce (norms x * w with w = 1,
# no scaled projections). Others (Gemma's x * (1 + w) norms, GPT-2's scaled c_proj, ...) keep
# their own initialisation, built whole with the same seed on every rank.
SHARDED_INIT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def has_sharded_init(config) -> bool:
    """Whether `config`'s model can be built on the meta device and initialised shard by shard."""
    return getattr(config, "model_type", None) in SHARDED_INIT_MODEL_TYPES


def meta_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config` with its parameters (of `dtype`) on the meta device (nothing
    allocated) and its buffers (rotary frequencies, ...) computed on the CPU as the constructor
    makes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def parameter_values(module: nn.Module, attr: str, shape: tuple, std: float, seed: int, name: str) -> torch.Tensor:
    """The whole initial value of parameter `attr` of `module` (called `name` in the model)."""
    kind = type(module).__name__
    if attr == "bias":
        return torch.zeros(shape)
    if attr == "weight" and (isinstance(module, (nn.Linear, nn.Embedding)) or kind == "Conv1D"):
        values = torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            values[module.padding_idx] = 0
        return values
    if attr == "weight" and ("Norm" in kind or isinstance(module, nn.LayerNorm)):
        return torch.ones(shape)
    raise ValueError(f"no initialisation rule for {name} (a parameter of {kind}): start such a model "
                     "from --init-from")


def _owned(model: nn.Module):
    """(module, attribute, full name, parameter) of every parameter, each once (tied ones once)."""
    seen = set()
    for prefix, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield module, attr, f"{prefix}.{attr}" if prefix else attr, param


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Every (whole, local) parameter set to its initial value."""
    std = model.config.initializer_range
    for module, attr, name, param in _owned(model):
        param.copy_(parameter_values(module, attr, tuple(param.shape), std, seed, name).to(param.dtype))


@torch.no_grad()
def materialize(model: nn.Module, seed: int, device: torch.device) -> None:
    """After fully_shard on a meta_model: allocate this rank's shards on `device` and fill them
    with their rows of the initial values; buffers keep the values the constructor computed."""
    from torch.distributed.tensor import DTensor
    from .engines.fsdp2 import _shard0_row_range
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    std = model.config.initializer_range
    for module, attr, name, param in _owned(model):
        if not isinstance(param, DTensor):
            param.copy_(parameter_values(module, attr, tuple(param.shape), std, seed, name).to(param.dtype))
            continue
        mesh = param.device_mesh
        start, stop = _shard0_row_range(param.shape[0], mesh.size(), mesh.get_local_rank())
        whole = parameter_values(module, attr, tuple(param.shape), std, seed, name)
        param.to_local().copy_(whole[start:stop].to(param.dtype))
