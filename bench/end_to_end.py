"""End-to-end training step time and tokens/s, MLorc vs AdamW, through launch/train.py, at
world size 2: DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, on the CPU (gloo) or GPUs.

    python bench/end_to_end.py                                   # configs/50m.json, 12 steps each
    python bench/end_to_end.py --model tiny --steps 6 --out /tmp/e2e.json
    python bench/end_to_end.py --engines zero2 --rounds 3        # ZeRO-2 only, 3 alternating rounds

Each pair runs the same model, data, batch and engine; the table gives the median step time
over the steps after --skip warm-up steps, tokens/s, and the MLorc / AdamW ratio. The AdamW
baselines: DeepSpeed's own torch AdamW for ZeRO (ds_configs/adamw.json's settings with its
optimizer block replaced, stage set per row) and dense AdamW through the same pieces for FSDP2
(`--optimizer adamw`). No run writes a checkpoint (--no-final-checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")


def ds_config(name: str, stage: int, scope: str | None, folder: Path, fused: bool = False) -> str:
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    if name == "adamw.json":    # the baseline is DeepSpeed's own torch AdamW, not AdamW through the pieces
        config.pop("mlorc")
        config["optimizer"] = {"type": "AdamW", "params": dict(config["optimizer"]["params"], torch_adam=True)}
    # the same ZeRO settings for both optimizers (those of mlorc.json), only the stage varies
    config["zero_optimization"] = dict(json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
                                       ["zero_optimization"], stage=stage)
    if scope and "mlorc" in config:
        config["mlorc"]["scope"] = scope
    if fused:
        config["mlorc"]["fused"] = True
    path = folder / f"{name[:-5]}_z{stage}_{scope or 'dense'}{'_fused' if fused else ''}.json"
    path.write_text(json.dumps(config))
    return str(path)


def run(label: str, cmd: list[str], out: Path, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    result = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["step_time"] for r in records[args.skip:]]
    step = statistics.median(timed)
    return {"run": label, "step_s": step, "tokens_per_s": args.global_batch * args.seq_len / step,
            "optimizer_s": statistics.median(r["optimizer_time"] for r in records[args.skip:]),
            "final_loss": records[-1]["loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "configs" / "50m.json"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--engines", default="zero2,zero3,fsdp2")
    p.add_argument("--optimizers", default="adamw,mlorc-adamw,mlorc-adamw-fused",
                   help="adamw (the base of the ratios) and any of mlorc-adamw, mlorc-adamw-fused")
    p.add_argument("--rounds", type=int, default=1, help="run every pair this many times, alternating")
    p.add_argument("--out", type=Path, default=Path("runs/bench_end_to_end.json"))
    args = p.parse_args(argv)
    common = ["--model", args.model, "--steps", str(args.steps), "--global-batch", str(args.global_batch),
              "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--warmup-steps", "1",
              "--no-final-checkpoint"]
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2",
                 "--master_port", "29890", TRAIN]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29891", TRAIN]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        optimizers = args.optimizers.split(",")
        if optimizers[0] != "adamw":
            raise ValueError("--optimizers must start with adamw (the base of the ratios)")
        for engine in args.engines.split(","):
            for round_index in range(args.rounds):
                pair = []
                for optimizer in optimizers:
                    label = f"{engine} {optimizer}" + (f" (round {round_index + 1})" if args.rounds > 1 else "")
                    fused = optimizer.endswith("-fused")
                    if engine == "fsdp2":
                        cmd = torchrun + common + ["--fsdp", "--optimizer", optimizer.removesuffix("-fused"),
                                                   "--rank", str(args.rank)] + (["--fused"] if fused else [])
                    else:
                        stage = int(engine[-1])
                        name = "adamw.json" if optimizer == "adamw" else "mlorc.json"
                        cmd = deepspeed + common + ["--deepspeed", ds_config(name, stage, "local", folder, fused)]
                    pair.append(run(label, cmd, folder / label.replace(" ", "_").replace("(", "").replace(")", ""), args))
                    print(f"{label:<36} {pair[-1]['step_s'] * 1e3:9.1f} ms {pair[-1]['tokens_per_s']:9.0f} tok/s "
                          f"(optimizer step {pair[-1]['optimizer_s'] * 1e3:.1f} ms)", flush=True)
                for row in pair[1:]:
                    row["vs_adamw"] = row["step_s"] / pair[0]["step_s"]
                    row["optimizer_vs_adamw"] = row["optimizer_s"] / pair[0]["optimizer_s"]
                rows += pair
    print(f"\n| engine, optimizer | step ms | tokens/s | x AdamW | optimizer step ms | x AdamW's |"
          f"\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:.0f} | "
              f"{row.get('vs_adamw', 1.0):.2f} | {row['optimizer_s'] * 1e3:.1f} | {row.get('optimizer_vs_adamw', 1.0):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
