"""Fine-tune a LLaMA with MLorc-AdamW through transformers' Trainer (DeepSpeed ZeRO, FSDP2, or neither).

    # DeepSpeed ZeRO-2, 2 processes (on CPU as well as on GPUs):
    torchrun --nproc_per_node 2 examples/finetune_trainer.py --deepspeed 2
    # DeepSpeed with a config file (it may name the optimizer: "type": "MLorcAdamW" and an "mlorc" block):
    torchrun --nproc_per_node 2 examples/finetune_trainer.py --deepspeed my_ds_config.json
    # FSDP2:
    torchrun --nproc_per_node 2 examples/finetune_trainer.py --fsdp
    # one process, no engine:
    python examples/finetune_trainer.py --steps 20

Everything is local: a tiny LLaMA built from a config ("tiny" shape, --model), a byte-level BPE
tokenizer trained on CPython's pydoc help text (cached under ~/.cache/mlorc_dist), and that
same English prose as training data (the last 5% held out for evaluation). For a real run, load
your own model with `AutoModelForCausalLM.from_pretrained(...)` instead.

What differs from a stock Trainer script:

    args = hf.training_arguments(...)            # TrainingArguments that see every process on CPU too
    trainer = hf.MLorcTrainer(..., optimizer_type="MLorcAdamW", mlorc={"rank": 4})

MLorcTrainer builds the optimizer where Trainer's DeepSpeed path expects it (a ready optimizer
passed as optimizers=(opt, None) would be silently replaced by AdamW there), attaches ZeRO's
shard layout once the engine exists, selects FSDP2 where accelerate would not (CPU), and logs
how many 2-D parameters got low-rank momentum (also in trainer.state.log_history).
"""
from __future__ import annotations

import argparse
import json
import logging
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
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--deepspeed", help="a ZeRO stage (1, 2, 3) or a DeepSpeed config file")
    engine.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) through Trainer")
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
    parser.add_argument("--output-dir", default="runs/finetune_trainer")
    parser.add_argument("--summary", type=Path, help="write losses and the optimizer report here (JSON)")
    return parser.parse_args(argv)


class Windows(torch.utils.data.Dataset):
    """Fixed windows of token ids as causal-LM examples (the model shifts the labels)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def deepspeed_config(value: str | None):
    if value is None or not value.isdigit():
        return value                     # None, or a path: Trainer reads the file
    # "auto" values are filled from TrainingArguments by Trainer
    return {"zero_optimization": {"stage": int(value)}, "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "steps_per_print": 10 ** 9}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # processes x threads must not exceed the cores: oversubscribed OpenMP spins (50x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlorc_dist").setLevel(logging.INFO)

    engine = {}
    if args.deepspeed:
        engine = {"deepspeed": deepspeed_config(args.deepspeed)}
    elif args.fsdp:
        engine = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    training_args = hf.training_arguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        per_device_eval_batch_size=args.micro_batch, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=max(1, min(10, args.steps // 3)),
        save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True, **engine)

    corpus = default_corpus_path()
    with training_args.main_process_first():      # the first process trains and caches the tokenizer
        tokenizer = train_tokenizer([str(corpus)], args.vocab)
        ids = load_token_ids(corpus, tokenizer)
    train_ids, eval_ids = split_train_eval(ids)
    model = build_model(llama_config(args.model, len(tokenizer)), seed=args.seed)

    trainer = hf.MLorcTrainer(
        model=model, args=training_args, train_dataset=Windows(contiguous_windows(train_ids, args.seq_len)),
        eval_dataset=Windows(contiguous_windows(eval_ids, args.seq_len)[:16]),
        optimizer_type=args.optimizer, mlorc={"rank": args.rank, "scope": args.scope, "seed": args.seed})
    result = trainer.train()
    report = trainer.mlorc_report
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"{report['algorithm']} under {report['engine']} on {report['world_size']} processes: low-rank "
              f"momentum on {report['lowrank_params']} of {report['params_2d']} 2-D parameters "
              f"({report['lowrank_pieces']} of {report['pieces_2d']} pieces); dense by choice: "
              f"{', '.join(report['dense_by_choice']) or 'none'}")
        print(f"train loss {result.training_loss:.4f}, eval loss {metrics['eval_loss']:.4f}")
    summary = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
               "eval_loss": metrics["eval_loss"], "report": report,
               "optimizer": type(hf.find_mlorc(trainer.optimizer)[0]).__name__}
    if args.summary is not None and trainer.is_world_process_zero():
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
