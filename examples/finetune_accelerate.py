"""Fine-tune a LLaMA with MLorc-AdamW in a plain accelerate training loop.

    # DeepSpeed ZeRO-2 or FSDP2, 2 processes (on CPU as well as on GPUs):
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/finetune_accelerate.py
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml examples/finetune_accelerate.py
    # one process, no engine:
    python examples/finetune_accelerate.py --steps 20

Everything is local: a tiny LLaMA built from a config ("tiny" shape, --model), a byte-level BPE
tokenizer trained on CPython's pydoc help text (cached under ~/.cache/mlorc_dist), and that
same English prose as training data (the last 5% held out for the eval loss). For a real run,
load your own model with `AutoModelForCausalLM.from_pretrained(...)` instead.

The three lines that differ from a stock accelerate loop:

    accelerator = hf.make_accelerator()            # sees all processes and really shards on CPU too
    optimizer = hf.create_optimizer(model, ...)    # MLorc-AdamW on mlorc_dist.param_groups(model)
    model, optimizer, loader = hf.prepare(accelerator, model, optimizer, loader)   # + ZeRO layout / FSDP2 check

`--summary PATH` writes the losses and what every rank's optimizer compresses as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from mlorc_dist.data import contiguous_windows, default_corpus_path, load_token_ids, split_train_eval, train_tokenizer
from mlorc_dist.engines import hf
from mlorc_dist.models import build_model, llama_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a shape of mlorc_dist.models (tiny, demo, 100m, ...)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--optimizer", default="MLorcAdamW", choices=["MLorcAdamW", "MLorcLion"])
    parser.add_argument("--rank", type=int, default=4, help="MLorc rank r")
    parser.add_argument("--scope", default="local", choices=["local", "global"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", type=Path, help="write losses and the optimizer report here (JSON)")
    return parser.parse_args(argv)


def text_windows(accelerator, vocab: int, seq_len: int):
    """(tokenizer, train windows, eval windows) of the pydoc prose."""
    corpus = default_corpus_path()
    with accelerator.main_process_first():       # the first process trains and caches the tokenizer
        tokenizer = train_tokenizer([str(corpus)], vocab)
        ids = load_token_ids(corpus, tokenizer)
    train_ids, eval_ids = split_train_eval(ids)
    return tokenizer, contiguous_windows(train_ids, seq_len), contiguous_windows(eval_ids, seq_len)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # processes x threads must not exceed the cores: oversubscribed OpenMP spins (50x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlorc_dist").setLevel(logging.INFO)

    accelerator = hf.make_accelerator()
    tokenizer, train, held_out = text_windows(accelerator, args.vocab, args.seq_len)
    model = build_model(llama_config(args.model, len(tokenizer)), seed=args.seed)

    sampler_generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.micro_batch, shuffle=True, drop_last=True,
                                         generator=sampler_generator)
    optimizer = hf.create_optimizer(model, optimizer_type=args.optimizer, lr=args.lr, weight_decay=0.0,
                                    mlorc={"rank": args.rank, "scope": args.scope, "seed": args.seed})

    def schedule(step):   # linear warmup, cosine decay to 10%
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # Not handed to prepare(): accelerate would step it once per process at every step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    model, optimizer, loader = hf.prepare(accelerator, model, optimizer, loader)
    report = accelerator.mlorc_report
    param_types = sorted({f"{type(p).__name__}{getattr(p, 'placements', '')}" for p in model.parameters()})
    accelerator.print(f"{report['algorithm']} under {report['engine']} on {report['world_size']} processes: "
                      f"low-rank momentum on {report['lowrank_params']} of {report['params_2d']} 2-D parameters "
                      f"({report['lowrank_pieces']} of {report['pieces_2d']} pieces); dense by choice: "
                      f"{', '.join(report['dense_by_choice']) or 'none'}")

    model.train()
    losses, step = [], 0
    while step < args.steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            if step % 10 == 0 or step == 1:
                accelerator.print(f"step {step:4d}  loss {losses[-1]:.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
            if step == args.steps:
                break

    model.eval()
    with torch.no_grad():
        mine = held_out[accelerator.process_index::accelerator.num_processes][:8].to(accelerator.device)
        eval_loss = accelerator.reduce(model(input_ids=mine, labels=mine).loss.detach(), reduction="mean").item()
    accelerator.print(f"eval loss {eval_loss:.4f} (first train loss {losses[0]:.4f}, last {losses[-1]:.4f})")

    summary = {"losses": losses, "eval_loss": eval_loss, "report": report,
               "distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
               "optimizer": type(hf.find_mlorc(optimizer)[0]).__name__,
               "param_types": param_types}
    if args.summary is not None and accelerator.is_main_process:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1, default=str))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
