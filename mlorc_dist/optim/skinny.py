"""The range finder's skinny products for the fused step on the CPU: a @ x and x^T @ a for a
large block a (m, n) and a sketch x of q <= 6 columns, in a small C++ kernel (skinny.cpp, part
of the extension that cpu_kernels.py builds when a fused optimizer is constructed with CPU
parameters).

Why: MKL's GEMM at q = 4 streams a block at ~13 GB/s on the reference VM, where a plain sum
streams at 25-85 GB/s; the eight such products of an MLorc-AdamW step were half its time. The
kernel keeps independent vector accumulators and makes one pass (bench/optimizer_step.py,
docs/BENCHMARKS.md). Same products, another summation order: results agree to rounding.

Which products run where is a fixed rule, not a fallback: float32/float64 CPU blocks (2-D, or
a batch of same-shaped bodies, 3-D) with q <= MAX_WIDTH use the kernel; GPUs and wider sketches
use torch.matmul (lowrank.times_skinny / skinny_t_times). A kernel that does not build is a
RuntimeError.
"""
from __future__ import annotations

import torch

from .. import lowrank
from . import cpu_kernels

__all__ = ["MAX_WIDTH", "uses_kernel", "times_skinny", "skinny_t_times", "KERNELS"]

# The kernel takes q <= 8, but above 6 columns MKL catches up with it (one 2048 x 2048 block, one
# thread: q = 4 0.73 vs 1.45 ms, q = 6 1.51 vs 1.69, q = 8 2.07 vs 1.75; the accumulators no
# longer fit the registers), so wider sketches go to torch.matmul.
MAX_WIDTH = 6


def uses_kernel(a: torch.Tensor, width: int) -> bool:
    """Whether a product of block a with a sketch of `width` columns runs in the C++ kernel."""
    return (a.dim() in (2, 3) and a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
            and width <= MAX_WIDTH)


def times_skinny(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for a ([B,] m, n) and x ([B,] n, q): the kernel where uses_kernel, else lowrank's."""
    if uses_kernel(a, x.shape[-1]):
        return cpu_kernels.extension().rows(a.contiguous(), x.mT.contiguous())
    return lowrank.times_skinny(a, x)


def skinny_t_times(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x^T @ a for x ([B,] m, q) and a ([B,] m, n): the kernel where uses_kernel, else lowrank's."""
    if uses_kernel(a, x.shape[-1]):
        return cpu_kernels.extension().cols(x.contiguous(), a.contiguous())
    return lowrank.skinny_t_times(x, a)


KERNELS = (times_skinny, skinny_t_times)
