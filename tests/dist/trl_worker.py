"""One multi-process job of tests/test_integrations.py: examples/sft_trl.py (TRL's SFTTrainer and
DPOTrainer with MLorc) several times in one process group, on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/trl_worker.py --out DIR \
        --runs sft:--deepspeed:2 dpo:--deepspeed:2

Each run is `<trainer>:<engine flags joined by ':'>`. Every rank writes DIR/<run name>.rank<r>.json:
the example's summary, and every torch optimizer class whose step() ran during the run with its
number of calls (torch's global step hook), so the test can see what really stepped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


def load_example():
    spec = importlib.util.spec_from_file_location("sft_trl", ROOT / "examples" / "sft_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import AcceleratorState
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stepped: dict[str, int] = {}

    def count(optimizer, *_):
        stepped[type(optimizer).__name__] = stepped.get(type(optimizer).__name__, 0) + 1
    register_optimizer_step_post_hook(count)
    example = load_example()
    for run in args.runs:
        trainer, *flags = run.split(":")
        name = f"{trainer}{''.join(flags).replace('--', '-')}"
        # a new Trainer per run: drop the previous run's accelerator state, keep the process group
        AcceleratorState._reset_state(reset_partial_state=False)
        stepped.clear()
        summary = example.main([*flags, "--trainer", trainer, "--steps", str(args.steps),
                                "--output-dir", str(args.out / name)])
        rank = dist.get_rank()
        (args.out / f"{name}.rank{rank}.json").write_text(
            json.dumps({"summary": summary, "stepped": dict(stepped)}, default=str))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from mlorc_dist.training import exit_without_teardown
    exit_without_teardown(0)      # gloo's teardown race at interpreter exit (see its docstring)
