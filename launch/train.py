"""Train a Hugging Face causal LM with MLorc under DeepSpeed ZeRO, FSDP2, or one process.

    # DeepSpeed (ZeRO stage and optimizer from the JSON; on CPU add DS_ACCELERATOR=cpu)
    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/mlorc.json --model 100m
    # FSDP2
    torchrun --nproc_per_node 8 launch/train.py --fsdp --optimizer mlorc-adamw --rank 4 --model 100m
    # one process
    python launch/train.py --optimizer mlorc-adamw --model tiny --steps 50
    # fine-tuning a local HF checkpoint on prompt/response records (prompt masked from the loss)
    torchrun --nproc_per_node 8 launch/train.py --fsdp --init-from ckpt/llama --task sft --data sft.jsonl
    # two nodes: launch/slurm_torchrun.sbatch, launch/slurm_deepspeed.sbatch, launch/hostfile.example
    # check a config and the world size without GPUs
    python launch/train.py --deepspeed ds_configs/mlorc.json --model llama-7b --world-size 64 --dry-run

Every rank draws the same global batch and trains on its slice, so a run's data does not
depend on the world size. Outputs go to --out: metrics.jsonl (rank 0, one line per step),
checkpoints/step_N/ (every --save-every steps and at the end; --resume continues from the
newest complete one, also at another world size), export/ (a plain HF model directory, --export).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlorc_dist import checkpoint as ckpt  # noqa: E402
from mlorc_dist.training import (CheckpointDir, GlobalBatches, MetricsWriter, exit_without_teardown,  # noqa: E402
                                 load_pretraining_ids, load_sft_records, lr_at, model_signature,
                                 packed_source, sft_source)

logger = logging.getLogger("mlorc_dist.train")
from mlorc_dist.methods import METHODS as OPTIMIZERS  # noqa: E402
TOKENIZER_VOCAB = 2048


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine = p.add_argument_group("engine")
    engine.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed JSON config (ZeRO stage, optimizer, mlorc block)")
    engine.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) under torchrun")
    engine.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    engine.add_argument("--dry-run", action="store_true", help="build on the meta device, check config and world size, exit")
    engine.add_argument("--world-size", type=int, default=None, help="for --dry-run: the planned world size")
    opt = p.add_argument_group("optimizer (FSDP2 / single process; DeepSpeed reads its JSON)")
    opt.add_argument("--optimizer", "--method", default="mlorc-adamw", help=f"one of {OPTIMIZERS}")
    opt.add_argument("--rank", type=int, default=4, help="rank r (MLorc, MoFaSGD, GaLore, LoRA, SwitchLoRA)")
    opt.add_argument("--scope", default="local", help="local | global")
    opt.add_argument("--fused", action="store_true",
                     help="MLorc: the fused one-pass step (C++ kernels on the CPU, torch.compile on a GPU; local scope)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak lr of the method's update of 2-D weights")
    opt.add_argument("--dense-lr", type=float, default=None,
                     help="peak lr of the dense state (embeddings, lm_head, 1-D); default --lr. "
                          "MoFaSGD wants a large --lr (e.g. 0.02) and an AdamW --dense-lr (e.g. 1e-3)")
    opt.add_argument("--galore-interval", type=int, default=200, help="GaLore: steps between projector updates")
    opt.add_argument("--galore-scale", type=float, default=0.25, help="GaLore: alpha")
    opt.add_argument("--mofasgd-momentum", type=float, default=0.9)
    opt.add_argument("--mofasgd-phi", default="spectral", help="MoFaSGD: spectral (U V^T) | inverse (min(1/s, cap))")
    opt.add_argument("--lora-alpha", type=float, default=None, help="LoRA: alpha (default 2 r)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--betas", type=float, nargs=2, default=None)
    opt.add_argument("--compress-embeddings", action="store_true")
    model = p.add_argument_group("model and data")
    model.add_argument("--model", default="tiny", help="a shape name (tiny, demo, 100m, llama-7b, ...) or an HF config.json")
    model.add_argument("--init-from", help="a local HF model directory to fine-tune (weights and tokenizer)")
    model.add_argument("--vocab-size", type=int, default=None,
                       help="tokenizer trained locally with this many tokens (default 2048); the model's "
                            "vocabulary too (default: 32000 for the llama-* shapes, else 2048)")
    model.add_argument("--data", help="text / JSON lines / parquet file (default: the demo corpus)")
    model.add_argument("--task", default="pretrain", choices=("pretrain", "sft"))
    model.add_argument("--text-field", default="text")
    model.add_argument("--prompt-field", default="prompt")
    model.add_argument("--response-field", default="response")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--global-batch", type=int, default=8)
    train.add_argument("--micro-batch", type=int, default=None, help="per rank (default: global batch / world size)")
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--warmup-steps", type=int, default=10)
    train.add_argument("--min-lr-ratio", type=float, default=0.1)
    train.add_argument("--clip-grad", type=float, default=1.0, help="0 disables")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--eval-every", type=int, default=0)
    train.add_argument("--eval-batches", type=int, default=4)
    train.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="runs/train")
    out.add_argument("--save-every", type=int, default=0)
    out.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    out.add_argument("--export", action="store_true", help="write a plain HF model directory at the end")
    out.add_argument("--profile-memory", action="store_true",
                     help="sample memory per rank (after backward, after step; tensor bytes by category, "
                          "RSS, CUDA allocator, NVML) and write memory.json / memory.png in --out")
    out.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    args = p.parse_args(argv)
    if args.deepspeed and args.fsdp:
        p.error("choose one of --deepspeed and --fsdp")
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown --optimizer {args.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if args.deepspeed and args.fused:
        p.error("--fused is read from the DeepSpeed config under --deepspeed: set \"fused\": true "
                "in its \"mlorc\" block")
    if args.fsdp and args.optimizer == "switchlora":
        raise ValueError("SwitchLoRA needs whole W, A and B on every rank, which FSDP2 shards: run "
                         "it single-process or with --deepspeed ds_configs/switchlora.json (ZeRO-1/2)")
    if args.export and args.optimizer in ("lora", "switchlora") and not args.deepspeed:
        raise ValueError("--export writes a plain HF model; merging adapters into it is not "
                         "supported yet: export is refused for lora / switchlora")
    return args


# --------------------------------------------------------------------------- set-up
def engine_kind(args) -> str:
    return "deepspeed" if args.deepspeed else ("fsdp2" if args.fsdp else "single")


def load_ds_config(path: str) -> dict:
    """The DeepSpeed config (its "mlorc" block checked), refusing an optimizer that does not exist."""
    from mlorc_dist.deepspeed import load_config, optimizer_class
    config = load_config(path)
    opt_type = (config.get("optimizer") or {}).get("type")
    if opt_type is None:
        raise ValueError(f"{path} has no optimizer block")
    if optimizer_class(opt_type) is None and opt_type.lower() not in ("adamw", "adam"):
        raise ValueError(f"{path}: optimizer type {opt_type!r} does not exist here; "
                         "use MLorcAdamW, MLorcLion or AdamW")
    return config


def build_config(args):
    """The model's HF config: a named shape, a config.json, or the one in --init-from."""
    from transformers import AutoConfig
    from mlorc_dist.models import llama_config
    if args.init_from:
        return AutoConfig.from_pretrained(args.init_from, local_files_only=True)
    if args.model.endswith(".json"):
        if not Path(args.model).is_file():
            raise FileNotFoundError(f"model config not found: {args.model}")
        return AutoConfig.from_pretrained(args.model, local_files_only=True)
    from mlorc_dist.models import LLAMA2_VOCAB_SIZE
    vocab = args.vocab_size or (LLAMA2_VOCAB_SIZE if args.model.startswith("llama-") else TOKENIZER_VOCAB)
    return llama_config(args.model, vocab)


def build_model(args, config):
    from transformers import AutoModelForCausalLM
    if args.init_from:
        model = AutoModelForCausalLM.from_pretrained(args.init_from, local_files_only=True,
                                                     torch_dtype=torch.float32)
    else:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_tokenizer(args, rank: int):
    from mlorc_dist.data import cache_root, default_corpus_path, train_tokenizer
    if args.init_from:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(args.init_from, local_files_only=True)
    text = Path(args.data) if args.data and Path(args.data).suffix in (".txt", ".text", ".md") else default_corpus_path()
    if rank == 0:   # rank 0 trains (or finds cached) first; the others then read the cache
        tokenizer = train_tokenizer([str(text)], args.vocab_size or TOKENIZER_VOCAB, cache_root() / "tokenizers")
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        tokenizer = train_tokenizer([str(text)], args.vocab_size or TOKENIZER_VOCAB, cache_root() / "tokenizers")
    return tokenizer


def batch_sources(args, tokenizer):
    """(train source, eval batches) for the task."""
    from mlorc_dist.data import contiguous_windows, default_corpus_path, split_train_eval
    if args.task == "pretrain":
        ids = load_pretraining_ids(args.data or default_corpus_path(), tokenizer, args.text_field)
        train_ids, eval_ids = split_train_eval(ids)
        windows = contiguous_windows(eval_ids, args.seq_len)[: args.eval_batches * args.global_batch]
        return packed_source(train_ids, args.seq_len), (windows, windows)
    if not args.data:
        raise ValueError("--task sft needs --data with prompt/response records")
    inputs, labels = load_sft_records(args.data, tokenizer, args.prompt_field, args.response_field, args.seq_len)
    held = max(1, inputs.shape[0] // 20)
    return sft_source(inputs[held:], labels[held:]), (inputs[:held], labels[:held])


def init_distributed(kind: str) -> tuple[int, int]:
    if kind == "single" and "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if kind == "deepspeed":
        import deepspeed
        import deepspeed.comm  # noqa: F401
        if backend == "gloo":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (60-70 s on a
            # fresh machine) that only its inference path uses; every collective here goes
            # through gloo, so we skip the build deliberately.
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def decoder_layers(model) -> list:
    """The transformer blocks (FSDP2 units), found by class name so that adapter wrappers
    (peft's PeftModel) do not hide them."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"no *DecoderLayer module in {type(model).__name__} to shard with FSDP2")
    return layers


def device_for(kind: str) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def make_torch_optimizer(args, model):
    """The method's optimizer for FSDP2 / single-process runs (dense AdamW, too, runs through
    the piece machinery, so that checkpoints and resharding work the same way)."""
    from mlorc_dist.methods import build_optimizer
    return build_optimizer(args.optimizer, model, lr=args.lr, dense_lr=args.dense_lr,
                           weight_decay=args.weight_decay, rank=args.rank, scope=args.scope,
                           seed=args.seed, betas=args.betas,
                           compress_embeddings=args.compress_embeddings,
                           galore_interval=args.galore_interval, galore_scale=args.galore_scale,
                           mofasgd_momentum=args.mofasgd_momentum, mofasgd_phi=args.mofasgd_phi,
                           fused=args.fused)


def dry_run(args) -> int:
    """Build the model on the meta device and check the config and the world size."""
    kind = engine_kind(args)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    config = build_config(args)
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    micro = args.micro_batch or max(1, args.global_batch // world)
    if args.global_batch % (micro * world):
        raise ValueError(f"global batch {args.global_batch} is not a multiple of micro batch {micro} x world size {world}")
    summary = {"engine": kind, "world_size": world, "parameters": params, "global_batch": args.global_batch,
               "micro_batch": micro, "gradient_accumulation": args.global_batch // (micro * world)}
    if args.deepspeed:
        config_ds = load_ds_config(args.deepspeed)
        summary["zero_stage"] = config_ds.get("zero_optimization", {}).get("stage", 0)
        summary["optimizer"] = config_ds["optimizer"]["type"]
        summary["mlorc"] = config_ds.get("mlorc", {})
    else:
        summary["optimizer"] = args.optimizer
    print(json.dumps(summary, indent=1))
    return 0


# --------------------------------------------------------------------------- engines
class Trainer:
    """One engine behind four calls: micro_step, step, full_state, and the MLorc optimizer."""

    def __init__(self, args, kind, model, world, device):
        self.args, self.kind, self.world = args, kind, world
        self.autocast = args.bf16 and kind == "single"
        if kind == "deepspeed":
            import mlorc_dist.deepspeed as mds
            config = load_ds_config(args.deepspeed)
            config["train_micro_batch_size_per_gpu"] = args.micro_batch
            config["gradient_accumulation_steps"] = args.global_batch // (args.micro_batch * world)
            config["train_batch_size"] = args.global_batch
            config["gradient_clipping"] = args.clip_grad
            if args.bf16:
                config["bf16"] = {"enabled": True}
            config.setdefault("steps_per_print", 10 ** 9)
            self.engine, _, _, _ = mds.initialize(model=model, config=config)
            self.model = self.engine.module
            self.adapter = (config.get("adapter") or {}).get("type")
            self.optimizer = getattr(self.engine, "mlorc_optimizer", None)
            self.lr_groups = (self.optimizer or self.engine.optimizer).param_groups
            self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
            self.peak_lr = config["optimizer"].get("params", {}).get("lr", 1e-3)
        else:
            model.to(device)
            if kind == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
                mesh = init_device_mesh(device.type, (world,))
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None,
                                              reduce_dtype=torch.float32 if args.bf16 else None)
                for layer in decoder_layers(model):
                    fully_shard(layer, mesh=mesh, mp_policy=policy)
                fully_shard(model, mesh=mesh, mp_policy=policy)
            self.model = model
            self.optimizer = make_torch_optimizer(args, model)
            self.lr_groups = self.optimizer.param_groups
            self.peak_lr = args.lr
        self.accumulation = args.global_batch // (args.micro_batch * world)
        self.step_seconds = 0.0
        self.method = self.adapter if kind == "deepspeed" else args.optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.lr_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def forward(self, input_ids, labels):
        target = self.engine if self.kind == "deepspeed" else self.model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return target(input_ids=input_ids, labels=labels).loss

    def micro_step(self, input_ids, labels) -> float:
        loss = self.forward(input_ids, labels)
        if self.kind == "deepspeed":
            self.engine.backward(loss)
            started = time.perf_counter()
            self.engine.step()           # DeepSpeed steps only at the accumulation boundary
            self.step_seconds += time.perf_counter() - started
        else:
            (loss / self.accumulation).backward()
        return float(loss.detach())

    def step(self) -> None:
        if self.kind == "deepspeed":
            return
        started = time.perf_counter()
        if self.args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds += time.perf_counter() - started

    def take_step_seconds(self) -> float:
        """Seconds spent in the optimizer step (DeepSpeed: engine.step(), with its gradient
        reduction and parameter gather; else clipping, step() and zero_grad) since the last
        call."""
        seconds, self.step_seconds = self.step_seconds, 0.0
        return seconds

    def after_step(self, step: int, total_steps: int) -> dict:
        """The method's work between steps (SwitchLoRA's switching); what it did."""
        from mlorc_dist.methods import after_step
        return after_step(self.method, self.model, self.optimizer, step, total_steps) if self.method else {}

    def sync_master_to_model(self) -> None:
        """After writing master weights into the optimizer's tensors: refresh what the model
        computes with (DeepSpeed keeps separate compute copies)."""
        if self.kind != "deepspeed":
            return
        wrapper = self.engine.optimizer
        if self.zero_stage in (1, 2):
            wrapper.update_lp_params()
        elif self.zero_stage == 3:
            for sub_group in range(len(wrapper.fp32_partitioned_groups_flat)):
                wrapper._reassign_or_swap_out_partitioned_parameters(sub_group)

    def full_state_dict(self) -> dict:
        """Full weights on every rank (collective under ZeRO-3 and FSDP2)."""
        if self.kind == "fsdp2":
            return {n: p.full_tensor().detach().cpu() for n, p in self.model.named_parameters()}
        if self.kind == "deepspeed" and self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(trainer, batches, step, args, rank, signature):
    directory = CheckpointDir(Path(args.out) / "checkpoints")
    optimizer = trainer.optimizer
    if optimizer is None:
        raise ValueError("checkpoints need an mlorc_dist optimizer (MLorcAdamW, MLorcLion or "
                         "--optimizer adamw); this DeepSpeed config builds DeepSpeed's own")
    if rank == 0:
        directory.begin(step)
    if dist.is_initialized():
        dist.barrier()
    staging = directory.staging(step)
    directory.save_file({"master": ckpt.master_records(optimizer), "optimizer": ckpt.optimizer_records(optimizer),
                         "rng": torch.get_rng_state(), "rank": rank}, staging / f"rank{rank}.pt")
    if rank == 0:
        # Not optimizer.state_dict(): under ZeRO-3 param_groups hold no tensor between steps,
        # so torch's packing cannot name the state's keys; the records above carry the state.
        directory.save_file({"batches": batches.state_dict(),
                             "optimizer_meta": {"seed": optimizer.seed, "skipped_steps": optimizer.skipped_steps},
                             "param_groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                              for g in optimizer.param_groups],
                             "switchlora": switchlora_checkpoint(trainer)},
                            staging / "common.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        directory.commit(step, {"step": step, "world_size": trainer.world, "engine": trainer.kind,
                                "algorithm": optimizer.algorithm, "scope": optimizer.scope,
                                "model": signature, "global_batch": args.global_batch})
    if dist.is_initialized():
        dist.barrier()


def switchlora_checkpoint(trainer) -> dict | None:
    """What SwitchLoRA changes outside the optimizer: the frozen W of every layer (switches
    fold vectors into it) and the candidate pools, slots and busy steps (the same on every
    rank: rank 0 writes them)."""
    if trainer.method != "switchlora":
        return None
    from mlorc_dist.switchlora import switchlora_layers, switchlora_state_dict
    return {"pools": switchlora_state_dict(trainer.model),
            "weights": {name: layer.weight.detach().cpu().clone() for name, layer in switchlora_layers(trainer.model)}}


def load_switchlora_checkpoint(trainer, saved: dict) -> None:
    from mlorc_dist.switchlora import load_switchlora_state_dict, switchlora_layers
    load_switchlora_state_dict(trainer.model, saved["pools"])
    layers = dict(switchlora_layers(trainer.model))
    if set(layers) != set(saved["weights"]):
        raise ValueError("checkpoint's SwitchLoRA layers differ from the model's")
    with torch.no_grad():
        for name, weight in saved["weights"].items():
            layers[name].weight.copy_(weight)


def load_checkpoint(trainer, batches, args, rank, signature) -> int:
    """Restore the newest complete checkpoint; returns its step (0 if there is none)."""
    path = CheckpointDir(Path(args.out) / "checkpoints").latest()
    if path is None:
        if rank == 0:
            logger.info("--resume: no checkpoint in %s, starting from scratch", args.out)
        return 0
    meta = json.loads((path / "meta.json").read_text())
    optimizer = trainer.optimizer
    if meta["model"] != signature:
        raise ValueError(f"{path} is a checkpoint of another model (parameter names or shapes differ)")
    if optimizer is None or meta["algorithm"] != optimizer.algorithm or meta["scope"] != optimizer.scope:
        raise ValueError(f"{path} was written by {meta['algorithm']} (scope {meta['scope']}); this run uses "
                         f"{getattr(optimizer, 'algorithm', None)} (scope {getattr(optimizer, 'scope', None)})")
    common = torch.load(path / "common.pt", weights_only=True)
    shards = [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(meta["world_size"])]
    ckpt.load_master_records(optimizer, [rec for s in shards for rec in s["master"]])
    counts = ckpt.load_optimizer_records(optimizer, [rec for s in shards for rec in s["optimizer"]])
    trainer.sync_master_to_model()
    for group, saved in zip(optimizer.param_groups, common["param_groups"]):
        for key in ("lr", "betas", "weight_decay", "rank", "oversample", "niter"):
            if key in saved:
                group[key] = saved[key]
    optimizer.seed = common["optimizer_meta"]["seed"]
    optimizer.skipped_steps = common["optimizer_meta"]["skipped_steps"]
    batches.load_state_dict(common["batches"])
    if (common.get("switchlora") is None) != (trainer.method != "switchlora"):
        raise ValueError(f"{path}: SwitchLoRA state {'missing' if trainer.method == 'switchlora' else 'present'}"
                         f" (a checkpoint of another method?)")
    if common.get("switchlora") is not None:
        load_switchlora_checkpoint(trainer, common["switchlora"])
    if rank < len(shards):
        torch.set_rng_state(shards[rank]["rng"])
    if rank == 0:
        logger.info("resumed from %s (written at world size %d): %s", path, meta["world_size"], counts)
    return meta["step"]


def export_hf(trainer, tokenizer, args, rank) -> None:
    state = trainer.full_state_dict()
    if rank == 0:
        target = Path(args.out) / "export"
        model = trainer.model
        config = model.config
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        plain.save_pretrained(target)
        tokenizer.save_pretrained(target)
        logger.info("exported a plain HF model to %s", target)


@torch.no_grad()
def evaluate(trainer, eval_batches, rank, world) -> float:
    inputs, labels = eval_batches
    total, count = torch.zeros(()), torch.zeros(())
    for lo in range(0, inputs.shape[0], trainer.args.micro_batch * world):
        mine = slice(lo + rank * trainer.args.micro_batch, lo + (rank + 1) * trainer.args.micro_batch)
        if inputs[mine].shape[0]:
            total += trainer.forward(inputs[mine], labels[mine]).float().cpu() * inputs[mine].shape[0]
            count += inputs[mine].shape[0]
    if dist.is_initialized():
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return float(total / count.clamp_min(1))


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    if args.deepspeed:
        load_ds_config(args.deepspeed)                  # fail before any process group exists
    if args.dry_run:
        return dry_run(args)
    previous = CheckpointDir(Path(args.out) / "checkpoints").latest()
    if not args.resume and (previous is not None or (Path(args.out) / "metrics.jsonl").exists()):
        raise ValueError(f"--out {args.out} already holds a run ({previous or 'metrics.jsonl'}): pass "
                         "--resume to continue it, or choose another --out (nothing was overwritten)")
    kind = engine_kind(args)
    rank, world = init_distributed(kind)
    if kind == "single" and world > 1:
        raise ValueError(f"{world} processes but neither --fsdp nor --deepspeed: the ranks would train "
                         "separate copies that never share gradients")
    args.micro_batch = args.micro_batch or max(1, args.global_batch // world)
    device = device_for(kind)
    tokenizer = load_tokenizer(args, rank)
    train_source, eval_batches = batch_sources(args, tokenizer)
    config = build_config(args)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab {config.vocab_size} < tokenizer vocab {len(tokenizer)}")
    model = build_model(args, config)
    if not args.deepspeed:      # under DeepSpeed the config's "adapter" block says (mlorc_dist.deepspeed)
        from mlorc_dist.methods import prepare_model
        model = prepare_model(args.optimizer, model, rank=args.rank, seed=args.seed,
                              lora_alpha=args.lora_alpha)
    signature = model_signature(model)
    trainer = Trainer(args, kind, model, world, device)
    batches = GlobalBatches(train_source, args.global_batch, args.micro_batch, world, rank, args.seed)
    start = load_checkpoint(trainer, batches, args, rank, signature) if args.resume else 0
    metrics = MetricsWriter(Path(args.out) / "metrics.jsonl" if rank == 0 else None)
    if rank == 0 and start and metrics.path.is_file():   # drop lines a killed run wrote after the checkpoint
        kept = [l for l in metrics.path.read_text().splitlines() if json.loads(l).get("step", 0) <= start]
        metrics.path.write_text("".join(k + "\n" for k in kept))
    profiler = None
    if args.profile_memory:
        from mlorc_dist.memory import MemoryProfiler
        profiler = MemoryProfiler(kind,
                                  trainer.engine if kind == "deepspeed" else trainer.model,
                                  trainer.optimizer, device)
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc=f"{kind} x{world}", dynamic_ncols=True)
    for step in range(start + 1, args.steps + 1):
        lr = lr_at(step, peak=trainer.peak_lr, warmup=args.warmup_steps, total=args.steps,
                   min_ratio=args.min_lr_ratio)
        trainer.set_lr(lr)
        started = time.perf_counter()
        losses = [trainer.micro_step(ids.to(device), lab.to(device)) for ids, lab in batches.next_step()]
        if profiler:
            profiler.sample("after_backward")
        trainer.step()
        optimizer_time = trainer.take_step_seconds()
        done = trainer.after_step(step, args.steps)
        if profiler:
            profiler.sample("after_step")
        loss = torch.tensor(sum(losses) / len(losses))
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": float(loss), "lr": lr, "step_time": elapsed,
                  "optimizer_time": optimizer_time,
                  "tokens_per_s": args.global_batch * args.seq_len / elapsed, **done}
        if torch.cuda.is_available():
            record["max_allocated"] = torch.cuda.max_memory_allocated()
        if args.eval_every and step % args.eval_every == 0:
            record["eval_loss"] = evaluate(trainer, eval_batches, rank, world)
        metrics.write(record)
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(trainer, batches, step, args, rank, signature)
    if progress:
        progress.close()
    if profiler:   # collective: every rank's samples reach rank 0, which writes the report
        profiler.gather_and_write(Path(args.out) / "memory.json", Path(args.out) / "memory.png")
        profiler.close()
    if args.export:
        export_hf(trainer, tokenizer, args, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    ran_distributed = "RANK" in os.environ or "LOCAL_RANK" in os.environ
    code = main()
    if ran_distributed:
        exit_without_teardown(code)
    sys.exit(code)
