"""One command, every method: AdamW, MLorc-AdamW, MLorc-Lion, MoFaSGD, GaLore, LoRA (peft) and
SwitchLoRA train the same small Llama on the same real text at the same budget (steps x batch
x sequence length), each with a short learning-rate sweep, in two settings:

  pretrain   from the same random initial weights, on the pydoc topics corpus
  finetune   from a model the harness pretrained itself (AdamW's best pretraining run), on a
             second corpus: the docstrings of the Python standard library

Writes a JSON of every run (loss curves, eval losses, optimizer-state bytes, step times, the
sweep), a PNG of the best run's loss curves per method, and a markdown table (printed, and
written next to the JSON) for docs/BENCHMARKS.md.

    python bench/compare_methods.py                       # full size (~20-30 min on 2 CPU cores)
    python bench/compare_methods.py --preset toy          # seconds: what the test suite runs

Single process on the CPU (or one GPU when present); the engines do not change the math
(tests/test_distributed.py shows sharded = single process for every optimizer here).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlorc_dist import methods  # noqa: E402
from mlorc_dist.data import (PackedBatches, contiguous_windows, default_corpus_path,  # noqa: E402
                             docstring_corpus_path, load_token_ids, split_train_eval, train_tokenizer)
from mlorc_dist.models import build_model, llama_config  # noqa: E402
from mlorc_dist.training import lr_at  # noqa: E402

PRESETS = {
    "full": dict(model="demo", pretrain_steps=200, finetune_steps=100, batch=8, seq_len=128,
                 eval_windows=32, eval_every=25, sweep=True),
    "toy": dict(model="tiny", pretrain_steps=4, finetune_steps=3, batch=2, seq_len=32,
                eval_windows=2, eval_every=2, sweep=False),
}
# The rank of each low-rank method: its usual setting (MLorc's paper uses 4; MoFaSGD 8-32;
# GaLore and (Switch)LoRA a quarter of the hidden size or so). Budgets match in tokens, not in
# state bytes: the table reports the bytes.
RANKS = {"adamw": 0, "mlorc-adamw": 4, "mlorc-lion": 4, "mofasgd": 8, "galore": 32, "lora": 16,
         "switchlora": 32}
# Peak learning rates swept per method and setting (the toy preset runs the middle one).
SWEEPS = {
    "pretrain": {"adamw": [5e-4, 1e-3, 2e-3], "mlorc-adamw": [2e-3, 4e-3, 8e-3],
                 "mlorc-lion": [3e-4, 1e-3, 3e-3], "mofasgd": [5e-3, 1e-2, 2e-2],
                 "galore": [5e-3, 1e-2, 2e-2], "lora": [1e-3, 3e-3, 1e-2],
                 "switchlora": [3e-3, 1e-2, 3e-2]},
    "finetune": {"adamw": [1e-3, 3e-3, 1e-2], "mlorc-adamw": [3e-4, 1e-3, 3e-3],
                 "mlorc-lion": [3e-4, 1e-3, 3e-3], "mofasgd": [3e-3, 1e-2, 3e-2],
                 "galore": [1e-3, 3e-3, 1e-2], "lora": [1e-3, 3e-3, 1e-2],
                 "switchlora": [3e-3, 1e-2, 3e-2]},
}
# What a sweep varies is the lr of each method's own update of the 2-D weights. Embeddings,
# lm_head and 1-D tensors run AdamW for every method but MLorc-Lion (Lion, its lr is not
# AdamW's: they follow its sweep) and LoRA (frozen), always at the same fixed lr: AdamW's
# best single lr of a first sweep. On a model this small they are a third of the parameters:
# letting their lr follow each method's sweep measured the embeddings' lr more than the
# method (GaLore at 0.01 "beat" AdamW by 0.6 nats that way; docs/BENCHMARKS.md).
DENSE_LR = {"pretrain": 1e-3, "finetune": 3e-3}
DENSE_LR_METHODS = ("adamw", "mlorc-adamw", "mofasgd", "galore", "switchlora")
GALORE_INTERVAL = 50          # GaLore's T (200 in the paper, for runs of thousands of steps)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--methods", default=",".join(methods.METHODS), help="comma-separated subset")
    p.add_argument("--out", type=Path, default=Path("docs/bench/compare_methods.json"))
    p.add_argument("--png", type=Path, default=None, help="default: the JSON's path with .png")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.methods = [methods.check_method(m) for m in args.methods.split(",")]
    if "adamw" not in args.methods:
        p.error("the fine-tuning base is AdamW's best pretraining run: keep adamw in --methods")
    return args


class Corpus:
    """Train windows (a deterministic stream) and fixed held-out windows of one text."""

    def __init__(self, path: Path, tokenizer, batch: int, seq_len: int, eval_windows: int):
        train_ids, eval_ids = split_train_eval(load_token_ids(path, tokenizer))
        self.train_ids, self.batch, self.seq_len = train_ids, batch, seq_len
        self.eval = contiguous_windows(eval_ids, seq_len)[:eval_windows]
        self.name = path.name

    def batches(self, seed: int) -> PackedBatches:
        return PackedBatches(self.train_ids, self.batch, self.seq_len, seed=seed)


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=w, labels=w).loss.item() for w in windows.split(batch)]
    model.train()
    return sum(losses) / len(losses)


def state_bytes(optimizer) -> int:
    return optimizer.state_bytes()


def train_run(method: str, setting: str, lr: float, config, corpus: Corpus, steps: int,
              eval_every: int, seed: int, base_state: dict | None) -> tuple[dict, dict | None]:
    """One run; returns its record (and the final weights for AdamW pretraining runs)."""
    model = build_model(config, seed=seed)
    if base_state is not None:
        model.load_state_dict(base_state)
    rank = RANKS[method]
    model = methods.prepare_model(method, model, rank=max(rank, 1), seed=seed)
    dense_lr = DENSE_LR[setting] if method in DENSE_LR_METHODS else None
    optimizer = methods.build_optimizer(method, model, lr=lr, dense_lr=dense_lr,
                                        rank=max(rank, 1), seed=seed, galore_interval=GALORE_INTERVAL)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = corpus.batches(seed)
    record = {"method": method, "setting": setting, "lr": lr, "rank": rank, "steps": steps,
              "trainable_params": sum(p.numel() for p in trainable),
              "eval_before": eval_loss(model, corpus.eval, corpus.batch),
              "train_loss": [], "eval": [], "step_s": [], "optimizer_step_s": []}
    warmup = max(1, steps // 10)
    for step in range(1, steps + 1):
        started = time.perf_counter()
        factor = lr_at(step, peak=1.0, warmup=warmup, total=steps, min_ratio=0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor * group.get("lr_scale", 1.0)
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt_started = time.perf_counter()
        optimizer.step()
        methods.after_step(method, model, optimizer, step, steps)
        record["optimizer_step_s"].append(time.perf_counter() - opt_started)
        optimizer.zero_grad(set_to_none=True)
        record["step_s"].append(time.perf_counter() - started)
        value = loss.item()
        record["train_loss"].append(value if math.isfinite(value) else None)
        if step % eval_every == 0 or step == steps:
            record["eval"].append([step, eval_loss(model, corpus.eval, corpus.batch)])
    record["eval_loss"] = record["eval"][-1][1]
    record["state_bytes"] = state_bytes(optimizer)
    timed = slice(min(3, steps - 1), None)
    record["step_ms"] = 1000 * statistics.median(record["step_s"][timed])
    record["optimizer_step_ms"] = 1000 * statistics.median(record["optimizer_step_s"][timed])
    del record["step_s"], record["optimizer_step_s"]
    weights = None
    if method == "adamw" and setting == "pretrain":
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return record, weights


def run_setting(setting: str, args, preset: dict, config, corpus: Corpus, base_state) -> tuple[dict, tuple]:
    """Every method's sweep; returns the results and (eval loss, lr, weights) of AdamW's best run."""
    steps = preset[f"{setting}_steps"]
    results, best_adamw_weights = {}, None
    for method in args.methods:
        lrs = SWEEPS[setting][method] if preset["sweep"] else SWEEPS[setting][method][1:2]
        sweep = []
        for lr in lrs:
            record, weights = train_run(method, setting, lr, config, corpus, steps, preset["eval_every"],
                                        args.seed, base_state)
            print(f"{setting:>8} {method:>12} lr {lr:<8g} eval {record['eval_loss']:.4f} "
                  f"step {record['step_ms']:.0f} ms", flush=True)
            sweep.append(record)
            if weights is not None and (best_adamw_weights is None or
                                        record["eval_loss"] < best_adamw_weights[0]):
                best_adamw_weights = (record["eval_loss"], lr, weights)
        finite = [r for r in sweep if math.isfinite(r["eval_loss"])] or sweep
        best = min(finite, key=lambda r: r["eval_loss"])
        results[method] = {"best": best, "sweep": [{"lr": r["lr"], "eval_loss": r["eval_loss"]} for r in sweep]}
    return results, best_adamw_weights


def table(setting: str, results: dict) -> str:
    lines = [f"**{setting}** (eval loss on held-out text; lr sweep as lr: eval loss)", "",
             "| method | rank | trainable params | best lr | eval loss | optimizer state | step ms | optimizer.step() ms | sweep |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, entry in results.items():
        b = entry["best"]
        sweep = ", ".join(f"{s['lr']:g}: {s['eval_loss']:.3f}" for s in entry["sweep"])
        lines.append(f"| {method} | {b['rank'] or '-'} | {b['trainable_params']:,} | {b['lr']:g} | "
                     f"{b['eval_loss']:.3f} | {b['state_bytes'] / 2**20:.2f} MiB | {b['step_ms']:.0f} | "
                     f"{b['optimizer_step_ms']:.1f} | {sweep} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("pretrain", "finetune") if s in report["results"]]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method, entry in report["results"][setting].items():
            best = entry["best"]
            losses = [x for x in best["train_loss"] if x is not None]
            smooth, ema = [], None
            for x in losses:
                ema = x if ema is None else 0.9 * ema + 0.1 * x
                smooth.append(ema)
            line, = ax.plot(range(1, len(smooth) + 1), smooth, label=f"{method} (lr {best['lr']:g})", lw=1.2)
            steps, evals = zip(*best["eval"])
            ax.plot(steps, evals, "o", ms=3, color=line.get_color())
        ax.set_title(f"{setting}: train loss (EMA 0.9), eval loss (dots)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} ({report['parameters'] / 1e6:.1f}M params), "
                 f"{report['preset']['batch']}x{report['preset']['seq_len']} tokens per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    started = time.perf_counter()
    pretrain_text = default_corpus_path()
    tokenizer = train_tokenizer([str(pretrain_text)], 2048)
    config = llama_config(preset["model"], vocab_size=len(tokenizer))
    parameters = sum(p.numel() for p in build_model(config, seed=args.seed).parameters())
    pretrain = Corpus(pretrain_text, tokenizer, preset["batch"], preset["seq_len"], preset["eval_windows"])
    finetune = Corpus(docstring_corpus_path(), tokenizer, preset["batch"], preset["seq_len"],
                      preset["eval_windows"])
    print(f"model {preset['model']} {parameters / 1e6:.2f}M params | pretrain on {pretrain.name} "
          f"({pretrain.train_ids.numel():,} tokens), finetune on {finetune.name} "
          f"({finetune.train_ids.numel():,} tokens)", flush=True)
    report = {"preset": {"name": args.preset, **preset}, "model": preset["model"], "parameters": parameters,
              "ranks": RANKS, "sweeps": SWEEPS, "dense_lr": {"methods": DENSE_LR_METHODS, **DENSE_LR},
              "galore_interval": GALORE_INTERVAL, "threads": torch.get_num_threads(),
              "corpora": {"pretrain": pretrain.name, "finetune": finetune.name}, "results": {}}
    report["results"]["pretrain"], base = run_setting("pretrain", args, preset, config, pretrain, None)
    report["finetune_base"] = {"method": "adamw", "lr": base[1], "pretrain_eval_loss": base[0]}
    report["results"]["finetune"], _ = run_setting("finetune", args, preset, config, finetune,
                                                   copy.deepcopy(base[2]))
    report["wall_s"] = time.perf_counter() - started
    markdown = "\n\n".join(table(s, report["results"][s]) for s in ("pretrain", "finetune"))
    print("\n" + markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown + "\n")
    png = args.png or args.out.with_suffix(".png")
    plot(report, png)
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md')} and {png} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
