"""The fused step's range finder on the CPU: a batch's whole randomized SVD in one C++ call
(range_finder.cpp, part of the extension that cpu_kernels.py builds when a fused optimizer is
constructed with CPU parameters), its products with the block in skinny loops (skinny.h).

Why: MKL's GEMM at q = 4 streams a block at ~13 GB/s on the reference VM, where a plain sum
streams at 25-85 GB/s; the eight such products of an MLorc-AdamW step were half its time. The
loops keep independent vector accumulators and make one pass each. And at 256 x 256 the torch
range finder's ~60 small operators per moment and batch (draws, QR, SVD, products, copies), each
a few microseconds of dispatch, were half of a fused step; in one C++ call they are loops
(bench/optimizer_step.py, docs/BENCHMARKS.md). Same steps, same test matrices, another summation
order and float64 small algebra: results agree with lowrank's to rounding.

Which batches run where is a fixed rule, not a fallback: float32/float64 CPU moments with a
sketch of q <= MAX_WIDTH columns use the C++ range finder; GPUs and wider sketches use
lowrank.compress_batch (torch.matmul, LAPACK or cuSOLVER). A kernel that does not build is a
RuntimeError. The extension's `rows` and `cols` bind the two product loops alone (tests and
bench/cpu_primitives.py measure them against torch.matmul).
"""
from __future__ import annotations

import torch

from .. import lowrank
from . import cpu_kernels

__all__ = ["MAX_WIDTH", "uses_kernel", "compress_batch"]

# The kernels take q <= 8 (their accumulators live in registers): wider sketches go to lowrank's
# range finder. Through q = 8 the C++ range finder is the faster one (one block, one thread,
# niter = 1, ms, C++ vs torch: 1024^2 q = 8 1.30 vs 1.92; 2048^2 q = 6 3.43 vs 6.96, q = 8 4.95 vs
# 8.56; 4096^2 q = 8 24.4 vs 38.2; docs/BENCHMARKS.md).
MAX_WIDTH = 8


def uses_kernel(a: torch.Tensor, width: int) -> bool:
    """Whether a batch's range finder over moment part a (B, k, n) with a sketch of `width`
    columns runs in the C++ kernel."""
    return (a.dim() == 3 and a.device.type == "cpu" and not lowrank.takes_gpu_rules(a.device)
            and a.dtype in (torch.float32, torch.float64)
            and width <= MAX_WIDTH)


def compress_batch(moment, rank: int, oversample: int, niter: int, seeds: list[int]):
    """lowrank.compress_batch for the fused step: a batch's new moments (a (B, k, n) tensor or a
    MomentUpdate of batched parts) -> U (B, k, r), s (B, r), Vh (B, r, n). Where uses_kernel, one
    call of the C++ range finder for the whole batch (Omega drawn from each seed as lowrank draws
    it, the same steps, the small algebra in float64); elsewhere lowrank.compress_batch."""
    unformed = isinstance(moment, lowrank.MomentUpdate)
    dense = moment.dense if unformed else moment
    width = lowrank.sketch_width(rank, oversample, dense.shape[-2], dense.shape[-1])
    if not uses_kernel(dense, width):
        return lowrank.compress_batch(moment, rank, oversample, niter, seeds)
    if unformed:
        us, vh, keep, mix = moment.us.contiguous(), moment.vh.contiguous(), moment.keep, moment.mix
    else:
        us = vh = dense.new_empty(0)
        keep, mix = 0.0, 1.0
    return cpu_kernels.extension().range_finder(dense.contiguous(), us, vh, float(keep), float(mix),
                                                list(seeds), width, niter, rank)
