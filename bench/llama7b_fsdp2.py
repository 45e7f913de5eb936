"""LLaMA-2-7B's shape (configs/llama-7b.json, 6.74B parameters) trained with MLorc-AdamW under FSDP2
at world size 2 on one small host: bf16 weights written with stochastic rounding (no fp32 master),
each parameter stepped in backward. Two steps, a checkpoint, then a resume for a third step; the
peak resident memory of each rank in each phase. MLorc's state covers the embedding and lm_head
too (--compress-embeddings, as the MLorc reference code does), and the step is the fused one
(--fused: its transients are one body's gradient in fp32 and V, not the reference path's rebuilt
moments and elementwise temporaries).

    python bench/llama7b_fsdp2.py [--seq-len 16] [--out runs/llama7b] [--json docs/bench/llama7b_fsdp2.json]

Each phase is `torchrun --nproc_per_node 2 launch/train.py --fsdp ...` run under
../shared/tools/peak_rss.py when it exists (its largest process and tree peaks are printed too);
this script samples every rank's VmRSS every 0.25 s itself (the ranks are the processes whose
environment holds RANK) for the per-rank table. Needs about 2 x 11 GB of host memory and ~30 GB
of disk for the checkpoint; nothing else should run beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = ROOT.parent / "shared" / "tools" / "peak_rss.py"


def rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if b"launch/train.py" not in cmdline or b"torch.distributed.run" in cmdline or b"RANK" not in env:
        return None
    return int(env[b"RANK"])


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RankSampler:
    """Peak VmRSS per rank of the launch/train.py processes running now."""

    def __init__(self):
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        ranks: dict[int, int] = {}
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) not in ranks:
                    rank = rank_of(int(name))
                    if rank is not None:
                        ranks[int(name)] = rank
            for pid, rank in ranks.items():
                self.peaks[rank] = max(self.peaks.get(rank, 0.0), rss_mb(pid))
            time.sleep(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_phase(name: str, flags: list[str], out: Path, port: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "launch" / "train.py"), "--fsdp", "--model", str(ROOT / "configs" / "llama-7b.json"),
           "--out", str(out), *flags]
    if PEAK_RSS.exists():
        cmd = [sys.executable, str(PEAK_RSS), "--", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    with RankSampler() as sampler:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    (out.parent / f"{out.name}_{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (rc {result.returncode}); log: {out.parent / f'{out.name}_{name}.log'}\n"
                         + result.stderr[-3000:])
    tool = [line for line in result.stdout.splitlines() if line.startswith("peak_rank_rss_mb=")]
    return {"phase": name, "seconds": round(seconds, 1),
            "rank_peak_mb": {str(r): round(v) for r, v in sorted(sampler.peaks.items())},
            "peak_rss_tool": tool[-1] if tool else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "runs" / "llama7b"))
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "llama7b_fsdp2.json"))
    p.add_argument("--port", type=int, default=29893)
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # --compress-embeddings: the embedding and lm_head get low-rank state too, as the MLorc reference
    # does (their dense fp32 AdamW state would be 1 GB per rank here)
    common = ["--optimizer", "mlorc-adamw", "--param-dtype", "bf16", "--step-in-backward", "--clip-grad", "0",
              "--compress-embeddings", "--fused",
              "--global-batch", "2", "--seq-len", str(args.seq_len), "--threads", "1", "--warmup-steps", "1",
              "--collective-timeout", "3600"]
    phases = [run_phase("train 2 steps + save", [*common, "--steps", "2"], out, args.port),
              run_phase("resume + step 3 + save", [*common, "--steps", "3", "--resume", "--extend-schedule"],
                        out, args.port)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint_gb = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file()) / 2 / 1e9
    result = {"command": " ".join(["python", "bench/llama7b_fsdp2.py", "--seq-len", str(args.seq_len)]),
              "model": "configs/llama-7b.json", "world_size": 2, "phases": phases,
              "steps": [{k: r[k] for k in ("step", "loss", "step_time", "optimizer_time")} for r in records],
              "checkpoints_gb_on_disk": round(checkpoint_gb, 1)}
    print(f"{'phase':28s} {'seconds':>8s} {'rank 0 peak MB':>15s} {'rank 1 peak MB':>15s}  peak_rss.py")
    for phase in phases:
        peaks = phase["rank_peak_mb"]
        print(f"{phase['phase']:28s} {phase['seconds']:8.1f} {peaks.get('0', 0):15,d} {peaks.get('1', 0):15,d}  "
              f"{phase['peak_rss_tool']}")
    for record in result["steps"]:
        print(f"step {record['step']}: loss {record['loss']:.4f}, {record['step_time']:.1f} s "
              f"(optimizer, inside backward: {record['optimizer_time']:.1f} s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
