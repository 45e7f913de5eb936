"""The range finder's skinny products for the fused step on the CPU: a @ x and x^T @ a for a
large block a (m, n) and a sketch x of q <= 6 columns, in a small C++ kernel (skinny.cpp)
built by torch.utils.cpp_extension when a fused optimizer is constructed with CPU parameters
(build(); later calls load it from torch's extension cache).

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

import hashlib
import platform
from pathlib import Path

import torch

from .. import lowrank

__all__ = ["MAX_WIDTH", "build", "uses_kernel", "times_skinny", "skinny_t_times", "KERNELS"]

# The kernel takes q <= 8, but above 6 columns MKL catches up with it (one 2048 x 2048 block, one
# thread: q = 4 0.73 vs 1.45 ms, q = 6 1.51 vs 1.69, q = 8 2.07 vs 1.75; the accumulators no
# longer fit the registers), so wider sketches go to torch.matmul.
MAX_WIDTH = 6
SOURCE = Path(__file__).with_name("skinny.cpp")
_EXTENSION = None


def _cpu_fingerprint() -> str:
    """The build is compiled for this CPU (-march=native): a cache shared by nodes of
    different CPUs must not hand one node's binary to another."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()}|{flags}".encode()).hexdigest()[:10]


def build() -> None:
    """Build (or load from torch's extension cache) the kernel now: the optimizers call this at
    construction when fused=True and a parameter is on the CPU, so that a missing compiler is
    an error before any step. Raises RuntimeError."""
    _extension()


def _extension():
    global _EXTENSION
    if _EXTENSION is None:
        from torch.utils.cpp_extension import load
        try:
            _EXTENSION = load(name=f"mlorc_skinny_{_cpu_fingerprint()}", sources=[str(SOURCE)],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:     # compiler, linker or ninja errors have many types
            raise RuntimeError(
                f"fused=True: could not build the C++ skinny-product kernel {SOURCE.name} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                "The fused step needs a C++ compiler on the CPU; fused=False runs the reference "
                "path.") from error
    return _EXTENSION


def uses_kernel(a: torch.Tensor, width: int) -> bool:
    """Whether a product of block a with a sketch of `width` columns runs in the C++ kernel."""
    return (a.dim() in (2, 3) and a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
            and width <= MAX_WIDTH)


def times_skinny(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for a ([B,] m, n) and x ([B,] n, q): the kernel where uses_kernel, else lowrank's."""
    if uses_kernel(a, x.shape[-1]):
        return _extension().rows(a.contiguous(), x.mT.contiguous())
    return lowrank.times_skinny(a, x)


def skinny_t_times(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x^T @ a for x ([B,] m, q) and a ([B,] m, n): the kernel where uses_kernel, else lowrank's."""
    if uses_kernel(a, x.shape[-1]):
        return _extension().cols(x.contiguous(), a.contiguous())
    return lowrank.skinny_t_times(x, a)


KERNELS = (times_skinny, skinny_t_times)
