"""The fused MLorc step of one block: rebuild, negative fix, moments and weight update in one
pass over memory (the fused step: `fused=True` on the optimizers, and their default on the CPU).
On a GPU (and on the CPU under MLORC_GPU_RULES_ON_CPU=1) the functions below are compiled by
torch.compile (Triton kernels), one call per batch of same-shaped bodies; on the CPU the same math
runs in a C++ kernel (blocks.cpp, built by cpu_kernels.py), one call per batch of bodies
(adamw_blocks_, lion_blocks_).

The reference path (functional.py, lowrank.py) materialises the rebuilt moments with a GEMM,
then makes a dozen elementwise passes over them (the fix's statistics and fill, the moment
updates, sqrt, the division, the weight update, the weight decay). Here the rebuilt entry
(U diag(s) Vh)[i, j] = sum_k us[i, k] vh[k, j] is written as r broadcast products, so the
compiler can compute it inside the elementwise kernel, one element at a time: the step reads
G and W once and writes W and the new second moment V once (into a workspace the optimizer
keeps between steps, so no page of it is fresh from the OS), and the negative-fix statistics
are one read-free reduction over the factors. The new first moment b M~ + (1 - b) G is never
written at all: its range finder multiplies G and the old factors instead
(lowrank.randomized_svd_of_update). What remains outside the kernel is the range finder (over
G and the factors for M, over the workspace for V): on the CPU one C++ call per moment and batch
(skinny.compress_batch).

The block functions below are plain torch: run eagerly, they compute the reference's math
(tests compare them, the compiled step and the C++ kernel against the reference path). Compiled,
their hyperparameters travel as 0-d tensors so that a new learning rate or step count does not
recompile.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..compiled_range import UNROLLED_RANK, CompiledFunction, rank_sum
from ..lowrank import negative_fill_value, per_body, takes_gpu_rules
from . import cpu_kernels
from .rounding import flat_keys, hashed_bits, stochastic_round

__all__ = [
    "rank_sum",
    "factored_negative_stats",
    "scalars",
    "adamw_block_",
    "lion_block_",
    "runs_cpu_kernels",
    "adamw_blocks_",
    "lion_blocks_",
    "compiled",
    "Stacked",
]


def per_block(x: torch.Tensor) -> torch.Tensor:
    """A value per block, 0-d (one block) or (B,) (a batch), shaped to broadcast over the
    blocks' entries (.., 1, 1)."""
    return x[..., None, None]


def factored_negative_stats(us: torch.Tensor, vh: torch.Tensor,
                            floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lowrank.negative_stats of the rebuilt us @ vh, without materialising it: sum of |v| over
    the entries below -floor, and their count; per block of a batch (us (B, k, r), vh (B, r, n),
    floor (B,)) or of one block (2-D, floor 0-d). Summed per row first: the compiler then keeps
    the rebuilt entries in registers (one whole-tensor sum made it write them out)."""
    v = rank_sum(us, vh)
    count = (v < -per_block(floor)).sum(dim=-1, dtype=v.dtype).sum(dim=-1)
    return floor * count - torch.clamp_max(v + per_block(floor), 0).sum(dim=-1).sum(dim=-1), count


def scalars(*values, like: torch.Tensor) -> list[torch.Tensor]:
    """Hyperparameters as 0-d tensors of like's dtype: a compiled kernel reads them at run time,
    so a new learning rate or step count does not recompile. Python numbers become CPU tensors
    (a 0-d CPU tensor is a scalar argument to a GPU kernel: no host-to-device copy); tensors
    keep their device. (Measured: one 1-D tensor of them, or moments written into caller
    buffers, kept the compiler from fusing the rebuild into the update loop.)"""
    return [torch.as_tensor(x, dtype=like.dtype,
                            device=x.device if isinstance(x, torch.Tensor) else "cpu").reshape(())
            for x in values]


def written(w: torch.Tensor, new: torch.Tensor, round_key: torch.Tensor | None) -> torch.Tensor:
    """The block's new weights as w.copy_ should take them: stochastically rounded to bf16 under
    round_key (int64, per block (seed_lo, seed_hi, start): (3,) for one block, (B, 3) for a batch;
    optim/rounding.py's bits of each element's index in the parameter), else as they are (copy_
    rounds to nearest)."""
    if round_key is None:
        return new
    k, n = new.shape[-2:]
    index = per_block(round_key[..., 2]) + torch.arange(k * n, device=new.device).view(k, n)
    return stochastic_round(new, hashed_bits(index, per_block(round_key[..., 0]), per_block(round_key[..., 1])))


def adamw_block_(w: torch.Tensor, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor,
                 v_us: torch.Tensor, v_vh: torch.Tensor, floor: torch.Tensor, beta1: torch.Tensor,
                 beta2: torch.Tensor, step_size: torch.Tensor, eps: torch.Tensor, decay: torch.Tensor,
                 v_out: torch.Tensor, round_key: torch.Tensor | None = None) -> None:
    """One MLorc-AdamW block update: writes this step's V into v_out and sets w to
    (w - step_size M / (sqrt(V) + eps)) * decay. The rebuilt previous second moment's entries
    below -floor become the mean |v| over them, those in [-floor, floor) become floor
    (lowrank.fill_negatives_); the statistics are a first loop over the factors.
    M is not stored: it is b1 M~ + (1 - b1) G, compressed from the factors and G
    (lowrank.MomentUpdate). (Measured: writing M too, into a caller's buffer, made the compiler
    write the rebuilt moments out first; V alone keeps one loop.)
    One block (w, g (k, n), floor and step_size 0-d) or a batch of B (w, g (B, k, n), factors
    (B, k, r) and (B, r, n), floor (B,), step_size 0-d or (B,)): one call for the batch."""
    abs_sum, count = factored_negative_stats(v_us, v_vh, floor)
    fill = per_block(negative_fill_value(abs_sum, count))
    floor, step_size = per_block(floor), per_block(step_size)
    m_prev = rank_sum(m_us, m_vh)
    v_prev = rank_sum(v_us, v_vh)
    v_prev = torch.where(v_prev < -floor, fill, torch.clamp_min(v_prev, floor))
    m = m_prev + (1 - beta1) * (g - m_prev)
    v = beta2 * v_prev + (1 - beta2) * (g * g)
    w.copy_(written(w, (w.to(m.dtype) - step_size * m / (torch.sqrt(v) + eps)) * decay, round_key))
    v_out.copy_(v)


def lion_block_(w: torch.Tensor, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor,
                beta1: torch.Tensor, lr: torch.Tensor, decay: torch.Tensor,
                round_key: torch.Tensor | None = None) -> None:
    """One MLorc-Lion block update: sets w to (w - lr sign(b1 M~ + (1 - b1) G)) * decay. The new
    moment b2 M~ + (1 - b2) G is not formed here (lowrank.MomentUpdate). One block (2-D) or a
    batch (3-D), as adamw_block_."""
    m_prev = rank_sum(m_us, m_vh)
    direction = torch.sign(m_prev + (1 - beta1) * (g - m_prev))
    w.copy_(written(w, (w.to(m_prev.dtype) - lr * direction) * decay, round_key))


def runs_cpu_kernels(t: torch.Tensor) -> bool:
    """The fixed rule for where a batch's block update runs: CPU tensors in the C++ kernel
    (blocks.cpp), any other device (and the CPU under MLORC_GPU_RULES_ON_CPU=1,
    lowrank.takes_gpu_rules) through the compiled block function."""
    return t.device.type == "cpu" and not takes_gpu_rules(t.device)


def _written_in_place(tensors: list) -> None:
    """Bump the version counters of tensors a C++ kernel wrote through their data pointers, as
    torch's own in-place operations do (autograd's and engines' checks see the change)."""
    torch.autograd.graph.increment_version(tensors)


def adamw_blocks_(ws: list, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor, v_us: torch.Tensor,
                  v_vh: torch.Tensor, floors: torch.Tensor, beta1: float, beta2: float, step_sizes: list,
                  eps: float, decay: float, v_out: torch.Tensor, roundings: list | None = None,
                  stacked=None) -> None:
    """adamw_block_ on every body of a batch: ws (B weights (k, n)), g (B, k, n) in the compute
    dtype, the factors stacked ((B, k, r), (B, r, n)), floors (B,) (the second moment's), one
    step size per body, v_out (B, k, n), roundings (one rounding.Rounding per body: bf16 weights
    written stochastically; None: to nearest). On the CPU one call of the C++ kernel (blocks.cpp);
    elsewhere one call of the compiled adamw_block_ for the whole batch, on the weights gathered
    into `stacked` (a (B, k, n) workspace of the weights' dtype, or a Stacked of it and its rows;
    a lone body is updated in place)."""
    if runs_cpu_kernels(g):
        cpu_kernels.extension().adamw_blocks(ws, g, m_us.contiguous(), m_vh.contiguous(), v_us.contiguous(),
                                             v_vh.contiguous(), floors, beta1, beta2, step_sizes, eps,
                                             decay, v_out, flat_keys(roundings))
        _written_in_place([*ws, v_out])
        return
    w = _gathered(ws, stacked)
    compiled(adamw_block_)(w, g, m_us, m_vh, v_us, v_vh, floors.to(g.dtype),
                           *scalars(beta1, beta2, like=g), per_body(step_sizes, g.dtype, g.device),
                           *scalars(eps, decay, like=g), v_out, _round_keys(roundings, g.device))
    _scattered(w, ws, stacked)


def lion_blocks_(ws: list, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor, beta1: float,
                 lr: float, decay: float, roundings: list | None = None,
                 stacked: torch.Tensor | None = None) -> None:
    """lion_block_ on every body of a batch (shapes as adamw_blocks_): one C++ call on the CPU,
    one compiled lion_block_ call for the batch elsewhere."""
    if runs_cpu_kernels(g):
        cpu_kernels.extension().lion_blocks(ws, g, m_us.contiguous(), m_vh.contiguous(), beta1, lr, decay,
                                            flat_keys(roundings))
        _written_in_place(ws)
        return
    w = _gathered(ws, stacked)
    compiled(lion_block_)(w, g, m_us, m_vh, *scalars(beta1, lr, decay, like=g), _round_keys(roundings, g.device))
    _scattered(w, ws, stacked)


def _round_keys(roundings: list | None, device) -> torch.Tensor | None:
    """The compiled functions' round_key of a batch: int64 (B, 3), per body (seed_lo, seed_hi,
    start), one copy to the device; None (round to nearest) without roundings."""
    if not roundings:
        return None
    return torch.tensor(flat_keys(roundings), dtype=torch.int64).view(-1, 3).to(device, non_blocking=True)


class Stacked(NamedTuple):
    """A batch's (B, k, n) weight workspace and its B rows (views, made once by the optimizer)."""
    tensor: torch.Tensor
    rows: list


def _gathered(ws: list, stacked) -> torch.Tensor:
    """The B weights (k, n) as one (B, k, n) tensor: a view of a lone body's own weight, else
    `stacked` (a Stacked, or a plain (B, k, n) tensor) filled by one stack."""
    if len(ws) == 1:
        return ws[0][None]
    tensor = stacked.tensor if isinstance(stacked, Stacked) else stacked
    if tensor is None or tensor.shape != (len(ws), *ws[0].shape) or tensor.dtype != ws[0].dtype:
        raise ValueError(f"a batch of {len(ws)} weights {tuple(ws[0].shape)} {ws[0].dtype} needs a stacked "
                         f"workspace of that shape and dtype")
    return torch.stack(ws, out=tensor)


def _scattered(w: torch.Tensor, ws: list, stacked=None) -> None:
    """Write the updated (B, k, n) weights back into the B bodies by one multi-tensor copy from
    w's rows (Stacked's, when given; nothing for a lone body, updated in place)."""
    if len(ws) > 1:
        torch._foreach_copy_(ws, stacked.rows if isinstance(stacked, Stacked) else list(w.unbind(0)))


# Graphs allowed per fused function: ranks 1..UNROLLED_RANK, x parameter dtypes, x bodies of
# one row and batches of one (a size-1 dimension is specialised), x one step size or one per
# body, with room to spare.
RECOMPILE_LIMIT = 256

# Inductor writes an inlined value out to memory once it is read more than
# realize_reads_threshold (default 4) times. The rebuilt second moment is read 4+ times (the
# negative fix, then V written out and V under the square root), so by default the compiler
# stored both rebuilt moments in m x n temporaries, in loops of their own (measured: 3 loops and
# two fresh 4 MiB buffers per 1024 x 1024 block, whose page faults were half the kernel's time;
# with this: one loop, no temporary). Recomputing an entry costs 2 r multiply-adds; a read
# from memory costs more.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 64}

_COMPILED: dict = {}


def compiled(fn):
    """fn compiled once per process by torch.compile (dynamic shapes, one graph). A failure to
    compile (no C++ compiler for the CPU, no Triton for the GPU) is raised as a RuntimeError
    that says so: fused=True never runs another computation quietly."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _CompiledBlock(fn)
    return _COMPILED[fn]


class _CompiledBlock(CompiledFunction):
    """A block function as compiled_range.CompiledFunction: INDUCTOR_OPTIONS, one graph per rank
    (unrolled), dtype and size-1 dimension up to RECOMPILE_LIMIT, on detached arguments (engine
    partitions can be views that autograd tracks)."""

    def __init__(self, fn):
        super().__init__(fn, prefix="fused=True: ", options=INDUCTOR_OPTIONS, recompile_limit=RECOMPILE_LIMIT,
                         detach=True, needs="The fused step needs a working torch.compile (a C++ compiler on "
                                            "the CPU, Triton on a GPU); fused=False runs the reference path.")
