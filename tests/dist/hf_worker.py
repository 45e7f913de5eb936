"""One multi-process job of tests/test_hf.py: transformers' Trainer under DeepSpeed ZeRO-2 or FSDP2
on CPU/gloo, with MLorcTrainer and with Trainer's own torch AdamW.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/hf_worker.py --engine deepspeed \
        --out DIR --runs mlorc-full adamw mlorc-r4

Runs (one Trainer each, same tiny Llama, same data, same TrainingArguments except the optimizer):
  mlorc-full   MLorcTrainer, rank >= every block's smaller side, dense_when_no_saving=False,
               compress_embeddings=True, eps 1e-30: must equal AdamW through the same engine
  adamw        plain Trainer, optim="adamw_torch", eps 1e-30
  mlorc-r4     MLorcTrainer at rank 4 with the default parameter groups (embeddings dense)
  mlorc-block  (deepspeed only) rank 4, optimizer and "mlorc" block named in the DeepSpeed config
  trap         (deepspeed only) plain Trainer handed optimizers=(MLorcAdamW(...), None), 2 steps:
               records what Trainer really steps and whether hf.attach refuses it
  refuse-block (deepspeed only) MLorcTrainer with a DeepSpeed config naming AdamW: must refuse
  example      examples/finetune_trainer.py itself (real text), 6 steps, through this engine
  resume       (deepspeed only) 6 steps straight vs 4 steps, a checkpoint, resume to 6 (the layouts
               must be attached before Trainer loads the checkpoint into the engine)
Rank 0 writes DIR/<run>.pt (initial and final full parameters, losses, the optimizer's class and
mlorc_report); every rank writes DIR/<run>.rank<r>.pt (its report, the types and placements of
what the optimizer steps).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*clamped to")     # the full-rank runs ask for rank 1000

VOCAB, SEQ, MICRO = 101, 12, 3


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    # The shapes of tests/dist/worker.py: ZeRO cuts matrices mid-row, FSDP2 shards are uneven.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=61, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager", use_cache=False)
    torch.manual_seed(1234)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(99)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def full_params(model):
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().double().clone()
    return out


def ds_config(run: str) -> dict:
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "steps_per_print": 10 ** 9}
    if run == "mlorc-block":
        config["optimizer"] = {"type": "MLorcAdamW", "params": {"lr": "auto", "betas": [0.9, 0.999],
                                                                "eps": 1e-8, "weight_decay": "auto"}}
        config["mlorc"] = {"rank": 4, "scope": "local", "seed": 3}
    return config


def run_example(engine: str, out: Path) -> None:
    """examples/finetune_trainer.py, in this process (its launch would cost ~20 s more)."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_trainer.py"
    spec = importlib.util.spec_from_file_location("finetune_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags = ["--deepspeed", "2"] if engine == "deepspeed" else ["--fsdp"]
    summary = module.main(flags + ["--steps", "6", "--output-dir", str(out / "trainer_example"),
                                   "--summary", str(out / "example.json")])
    torch.save(summary, out / f"example.rank{dist.get_rank()}.pt")


def run_trap(out: Path, steps: int) -> None:
    """The trap MLorcTrainer exists for: Trainer's DeepSpeed path and optimizers=(opt, None)."""
    from transformers import Trainer, TrainerCallback

    import mlorc_dist
    from mlorc_dist.engines import hf

    model = tiny_llama()
    args = hf.training_arguments(output_dir=str(out / "trainer_trap"), per_device_train_batch_size=MICRO,
                                 max_steps=steps, learning_rate=1e-3, save_strategy="no", report_to=[],
                                 disable_tqdm=True, deepspeed=ds_config("trap"))
    seen = {}

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["stepped"] = type(hf.find_mlorc(optimizer)[1].optimizer).__name__
            try:
                hf.attach(optimizer, trainer.model_wrapped, expect="deepspeed")
                seen["error"] = None
            except ValueError as exc:
                seen["error"] = str(exc)

    mine = mlorc_dist.MLorcAdamW(mlorc_dist.param_groups(model), lr=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(steps * MICRO * dist.get_world_size()),
                      optimizers=(mine, None), callbacks=[Check()])
    trainer.train()
    torch.save(seen, out / f"trap.rank{dist.get_rank()}.pt")


def run_refuse_block(out: Path) -> None:
    from mlorc_dist.engines import hf

    config = ds_config("refuse-block")
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    args = hf.training_arguments(output_dir=str(out / "trainer_refuse"), per_device_train_batch_size=MICRO,
                                 max_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                                 deepspeed=config)
    try:
        hf.MLorcTrainer(model=tiny_llama(), args=args, train_dataset=Tokens(MICRO * dist.get_world_size()))
        error = None
    except ValueError as exc:
        error = str(exc)
    torch.save({"error": error}, out / f"refuse-block.rank{dist.get_rank()}.pt")


def run_resume(out: Path) -> None:
    from accelerate.state import AcceleratorState

    from mlorc_dist.engines import hf

    def train(directory, steps, resume):
        AcceleratorState._reset_state(reset_partial_state=False)
        args = hf.training_arguments(output_dir=str(out / directory), per_device_train_batch_size=MICRO,
                                     max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant",
                                     save_strategy="steps", save_steps=4, report_to=[], disable_tqdm=True,
                                     deepspeed=ds_config("resume"))
        trainer = hf.MLorcTrainer(model=tiny_llama(), args=args, train_dataset=Tokens(12 * MICRO * 2),
                                  mlorc={"rank": 4})
        trainer.train(resume_from_checkpoint=resume or None)
        return {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}, trainer

    straight, _ = train("resume_straight", 6, False)
    train("resume_split", 4, False)
    resumed, trainer = train("resume_split", 6, True)
    torch.save({"straight": straight, "resumed": resumed, "global_step": trainer.state.global_step,
                "report": trainer.mlorc_report}, out / f"resume.rank{dist.get_rank()}.pt")


def run(engine: str, name: str, steps: int, out: Path) -> None:
    from accelerate.state import AcceleratorState
    from transformers import Trainer

    from mlorc_dist.engines import hf

    # Each run builds a new Trainer: drop the previous run's accelerator state (plugins), keep the
    # process state (the gloo process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    if name == "example":
        return run_example(engine, out)
    if name == "trap":
        return run_trap(out, 2)
    if name == "refuse-block":
        return run_refuse_block(out)
    if name == "resume":
        return run_resume(out)
    model = tiny_llama()
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    kwargs = dict(output_dir=str(out / f"trainer_{name}"), per_device_train_batch_size=MICRO,
                  max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                  adam_epsilon=1e-30 if name in ("mlorc-full", "adamw") else 1e-8, optim="adamw_torch",
                  logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  use_cpu=False, dataloader_num_workers=0)
    if engine == "deepspeed":
        kwargs["deepspeed"] = ds_config(name)
    else:
        kwargs.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                              "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = hf.training_arguments(**kwargs)      # creates the gloo process group on first use
    world, rank = dist.get_world_size(), dist.get_rank()
    data = Tokens(steps * MICRO * world)
    if name == "adamw":
        class BaselineTrainer(Trainer):
            """Trainer's own torch AdamW, through the same engine (FSDP2 selected on CPU)."""

            def create_accelerator_and_postprocess(self):
                super().create_accelerator_and_postprocess()
                if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                    from accelerate.utils import FullyShardedDataParallelPlugin
                    self.is_fsdp_enabled = hf.enable_fsdp(
                        self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
        trainer = BaselineTrainer(model=model, args=args, train_dataset=data)
    else:
        settings = {}
        if name == "mlorc-full":
            settings = dict(mlorc={"rank": 1000, "dense_when_no_saving": False, "compress_embeddings": True,
                                   "seed": 7})
        elif name == "mlorc-r4":
            settings = dict(mlorc={"rank": 4, "seed": 7})
        trainer = hf.MLorcTrainer(model=model, args=args, train_dataset=data, **settings)
    trainer.train()
    wrapped = trainer.model_wrapped
    module = wrapped.module if type(wrapped).__name__ == "DeepSpeedEngine" else trainer.model
    final = full_params(module)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    mlorc, zero = hf.find_mlorc(trainer.optimizer)
    inner = zero.optimizer if zero is not None else getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    stepped = [(type(p).__name__, tuple(p.shape), str(getattr(p, "placements", "")))
               for g in inner.param_groups for p in g["params"]]
    mine = {"report": trainer.mlorc_report if mlorc is not None else None,
            "optimizer": type(inner).__name__, "zero": type(zero).__name__ if zero is not None else None,
            "stepped": stepped, "skipped": getattr(mlorc, "skipped_steps", None),
            "engine_kind": type(wrapped).__name__, "epoch": trainer.state.epoch,
            "logged": [e for e in trainer.state.log_history if "mlorc_params_2d" in e],
            "settings": None if mlorc is None else {
                "seed": mlorc.seed, "scope": mlorc.scope,
                **{k: mlorc.param_groups[0][k] for k in ("rank", "lr", "eps", "betas", "dense_when_no_saving")}}}
    torch.save(mine, out / f"{name}.rank{rank}.pt")
    if rank == 0:
        torch.save({"initial": initial, "final": final, "losses": losses, "world": world, **mine},
                   out / f"{name}.pt")
    dist.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["deepspeed", "fsdp2"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        run(args.engine, name, args.steps, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from mlorc_dist.training import exit_without_teardown
    exit_without_teardown(0)      # gloo's teardown race at interpreter exit (see its docstring)
