"""Peak host memory per rank in each phase of a launch/train.py run, beside what the rank must
hold (the planner's exact categories for it: weights, grads, master, optimizer state).

    python bench/scale_probe.py                                      # configs/100m.json, FSDP2 and ZeRO-3
    python bench/scale_probe.py --model configs/llama-1b.json --engines fsdp2,zero2,zero3 --scope global

Phases, each its own launch measured by ../shared/tools/peak_rss.py (largest process):
    train      build, load data, 2 steps, the final checkpoint (world size 2)
    export     resume at world size 2 (nothing left to do) and --export
    init-from  --init-from the exported directory (each rank reading its slices), one step
    resume@N   the world-size-2 checkpoint resumed at world size N (--resume-worlds), one more step
Beside each: the rank's ideal (the planner's exact categories for that engine and world size:
weights, grads, master, optimizer state) and the target 1.25 x ideal + 600 MB (a process's
baseline: Python, torch, transformers, DeepSpeed). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
PEAK_RSS = ROOT.parent / "shared" / "tools" / "peak_rss.py"


def measure(cmd: list[str], env: dict) -> float:
    """Peak RSS of the largest process of the command's tree, MB."""
    result = subprocess.run([sys.executable, str(PEAK_RSS), "--", *cmd], env=env, capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return float(re.findall(r"peak_rank_rss_mb=(\d+)", result.stdout + result.stderr)[-1])


BASELINE_MB = 600


def ideal_mb(args, engine: str, world: int) -> float:
    """The planner's exact bytes of the worst rank: what it cannot avoid holding."""
    from transformers import AutoConfig
    from mlorc_dist.memory import planner
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    plan = planner.plan_for_run(config, engine=engine, world_size=world, optimizer="mlorc-adamw", rank=4,
                                micro_batch=1, seq=args.seq_len, scope=args.scope)
    return max(sum(rank[c] for c in planner.EXACT_CATEGORIES) for rank in plan.ranks) / 2 ** 20


def launcher(engine: str, world: int, port: int, args, folder: Path) -> list[str]:
    if engine == "fsdp2":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                str(port), TRAIN, "--fsdp", "--optimizer", "mlorc-adamw", "--scope", args.scope]
    shipped = {"zero2": "mlorc.json", "zero3": "mlorc_zero3.json"}[engine]
    config = json.loads((ROOT / "ds_configs" / shipped).read_text())
    config["mlorc"]["scope"] = args.scope
    path = folder / f"{engine}_{args.scope}.json"
    path.write_text(json.dumps(config))
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(world), "--master_port",
            str(port), TRAIN, "--deepspeed", str(path)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "configs" / "100m.json"))
    p.add_argument("--engines", default="fsdp2,zero3")
    p.add_argument("--scope", default="local")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--resume-worlds", default="1,2,3")
    p.add_argument("--phases", default="train,export,init-from,resume", help="the phases to run (train always)")
    p.add_argument("--port", type=int, default=29640)
    p.add_argument("--out", type=Path, default=Path("runs/scale_probe.json"))
    args = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    common = ["--seq-len", str(args.seq_len), "--global-batch", "6", "--micro-batch", "1",
              "--warmup-steps", "1", "--threads", "1"]
    model = ["--model", args.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for engine in args.engines.split(","):
            out = folder / engine
            phases = [("train", 2, [*model, "--steps", "2"], out),
                      ("export", 2, [*model, "--steps", "2", "--resume", "--export", "--no-final-checkpoint"], out),
                      ("init-from", 2, ["--init-from", str(out / "export"), "--steps", "1", "--no-final-checkpoint"],
                       folder / f"{engine}_init")]
            for world in map(int, args.resume_worlds.split(",")):
                phases.append((f"resume@{world}", world, [*model, "--steps", "3", "--resume", "--extend-schedule",
                                                          "--no-final-checkpoint"], folder / f"{engine}_resume{world}"))
            wanted = {"train", *args.phases.split(",")}
            phases = [ph for ph in phases if ph[0].split("@")[0] in wanted]
            for index, (phase, world, extra, run_out) in enumerate(phases):
                if phase.startswith("resume"):
                    shutil.copytree(out / "checkpoints" / "step_00000002", run_out / "checkpoints" / "step_00000002")
                cmd = launcher(engine, world, args.port + index, args, folder) + common + extra + ["--out", str(run_out)]
                peak = measure(cmd, env)
                ideal = ideal_mb(args, engine, world)
                target = 1.25 * ideal + BASELINE_MB
                rows.append({"engine": engine, "scope": args.scope, "phase": phase, "world_size": world,
                             "peak_rank_mb": peak, "ideal_mb": ideal, "target_mb": target})
                print(f"{engine:6} {phase:10} ws={world} peak {peak:8.0f} MB  ideal {ideal:8.0f} MB  target "
                      f"{target:8.0f} MB", flush=True)
                if phase.startswith("resume"):
                    shutil.rmtree(run_out)
    print("\n| engine | scope | phase | world size | peak RSS per rank, MB | rank's ideal, MB | target, MB | within |\n"
          "|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['scope']} | {r['phase']} | {r['world_size']} | {r['peak_rank_mb']:.0f} | "
              f"{r['ideal_mb']:.0f} | {r['target_mb']:.0f} | {'yes' if r['peak_rank_mb'] <= r['target_mb'] else 'no'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
