import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch.compile's FX graph cache does not key its entries on ATEN_CPU_CAPABILITY, which sets the
# vector ISA of inductor's C++: code generated for AVX-512 and cached is then compiled without
# AVX-512 under ATEN_CPU_CAPABILITY=default, a C++ compile error ("at::vec has not been
# declared"). A run that sets the capability keeps a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_aten_{os.environ['ATEN_CPU_CAPABILITY']}"
# One thread per process: the suite runs multi-process engines on 2 cores, and OpenMP threads
# that outnumber the cores spin-wait (a 30-step test went from 2 s to 130 s when oversubscribed).
torch.set_num_threads(1)


def relative_difference(params_a, params_b) -> float:
    """||a - b|| / ||b|| over a list of tensors, computed in float64."""
    num = sum(((a.detach().double() - b.detach().double()) ** 2).sum() for a, b in zip(params_a, params_b))
    den = sum((b.detach().double() ** 2).sum() for b in params_b)
    return float((num / den).sqrt())


@pytest.fixture
def rel_diff():
    return relative_difference


@pytest.fixture
def cpu_rules(monkeypatch):
    """The CPU's own rules (C++ kernels, LAPACK, CPU batching caps) for a test of them, also when
    the suite runs with MLORC_GPU_RULES_ON_CPU=1 (which gives every other test the GPU's)."""
    monkeypatch.delenv("MLORC_GPU_RULES_ON_CPU", raising=False)


@pytest.fixture
def cpu_kernel_calls(monkeypatch, cpu_rules):
    """The names of the fused step's C++ kernels called from here on (optim/cpu_kernels.py's
    extension, wrapped to count; the real kernels still run)."""
    from mlorc_dist.optim import cpu_kernels
    calls = []
    real = cpu_kernels.extension()

    class Counting:
        def __getattr__(self, name):
            def counted(*args):
                calls.append(name)
                return getattr(real, name)(*args)
            return counted

    monkeypatch.setattr(cpu_kernels, "extension", lambda: Counting())
    return calls
