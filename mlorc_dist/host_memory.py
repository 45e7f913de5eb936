"""Host memory of a training process: what glibc's malloc keeps after torch frees a tensor.

torch's CPU allocator takes every tensor from malloc (posix_memalign) and gives it back with
free. glibc serves a block under its mmap threshold from a heap arena and keeps it there when
it is freed, for reuse; the threshold starts at 128 KiB and rises to the size of each freed
mmap'd block, up to 32 MiB. A training step frees many blocks of 1-32 MiB (a layer's gathered
weights and gradients, the optimizer's batches); once the threshold has risen they stay in the
heaps, fragmented, and the resident set grows far past the live tensors (seen: 2.6 GB per rank
where 0.35 GB are live, FSDP2 at world size 2, configs/100m.json). Two settings return them:

- a fixed mmap threshold (mallopt M_MMAP_THRESHOLD, which also stops the dynamic rise; the trim
  threshold set equal): every block above it is its own mapping, unmapped when freed;
- transparent huge pages for torch's allocations of 2 MiB and more (c10's THP_MEM_ALLOC_ENABLE,
  which c10 reads once, at its first allocation: it must be in the environment before torch is
  imported): a fresh mapping then faults in 2 MiB pages instead of 4 KiB ones, which makes the
  fixed threshold cheap.

Neither exists in torch's or glibc's defaults for this use; both are the libraries' own knobs.
launch/train.py applies them (--mmap-threshold-mb, default 1) and logs what it set.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["libc", "is_glibc", "bound_freed_memory", "THP_ENV", "huge_pages_requested"]

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_M_TRIM_THRESHOLD = -1      # glibc malloc.h
_M_MMAP_THRESHOLD = -3


@functools.cache
def libc():
    """The C library this process runs on, loaded once."""
    return ctypes.CDLL(None)


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def huge_pages_requested() -> bool:
    """Whether torch's CPU allocations of 2 MiB and more ask for transparent huge pages (the
    environment when torch made its first allocation; a later change has no effect)."""
    return os.environ.get(THP_ENV, "0") not in ("", "0")


def bound_freed_memory(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) at `threshold_bytes`: freed blocks above
    it go back to the system at once, those below return from the top of a heap. Returns False,
    changing nothing, where the C library is not glibc; ValueError for a threshold <= 0 or one
    glibc refuses."""
    if threshold_bytes <= 0:
        raise ValueError(f"mmap threshold must be > 0 bytes, got {threshold_bytes}")
    if not is_glibc():
        return False
    lib = libc()
    if not lib.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)):
        raise ValueError(f"glibc refused an mmap threshold of {threshold_bytes} bytes")
    lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold_bytes))
    lib.malloc_trim(ctypes.c_size_t(0))        # what the process kept before now
    return True
