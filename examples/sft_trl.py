"""Fine-tune a LLaMA with MLorc-AdamW through TRL's SFTTrainer (or DPOTrainer), under DeepSpeed ZeRO, FSDP2 or neither.

    # DeepSpeed ZeRO-2, 2 processes (on CPU as well as on GPUs); --deepspeed 3 for ZeRO-3:
    torchrun --nproc_per_node 2 examples/sft_trl.py --deepspeed 2
    # FSDP2:
    torchrun --nproc_per_node 2 examples/sft_trl.py --fsdp
    # preference tuning with DPO on prompt/chosen/rejected records:
    torchrun --nproc_per_node 2 examples/sft_trl.py --fsdp --trainer dpo
    # one process, no engine; a peer optimizer; LoRA adapters (peft) with AdamW on them:
    python examples/sft_trl.py --steps 20 --optimizer MoFaSGD --lr 0.02
    python examples/sft_trl.py --lora

Data: JSON lines with "prompt" and "response" fields (--data; DPO: "prompt", "chosen",
"rejected"). Without --data the script writes such records first, up to four per help topic
of CPython's pydoc (the prompt names the topic and a part of its text, the response is that
part; DPO's rejected answer is the same part of another topic), to
--output-dir/records_sft.jsonl (records_dpo.jsonl); the last 5% are held out for evaluation.
The model is a tiny LLaMA built from a config (--model) with a byte-level BPE tokenizer
trained on the same prose (cached under ~/.cache/mlorc_dist). For a real run, load your own
model and tokenizer with from_pretrained(...) instead.

What differs from a stock TRL script:

    args = hf.training_arguments(args_class=SFTConfig, ...)    # sees every process on CPU too
    trainer = hf.MLorcSFTTrainer(..., optimizer_type="MLorcAdamW", mlorc={"rank": 4})

MLorcSFTTrainer and MLorcDPOTrainer are TRL's trainers with mlorc_dist.engines.hf's
MLorcTrainerMixin in front (the one MLorcTrainer uses): the optimizer is built where Trainer's
DeepSpeed path expects it, ZeRO's shard layouts are attached once the engine exists, FSDP2 is
selected where accelerate would not (CPU), and how many 2-D parameters got low-rank momentum is
logged (also in trainer.state.log_history); a ValueError if anything else would step.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_trainer import deepspeed_config  # noqa: E402

from mlorc_dist.data import default_corpus_path, train_tokenizer  # noqa: E402
from mlorc_dist.engines import hf  # noqa: E402
from mlorc_dist.models import build_model, llama_config  # noqa: E402

RESPONSE_CHARS = 240


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--deepspeed", help="a ZeRO stage (1, 2, 3) or a DeepSpeed config file")
    engine.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) through Trainer")
    parser.add_argument("--trainer", default="sft", choices=["sft", "dpo"], help="trl.SFTTrainer or trl.DPOTrainer")
    parser.add_argument("--data", type=Path, help="JSON lines: prompt/response (sft) or prompt/chosen/rejected (dpo)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--model", default="tiny", help="a shape of mlorc_dist.models (tiny, demo, 100m, ...)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example (prompt and response)")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per process per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--optimizer", default="MLorcAdamW", choices=list(hf.TRAINER_OPTIMIZERS))
    parser.add_argument("--rank", type=int, default=4, help="rank r of the low-rank state")
    parser.add_argument("--scope", default="local", choices=["local", "global"])
    parser.add_argument("--lora", action="store_true", help="peft LoRA adapters of --rank (TRL's peft_config), "
                        "dense AdamW on them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sft_trl"))
    parser.add_argument("--summary", type=Path, help="write losses and the optimizer report here (JSON)")
    return parser.parse_args(argv)


def write_records(path: Path, trainer: str, parts: int = 4) -> None:
    """Up to `parts` records per pydoc help topic (its text in pieces of RESPONSE_CHARS
    characters): SFT's prompt/response, DPO's prompt/chosen/rejected (rejected: the same piece
    of another topic)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    texts = {name: " ".join(topics[name].split()) for name in names}
    lines = []
    for i, name in enumerate(names):
        other = texts[names[(i + len(names) // 2) % len(names)]]
        for part in range(parts):
            answer = texts[name][part * RESPONSE_CHARS:(part + 1) * RESPONSE_CHARS]
            if len(answer) < RESPONSE_CHARS // 4:
                break
            prompt = f"Python help topic: {name}, part {part + 1}\n"
            if trainer == "sft":
                lines.append({"prompt": prompt, "response": answer})
            else:
                rejected = other[part * RESPONSE_CHARS:(part + 1) * RESPONSE_CHARS] or other[:RESPONSE_CHARS]
                lines.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def load_records(path: Path, args) -> list[dict]:
    """The records as TRL's prompt-completion (SFT) or preference (DPO) columns."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if args.trainer == "sft":
        fields = [args.prompt_field, args.response_field]
        columns = ["prompt", "completion"]
    else:
        fields = [args.prompt_field, "chosen", "rejected"]
        columns = ["prompt", "chosen", "rejected"]
    missing = [f for f in fields if records and f not in records[0]]
    if not records or missing:
        raise ValueError(f"{path}: {'no records' if not records else f'records lack field(s) {missing}'}")
    return [{c: r[f] for c, f in zip(columns, fields)} for r in records]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # processes x threads must not exceed the cores: oversubscribed OpenMP spins (50x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlorc_dist").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from trl import DPOConfig, SFTConfig

    engine = {}
    if args.deepspeed:
        engine = {"deepspeed": deepspeed_config(args.deepspeed)}
    elif args.fsdp:
        engine = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    common = dict(output_dir=str(args.output_dir), max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
                  per_device_eval_batch_size=args.micro_batch, learning_rate=args.lr,
                  warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0,
                  logging_steps=max(1, min(10, args.steps // 4)), save_strategy="no", eval_strategy="no",
                  report_to=[], seed=args.seed, disable_tqdm=True, max_length=args.max_length,
                  bf16=torch.cuda.is_available(), **engine)      # TRL defaults to bf16, which a CPU lacks
    if args.trainer == "sft":
        training_args = hf.training_arguments(args_class=SFTConfig, **common)
    else:
        training_args = hf.training_arguments(args_class=DPOConfig, beta=0.1, **common)

    data = args.data
    with training_args.main_process_first():      # the first process writes the records, trains the tokenizer
        if data is None:
            data = args.output_dir / f"records_{args.trainer}.jsonl"
            if not data.is_file():
                write_records(data, args.trainer)
        tokenizer = train_tokenizer([str(default_corpus_path())], args.vocab)
    records = load_records(data, args)
    held_out = max(1, len(records) // 20)
    train, evaluation = Dataset.from_list(records[:-held_out]), Dataset.from_list(records[-held_out:])
    model = build_model(llama_config(args.model, len(tokenizer)), seed=args.seed)

    settings = dict(optimizer_type=args.optimizer, mlorc={"rank": args.rank, "scope": args.scope, "seed": args.seed})
    if args.lora:
        from peft import LoraConfig
        settings["mlorc"]["dense"] = True        # LoRA: AdamW on the adapters
        settings["peft_config"] = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM")
    if args.trainer == "sft":
        trainer = hf.MLorcSFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                     processing_class=tokenizer, **settings)
    else:
        reference = None if args.lora else copy.deepcopy(model)   # LoRA: the adapters switched off
        trainer = hf.MLorcDPOTrainer(model=model, ref_model=reference, args=training_args, train_dataset=train,
                                     eval_dataset=evaluation, processing_class=tokenizer, **settings)
    result = trainer.train()
    report = trainer.mlorc_report
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        names = report["dense_by_choice"]
        dense = ", ".join(names) if len(names) <= 4 else f"{len(names)} tensors (LoRA's adapters?)"
        print(f"{report['algorithm']} under {report['engine']} on {report['world_size']} processes "
              f"({type(trainer).__name__}): low-rank momentum on {report['lowrank_params']} of "
              f"{report['params_2d']} 2-D parameters ({report['lowrank_pieces']} of {report['pieces_2d']} pieces); "
              f"dense by choice: {dense}")
        print(f"train loss {result.training_loss:.4f}, eval loss {metrics['eval_loss']:.4f}")
    mlorc, zero = hf.find_mlorc(trainer.optimizer)
    summary = {"trainer": type(trainer).__name__, "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
               "eval_loss": metrics["eval_loss"], "report": report, "optimizer": type(mlorc).__name__,
               "zero": type(zero).__name__ if zero is not None else None,
               "stepped_is_built": mlorc is trainer.mlorc_optimizer,
               "step_count": trainer.state.global_step, "skipped_steps": mlorc.skipped_steps,
               "logged": [e for e in trainer.state.log_history if "mlorc_params_2d" in e]}
    if args.summary is not None and trainer.is_world_process_zero():
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
