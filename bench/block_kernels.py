"""The fused step's block update alone, on the CPU: the C++ kernel (optim/blocks.cpp, what a
fused step runs there, one call per batch) against the same function compiled by torch.compile
(fused.adamw_block_ / lion_block_, what a GPU runs; inductor on the CPU, one call per body),
and a plain pass `w.add_(g)` for scale. Same tensors, one process, the best of --rounds.

    python bench/block_kernels.py                               # one thread
    python bench/block_kernels.py --cases 4x256:4 1x4096:4 --rounds 5

A case is BxS:R (B bodies of S x S, rank R) or BxS:R:bf16 (bf16 weights). Prints a table and
writes JSON (docs/BENCHMARKS.md, "Where the time goes": the block kernels).
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
from mlorc_dist.optim import fused  # noqa: E402

CASES = ["4x256:4", "1x1024:4", "1x4096:4", "4x256:16", "1x1024:16", "1x1024:4:bf16"]


def measure(case: str, rounds: int) -> dict:
    shape, rank, *rest = case.split(":")
    batch, size = (int(x) for x in shape.split("x"))
    rank, dtype = int(rank), torch.bfloat16 if rest == ["bf16"] else torch.float32
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(size, size, generator=g).to(dtype) for _ in range(batch)]
    grad = torch.randn(batch, size, size, generator=g)
    m_us, m_vh = torch.randn(batch, size, rank, generator=g), torch.randn(batch, rank, size, generator=g)
    v_us, v_vh = torch.rand(batch, size, rank, generator=g), torch.rand(batch, rank, size, generator=g) - 0.3
    floors, v_out = torch.full((batch,), 1e-3), torch.empty(batch, size, size)
    repeats = max(1, int(4e7 // (batch * size * size)))
    adamw_hyper = [fused.scalars(floors[i], 0.9, 0.999, 1e-3, 1e-8, 0.9999, like=grad) for i in range(batch)]
    lion_hyper = fused.scalars(0.9, 1e-4, 0.999, like=grad)
    compiled_adamw, compiled_lion = fused.compiled(fused.adamw_block_), fused.compiled(fused.lion_block_)
    row = {"case": case, "elements": batch * size * size}
    row["adamw_cpp"] = best_ms(lambda: fused.adamw_blocks_(ws, grad, m_us, m_vh, v_us, v_vh, floors, 0.9, 0.999,
                                                           [1e-3] * batch, 1e-8, 0.9999, v_out), repeats, rounds)
    row["adamw_compiled"] = best_ms(lambda: [compiled_adamw(w, grad[i], m_us[i], m_vh[i], v_us[i], v_vh[i],
                                                            *adamw_hyper[i], v_out[i]) for i, w in enumerate(ws)],
                                    repeats, rounds)
    row["lion_cpp"] = best_ms(lambda: fused.lion_blocks_(ws, grad, m_us, m_vh, 0.9, 1e-4, 0.999), repeats, rounds)
    row["lion_compiled"] = best_ms(lambda: [compiled_lion(w, grad[i], m_us[i], m_vh[i], *lion_hyper)
                                            for i, w in enumerate(ws)], repeats, rounds)
    row["add_pass"] = best_ms(lambda: [w.add_(grad[i].to(dtype)) for i, w in enumerate(ws)], repeats, rounds)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_block_kernels.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(case, args.rounds) for case in args.cases]
    label = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"block update, ms per call (all bodies of the case), {label}, torch {torch.__version__}")
    print(f"{'case':<15} {'AdamW C++':>10} {'compiled':>9} {'ratio':>6} {'Lion C++':>9} {'compiled':>9} "
          f"{'ratio':>6} {'w.add_(g)':>10}")
    for r in rows:
        print(f"{r['case']:<15} {r['adamw_cpp']:>10.3f} {r['adamw_compiled']:>9.3f} "
              f"{r['adamw_cpp'] / r['adamw_compiled']:>6.2f} {r['lion_cpp']:>9.3f} {r['lion_compiled']:>9.3f} "
              f"{r['lion_cpp'] / r['lion_compiled']:>6.2f} {r['add_pass']:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "torch": torch.__version__,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
