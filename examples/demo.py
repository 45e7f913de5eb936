"""MLorc vs AdamW in two minutes on a laptop CPU.

Trains a small LLaMA ("demo" shape, ~2.6M parameters) on English prose that ships with
Python (the pydoc help topics), twice: from the same initial weights on the same batches,
once with torch.optim.AdamW and once with mlorc_dist.MLorcAdamW (rank-4 compressed momentum).
Then compares loss, optimizer-state memory and step time.

Run it:

    make demo                                # the whole demo, ~2 minutes on 2 CPU cores
    python examples/demo.py --steps 50       # a quick smoke run
    python examples/demo.py --optimizers adamw --steps 200 --lr 1e-3

Nothing is downloaded: the tokenizer is trained locally and cached under ~/.cache/mlorc_dist
(or $MLORC_CACHE). Results go to runs/demo.json (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mlorc_dist.data import (
    PackedBatches,
    contiguous_windows,
    default_corpus_path,
    load_token_ids,
    split_train_eval,
    train_tokenizer,
)
from mlorc_dist.models import build_model, llama_config

OPTIMIZER_NAMES = ("adamw", "mlorc")
# Peak learning rates from a sweep at the default settings (250 steps of 8x128 tokens):
# AdamW 5e-4..5e-3 -> best 1e-3 (1.5e-3 ties); MLorc 1e-3..4e-3 -> best 1.5e-3.
DEFAULT_LR = {"adamw": 1e-3, "mlorc": 1.5e-3}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="training steps per optimizer")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate for every optimizer (default {DEFAULT_LR})")
    parser.add_argument("--rank", type=int, default=4, help="MLorc momentum rank")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", default="demo", help="a shape from mlorc_dist.models.LLAMA_SHAPES")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batch order")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZER_NAMES), help=f"comma-separated subset of {OPTIMIZER_NAMES}"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo.json"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    args.optimizers = args.optimizers.split(",")
    for name in args.optimizers:
        if name not in OPTIMIZER_NAMES:
            parser.error(f"unknown optimizer {name!r}; choose from {OPTIMIZER_NAMES}")
    return args


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(name: str, model: torch.nn.Module, lr: float, rank: int) -> torch.optim.Optimizer:
    """AdamW or MLorcAdamW with the same hyperparameters (no weight decay, to compare plainly)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    from mlorc_dist import MLorcAdamW

    return MLorcAdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=rank)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (MLorc reports its own; AdamW's are summed here)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def lr_at(step: int, total_steps: int, peak_lr: float) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- train / eval


@torch.no_grad()
def eval_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over fixed held-out windows [N, T]."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in windows.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def train_one(name: str, args: argparse.Namespace, config, train_ids: torch.Tensor, eval_windows: torch.Tensor) -> dict:
    """Train a fresh model (same init, same batches for every optimizer); return its metrics."""
    model = build_model(config, seed=args.seed)
    peak_lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    optimizer = make_optimizer(name, model, peak_lr, args.rank)
    batches = PackedBatches(train_ids, args.batch_size, args.seq_len, seed=args.seed)
    eval_before = eval_loss(model, eval_windows, args.batch_size)

    losses, step_seconds, optimizer_step_seconds = [], [], []
    progress = tqdm(range(args.steps), desc=f"{name:>6}", unit="step")
    for step in progress:
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, peak_lr)
        input_ids = next(batches)  # [B, T]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_start = time.perf_counter()
        optimizer.step()
        optimizer_step_seconds.append(time.perf_counter() - opt_start)
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - step_start)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")

    # The first steps include one-off costs (state allocation, allocator warmup): skip them in timings.
    timed = slice(min(5, args.steps - 1), None)
    return {
        "optimizer": name,
        "peak_lr": peak_lr,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "eval_loss_before": eval_before,
        "eval_loss": eval_loss(model, eval_windows, args.batch_size),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "step_ms": 1000 * sum(step_seconds[timed]) / len(step_seconds[timed]),
        "optimizer_step_ms": 1000 * sum(optimizer_step_seconds[timed]) / len(optimizer_step_seconds[timed]),
        "train_losses": losses,
    }


# ----------------------------------------------------------------------------- report


def format_table(results: list[dict]) -> str:
    """A markdown table with one row per optimizer."""
    header = "| optimizer | peak lr | final train loss | eval loss | optimizer state | step ms | optimizer.step() ms |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {r['optimizer']} | {r['peak_lr']:g} | {r['final_train_loss']:.3f} | {r['eval_loss']:.3f} "
        f"| {r['optimizer_state_bytes'] / 2**20:.2f} MiB | {r['step_ms']:.1f} | {r['optimizer_step_ms']:.1f} |"
        for r in results
    ]
    return "\n".join([header, rule, *rows])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    corpus = default_corpus_path()
    tokenizer = train_tokenizer([str(corpus)], vocab_size=args.vocab_size)
    train_ids, eval_ids = split_train_eval(load_token_ids(corpus, tokenizer))
    eval_windows = contiguous_windows(eval_ids, args.seq_len)  # [N, T], the same for every run
    config = llama_config(args.model, vocab_size=len(tokenizer))
    num_params = sum(p.numel() for p in build_model(config, seed=args.seed).parameters())
    print(
        f"corpus {corpus} | {train_ids.numel():,} train / {eval_ids.numel():,} eval tokens | "
        f"model {args.model} {num_params / 1e6:.2f}M params | {args.steps} steps of {args.batch_size}x{args.seq_len}"
    )

    results = [train_one(name, args, config, train_ids, eval_windows) for name in args.optimizers]
    wall_seconds = time.perf_counter() - wall_start

    print()
    print(format_table(results))
    print(f"\nloss before training: {results[0]['eval_loss_before']:.3f} | wall time after imports {wall_seconds:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "settings": settings,
        "num_params": num_params,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": wall_seconds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
