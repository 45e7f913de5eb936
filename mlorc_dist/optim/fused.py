"""The fused MLorc step of one block: rebuild, negative fix, moments and weight update in one
pass over memory, compiled by torch.compile (`fused=True` on the optimizers).

The reference path (functional.py, lowrank.py) materialises the rebuilt moments with a GEMM,
then makes a dozen elementwise passes over them (the fix's statistics and fill, the moment
updates, sqrt, the division, the weight update, the weight decay). Here the rebuilt entry
(U diag(s) Vh)[i, j] = sum_k us[i, k] vh[k, j] is written as r broadcast products, so the
compiler can compute it inside the elementwise kernel, one element at a time: the step reads
G and W once, writes W and the new moments once, and the negative-fix statistics are one
read-free reduction over the factors. What remains outside is the range finder's skinny
products over the new moments (lowrank.randomized_svd), unchanged.

The functions below are plain torch: run eagerly, they compute the reference's math (tests
compare them, and the compiled step, against the reference path). Hyperparameters travel as
0-d tensors so that a new learning rate or step count does not recompile.
"""
from __future__ import annotations

import torch

__all__ = [
    "rank_sum",
    "factored_negative_stats",
    "scalars",
    "adamw_block_",
    "lion_block_",
    "compiled",
]


# Up to this rank the rebuild is unrolled into the elementwise kernel (2 r multiply-adds per
# entry, no m x n temporary); above it the kernel calls a GEMM for it (an unrolled sum of 64
# terms compiles slowly and costs more arithmetic than the memory pass it saves).
UNROLLED_RANK = 8


def rank_sum(us: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """us (k, r) @ vh (r, n). For r <= UNROLLED_RANK written as r broadcast products, an
    elementwise expression that a compiler fuses into whatever consumes it (eagerly it
    materialises, like a GEMM); above, a matrix product."""
    if us.shape[1] > UNROLLED_RANK:
        return us @ vh
    total = us[:, 0:1] * vh[0:1, :]
    for j in range(1, us.shape[1]):
        total = total + us[:, j:j + 1] * vh[j:j + 1, :]
    return total


def factored_negative_stats(us: torch.Tensor, vh: torch.Tensor,
                            floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lowrank.negative_stats of the rebuilt us @ vh, without materialising it: sum of |v| over
    the entries below -floor, and their count. Summed per row first: the compiler then keeps the
    rebuilt entries in registers (one whole-tensor sum made it write them out)."""
    v = rank_sum(us, vh)
    count = (v < -floor).sum(dim=1, dtype=v.dtype).sum()
    return floor * count - torch.clamp_max(v + floor, 0).sum(dim=1).sum(), count


def scalars(*values, like: torch.Tensor) -> list[torch.Tensor]:
    """Hyperparameters as 0-d tensors of like's dtype: a compiled kernel reads them at run time,
    so a new learning rate or step count does not recompile. Python numbers become CPU tensors
    (a 0-d CPU tensor is a scalar argument to a GPU kernel: no host-to-device copy); tensors
    keep their device. (Measured: one 1-D tensor of them, or moments written into caller
    buffers, kept the compiler from fusing the rebuild into the update loop.)"""
    return [torch.as_tensor(x, dtype=like.dtype,
                            device=x.device if isinstance(x, torch.Tensor) else "cpu").reshape(())
            for x in values]


def adamw_block_(w: torch.Tensor, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor,
                 v_us: torch.Tensor, v_vh: torch.Tensor, fill: torch.Tensor, floor: torch.Tensor,
                 beta1: torch.Tensor, beta2: torch.Tensor, step_size: torch.Tensor,
                 eps: torch.Tensor, decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MLorc-AdamW block update: returns this step's M and V, and sets w to
    (w - step_size M / (sqrt(V) + eps)) * decay. The rebuilt previous second moment's entries
    below -floor become fill, those in [-floor, floor) become floor (lowrank.fill_negatives_)."""
    m_prev = rank_sum(m_us, m_vh)
    v_prev = rank_sum(v_us, v_vh)
    v_prev = torch.where(v_prev < -floor, fill, torch.clamp_min(v_prev, floor))
    m = m_prev + (1 - beta1) * (g - m_prev)
    v = beta2 * v_prev + (1 - beta2) * (g * g)
    w.copy_((w.to(m.dtype) - step_size * m / (torch.sqrt(v) + eps)) * decay)
    return m, v


def lion_block_(w: torch.Tensor, g: torch.Tensor, m_us: torch.Tensor, m_vh: torch.Tensor,
                beta1: torch.Tensor, beta2: torch.Tensor, lr: torch.Tensor,
                decay: torch.Tensor) -> torch.Tensor:
    """One MLorc-Lion block update: sets w to (w - lr sign(b1 M~ + (1 - b1) G)) * decay and
    returns b2 M~ + (1 - b2) G."""
    m_prev = rank_sum(m_us, m_vh)
    direction = torch.sign(m_prev + (1 - beta1) * (g - m_prev))
    w.copy_((w.to(m_prev.dtype) - lr * direction) * decay)
    return m_prev + (1 - beta2) * (g - m_prev)


# Graphs allowed per fused function: ranks 1..UNROLLED_RANK, x parameter dtypes, x bodies of
# one row (a size-1 dimension is specialised), with room to spare.
RECOMPILE_LIMIT = 64

_COMPILED: dict = {}


def compiled(fn):
    """fn compiled once per process by torch.compile (dynamic shapes, one graph). A failure to
    compile (no C++ compiler for the CPU, no Triton for the GPU) is raised as a RuntimeError
    that says so: fused=True never runs another computation quietly."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _CompiledBlock(fn)
    return _COMPILED[fn]


class _CompiledBlock:
    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, *args):
        # detached aliases (same storage, so in-place writes land): an engine's flat partition
        # can be a view of a tensor that autograd tracks, which torch.compile refuses to trace
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            # one graph per rank (unrolled), dtype and size-1 dimension: a model can need more
            # than dynamo's default of 8 per function, which with fullgraph=True is an error
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self.compiled(*args)
        except Exception as error:     # torch.compile's errors have many types; all end here
            raise RuntimeError(
                f"fused=True: torch.compile could not build {self.fn.__name__} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). The fused step needs a working "
                f"torch.compile (a C++ compiler on the CPU, Triton on a GPU); fused=False runs the "
                f"reference path.") from error
