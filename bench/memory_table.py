"""The planned per-GPU memory tables of docs/BENCHMARKS.md: LLaMA-2 7B / 13B / 70B, AdamW vs
MLorc-AdamW (r = 4; batched step, the default, and batched=False), ZeRO-2 / ZeRO-3 / FSDP2, 8 and
64 GPUs; with --in-backward: AdamW (bf16), MLorc (bf16), MLorc + step in backward and + bf16
weights (--param-dtype bf16), on one GPU and FSDP2 on 8 and 64 GPUs. Each row with its command.

    python bench/memory_table.py [--seq 4096] [--micro-batch 1] [--no-checkpointing] > table.md
    python bench/memory_table.py --in-backward [--seq 4096] ... > table.md

Every row is `python -m mlorc_dist.plan ...` (the same code, called in-process).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mlorc_dist.memory.planner import (GB, GPU_SIZES_GB, PlanSettings, build_meta_model,  # noqa: E402
                                       load_config, plan_model)


def command(args, ckpt: bool, name: str, engine: str, world: int, optimizer: str, bf16: bool, extra: str) -> str:
    """The planner command that prints one row's plan (`extra`: the flags after the common ones)."""
    return (f"`python -m mlorc_dist.plan --model {name} --engine {engine}"
            + (f" --world-size {world}" if world > 1 else "") + f" --optimizer {optimizer}"
            + (f" --rank {args.rank}" if optimizer != "adamw" else "")
            + f" --micro-batch {args.micro_batch} --seq {args.seq}"
            + (" --bf16" if bf16 else "") + (" --activation-checkpointing" if ckpt else "") + extra + "`")


def row(lead: list[str], p, columns, cmd: str) -> str:
    """One table row: the `lead` cells, columns(worst rank, its optimizer state bytes) in GB, the
    peak, which GPU sizes it fits, the command."""
    worst = max(p.ranks, key=lambda r: sum(r.values()))
    state = worst["state_factors"] + worst["state_dense"] + worst["state_scalars"]
    fits = "/".join("yes" if v else "no" for v in p.fits().values())
    cells = lead + [f"{v / GB:.2f}" for v in columns(worst, state)] + [f"**{p.peak['peak'] / GB:.1f}**", fits, cmd]
    return "| " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--in-backward", action="store_true", help="the step-in-backward / bf16-weights table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = not args.no_checkpointing
    if args.in_backward:
        return in_backward_table(args, ckpt)
    print("| model | engine | GPUs | optimizer | weights | grads | fp32 master | optimizer state "
          "| grad staging + engine buffers | activations (bwd peak) | transients (all, summed) | **peak / GPU** "
          "| fits (" + "/".join(str(g) for g in GPU_SIZES_GB) + " GB) | command |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name in ("llama-7b", "llama-13b", "llama-70b"):
        config = load_config(name)
        meta = build_meta_model(config)
        for engine in ("zero2", "zero3", "fsdp2"):
            for world in (8, 64):
                for optimizer, batched in (("adamw", True), ("mlorc-adamw", True), ("mlorc-adamw", False)):
                    s = PlanSettings(engine=engine, world_size=world, optimizer=optimizer, rank=args.rank,
                                     micro_batch=args.micro_batch, seq=args.seq, bf16=True,
                                     activation_checkpointing=ckpt, batched=batched)
                    p = plan_model(meta, config, s, name)
                    cmd = command(args, ckpt, name, engine, world, optimizer, True, "" if batched else " --no-batched")
                    label = "AdamW" if optimizer == "adamw" else f"MLorc r={args.rank}" + ("" if batched else ", batched=False")
                    print(row([name, engine, str(world), label], p, lambda worst, state: (
                        worst["weights"], worst["grads"], worst["master"], state,
                        worst["staging"] + worst["engine_buffers"], p.activations["peak"],
                        sum(p.transients.values())), cmd), flush=True)


# (label, optimizer, --bf16, --step-in-backward, --param-dtype)
IN_BACKWARD_CONFIGS = (("AdamW, bf16", "adamw", True, False, "fp32"),
                       ("MLorc r={r}, bf16", "mlorc-adamw", True, False, "fp32"),
                       ("MLorc r={r}, bf16, step in backward", "mlorc-adamw", True, True, "fp32"),
                       ("MLorc r={r}, step in backward, bf16 weights", "mlorc-adamw", False, True, "bf16"))


def in_backward_table(args, ckpt: bool) -> None:
    print("| model | engine | GPUs | configuration | weights | grads | fp32 master | optimizer state "
          "| activations (bwd peak) | transients (all, summed) | **peak / GPU** "
          "| fits (" + "/".join(str(g) for g in GPU_SIZES_GB) + " GB) | command |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name in ("llama-7b", "llama-13b", "llama-70b"):
        config = load_config(name)
        meta = build_meta_model(config)
        for engine, world in (("single", 1), ("fsdp2", 8), ("fsdp2", 64)):
            for label, optimizer, bf16, sib, param_dtype in IN_BACKWARD_CONFIGS:
                s = PlanSettings(engine=engine, world_size=world, optimizer=optimizer, rank=args.rank,
                                 micro_batch=args.micro_batch, seq=args.seq, bf16=bf16,
                                 activation_checkpointing=ckpt, step_in_backward=sib, param_dtype=param_dtype)
                p = plan_model(meta, config, s, name)
                cmd = command(args, ckpt, name, engine, world, optimizer, bf16,
                              (" --step-in-backward" if sib else "")
                              + (f" --param-dtype {param_dtype}" if param_dtype != "fp32" else ""))
                print(row([name, engine, str(world), label.format(r=args.rank)], p, lambda worst, state: (
                    worst["weights"], worst["grads"], worst["master"], state, p.activations["peak"],
                    sum(p.transients.values())), cmd), flush=True)


if __name__ == "__main__":
    main()
