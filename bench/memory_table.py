"""The planned per-GPU memory table of docs/BENCHMARKS.md: LLaMA-2 7B / 13B / 70B, AdamW vs
MLorc-AdamW (r = 4; batched step, the default, and batched=False), ZeRO-2 / ZeRO-3 / FSDP2, 8 and
64 GPUs, each row with its command.

    python bench/memory_table.py [--seq 4096] [--micro-batch 1] [--no-checkpointing] > table.md

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = not args.no_checkpointing
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
                    worst = max(p.ranks, key=lambda r: sum(r.values()))
                    state = worst["state_factors"] + worst["state_dense"] + worst["state_scalars"]
                    fits = "/".join("yes" if v else "no" for v in p.fits().values())
                    cmd = (f"`python -m mlorc_dist.plan --model {name} --engine {engine} --world-size {world} "
                           f"--optimizer {optimizer}" + (f" --rank {args.rank}" if optimizer != "adamw" else "")
                           + f" --micro-batch {args.micro_batch} --seq {args.seq} --bf16"
                           + (" --activation-checkpointing" if ckpt else "") + ("" if batched else " --no-batched") + "`")
                    label = "AdamW" if optimizer == "adamw" else f"MLorc r={args.rank}" + ("" if batched else ", batched=False")
                    cells = [name, engine, str(world), label]
                    cells += [f"{v / GB:.2f}" for v in (worst["weights"], worst["grads"], worst["master"], state,
                                                        worst["staging"] + worst["engine_buffers"],
                                                        p.activations["peak"], sum(p.transients.values()))]
                    cells += [f"**{p.peak['peak'] / GB:.1f}**", fits, cmd]
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
