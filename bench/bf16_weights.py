"""What bf16 weights with no fp32 master cost in quality: MLorc-AdamW with fp32 weights, with bf16
weights written with stochastic rounding (the default), and with bf16 weights rounded to nearest,
on the same data at the same budget. Two tasks, the protocols of examples/demo.py and
bench/compare_methods.py:

  demo      the "demo" Llama from scratch, 250 steps of 8 x 128 tokens, peak lr 1.5e-3
  finetune  compare_methods' fine-tuning task: 100 steps on the standard library's docstrings
            from a model pretrained here (AdamW, 200 steps, fp32), MLorc-AdamW's best lr there
            and compare_methods' dense lr for embeddings, lm_head and norms

    python bench/bf16_weights.py                 # ~20 min on 2 cores; writes docs/bench/bf16_weights.json
    python bench/bf16_weights.py --preset toy    # seconds

One process, one thread, the same seeds in every run: only the weights' dtype and rounding differ.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import DENSE_LR, Corpus, eval_loss  # noqa: E402
from mlorc_dist import methods  # noqa: E402
from mlorc_dist.data import default_corpus_path, docstring_corpus_path, train_tokenizer  # noqa: E402
from mlorc_dist.models import build_model, llama_config  # noqa: E402
from mlorc_dist.training import lr_at  # noqa: E402

PRESETS = {
    "full": dict(model="demo", demo_steps=250, demo_lr=1.5e-3, base_steps=200, base_lr=5e-4, finetune_steps=100,
                 finetune_lr=3e-4, batch=8, seq_len=128, eval_windows=32),
    "toy": dict(model="tiny", demo_steps=6, demo_lr=1.5e-3, base_steps=4, base_lr=5e-4, finetune_steps=3,
                finetune_lr=3e-4, batch=2, seq_len=32, eval_windows=2),
}
VARIANTS = {"fp32 weights": (torch.float32, True), "bf16, stochastic rounding": (torch.bfloat16, True),
            "bf16, round to nearest": (torch.bfloat16, False)}


def train(method: str, config, corpus: Corpus, steps: int, lr: float, dtype: torch.dtype, stochastic: bool,
          seed: int, base_state: dict | None = None, dense_lr: float | None = None) -> tuple[float, dict]:
    """One run (warmup 10%, cosine to 10%, clipping 1.0, as compare_methods); (eval loss, weights)."""
    model = build_model(config, seed=seed)
    if base_state is not None:
        model.load_state_dict(base_state)
    model.to(dtype)
    optimizer = methods.build_optimizer(method, model, lr=lr, dense_lr=dense_lr, seed=seed)
    optimizer.stochastic_rounding = stochastic
    batches = corpus.batches(seed)
    for step in range(1, steps + 1):
        factor = lr_at(step, peak=1.0, warmup=max(1, steps // 10), total=steps, min_ratio=0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor * group.get("lr_scale", 1.0)
        ids = next(batches)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return eval_loss(model, corpus.eval, corpus.batch), {k: v.detach().float().clone()
                                                         for k, v in model.state_dict().items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="initial weights and batches; each seed runs every variant (the spread between seeds "
                        "is the noise a dtype's difference is read against)")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "bench" / "bf16_weights.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    started = time.perf_counter()
    tokenizer = train_tokenizer([str(default_corpus_path())], 2048)
    config = llama_config(preset["model"], vocab_size=len(tokenizer))
    pretrain = Corpus(default_corpus_path(), tokenizer, preset["batch"], preset["seq_len"], preset["eval_windows"])
    finetune = Corpus(docstring_corpus_path(), tokenizer, preset["batch"], preset["seq_len"], preset["eval_windows"])
    rows = []
    for seed in args.seeds:          # the demo (as examples/demo.py: every lr the same)
        for name, (dtype, stochastic) in VARIANTS.items():
            loss, _ = train("mlorc-adamw", config, pretrain, preset["demo_steps"], preset["demo_lr"], dtype,
                            stochastic, seed)
            rows.append({"task": "demo", "seed": seed, "weights": name, "eval_loss": loss})
            print(f"demo      seed {seed} {name:28s} eval {loss:.4f}", flush=True)
    for seed in args.seeds:          # compare_methods' fine-tuning: its base, its dense lr
        _, base = train("adamw", config, pretrain, preset["base_steps"], preset["base_lr"], torch.float32, True,
                        seed, dense_lr=DENSE_LR["pretrain"])
        for name, (dtype, stochastic) in VARIANTS.items():
            loss, _ = train("mlorc-adamw", config, finetune, preset["finetune_steps"], preset["finetune_lr"], dtype,
                            stochastic, seed, base, dense_lr=DENSE_LR["finetune"])
            rows.append({"task": "finetune", "seed": seed, "weights": name, "eval_loss": loss})
            print(f"finetune  seed {seed} {name:28s} eval {loss:.4f}", flush=True)
    for row in rows:
        fp32 = next(r["eval_loss"] for r in rows if (r["task"], r["seed"], r["weights"]) ==
                    (row["task"], row["seed"], "fp32 weights"))
        row["vs_fp32"] = row["eval_loss"] - fp32
    print("\n| task | seed | weights | eval loss | vs fp32 weights |\n|---|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['task']} | {row['seed']} | {row['weights']} | {row['eval_loss']:.4f} | {row['vs_fp32']:+.4f} |")
    report = {"command": f"python bench/bf16_weights.py --preset {args.preset}", "preset": preset,
              "dense_lr": DENSE_LR, "rows": rows,
              "wall_s": round(time.perf_counter() - started)}
    if args.preset == "full":
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
