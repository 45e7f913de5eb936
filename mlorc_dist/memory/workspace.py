"""Step workspace: how much memory an optimizer's step() allocates on top of what it keeps.

Measured with torch.profiler's memory timeline (CPU allocations, creation and destruction of
every tensor inside the profiled step), as the peak of live bytes above those that existed
before, in units of one fp32 copy of the parameter (k n 4 bytes). The planner's constants
(planner.MLORC_STEP_WORKSPACE) are these measurements; tests/test_memory.py re-measures them so
that a heavier step() makes the test fail instead of the plan silently lying.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile

import torch

__all__ = ["measure_step_workspace", "measure_step_workspace_bytes"]


def measure_step_workspace(make_optimizer, rows: int, cols: int, dtype=torch.float32, count: int = 1,
                           warmup: int = 2) -> float:
    """Peak extra bytes of one step() / (rows x cols x 4), after `warmup` steps (state exists).

    make_optimizer(params) -> optimizer, for `count` (rows, cols) parameters of `dtype` (MLorc
    batches same-shaped blocks, so its workspace grows with their number)."""
    return measure_step_workspace_bytes(make_optimizer, [(rows, cols)] * count, dtype, warmup) / (rows * cols * 4)


def measure_step_workspace_bytes(make_optimizer, shapes, dtype=torch.float32, warmup: int = 2) -> int:
    """Peak extra bytes of one step() for parameters of the given shapes, in this order."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype)) for shape in shapes]
    optimizer = make_optimizer(params)

    def new_grads():
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
    for _ in range(warmup):
        new_grads()
        optimizer.step()
    new_grads()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.raw.json.gz")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # export_memory_timeline is marked deprecated
            prof.export_memory_timeline(path, device="cpu")
        with gzip.open(path) as f:
            events = json.load(f)
    # [time, action, bytes, category]; actions: 1 pre-existing, 2 create, 3 version bump,
    # 4 destroy (with negative bytes)
    live = peak = 0
    for _, action, nbytes, _ in sorted((e for e in events if e[1] in (2, 4)), key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak
