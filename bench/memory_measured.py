"""Measured vs planned memory per rank: real 2-process jobs (tests/dist/memory_worker.py,
DeepSpeed / FSDP2 on CPU, gloo) against python -m mlorc_dist.plan, as a markdown table.

    python bench/memory_measured.py --model tiny --vocab 101 --micro-batch 2 --seq 32
    python bench/memory_measured.py --model 100m --vocab 2048 --micro-batch 1 --seq 64 \
        --runs zero2:mlorc-adamw zero3:mlorc-adamw fsdp2:mlorc-adamw

Measured: exact tensor bytes by category from MemoryProfiler (right after the second optimizer
step; grads as handed to it), activations with saved-tensor hooks (distinct storages autograd
saves for backward, parameters excluded, plus the logits the output holds). A run is
engine:optimizer[:precision[:scope[:sib]]] (tests/dist/memory_worker.py): precision pbf16 is
--param-dtype bf16; sib steps in backward, whose grads are the most gradient bytes alive at one of
the in-backward steps (MemoryProfiler.track_backward_grads), against the plan's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mlorc_dist.memory.planner import EXACT_CATEGORIES, PlanSettings, plan  # noqa: E402
from mlorc_dist.memory.report import reference_sample  # noqa: E402

DEFAULT_RUNS = ["zero2:adamw", "zero2:mlorc-adamw", "zero3:adamw", "zero3:mlorc-adamw", "fsdp2:adamw",
                "fsdp2:mlorc-adamw", "zero2:mlorc-adamw:bf16", "zero3:mlorc-adamw:bf16",
                "fsdp2:mlorc-adamw:bf16"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vocab", type=int, default=101)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--port", type=int, default=29741)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="mlorc_memory_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(args.port), str(ROOT / "tests" / "dist" / "memory_worker.py"), "--out", str(out),
           "--model", args.model, "--vocab", str(args.vocab), "--micro-batch", str(args.micro_batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--runs", *args.runs]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    print("| run | rank | weights | grads | master | state factors | state dense (+scalars) "
          "| activations measured / planned | tensor categories |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for spec in args.runs:
        parts = spec.split(":")
        precision = parts[2] if len(parts) > 2 else "fp32"
        sib = len(parts) > 4 and parts[4] == "sib"
        settings = PlanSettings(engine=parts[0], world_size=2, optimizer=parts[1], rank=args.rank,
                                micro_batch=args.micro_batch, seq=args.seq, bf16=precision == "bf16",
                                param_dtype="bf16" if precision == "pbf16" else "fp32",
                                scope=parts[3] if len(parts) > 3 else "local", step_in_backward=sib)
        planned = plan(args.model, settings, vocab_size=args.vocab)
        report = json.loads((out / f"{spec.replace(':', '_')}.json").read_text())
        for r, rank_report in enumerate(report["ranks"]):
            m = dict(reference_sample(rank_report)["tensors"])
            if sib:          # no step() call: the gradients alive at the in-backward steps
                m["grads"] = rank_report["peaks"]["grads_in_backward"]
            p = planned.ranks[r]
            same = all(m[c] == p[c] for c in EXACT_CATEGORIES)
            acts = rank_report["peaks"]["activations"]
            cells = [spec, str(r)] + [f"{m[c]:,}" for c in ("weights", "grads", "master", "state_factors")]
            cells.append(f"{m['state_dense'] + m['state_scalars']:,}")
            cells.append(f"{acts:,} / {planned.activations['saved']:,} "
                         f"({100 * (planned.activations['saved'] - acts) / acts:+.3f}%)")
            cells.append("= planned" if same else "**differs**: " + ", ".join(
                f"{c} planned {p[c]:,}" for c in EXACT_CATEGORIES if m[c] != p[c]))
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
