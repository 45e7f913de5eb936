"""The fused step's C++ kernels for the CPU, one extension built by torch.utils.cpp_extension
(`-O3 -march=native -fopenmp`): range_finder.cpp, a batch's whole range finder
(skinny.compress_batch), whose product loops (skinny.h) skinny.cpp also binds alone for tests and
benches; blocks.cpp, the block updates (fused.adamw_blocks_, lion_blocks_). cpu_kernels.cpp
binds them.

It is built when a fused optimizer is constructed with CPU parameters (build()), so a missing
compiler is a RuntimeError before any step; later processes load it from torch's extension
cache (TORCH_EXTENSIONS_DIR). The binary is compiled for this CPU: the CPU's fingerprint is in
the extension's name, so nodes of different CPUs sharing a cache do not share a binary.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

__all__ = ["SOURCES", "build", "extension"]

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ("cpu_kernels.cpp", "skinny.cpp", "range_finder.cpp", "blocks.cpp"))
_EXTENSION = None


def _cpu_fingerprint() -> str:
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
    """Build (or load from torch's extension cache) the kernels now. Raises RuntimeError."""
    extension()


def extension():
    """The loaded extension module (rows, cols, range_finder, adamw_blocks, lion_blocks), built on first use."""
    global _EXTENSION
    if _EXTENSION is None:
        from torch.utils.cpp_extension import load
        try:
            # -fno-math-errno: sqrt in a vectorised loop (blocks.cpp) needs no errno branch
            _EXTENSION = load(name=f"mlorc_cpu_kernels_{_cpu_fingerprint()}", sources=[str(s) for s in SOURCES],
                              extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                              extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:     # compiler, linker or ninja errors have many types
            raise RuntimeError(
                f"fused=True: could not build the fused step's C++ kernels for the CPU "
                f"({', '.join(s.name for s in SOURCES)}; {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). The fused step needs a C++ "
                "compiler on the CPU; fused=False runs the reference path.") from error
    return _EXTENSION
