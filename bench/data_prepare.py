"""Throughput of token-shard preparation (mlorc_dist.corpus.prepare) with 1 and 2 workers.

    python bench/data_prepare.py --copies 100 --json docs/bench/data_prepare.json

The corpus is --copies copies of the demo corpus (mlorc_dist.data.default_corpus_path(),
~466 kB each) written to --workdir, or --data FILE; the tokenizer is a byte-level BPE of
--vocab-size tokens trained on the demo corpus (or --tokenizer DIR). Each worker count runs in
a fresh process, which prepares into a new directory and reports wall time, tokens/s, the CPU
seconds of itself and of its workers (cores busy = CPU seconds / wall seconds), and peak RSS
of itself and of the largest worker. "available" is the CPUs that as many busy loops (at least
2) get just before and just after the run (mean): the ceiling on a machine shared with other
jobs. Every run must write byte-identical shards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def watch_children(stop: threading.Event, peaks: dict, cpu: dict) -> None:
    """Until ``stop``: the high-water RSS (VmHWM, MB) and the CPU seconds of each child process,
    by pid. Read from /proc after their exec: rusage's ru_maxrss would count the pages a child
    shares with this process between fork and exec."""
    me = str(os.getpid())
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.1):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                peaks[pid] = max(peaks.get(pid, 0), int(fields["VmHWM"].split()[0]) / 1024)
                cpu[pid] = (int(stat[11]) + int(stat[12])) / tick        # utime + stime


def one_run(args) -> dict:
    """Child mode: prepare once and report (this process is fresh, so its rusage is this run's)."""
    from mlorc_dist.corpus import prepare, load_hf_tokenizer, TokenShards
    tokenizer = load_hf_tokenizer(args.tokenizer)
    peaks: dict = {}
    cpu: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=watch_children, args=(stop, peaks, cpu), daemon=True)
    sampler.start()
    started = time.perf_counter()
    cpu_self = time.process_time()
    out = prepare(args.data, tokenizer, args.out, workers=args.workers, chunk_chars=args.chunk_chars)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    cpu_self = time.process_time() - cpu_self
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    shards = TokenShards(out)
    digest = hashlib.sha256()
    for shard in shards.index["shards"]:
        with (out / shard["file"]).open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    cpu_workers = children.ru_utime + children.ru_stime
    return {"workers": args.workers, "tokens": shards.num_tokens, "seconds": wall,
            "tokens_per_s": shards.num_tokens / wall, "cpu_parent_s": cpu_self, "cpu_workers_s": cpu_workers,
            "cores_busy": (cpu_self + cpu_workers) / wall,
            "peak_rss_parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mb": max(peaks.values(), default=0.0),
            "cpu_per_worker_s": sorted(cpu.values(), reverse=True), "shards_sha256": digest.hexdigest()}


SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\nprint(time.process_time())"


def cores_available(processes: int = 2, seconds: float = 3.0) -> float:
    """CPUs that ``processes`` busy loops started together get (CPU seconds / wall seconds): on
    a machine shared with other jobs, the most a run with that many busy processes can reach."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    return sum(float(proc.communicate()[0]) for proc in procs) / seconds


def build_corpus(args, workdir: Path) -> tuple[Path, Path]:
    from mlorc_dist.data import default_corpus_path, train_tokenizer
    demo = default_corpus_path()
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else workdir / "tokenizer"
    if not args.tokenizer:
        train_tokenizer([str(demo)], args.vocab_size, workdir / "tokenizer-cache").save_pretrained(tokenizer_dir)
    if args.data:
        return Path(args.data), tokenizer_dir
    corpus = workdir / f"demo_x{args.copies}.txt"
    if not corpus.is_file():
        text = demo.read_bytes()
        with corpus.open("wb") as f:
            for _ in range(args.copies):
                f.write(text)
    return corpus, tokenizer_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=60, help="copies of the demo corpus (60: ~28 MB)")
    p.add_argument("--data", help="a text file instead of the copies")
    p.add_argument("--tokenizer", help="an HF tokenizer directory (default: BPE trained on the demo corpus)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-chars", type=int, default=None, help="characters per message (default: corpus.py's)")
    p.add_argument("--workdir", default=None, help="where the corpus and shards go (default: a temporary directory)")
    p.add_argument("--json", default="runs/bench_data_prepare.json")
    p.add_argument("--out", help=argparse.SUPPRESS)      # child mode
    args = p.parse_args()
    from mlorc_dist.corpus import DEFAULT_CHUNK_CHARS
    args.chunk_chars = args.chunk_chars or DEFAULT_CHUNK_CHARS
    if args.out:
        args.workers = args.workers[0]
        print(json.dumps(one_run(args)))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_prepare_"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer_dir = build_corpus(args, workdir)
    rows = []
    load_before = os.getloadavg()[0]
    for workers in args.workers:
        out = workdir / f"shards_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--data", str(corpus), "--tokenizer", str(tokenizer_dir),
               "--workers", str(workers), "--chunk-chars", str(args.chunk_chars), "--out", str(out)]
        available = cores_available(max(2, workers))
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if result.returncode:
            print(result.stderr[-4000:], file=sys.stderr)
            return result.returncode
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        rows[-1]["cores_available"] = (available + cores_available(max(2, workers))) / 2
        shutil.rmtree(out, ignore_errors=True)
    identical = len({r["shards_sha256"] for r in rows}) == 1
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), {rows[0]['tokens']:,} tokens, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'workers':>7} {'seconds':>8} {'tokens/s':>10} {'cores busy':>10} {'available':>9} {'CPU parent s':>12} "
          f"{'CPU workers s':>13} {'CPU per worker s':>16} {'RSS parent MB':>13} {'RSS worker MB':>13}")
    for r in rows:
        print(f"{r['workers']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>10,.0f} {r['cores_busy']:>10.2f} "
              f"{r['cores_available']:>9.2f} "
              f"{r['cpu_parent_s']:>12.1f} {r['cpu_workers_s']:>13.1f} "
              f"{' + '.join(f'{c:.1f}' for c in r['cpu_per_worker_s']):>16} {r['peak_rss_parent_mb']:>13.0f} "
              f"{r['peak_rss_worker_mb']:>13.0f}")
    print(f"shards byte-identical across worker counts: {identical}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"corpus": str(corpus), "bytes": corpus.stat().st_size,
                                           "cpus": os.cpu_count(), "chunk_chars": args.chunk_chars,
                                           "load_average": [load_before, os.getloadavg()[0]],
                                           "identical": identical, "runs": rows}, indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
