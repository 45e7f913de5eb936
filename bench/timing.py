"""Timing shared by the micro-benchmarks (block_kernels.py, cpu_primitives.py)."""
from __future__ import annotations

import time


def best_ms(fn, repeats: int, rounds: int) -> float:
    """Milliseconds per call of fn: the best of `rounds` rounds of `repeats` back-to-back calls,
    after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3
