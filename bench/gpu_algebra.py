"""The range finder's small linear algebra on a GPU, and what it does to an optimizer step.

    python bench/gpu_algebra.py --out runs/gpu_algebra.json      # needs a CUDA device

Part 1, primitives on 4096 x 4 sketches, one block and a batch of 8: Householder QR vs
lowrank.cholesky_qr, torch.linalg.svd vs lowrank.gram_eigh_svd (4 x 4096), the test
matrices' draw, and the skinny products against a plain read of the block. Times are per
call with the calls queued back to back (one synchronisation at the end), so host costs
(Python, dispatch, launches, synchronisations inside the call) count as they do in a step.

Part 2, optimizer.step() of 4 square matrices (1024, 4096), r = 4, over --rounds rounds:
AdamW (foreach, fused) and MLorc with the library's batching rule ("default"), and with every
same-shaped body batched ("all batched": the caps raised for this run only).
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlorc_dist  # noqa: E402
from mlorc_dist import lowrank  # noqa: E402
from mlorc_dist.optim import base  # noqa: E402
from bench.optimizer_step import make_params  # noqa: E402


def per_call_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def primitives(device) -> list[dict]:
    rows = []
    for batch in (1, 8):
        shape = (batch, 4096, 4) if batch > 1 else (4096, 4)
        y = torch.randn(*shape, device=device)
        small = torch.randn(*shape[:-2], 4, 4096, device=device)
        for name, fn in ((f"Householder QR, batch {batch}", lambda: torch.linalg.qr(y)),
                         (f"cholesky_qr, batch {batch}", lambda: lowrank.cholesky_qr(y)),
                         (f"torch.linalg.svd 4 x 4096, batch {batch}", lambda: torch.linalg.svd(small, full_matrices=False)),
                         (f"gram_eigh_svd 4 x 4096, batch {batch}", lambda: lowrank.gram_eigh_svd(small)),
                         (f"test matrices drawn, batch {batch}",
                          lambda: lowrank.gaussian_test_matrices(4096, 4, list(range(batch)), torch.float32, device))):
            rows.append({"primitive": name, "ms": per_call_ms(fn)})
    a, other = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    x = torch.randn(4096, 4, device=device)
    for name, fn in (("a @ x, 4096^2, q = 4", lambda: lowrank.times_skinny(a, x)),
                     ("x^T a, 4096^2, q = 4", lambda: lowrank.skinny_t_times(x, a)),
                     ("a.sum() (one read of a)", lambda: a.sum()),
                     ("a.copy_(b) (a read and a write)", lambda: a.copy_(other))):
        rows.append({"primitive": name, "ms": per_call_ms(fn, reps=200)})
    return rows


def step_ms(opt, device, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class all_batched:
    """Raise the batching caps for the duration (every same-shaped body in one batch)."""
    names = ("BATCH_MAX_BODY_OTHER", "FUSED_BATCH_ELEMENTS", "BATCH_ELEMENTS")

    def __enter__(self):
        self.saved = [getattr(base, n) for n in self.names]
        for n in self.names:
            setattr(base, n, 1 << 40)

    def __exit__(self, *exc):
        for n, v in zip(self.names, self.saved):
            setattr(base, n, v)


def steps(device, sizes, rounds: int) -> list[dict]:
    rows = []
    for size in sizes:
        params = make_params(size, 4, device)
        makers = {"adamw-foreach": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
                  "adamw-fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
                  "mlorc-adamw": lambda: mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=4),
                  "mlorc-adamw fused": lambda: mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=4, fused=True),
                  "mlorc-lion fused": lambda: mlorc_dist.MLorcLion(params, lr=1e-4, rank=4, fused=True)}
        seen: dict[tuple, list] = {}
        for _ in range(rounds):
            for name, make in makers.items():
                seen.setdefault((name, "default"), []).append(step_ms(make(), device))
                if name.startswith("mlorc"):
                    with all_batched():
                        seen.setdefault((name, "all batched"), []).append(step_ms(make(), device))
        base_ms = statistics.median(seen[("adamw-fused", "default")])
        for (name, batching), values in seen.items():
            ms = statistics.median(values)
            rows.append({"size": size, "optimizer": name, "batching": batching, "ms": ms,
                         "rounds_ms": values, "vs_adamw_fused": ms / base_ms})
        del params
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_algebra.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_algebra.py needs a CUDA device")
    device = torch.device("cuda")
    label = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    prims = primitives(device)
    print(f"Primitives, {label} (ms per call, calls queued)")
    for row in prims:
        print(f"  {row['primitive']:<42} {row['ms']:8.3f}")
    rows = steps(device, args.sizes, args.rounds)
    print(f"\noptimizer.step(), 4 matrices, r = 4, {label}; median of {args.rounds} round medians")
    print(f"{'s':>5} {'optimizer':<20} {'batching':<12} {'ms':>8} {'x AdamW fused':>14}   rounds")
    for r in rows:
        print(f"{r['size']:>5} {r['optimizer']:<20} {r['batching']:<12} {r['ms']:8.3f} {r['vs_adamw_fused']:14.2f}   "
              + " ".join(f"{v:.2f}" for v in r["rounds_ms"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "primitives": prims, "steps": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
