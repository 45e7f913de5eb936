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

__all__ = ["meta_model", "materialize", "fill", "zero3_model", "fsdp2_units", "shard_fsdp2", "SeededInit",
           "init_weights", "parameter_values", "has_sharded_init", "SHARDED_INIT_MODEL_TYPES"]

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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()     # init_empty_weights leaves tied parameters (lm_head = embeddings) apart
    return model


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


class SeededInit:
    """The initial values of mlorc_dist.build's rules: each parameter drawn whole from its
    (seed, name) generator, then cut to the part asked for (the same at every world size)."""

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std

    def whole(self, module, attr, name, shape):
        return parameter_values(module, attr, shape, self.std, self.seed, name)

    def rows(self, module, attr, name, shape, start, stop):
        return self.whole(module, attr, name, shape)[start:stop]

    def flat(self, module, attr, name, shape, start, stop):
        return self.whole(module, attr, name, shape).reshape(-1)[start:stop]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Every (whole, local) parameter set to its initial value."""
    source = SeededInit(seed, model.config.initializer_range)
    for module, attr, name, param in _owned(model):
        param.copy_(source.whole(module, attr, name, tuple(param.shape)).to(param.dtype))


@torch.no_grad()
def fill(model: nn.Module, device: torch.device, source) -> None:
    """Give every parameter its values from `source` (SeededInit, or mlorc_dist.load's FileSource
    for --init-from), each rank only its part: an FSDP2 DTensor its rows, a ZeRO-3 parameter
    (deepspeed.zero.Init) its flat partition, any other parameter the whole. Parameters still on
    the meta device are first allocated on `device` (to_empty); buffers keep the values the
    constructor computed, or the source's where it holds them."""
    from torch.distributed.tensor import DTensor
    from .engines.fsdp2 import _shard0_row_range
    if any(p.is_meta for p in model.parameters()):
        buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
        model.to_empty(device=device)     # a new Parameter per module: tied ones come apart
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    for buffer, value in getattr(source, "buffers", lambda m: ())(model):
        buffer.copy_(value.to(buffer.dtype))
    for module, attr, name, param in _owned(model):
        if isinstance(param, DTensor):
            shape = tuple(param.shape)
            mesh = param.device_mesh
            start, stop = _shard0_row_range(shape[0], mesh.size(), mesh.get_local_rank())
            param.to_local().copy_(source.rows(module, attr, name, shape, start, stop).to(param.dtype))
        elif hasattr(param, "ds_tensor"):       # ZeRO-3: DeepSpeed's partition of the flat parameter
            import torch.distributed as dist
            shape, total = tuple(param.ds_shape), param.ds_numel
            size = param.ds_tensor.ds_numel
            start = min(size * dist.get_rank(group=param.ds_process_group), total)
            stop = min(start + size, total)
            part = param.ds_tensor.data
            part.zero_()
            if stop > start:
                part[: stop - start].copy_(source.flat(module, attr, name, shape, start, stop).to(part.dtype))
        else:
            param.copy_(source.whole(module, attr, name, tuple(param.shape)).to(param.dtype))


def materialize(model: nn.Module, seed: int, device: torch.device) -> None:
    """After fully_shard on a meta_model: allocate this rank's shards on `device` and fill them
    with their rows of the initial values."""
    fill(model, device, SeededInit(seed, model.config.initializer_range))


def zero3_model(config, ds_config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model built under deepspeed.zero.Init: each parameter is partitioned over the ranks as
    its module is constructed, so the whole model never exists on one rank. Its values are
    Hugging Face's initialisation of empty partitions until `fill` gives them theirs."""
    import importlib
    import deepspeed
    from transformers import AutoModelForCausalLM
    importlib.import_module("torch._dynamo")    # imported inside zero.Init it fails (Tensor.__new__ is patched)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):     # its dtype: the config's (bf16 if enabled)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def fsdp2_units(model: nn.Module) -> list[tuple[str, list[nn.Module], bool]]:
    """The FSDP2 units of `model`, in forward order: (name, modules, reshard_after_forward).

    Each decoder layer is a unit (found by class name, so that peft's wrappers do not hide them).
    With untied embeddings, the input embedding is a unit and the output projection with the
    final norm another (torchtitan's layout): each is gathered only while it runs, and the output
    unit's gradient is reduce-scattered as soon as its backward ends, where in the root they would
    stay unsharded, with the lm_head's gradient, through the whole backward. The output unit is not
    resharded after forward (its backward comes next). Tied embeddings stay in the root, which
    holds whatever no unit took."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"no *DecoderLayer module in {type(model).__name__} to shard with FSDP2")
    units = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    untied = (isinstance(embed, nn.Embedding) and isinstance(output, nn.Linear)
              and embed.weight is not output.weight)
    if untied:
        units.append(("embeddings", [embed], True))
    units += [(f"layer {i}", [layer], True) for i, layer in enumerate(layers)]
    if untied:
        # the final norm: a sibling of the layers' list (LlamaModel.norm), run just before the output
        norms = [m.norm for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
                 and any(layer is layers[0] for layer in m.layers) and isinstance(getattr(m, "norm", None), nn.Module)]
        units.append(("output", norms[:1] + [output], False))
    return units


def shard_fsdp2(model: nn.Module, mesh, mp_policy=None) -> None:
    """fully_shard each of fsdp2_units(model), then the root (whatever is left).

    The embeddings unit is not gathered in backward: an embedding's gradient is computed from
    the token ids alone (FSDP2's set_unshard_in_backward, made for this case). On a CPU mesh no
    unit prefetches another in backward, and each collective's buffer is freed once used
    (mlorc_dist.cpu_collectives)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from .cpu_collectives import CPUAllGather, fsdp2_collectives_on_cpu
    mp_policy = mp_policy or MixedPrecisionPolicy()
    cpu = mesh.device_type == "cpu"
    all_gather = CPUAllGather()
    for name, modules, reshard in fsdp2_units(model):
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard)
        unit = modules[0]             # now an FSDPModule; a list's modules share one FSDP state
        if name == "embeddings":
            unit.set_unshard_in_backward(False)
        if cpu:
            fsdp2_collectives_on_cpu(unit, all_gather)
    root = fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    if cpu:
        fsdp2_collectives_on_cpu(root, all_gather)


def model_source(model: nn.Module, seed: int, init_from=None):
    """Where `model`'s values come from: the --init-from directory's files (read by slices),
    else the seeded initialisation."""
    if init_from:
        from .load import SafetensorsDir
        return SafetensorsDir(init_from).source_for(model)
    return SeededInit(seed, model.config.initializer_range)


def build_model(config, *, engine: str, seed: int, device: torch.device, init_from=None,
                ds_config: dict | None = None, shard_later: bool = False,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config`, its values from --init-from or the seeded initialisation, built so
    that no rank holds more than it trains with:

    - engine "fsdp2" with shard_later: on the meta device; after fully_shard,
      fill(model, device, model_source(model, seed, init_from)) gives each rank its rows;
    - "deepspeed" at ZeRO stage 3 (no adapter): under deepspeed.zero.Init, each rank filling
      only its partition;
    - otherwise whole, allocated once on `device` (no second copy in another dtype or place).

    A model type without sharded initialisation rules (has_sharded_init) and no --init-from
    keeps Hugging Face's own initialisation, built whole on every rank with the same seed."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    if not init_from and not has_sharded_init(config):
        import logging
        logging.getLogger("mlorc_dist.train").info(
            "model type %r: its own Hugging Face initialisation, the whole model built on every rank",
            config.model_type)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    ds_config = ds_config or {}
    if (engine == "deepspeed" and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
            and not ds_config.get("adapter")):
        model = zero3_model(config, ds_config, dtype)
    else:
        model = meta_model(config, dtype)
        if engine == "fsdp2" and shard_later:
            return model
    fill(model, device, model_source(model, seed, init_from))
    return model
