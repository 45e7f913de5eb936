"""Peak host memory per rank and step time of one FSDP2 job under each host-allocator setting
(mlorc_dist.host_memory): glibc's mmap threshold (its dynamic one, or fixed by
--mmap-threshold-mb) and torch's transparent huge pages (THP_MEM_ALLOC_ENABLE).

    python bench/host_allocator.py --out docs/bench/host_allocator_100m.json
    python bench/host_allocator.py --model configs/llama-1b.json --steps 2 --rounds 1 --out runs/host_allocator_1b.json

Each setting is a launch of launch/train.py (FSDP2, world size 2, MLorc-AdamW, local scope) measured
by ../shared/tools/peak_rss.py (largest process, MiB); the step time is the median of the steps
after the first (metrics.jsonl's step_time). --rounds repeats the settings in alternating order so
that a machine's drift touches all of them. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = ROOT.parent / "shared" / "tools" / "peak_rss.py"

# name -> (--mmap-threshold-mb, THP_MEM_ALLOC_ENABLE)
SETTINGS = {"glibc dynamic threshold, 4 KiB pages": ("0", "0"),
            "glibc dynamic threshold, huge pages": ("0", "1"),
            "1 MiB threshold, 4 KiB pages": ("1", "0"),
            "8 MiB threshold, huge pages": ("8", "1"),
            "1 MiB threshold, huge pages (default)": ("1", "1")}


def run(args, name: str, folder: Path, port: int) -> dict:
    threshold, thp = SETTINGS[name]
    out = folder / re.sub(r"\W+", "_", name)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), THP_MEM_ALLOC_ENABLE=thp)
    cmd = [sys.executable, str(PEAK_RSS), "--", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), str(ROOT / "launch" / "train.py"), "--fsdp", "--model", args.model,
           "--seq-len", str(args.seq_len), "--global-batch", "6", "--micro-batch", "1", "--warmup-steps", "1",
           "--steps", str(args.steps), "--threads", "1", "--no-final-checkpoint", "--mmap-threshold-mb", threshold,
           "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    peak = float(re.findall(r"peak_rank_rss_mb=(\d+)", result.stdout + result.stderr)[-1])
    times = [json.loads(line)["step_time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"setting": name, "mmap_threshold_mb": float(threshold), "huge_pages": thp == "1", "peak_rank_mib": peak,
            "median_step_s": statistics.median(times[1:] or times), "step_times_s": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "configs" / "100m.json"))
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=29660)
    p.add_argument("--out", type=Path, default=Path("runs/host_allocator.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = list(SETTINGS)
        for round_ in range(args.rounds):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                row = run(args, name, Path(tmp) / f"r{round_}", args.port + len(rows))
                row["round"] = round_
                rows.append(row)
                print(f"{name:40} peak {row['peak_rank_mib']:7.0f} MiB  median step {row['median_step_s']:6.2f} s",
                      flush=True)
    base = {r["round"]: r for r in rows if r["setting"] == names[0]}
    print(f"\n{Path(args.model).name}, FSDP2 world size 2\n\n| setting | peak RSS per rank, MiB | median step, s | "
          "step / glibc's default |\n|---|---:|---:|---:|")
    for name in names:
        mine = [r for r in rows if r["setting"] == name]
        peaks = ", ".join(f"{r['peak_rank_mib']:.0f}" for r in mine)
        steps = ", ".join(f"{r['median_step_s']:.2f}" for r in mine)
        ratio = ", ".join(f"{r['median_step_s'] / base[r['round']]['median_step_s']:.2f}" for r in mine)
        print(f"| {name} | {peaks} | {steps} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
