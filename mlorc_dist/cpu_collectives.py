"""Collectives for engines on CPU process groups (gloo), where a collective has finished when its
call returns and freed memory goes back to the host. The engines are written for GPUs: they keep
buffers alive for overlap with compute on other streams, or copy what NCCL would use in place.
Here each buffer is freed once used, with the same numbers bit for bit
(tests/test_cpu_collectives.py):

- FSDP2 (mlorc_dist.build.shard_fsdp2 on a CPU mesh): no backward prefetch, CPUAllGather,
  CPUReduceScatter and an in-place CPU kernel for FSDP2's fsdp::chunk_cat;
- DeepSpeed ZeRO-3 (mlorc_dist.deepspeed.initialize on gloo): gloo_reduce_scatter.

Each goes through the hook the engine has (FSDP2's custom comm classes, torch.library) or, where
it has none (DeepSpeed's coalesced reduce-scatter), replaces the one function that needs it.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist
# the interfaces FSDPModule.set_custom_all_gather / _reduce_scatter take (torch exports the methods)
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

__all__ = ["fsdp2_collectives_on_cpu", "CPUAllGather", "CPUReduceScatter", "chunk_cat_rows",
           "reduce_scatter_in_place", "zero3_reduce_scatter_on_gloo", "gloo_reduce_scatter"]


def fsdp2_collectives_on_cpu(unit, all_gather: "CPUAllGather") -> None:
    """FSDP2 overlaps collectives with compute on a GPU: in backward each unit gathers the next
    one's parameters ahead (prefetch), and each unit keeps its all-gather and reduce-scatter
    buffers until the next unit's. On a CPU mesh the collectives are synchronous, so all three
    only hold memory: a second unit gathered, a whole unit's parameters or gradient kept. An
    explicit prefetch list turns FSDP2's default off; the unit itself (already gathered when its
    backward starts) is the list that prefetches nothing. CPUAllGather and CPUReduceScatter free
    their buffers once used, and the copy of the gradients into the reduce-scatter buffer writes
    in place (_register_cpu_chunk_cat). `all_gather` is one instance for every unit of a model."""
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
            raise ValueError("CPUReduceScatter runs synchronously; FSDP2 asked for an asynchronous "
                             "reduce-scatter")
        reduce_scatter_in_place(input_tensor, output_tensor, group, op)     # on FSDP2's scratch buffer
        input_tensor.untyped_storage().resize_(0)     # FSDP2's own way of freeing a buffer it still references
        return None


def reduce_scatter_in_place(input_tensor: torch.Tensor, output_tensor: torch.Tensor, group=None,
                            op=dist.ReduceOp.SUM) -> None:
    """reduce_scatter_tensor(output_tensor, input_tensor) on gloo without its clone: gloo's
    reduce-scatter all-reduces a clone of its input and copies this rank's part out; the same
    all-reduce in place on a buffer the caller may overwrite gives the same numbers, bit for bit.
    The output may be a view of this rank's part of the input (then there is nothing to copy)."""
    dist.all_reduce(input_tensor, op=op, group=group)
    part = input_tensor.view(dist.get_world_size(group), -1)[dist.get_rank(group)]
    if part.data_ptr() != output_tensor.data_ptr():
        output_tensor.copy_(part.view_as(output_tensor))


def gloo_reduce_scatter(input_tensor: torch.Tensor, output_tensor: torch.Tensor, group=None, async_op=False,
                        prof=False):
    """ZeRO-3's reduce-scatter of a gradient bucket (deepspeed.runtime.comm.coalesced_collectives,
    same arguments) on gloo: reduce_scatter_in_place. ZeRO-3's input is a buffer of its own (or a
    gradient it drops next) and its output a view of that buffer, as NCCL's in-place
    reduce-scatter allows, so gloo's clone is a whole bucket more (for a 32000 x 2048 output
    projection, reduced alone: 250 MB) for the same sums."""
    if async_op:
        raise ValueError("gloo_reduce_scatter runs synchronously; DeepSpeed asked for an asynchronous "
                         "reduce-scatter")
    reduce_scatter_in_place(input_tensor, output_tensor, group)


def zero3_reduce_scatter_on_gloo() -> bool:
    """Give ZeRO-3's gradient reduce-scatter gloo_reduce_scatter when the process group is gloo
    (DeepSpeed on the CPU). DeepSpeed has no option for it: its coalesced collectives call one
    module-level function, which this replaces (for every ZeRO-3 engine in the process)."""
    from deepspeed.runtime.comm import coalesced_collectives
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    coalesced_collectives._torch_reduce_scatter_fn = gloo_reduce_scatter
    return True
