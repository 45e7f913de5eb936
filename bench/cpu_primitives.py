"""The range finder's small pieces on the CPU, each alone: the fused step's C++ skinny products
against torch's batched GEMM, LAPACK's QR and SVD against the Gram algebra a GPU batch uses
(lowrank.cholesky_qr, gram_eigh_svd), and the test matrices' draw (one generator per seed).
Best of 3 rounds of back-to-back calls, one thread by default.

    python bench/cpu_primitives.py --out docs/bench/cpu_primitives_cpu1.json

Prints a table and writes JSON (docs/BENCHMARKS.md, "The fused step on the CPU, third version").
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlorc_dist import lowrank  # noqa: E402
from mlorc_dist.optim import cpu_kernels  # noqa: E402

# (B, m, n): B same-shaped bodies of m x n; q = 4 sketch columns throughout
SHAPES = [(4, 256, 256), (64, 256, 256), (16, 512, 512), (256, 128, 128), (1, 1024, 1024), (1, 2048, 2048)]
Q = 4


def best_ms(fn, rounds: int, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def measure(batch: int, m: int, n: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, m, n, generator=g)
    x_right, x_left = torch.randn(batch, n, Q, generator=g), torch.randn(batch, m, Q, generator=g)
    xt = x_right.mT.contiguous()
    sketch, small = torch.randn(batch, m, Q, generator=g), torch.randn(batch, Q, n, generator=g)
    ext = cpu_kernels.extension()
    seeds = list(range(batch))
    return {
        "shape": [batch, m, n],
        "rows_cpp": best_ms(lambda: ext.rows(a, xt), rounds),
        "rows_bmm": best_ms(lambda: torch.bmm(a, x_right), rounds),
        "cols_cpp": best_ms(lambda: ext.cols(x_left, a), rounds),
        "cols_bmm": best_ms(lambda: torch.bmm(x_left.mT, a), rounds),
        "sum": best_ms(lambda: a.sum(), rounds),
        "qr_lapack": best_ms(lambda: torch.linalg.qr(sketch), rounds),
        "qr_cholesky": best_ms(lambda: lowrank.cholesky_qr(sketch), rounds),
        "svd_lapack": best_ms(lambda: torch.linalg.svd(small, full_matrices=False), rounds),
        "svd_gram_eigh": best_ms(lambda: lowrank.gram_eigh_svd(small), rounds),
        "draws": best_ms(lambda: lowrank.gaussian_test_matrices(n, Q, seeds, torch.float32), rounds),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_cpu_primitives.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(*shape, args.rounds) for shape in SHAPES]
    label = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"ms per call, q = {Q}, {label}, torch {torch.__version__}")
    keys = [k for k in rows[0] if k != "shape"]
    print(f"{'B x m x n':<16}" + "".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):<16}" + "".join(f"{r[k]:>14.3f}" for k in keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "torch": torch.__version__, "q": Q,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
