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
import weakref

import torch
import torch.distributed as dist
from torch import nn
# the interfaces FSDPModule.set_custom_all_gather / _reduce_scatter take (torch exports the methods)
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

__all__ = ["meta_model", "materialize", "fill", "zero3_model", "fsdp2_units", "shard_fsdp2", "CPUAllGather", "CPUReduceScatter", "chunk_cat_rows", "SeededInit",
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
    (_synchronous_collectives)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
            _synchronous_collectives(unit, all_gather)
    root = fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    if cpu:
        _synchronous_collectives(root, all_gather)


def _synchronous_collectives(unit, all_gather: "CPUAllGather") -> None:
    """FSDP2 overlaps collectives with compute on a GPU: in backward each unit gathers the next
    one's parameters ahead (prefetch), and each unit keeps its all-gather and reduce-scatter
    buffers until the next unit's. On a CPU mesh the collectives are synchronous, so all three
    only hold memory: a second unit gathered, a whole unit's parameters or gradient kept. An
    explicit prefetch list turns FSDP2's default off; the unit itself (already gathered when its
    backward starts) is the list that prefetches nothing. CPUAllGather and CPUReduceScatter free their buffers once they are used, and the
    copy of the gradients into the reduce-scatter buffer writes in place (_register_cpu_chunk_cat)."""
    _register_cpu_chunk_cat()
    unit.set_modules_to_backward_prefetch([unit])
    unit.set_custom_all_gather(all_gather)
    unit.set_custom_reduce_scatter(CPUReduceScatter())


class CPUAllGather(AllGather):
    """FSDP2's all-gather of a unit's parameters for a CPU mesh, freeing the previous unit's
    all-gather buffer when the next unit gathers.

    In forward FSDP2 keeps each unit's all-gather buffer (the whole unit, flat) until the next
    unit has gathered, so that a GPU can copy one unit out while the next is in flight. A unit
    has been copied out of its buffer before FSDP2 gathers the next one (wait_for_unshard before
    the next unshard; asynchronous prefetching, which would break this, is refused), so on a CPU
    mesh the kept buffer only adds a whole unit to the next unit's gather. One instance serves
    every unit of a model."""

    def __init__(self):
        self._last = None           # a weak reference: FSDP2 drops the buffer itself after forward

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        last = self._last() if self._last is not None else None
        if last is not None:
            last.untyped_storage().resize_(0)      # copied out already (see the class)
        buffer = torch.empty(*size, dtype=dtype, device=device)
        self._last = weakref.ref(buffer)
        return buffer

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        if async_op:
            raise ValueError("CPUAllGather runs synchronously; FSDP2 asked for an asynchronous all-gather")
        dist.all_gather_single(output_tensor, input_tensor, group=group)
        return None


def chunk_cat_rows(tensors, dim: int, num_chunks: int, *, out: torch.Tensor) -> None:
    """torch._chunk_cat(tensors, 0, num_chunks, out=out), writing straight into `out`: tensor i
    is padded with zero rows to a multiple of num_chunks, cut into num_chunks row blocks, and
    row k of out (viewed as num_chunks rows) is the concatenation of every tensor's block k."""
    if dim != 0:
        raise ValueError(f"chunk_cat_rows cuts along dim 0 (FSDP2's layout), not dim {dim}")
    blocks = out.view(num_chunks, -1)
    offset = 0
    for t in tensors:
        if t.size(0) == 0:
            continue
        rows = -(-t.size(0) // num_chunks)
        width = t[0].numel()
        block = blocks[:, offset:offset + rows * width].unflatten(1, (rows, width))
        full, rest = divmod(t.size(0), rows)
        flat = t.reshape(t.size(0), width)
        block[:full].copy_(flat[:full * rows].view(full, rows, width))
        if full < num_chunks:
            block[full, :rest].copy_(flat[full * rows:])
            block[full, rest:].zero_()
            block[full + 1:].zero_()
        offset += rows * width


_CPU_CHUNK_CAT = []


def _register_cpu_chunk_cat() -> None:
    """FSDP2 copies a unit's gradients into its reduce-scatter buffer with its own operator,
    fsdp::chunk_cat, whose CPU kernel (torch._chunk_cat) first makes a zero-padded copy of every
    gradient whose rows do not divide by the world size: a whole unit's gradient more, at the
    moment the gradients and the buffer both exist (a 32000 x 2048 projection at world size 3:
    250 MB). Its CUDA kernel writes in place. This gives the CPU the same, through torch.library,
    the mechanism FSDP2 registers the operator with; the values are the same, bit for bit."""
    if _CPU_CHUNK_CAT:
        return
    import warnings
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (defines fsdp::chunk_cat)
    library = torch.library.Library("fsdp", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        library.impl("chunk_cat", chunk_cat_rows, "CPU")
    _CPU_CHUNK_CAT.append(library)         # the registration lasts as long as the Library object


class CPUReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter of a unit's gradients for a CPU mesh, freeing its input buffer (the
    unit's whole unsharded gradient) as soon as the collective returns.

    FSDP2 keeps that buffer alive until the next unit's reduce-scatter (at least one in flight,
    set_reduce_scatter_max_input_buffers), so that a GPU's caching allocator cannot hand the memory
    to the compute stream while the collective still reads it. A CPU collective has returned when
    the call does (gloo, async_op=False) and freed memory goes back to the host, so the kept buffer
    only adds a whole unit's gradient to the next unit's backward: 250 MB for a 32000 x 2048
    output projection. FSDP2 has no switch for this; its own comm hook is the place."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if async_op:
            raise ValueError("CPUReduceScatter runs synchronously; FSDP2 asked for an asynchronous reduce-scatter")
        # gloo's reduce-scatter all-reduces a clone of its input, then copies this rank's part out:
        # the same all-reduce in place on FSDP2's scratch buffer gives the same numbers without
        # a second copy of the unit's gradient
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])
        input_tensor.untyped_storage().resize_(0)     # FSDP2's own way of freeing a buffer it still references
        return None


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

