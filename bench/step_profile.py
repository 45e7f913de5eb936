"""Where one optimizer.step() spends its time, per block: torch.profiler self time of the
heaviest operators, and (on the CPU) cProfile's self time of the heaviest Python functions and
built-in calls, which is where the fused step's C++ kernels show (torch.profiler does not see
them); AdamW foreach against MLorc-AdamW (reference path and fused), the same process and the
same matrices.

    python bench/step_profile.py                       # 4 blocks of 1024 x 1024, r = 4, one thread
    python bench/step_profile.py --size 2048 --steps 5
    python bench/step_profile.py --device cuda --size 4096     # GPU: kernel time per operator too

Prints a table per optimizer and writes JSON (docs/BENCHMARKS.md, "Where the time goes").
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlorc_dist  # noqa: E402
from bench.optimizer_step import make_params  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--matrices", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/bench_step_profile.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    params = make_params(args.size, args.matrices, device)
    blocks = args.steps * args.matrices
    results = {}
    for name, make in (("adamw-foreach", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True)),
                       *([("adamw-fused", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True))] if cuda else []),
                       ("mlorc-adamw", lambda: mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=args.rank)),
                       ("mlorc-adamw fused", lambda: mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=args.rank,
                                                                           fused=True))):
        opt = make()
        for _ in range(3):            # state, and the fused kernel's compilation
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / blocks * 1e3
        with profile() as prof:
            for _ in range(args.steps):
                opt.step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        # on a GPU the kernels' time (self device time) says where the device is busy; the gap
        # between it and the wall time is launch latency and host synchronisation
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) / blocks / 1e3
        rows = [{"op": e.key, "ms_per_block": getattr(e, key) / blocks / 1e3,
                 "cpu_ms_per_block": e.self_cpu_time_total / blocks / 1e3, "calls_per_block": e.count / blocks}
                for e in sorted(events, key=lambda e: -getattr(e, key))[:args.top]]
        host = [{"op": e.key, "cpu_ms_per_block": e.self_cpu_time_total / blocks / 1e3, "calls_per_block": e.count / blocks}
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]] if cuda else []
        python = [] if cuda else _python_profile(opt, args.steps, blocks, args.top)
        results[name] = {"ms_per_block": total, "wall_ms_per_block": wall, "top": rows, "top_host": host,
                         "top_python": python}
        print(f"\n{name}: {wall:.3f} ms per {args.size} x {args.size} block (wall, unprofiled); "
              f"{total:.3f} ms of {'kernel' if cuda else 'self CPU'} time (profiled)")
        for row in rows:
            print(f"  {row['op'][:60]:<60} {row['ms_per_block']:7.3f} ms  (host {row['cpu_ms_per_block']:6.3f})"
                  f" {row['calls_per_block']:5.1f} calls")
        if host:
            print("  heaviest on the host (self CPU time):")
        for row in host:
            print(f"    {row['op'][:58]:<58} {row['cpu_ms_per_block']:7.3f} ms  {row['calls_per_block']:5.1f} calls")
        if python:
            print("  heaviest Python functions and built-in calls (cProfile self time; C++ kernels show here):")
        for row in python:
            print(f"    {row['function'][:58]:<58} {row['ms_per_block']:7.3f} ms  {row['calls_per_block']:5.1f} calls")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                                    "torch": torch.__version__, "results": results}, indent=1))
    return 0


def _python_profile(opt, steps: int, blocks: int, top: int) -> list[dict]:
    """cProfile's self time per block of the heaviest functions over `steps` steps (profiled, so
    slower than the wall time above; the shares are what to read)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        opt.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats        # (file, line, name) -> (cc, calls, self, cumulative, callers)
    total = sum(entry[2] for entry in stats.values())
    rows = [{"function": name if file == "~" else f"{Path(file).name}:{line}({name})",
             "ms_per_block": entry[2] / blocks * 1e3, "share": entry[2] / total, "calls_per_block": entry[1] / blocks}
            for (file, line, name), entry in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]]
    return rows


if __name__ == "__main__":
    sys.exit(main())
