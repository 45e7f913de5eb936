"""The range finder's pieces on the CPU, each alone: the fused step's C++ skinny products against
torch's batched GEMM, LAPACK's QR and SVD against the Gram algebra a GPU batch uses
(lowrank.cholesky_qr, gram_eigh_svd), the test matrices' draw (one generator per seed), and the
whole range finder of a batch (niter = 1, r = q = 4): the C++ call (optim/range_finder.cpp)
against lowrank's torch one. Best of 3 rounds of back-to-back calls, one thread by default.

    python bench/cpu_primitives.py --out docs/bench/cpu_primitives_cpu1.json

Prints a table and writes JSON (docs/BENCHMARKS.md, "optimizer.step() on the CPU", "Where the
time goes").
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import best_ms  # noqa: E402
from mlorc_dist import lowrank  # noqa: E402
from mlorc_dist.optim import cpu_kernels  # noqa: E402

# (B, m, n): B same-shaped bodies of m x n; q = 4 sketch columns throughout
SHAPES = [(4, 256, 256), (64, 256, 256), (16, 512, 512), (256, 128, 128), (1, 1024, 1024), (1, 2048, 2048),
          (1, 4096, 4096)]
Q = 4


def measure(batch: int, m: int, n: int, rounds: int) -> dict:
    repeats = 20 if m < 4096 else 5
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, m, n, generator=g)
    x_right, x_left = torch.randn(batch, n, Q, generator=g), torch.randn(batch, m, Q, generator=g)
    xt = x_right.mT.contiguous()
    sketch, small = torch.randn(batch, m, Q, generator=g), torch.randn(batch, Q, n, generator=g)
    ext = cpu_kernels.extension()
    seeds = list(range(batch))
    best = lambda fn: best_ms(fn, repeats, rounds)      # noqa: E731
    return {
        "shape": [batch, m, n],
        "rows_cpp": best(lambda: ext.rows(a, xt)),
        "rows_bmm": best(lambda: torch.bmm(a, x_right)),
        "cols_cpp": best(lambda: ext.cols(x_left, a)),
        "cols_bmm": best(lambda: torch.bmm(x_left.mT, a)),
        "sum": best(lambda: a.sum()),
        "qr_lapack": best(lambda: torch.linalg.qr(sketch)),
        "qr_cholesky": best(lambda: lowrank.cholesky_qr(sketch)),
        "svd_lapack": best(lambda: torch.linalg.svd(small, full_matrices=False)),
        "svd_gram_eigh": best(lambda: lowrank.gram_eigh_svd(small)),
        "draws": best(lambda: lowrank.gaussian_test_matrices(n, Q, seeds, torch.float32)),
        "range_finder_cpp": best(lambda: ext.range_finder(a, a.new_empty(0), a.new_empty(0), 0.0, 1.0, seeds, Q, 1, Q)),
        "range_finder_torch": best(lambda: lowrank.compress_batch(a, Q, 0, 1, seeds)),
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
    widths = {k: max(14, len(k) + 2) for k in keys}
    print(f"{'B x m x n':<16}" + "".join(f"{k:>{widths[k]}}" for k in keys))
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):<16}" + "".join(f"{r[k]:>{widths[k]}.3f}" for k in keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "torch": torch.__version__, "q": Q,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
