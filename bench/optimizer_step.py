"""optimizer.step() time: MLorc-AdamW / MLorc-Lion / MoFaSGD / GaLore vs torch AdamW (foreach, fused) on the same
matrices, measured in one run so the ratios are comparable.

    python bench/optimizer_step.py                          # CPU, sizes 256 1024 4096, ranks 4 16 64
    python bench/optimizer_step.py --device cuda --sizes 1024 4096 --out runs/bench_step_cuda.json

For each size s and rank r: --matrices s x s matrices with random gradients; each optimizer
is stepped --warmup times, then timed over --repeats steps (median, synchronised on CUDA).
With --rounds N the optimizers run one after another N times and each gets the median of its
N round medians (on a noisy machine, alternation spreads the noise over all of them).
The "fused" rows compile their kernel in the warm-up steps (torch.compile).
Prints a table (ms and ratio to AdamW foreach) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlorc_dist  # noqa: E402


def make_params(size: int, count: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.randn(size, size, generator=g).mul_(0.02).to(device).requires_grad_()
        p.grad = torch.randn(size, size, generator=g).mul_(1e-3).to(device)
        params.append(p)
    return params


def optimizers(params, rank: int, device):
    yield "adamw-foreach", torch.optim.AdamW(params, lr=1e-3, foreach=True)
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        opt.step()
        yield "adamw-fused", opt
    except (RuntimeError, ValueError):
        pass
    # "mlorc-adamw": no speed options (fused=None: the fused step on the CPU, the reference path on a GPU)
    yield "mlorc-adamw", mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=rank)
    yield "mlorc-adamw reference", mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=rank, fused=False)
    yield "mlorc-adamw fused", mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=rank, fused=True)
    yield "mlorc-adamw per-body", mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=rank, batched=False, fused=False)
    yield "mlorc-adamw niter=0", mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=rank, niter=0, fused=False)
    yield "mlorc-lion", mlorc_dist.MLorcLion(params, lr=1e-4, rank=rank)
    yield "mlorc-lion reference", mlorc_dist.MLorcLion(params, lr=1e-4, rank=rank, fused=False)
    yield "mlorc-lion fused", mlorc_dist.MLorcLion(params, lr=1e-4, rank=rank, fused=True)
    yield "mofasgd", mlorc_dist.MoFaSGD(params, lr=1e-2, rank=rank)
    # GaLore's full SVD of the gradient runs every T steps: the timed steps come after the first
    yield "galore (T=200)", mlorc_dist.GaLoreAdamW(params, lr=1e-3, rank=rank, update_interval=200)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, warmup: int, repeats: int, device) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--matrices", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, help="names of the optimizers to run "
                        "(adamw-foreach is always run: it is the base of the ratios)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    rows = []
    for size in args.sizes:
        for rank in args.ranks:
            params = make_params(size, args.matrices, device)
            rounds: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for name, opt in optimizers(params, rank, device):
                    if args.only is None or name in args.only or name == "adamw-foreach":
                        rounds.setdefault(name, []).append(time_steps(opt, args.warmup, args.repeats, device))
                    del opt
            timings = {name: statistics.median(values) for name, values in rounds.items()}
            base = timings["adamw-foreach"]
            for name, seconds in timings.items():
                rows.append({"size": size, "rank": rank, "optimizer": name, "ms": 1e3 * seconds,
                             "vs_adamw_foreach": seconds / base})
            del params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"optimizer.step(), {args.matrices} matrices of s x s, {label}, torch {torch.__version__}")
    print(f"{'s':>5} {'r':>3} {'optimizer':<20} {'ms':>9} {'x AdamW foreach':>16}")
    for row in rows:
        print(f"{row['size']:>5} {row['rank']:>3} {row['optimizer']:<20} {row['ms']:>9.2f} {row['vs_adamw_foreach']:>16.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
