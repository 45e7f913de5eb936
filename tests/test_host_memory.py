"""mlorc_dist.host_memory: a fixed mmap threshold gives freed blocks back to the system, where
glibc's dynamic one keeps them resident. Each case runs in its own process (mallopt changes the
whole process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlorc_dist import host_memory

ROOT = Path(__file__).resolve().parents[1]

# 64 blocks of 8 MiB freed while a 256 KiB block after each stays alive: glibc's dynamic threshold
# (raised by the first freed 8 MiB mapping) serves them from the heap, whose holes it keeps
FRAGMENT = """
import sys, torch
from mlorc_dist import host_memory
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
if sys.argv[1] == "bounded":
    assert host_memory.bound_freed_memory(1 << 20)
first = torch.empty(2 << 20).fill_(1)
del first
big, small = [], []
for _ in range(64):
    big.append(torch.empty(2 << 20).fill_(1))
    small.append(torch.empty(64 << 10).fill_(1))
before = rss_mib()
big.clear()
print(before - rss_mib())
"""


@pytest.mark.skipif(not host_memory.is_glibc(), reason="mallopt's thresholds are glibc's")
def test_a_fixed_threshold_returns_freed_blocks_that_the_dynamic_one_keeps():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", THP_MEM_ALLOC_ENABLE="0")
    returned = {}
    for mode in ("dynamic", "bounded"):
        result = subprocess.run([sys.executable, "-c", FRAGMENT, mode], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        returned[mode] = int(result.stdout.split()[-1])
    assert returned["bounded"] >= 480, returned          # of the 512 MiB freed
    assert returned["dynamic"] <= 64, returned


def test_bad_thresholds_are_errors():
    with pytest.raises(ValueError, match="> 0"):
        host_memory.bound_freed_memory(0)
