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
import copy
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

# torch's CPU allocations of 2 MiB and more in transparent huge pages (mlorc_dist.host_memory):
# c10 reads this once, at its first allocation, so it is set before torch is imported;
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps 4 KiB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlorc_dist import checkpoint as ckpt  # noqa: E402
from mlorc_dist.flops import mfu_fields  # noqa: E402
from mlorc_dist.reporting import open_reporters  # noqa: E402
from mlorc_dist.launch_checks import (check_args, explicit_flags, launcher_world_size,  # noqa: E402
                                     planned_schedule, report_error, speaks_for_node)
from mlorc_dist.training import (IGNORE_INDEX, CheckpointDir, GlobalBatches, MetricsWriter,  # noqa: E402
                                 exit_without_teardown, model_signature)

logger = logging.getLogger("mlorc_dist.train")
from mlorc_dist.methods import METHODS as OPTIMIZERS  # noqa: E402
TOKENIZER_VOCAB = 2048
CPU_COLLECTIVE_TIMEOUT_S = 600.0
PREPARATION_TIMEOUT_H = 48
PREPARATION_GROUP = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="launch/train.py", description=__doc__, formatter_class=HelpFormatter)
    engine = p.add_argument_group("engine")
    engine.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed JSON config (ZeRO stage, optimizer, mlorc "
                        "block); its \"auto\" values come from the flags below, other values must agree with them")
    engine.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) under torchrun")
    engine.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    engine.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, check config and world size, print the planned memory, exit")
    engine.add_argument("--world-size", type=int, default=None, help="for --dry-run: the planned world size "
                        "(default: the launcher's WORLD_SIZE, else 1)")
    engine.add_argument("--collective-timeout", type=float, default=None, metavar="SECONDS",
                        help="a collective that does not complete within this time is an error naming the rank "
                             "(default: 600 on the CPU, torch's own on GPUs)")
    engine.add_argument("--debug", action="store_true", help="show the traceback of a usage error")
    opt = p.add_argument_group("optimizer (FSDP2 / single process; under --deepspeed the JSON sets these)")
    opt.add_argument("--optimizer", "--method", default="mlorc-adamw", help=f"one of {', '.join(OPTIMIZERS)}")
    opt.add_argument("--rank", type=int, default=4, help="rank r (MLorc, MoFaSGD, GaLore, LoRA, SwitchLoRA)")
    opt.add_argument("--scope", default="local", help="local | global")
    opt.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                     help="MLorc: the fused one-pass step (C++ kernels on the CPU, torch.compile on a GPU; local "
                     "scope); --no-fused: the reference path; default: fused on the CPU in local scope, else the reference path")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak lr of the method's update of 2-D weights "
                     "(under --deepspeed: optimizer.params.lr)")
    opt.add_argument("--dense-lr", type=float, default=None,
                     help="peak lr of the dense state (embeddings, lm_head, 1-D); None: --lr. "
                          "MoFaSGD wants a large --lr (e.g. 0.02) and an AdamW --dense-lr (e.g. 1e-3)")
    opt.add_argument("--galore-interval", type=int, default=200, help="GaLore: steps between projector updates")
    opt.add_argument("--galore-scale", type=float, default=0.25, help="GaLore: alpha")
    opt.add_argument("--mofasgd-momentum", type=float, default=0.9, help="MoFaSGD: momentum of the factors")
    opt.add_argument("--mofasgd-phi", default="spectral", help="MoFaSGD: spectral (U V^T) | inverse (min(1/s, cap))")
    opt.add_argument("--lora-alpha", type=float, default=None, help="LoRA: alpha (None: 2 r)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of 2-D weights")
    opt.add_argument("--betas", type=float, nargs=2, default=None, help="None: the method's own")
    opt.add_argument("--compress-embeddings", action="store_true", help="MLorc: low-rank momentum for embeddings too")
    model = p.add_argument_group("model and data")
    model.add_argument("--model", default="tiny", help="a shape name (tiny, demo, 100m, llama-7b, ...) or an HF config.json")
    model.add_argument("--init-from", help="a local HF model directory to fine-tune (weights and tokenizer)")
    model.add_argument("--vocab-size", type=int, default=None,
                       help="tokenizer trained locally with this many tokens (None: 2048); the model's "
                            "vocabulary too (None: 32000 for the llama-* shapes, else 2048)")
    model.add_argument("--data", help="text / JSON lines / parquet file, tokenised once into token shards in the "
                       "cache; or a directory of shards made by python -m mlorc_dist.data prepare (None: the demo corpus)")
    model.add_argument("--tokenizer", metavar="DIR", help="an HF tokenizer directory (None: --init-from's, the one "
                       "saved with a prepared --data directory, or a byte-level BPE trained locally)")
    model.add_argument("--data-workers", type=int, default=None, help="processes tokenising a --data file the first "
                       "time it is used (None: all cores)")
    model.add_argument("--task", default="pretrain", choices=("pretrain", "sft"), help="pretrain: packed windows; "
                       "sft: prompt/response records, the prompt masked from the loss")
    model.add_argument("--text-field", default="text", help="the text field of .jsonl / .json / .parquet records")
    model.add_argument("--prompt-field", default="prompt", help="--task sft: the prompt field")
    model.add_argument("--response-field", default="response", help="--task sft: the response field")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps of the run (its lr schedule's length)")
    train.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, over all ranks")
    train.add_argument("--micro-batch", type=int, default=None,
                       help="sequences per rank per forward (None: global batch / world size)")
    train.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    train.add_argument("--warmup-steps", type=int, default=10, help="linear lr warmup")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay's floor, as a fraction of the peak")
    train.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clipping; 0 disables")
    train.add_argument("--bf16", action="store_true", help="bf16 compute (FSDP2 / DeepSpeed mixed precision, autocast)")
    train.add_argument("--param-dtype", default="fp32", choices=("fp32", "bf16"),
                       help="dtype of the weights and gradients: bf16 keeps no fp32 master, the optimizer writes "
                            "every weight with stochastic rounding (one process and --fsdp; MLorc)")
    train.add_argument("--step-in-backward", action="store_true",
                       help="step each parameter as soon as its gradient is final and free it (no step after "
                            "backward; needs --clip-grad 0 and no gradient accumulation; MLorc, local scope)")
    train.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps; 0: never")
    train.add_argument("--eval-batches", type=int, default=4, help="held-out set size, in global batches")
    train.add_argument("--seed", type=int, default=0, help="model initialisation, batches and sketches")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="runs/train", help="the run's directory")
    out.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps; 0: only at the end")
    out.add_argument("--no-final-checkpoint", action="store_true", help="do not write a checkpoint at the end")
    out.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    out.add_argument("--extend-schedule", action="store_true",
                     help="--resume with another --steps: the lr continues from its value at the checkpoint and "
                          "decays to the floor at the new --steps (without it a changed schedule is an error)")
    out.add_argument("--export", action="store_true", help="write a plain HF model directory at the end")
    out.add_argument("--profile-memory", action="store_true",
                     help="sample memory per rank (after backward, after step; tensor bytes by category, "
                          "RSS, CUDA allocator, NVML) and write memory.json / memory.png in --out")
    out.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (None: torch's)")
    out.add_argument("--mmap-threshold-mb", type=float, default=1.0, metavar="MB",
                     help="glibc's mmap threshold, fixed: a freed host block above it goes back to the system at "
                          "once (mlorc_dist.host_memory); 0 leaves glibc's own, which rises to 32 MiB and keeps "
                          "freed blocks below that in its heaps")
    out.add_argument("--report-to", nargs="+", default=["none"], choices=("tensorboard", "wandb", "none"),
                     help="also send each step's metrics to TensorBoard (--out/tensorboard) and / or Weights & "
                          "Biases (WANDB_MODE=offline: --out/wandb), from rank 0 (mlorc_dist.reporting)")
    return p


# --------------------------------------------------------------------------- set-up
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bound_host_memory(args) -> None:
    """glibc's mmap threshold fixed at --mmap-threshold-mb, logged with the huge-pages setting."""
    from mlorc_dist import host_memory
    pages = "2 MiB (transparent huge pages)" if host_memory.huge_pages_requested() else "4 KiB"
    if not args.mmap_threshold_mb:
        logger.info("host memory: glibc's dynamic mmap threshold; torch's pages %s", pages)
        return
    fixed = host_memory.bound_freed_memory(int(args.mmap_threshold_mb * 2 ** 20))
    logger.info("host memory: %s; torch's pages %s", f"mmap threshold fixed at {args.mmap_threshold_mb:g} MiB"
                if fixed else "not glibc, the C library's own allocator", pages)


def engine_kind(args) -> str:
    return "deepspeed" if args.deepspeed else ("fsdp2" if args.fsdp else "single")


def build_config(args, tokenizer=None):
    """The model's HF config: a named shape, a config.json, or the one in --init-from. A named
    shape's vocabulary is --vocab-size, else the shape's default or the tokenizer's size if larger."""
    from transformers import AutoConfig
    from mlorc_dist.models import llama_config
    if args.init_from:
        return AutoConfig.from_pretrained(args.init_from, local_files_only=True)
    if args.model.endswith(".json"):
        if not Path(args.model).is_file():
            raise FileNotFoundError(f"model config not found: {args.model}")
        return AutoConfig.from_pretrained(args.model, local_files_only=True)
    from mlorc_dist.models import LLAMA2_VOCAB_SIZE
    vocab = args.vocab_size or max(LLAMA2_VOCAB_SIZE if args.model.startswith("llama-") else TOKENIZER_VOCAB,
                                   len(tokenizer) if tokenizer is not None else 0)
    return llama_config(args.model, vocab)


def build_model(args, config, kind: str, ds_config: dict | None = None):
    """The model in --param-dtype, no rank holding more of it than it trains with (mlorc_dist.build):
    under FSDP2 (no adapters) on the meta device, each rank filling only its rows after
    fully_shard (Trainer); under ZeRO-3 partitioned as it is built (deepspeed.zero.Init);
    elsewhere whole. Its values are --init-from's (each rank reading only its slices of the
    safetensors files) or mlorc_dist.build's initialisation: the same at every world size."""
    from mlorc_dist.build import build_model as build
    model = build(config, engine=kind, seed=args.seed, device=device_for(kind), init_from=args.init_from,
                  ds_config=ds_config, shard_later=kind == "fsdp2" and args.optimizer not in ("lora", "switchlora"),
                  dtype=PARAM_DTYPES[args.param_dtype])
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()   # the forward turns the KV cache off while it recomputes
    return model


def load_tokenizer(args, rank: int):
    """--tokenizer, else --init-from's, else the one saved with a prepared --data directory,
    else a byte-level BPE trained locally on the --data text or records (or the demo corpus), cached."""
    from mlorc_dist.corpus import TokenShards, load_hf_tokenizer
    from mlorc_dist.data import cache_root, default_corpus_path, records_text_file, train_tokenizer
    if args.tokenizer or args.init_from:
        return load_hf_tokenizer(args.tokenizer or args.init_from)
    if args.data and Path(args.data).is_dir():
        return TokenShards(args.data).load_tokenizer()
    def text():     # what the tokenizer learns from: the user's text, else the demo corpus
        if not args.data:
            return default_corpus_path()
        if Path(args.data).suffix in (".txt", ".text", ".md"):
            return Path(args.data)
        fields = [args.prompt_field, args.response_field] if args.task == "sft" else [args.text_field]
        return records_text_file(args.data, fields, cache_root())
    if rank == 0:   # rank 0 trains (or finds cached) first; the others then read the cache
        tokenizer = train_tokenizer([str(text())], args.vocab_size or TOKENIZER_VOCAB, cache_root() / "tokenizers")
    wait_for_rank0()
    if rank != 0:
        tokenizer = train_tokenizer([str(text())], args.vocab_size or TOKENIZER_VOCAB, cache_root() / "tokenizers")
    return tokenizer


def batch_sources(args, tokenizer):
    """(train source, eval batches) for the task, read from memory-mapped token shards: --data a
    prepared directory, or a file (None: the demo corpus) prepared once into the cache by rank 0
    while the other ranks wait (wait_for_rank0)."""
    from mlorc_dist import corpus
    from mlorc_dist.data import cache_root, default_corpus_path
    if args.task == "sft" and not args.data:
        raise ValueError("--task sft needs --data with prompt/response records")
    fields = corpus.Fields(args.task, args.text_field, args.prompt_field, args.response_field)
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    logging.getLogger("mlorc_dist.corpus").setLevel(logging.INFO if rank == 0 else logging.WARNING)  # progress
    shards = corpus.open_training_data(args.data or default_corpus_path(), tokenizer, fields=fields,
                                       cache=cache_root(), workers=args.data_workers,
                                       rank=rank, barrier=wait_for_rank0)
    held_out = args.eval_batches * args.global_batch
    if args.task == "pretrain":
        windows = corpus.eval_windows(shards, args.seq_len, held_out)
        return corpus.packed_source(shards, args.seq_len), (windows, windows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return corpus.sft_sources(shards, args.seq_len, pad, held_out)


def init_distributed(kind: str, timeout_s: float | None) -> tuple[int, int]:
    """(rank, world size). Every collective gets `timeout_s` (None: 600 s on the CPU, where gloo
    would otherwise wait 30 minutes, and torch's default with NCCL), so a rank that never joins
    ends the run with an error instead of a hang."""
    if kind == "single" and "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout_s is None and backend == "gloo":
        timeout_s = CPU_COLLECTIVE_TIMEOUT_S
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if kind == "deepspeed":
        import deepspeed
        import deepspeed.comm  # noqa: F401
        if backend == "gloo":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (60-70 s on a
            # fresh machine) that only its inference path uses; every collective here goes
            # through gloo, so we skip the build deliberately.
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
    elif not dist.is_initialized():
        dist.init_process_group(backend, **timeout)
    global PREPARATION_GROUP     # made now, by every rank: making it is itself a collective
    PREPARATION_GROUP = dist.new_group(backend="gloo", timeout=timedelta(hours=PREPARATION_TIMEOUT_H))
    return dist.get_rank(), dist.get_world_size()


def wait_for_rank0() -> None:
    """Wait while rank 0 trains a tokenizer or prepares a corpus, which may take hours on a large
    one: a barrier of its own group, not bound by --collective-timeout (a rank 0 that fails
    ends the job through the launcher)."""
    if dist.is_initialized():
        dist.barrier(group=PREPARATION_GROUP)


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


def dry_run(args, ds_config: dict | None, world: int) -> int:
    """Build the model on the meta device, print what the run would be (the DeepSpeed config as
    resolved) and the planner's per-GPU memory for it."""
    kind = engine_kind(args)
    config = build_config(args)
    logging.getLogger("mlorc_dist").setLevel(logging.WARNING)     # the planner's meta optimizers
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    micro = args.micro_batch or max(1, args.global_batch // world)
    summary = {"engine": kind, "world_size": world, "parameters": params, "global_batch": args.global_batch,
               "micro_batch": micro, "gradient_accumulation": args.global_batch // (micro * world)}
    if ds_config is not None:
        summary["zero_stage"] = ds_config.get("zero_optimization", {}).get("stage", 0)
        summary["optimizer"] = ds_config["optimizer"]["type"]
        summary["mlorc"] = ds_config.get("mlorc", {})
        summary["deepspeed_config"] = ds_config
    else:
        summary["optimizer"] = args.optimizer
    summary["plan"] = plan_summary(args, ds_config, config, world, micro)
    print(json.dumps(summary, indent=1))
    return 0


def plan_summary(args, ds_config: dict | None, config, world: int, micro: int) -> dict:
    """The memory planner's per-GPU peak for this run (mlorc_dist.memory.planner)."""
    from mlorc_dist.memory import planner
    if ds_config is not None:
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        engine = f"zero{stage}" if stage else "single"
        block, adapter = ds_config.get("mlorc") or {}, (ds_config.get("adapter") or {})
        from mlorc_dist.deepspeed import normalized_type
        name = normalized_type(ds_config["optimizer"]["type"])
        optimizer = adapter.get("type") or ("adamw" if block.get("dense") or name in ("adamw", "adam") else
                                            {"mlorcadamw": "mlorc-adamw", "mlorclion": "mlorc-lion", "mofasgd": "mofasgd",
                                             "galoreadamw": "galore", "galore": "galore"}.get(name, name))
        rank = adapter.get("rank", block.get("rank", 4))
        scope, fused = block.get("scope", "local"), block.get("fused")
        compress = bool(block.get("compress_embeddings", False))
        zero = ds_config.get("zero_optimization") or {}       # "auto" sizes already resolved (launch_checks)
    else:
        engine = "fsdp2" if args.fsdp else "single"
        optimizer, rank, scope, fused = args.optimizer, args.rank, args.scope, args.fused
        compress, zero = args.compress_embeddings, None
    plan = planner.plan_for_run(config, engine=engine, world_size=world, optimizer=optimizer, rank=rank,
                                micro_batch=micro, seq=args.seq_len, bf16=args.bf16,
                                activation_checkpointing=args.activation_checkpointing, scope=scope,
                                fused=fused, compress_embeddings=compress,
                                step_in_backward=args.step_in_backward, param_dtype=args.param_dtype, zero=zero)
    return {"engine": engine, "optimizer": optimizer, "per_gpu_peak": planner.peak_line(plan)}


# --------------------------------------------------------------------------- engines
class Trainer:
    """One engine behind four calls: micro_step, step, full_state, and the MLorc optimizer."""

    def __init__(self, args, kind, model, world, device, ds_config: dict | None = None):
        self.args, self.kind, self.world, self.device = args, kind, world, device
        self.autocast = args.bf16 and kind == "single"
        if kind == "deepspeed":
            import mlorc_dist.deepspeed as mds
            config = dict(ds_config)      # resolved against the command line (launch_checks)
            config.setdefault("steps_per_print", 10 ** 9)
            self.engine, _, _, _ = mds.initialize(model=model, config=config)
            self.model = self.engine.module
            self.adapter = (config.get("adapter") or {}).get("type")
            self.optimizer = getattr(self.engine, "mlorc_optimizer", None)
            self.lr_groups = (self.optimizer or self.engine.optimizer).param_groups
            self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
            self.peak_lr = args.lr        # the JSON's optimizer.params.lr where it sets one
        else:
            on_meta = any(p.is_meta for p in model.parameters())
            if not on_meta:
                model.to(device)
            if kind == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import MixedPrecisionPolicy
                from mlorc_dist.build import shard_fsdp2
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None,
                                              reduce_dtype=torch.float32 if args.bf16 else None)
                shard_fsdp2(model, init_device_mesh(device.type, (world,)), policy)   # layers, embeddings, output
            if on_meta:
                from mlorc_dist.build import fill, model_source
                fill(model, device, model_source(model, args.seed, args.init_from))   # this rank's rows only
            self.model = model
            self.optimizer = make_torch_optimizer(args, model)
            self.lr_groups = self.optimizer.param_groups
            self.peak_lr = args.lr
        self.in_backward = None
        if args.step_in_backward:        # each parameter stepped by its gradient hook (launch_checks allowed it)
            from mlorc_dist import step_in_backward
            self.in_backward = step_in_backward(self.optimizer, self.model)
        self.accumulation = args.global_batch // (args.micro_batch * world)
        self.step_seconds = 0.0
        self.method = self.adapter if kind == "deepspeed" else args.optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.lr_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def outputs(self, **inputs):
        """The model's outputs through the engine (DeepSpeed) or the model, autocast where asked."""
        target = self.engine if self.kind == "deepspeed" else self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return target(**inputs)

    def forward(self, input_ids, labels):
        return self.outputs(input_ids=input_ids, labels=labels).loss

    @torch.no_grad()
    def token_loss(self, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of predicted tokens) of a batch, in float64 on the CPU; rows whose
        labels are all IGNORE_INDEX count nothing (evaluation's padding)."""
        logits = self.outputs(input_ids=input_ids).logits
        shifted = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        return loss.double().cpu(), (shifted != IGNORE_INDEX).sum().double().cpu()

    def set_training(self, training: bool) -> None:
        """Train or eval mode; leaving eval under FSDP2 reshards every module (the root keeps its
        parameters gathered after a forward without backward, which the next step's and
        --export's gathers do not expect)."""
        (self.engine if self.kind == "deepspeed" else self.model).train(training)
        if training and self.kind == "fsdp2":
            from torch.distributed.fsdp import FSDPModule
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

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
        if self.in_backward:             # every parameter was stepped during backward
            self.step_seconds += self.in_backward.take_seconds()
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

    def full_parameters(self):
        """(name, whole tensor) one parameter at a time; under FSDP2 and ZeRO-3 each is gathered
        as it is reached (a collective: every rank iterates to the end)."""
        for name, param in self.model.named_parameters():
            if self.kind == "fsdp2":
                yield name, param.full_tensor()
            elif self.kind == "deepspeed" and self.zero_stage == 3:
                import deepspeed
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.detach().clone()       # the gathered storage is freed on exit
                yield name, full
            else:
                yield name, param


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(trainer, batches, step, args, rank, signature, schedule):
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
                             "optimizer_meta": {"seed": optimizer.seed, "skipped_steps": optimizer.skipped_steps,
                                                "skipped_tensors": getattr(optimizer, "skipped_tensors", 0)},
                             "param_groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                              for g in optimizer.param_groups],
                             "switchlora": switchlora_checkpoint(trainer)},
                            staging / "common.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        directory.commit(step, {"step": step, "world_size": trainer.world, "engine": trainer.kind,
                                "algorithm": optimizer.algorithm, "scope": optimizer.scope,
                                "model": signature, "global_batch": args.global_batch,
                                "schedule": schedule.state_dict()})
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
    common = ckpt.read_file(path / "common.pt")
    shards = [ckpt.read_file(path / f"rank{r}.pt") for r in range(meta["world_size"])]   # memory-mapped
    ckpt.load_master_records(optimizer, [rec for s in shards for rec in s["master"]])
    counts = ckpt.load_optimizer_records(optimizer, [rec for s in shards for rec in s["optimizer"]])
    rng = shards[rank]["rng"].clone() if rank < len(shards) else None
    del shards                  # the files' mappings go with their tensors
    ckpt.forget_mappings()
    trainer.sync_master_to_model()
    for group, saved in zip(optimizer.param_groups, common["param_groups"]):
        for key in ("lr", "betas", "weight_decay", "rank", "oversample", "niter"):
            if key in saved:
                group[key] = saved[key]
    optimizer.seed = common["optimizer_meta"]["seed"]
    optimizer.skipped_steps = common["optimizer_meta"]["skipped_steps"]
    if hasattr(optimizer, "skipped_tensors"):
        optimizer.skipped_tensors = common["optimizer_meta"].get("skipped_tensors", 0)
    batches.load_state_dict(common["batches"])
    if (common.get("switchlora") is None) != (trainer.method != "switchlora"):
        raise ValueError(f"{path}: SwitchLoRA state {'missing' if trainer.method == 'switchlora' else 'present'}"
                         f" (a checkpoint of another method?)")
    if common.get("switchlora") is not None:
        load_switchlora_checkpoint(trainer, common["switchlora"])
    if rng is not None:
        torch.set_rng_state(rng)
    if rank == 0:
        logger.info("resumed from %s (written at world size %d): %s", path, meta["world_size"], counts)
    return meta["step"]


def export_hf(trainer, tokenizer, args, rank) -> None:
    """A plain HF model directory in --out/export, one parameter in flight at a time."""
    from mlorc_dist.export import write_hf_model
    config = copy.deepcopy(trainer.model.config)
    config.use_cache = True         # for generation; activation checkpointing only trains without it
    # the model's own class (FSDP2 wraps it in a subclass of its own): serving stacks read it
    config.architectures = [next(c.__name__ for c in type(trainer.model).__mro__
                                 if c.__module__.startswith("transformers."))]
    target = write_hf_model(trainer.full_parameters(), config, Path(args.out) / "export", tokenizer,
                            writer=rank == 0)
    if target is not None:
        logger.info("exported a plain HF model to %s", target)


def evaluate(trainer, eval_batches, rank, world, device) -> float:
    """Mean loss per predicted token over the held-out set. Every rank makes the same number of
    forward calls of the same shape, whatever the set's size: the last chunk is padded with
    copies of example 0 whose labels are all ignored. (A rank with nothing left skipping its
    forward would leave the others waiting forever in FSDP2's and ZeRO-3's all-gathers.)"""
    inputs, labels = eval_batches
    micro = trainer.args.micro_batch
    if inputs.shape[0] == 0:
        raise ValueError("the held-out set is empty: more data, a shorter --seq-len, or --eval-every 0")
    total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    trainer.set_training(False)
    for lo in range(0, inputs.shape[0], micro * world):
        index = torch.arange(lo + rank * micro, lo + (rank + 1) * micro)
        real = index < inputs.shape[0]
        index = torch.where(real, index, torch.zeros_like(index))
        ids, lab = inputs[index], labels[index].clone()
        lab[~real] = IGNORE_INDEX
        loss, count = trainer.token_loss(ids.to(device), lab.to(device))
        total += loss
        tokens += count
    trainer.set_training(True)
    if dist.is_initialized():
        both = torch.stack([total, tokens]).to(device)     # NCCL reduces device tensors only
        dist.all_reduce(both)
        total, tokens = both[0].cpu(), both[1].cpu()
    return float(total / tokens.clamp_min(1))


# --------------------------------------------------------------------------- start-up
def quiet_logs(rank: int) -> None:
    """One voice per run: rank 0 logs the run; the library's per-rank construction lines are
    replaced by log_startup's summary over ranks; DeepSpeed says only warnings."""
    logging.getLogger("mlorc_dist").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if "deepspeed" in sys.modules:
        from deepspeed.utils import logger as deepspeed_logger
        deepspeed_logger.setLevel(logging.WARNING)


def describe_method(trainer, ds_config: dict | None) -> str:
    """The method this run trains with, as the user would name it."""
    args, optimizer = trainer.args, trainer.optimizer
    if ds_config is not None:
        adapter = ds_config.get("adapter") or {}
        if optimizer is None:
            return f"DeepSpeed's own {ds_config['optimizer']['type']}"
        if adapter.get("type") == "lora":
            return f"LoRA (peft) rank {adapter.get('rank', 8)}, AdamW on the adapters"
        if adapter.get("type") == "switchlora":
            return f"SwitchLoRA rank {adapter.get('rank', 8)}, {optimizer.algorithm}"
        if (ds_config.get("mlorc") or {}).get("dense"):
            return "AdamW (dense state, through mlorc_dist's pieces)"
        rank = (ds_config.get("mlorc") or {}).get("rank", 4)
    else:
        rank = args.rank
        if args.optimizer == "adamw":
            return "AdamW (dense state, through mlorc_dist's pieces)"
        if args.optimizer == "lora":
            return f"LoRA (peft) rank {args.rank}, AdamW on the adapters"
        if args.optimizer == "switchlora":
            return f"SwitchLoRA rank {args.rank}, {optimizer.algorithm}"
    fused = ", fused step" if getattr(optimizer, "fused", False) else ""
    return f"{optimizer.algorithm} rank {rank}, {optimizer.scope} scope{fused}"


def log_startup(trainer, ds_config: dict | None, rank: int, world: int) -> None:
    """One summary of the run (rank 0): the engine, the method, and per treatment the
    parameters, pieces and elements summed over ranks."""
    mine = trainer.optimizer.treatment_summary(with_keys=True) if trainer.optimizer is not None else {}
    summaries = [mine]
    if dist.is_initialized():
        summaries = [None] * world
        dist.all_gather_object(summaries, mine)
    if rank != 0:
        return
    logger.info("%s x%d: %s", trainer.kind, world, describe_method(trainer, ds_config))
    for kind in sorted({k for summary in summaries for k in summary}):
        parts = [summary[kind] for summary in summaries if kind in summary]
        params = len({key for part in parts for key in part["keys"]})
        logger.info("  %s: %d params, %d pieces, %s elements over %d rank(s)", kind, params,
                    sum(p["pieces"] for p in parts), f"{sum(p['elements'] for p in parts):,}", world)


def open_metrics(args, rank: int, start: int) -> MetricsWriter:
    """metrics.jsonl on rank 0, holding each step once: a resumed run drops the lines a killed
    run wrote after its newest checkpoint (the resumed run writes those steps again)."""
    metrics = MetricsWriter(Path(args.out) / "metrics.jsonl" if rank == 0 else None)
    if rank == 0 and args.resume and metrics.path.is_file():
        lines = [line for line in metrics.path.read_text().splitlines() if line.strip()]
        try:
            kept = [line for line in lines if json.loads(line).get("step", 0) <= start]
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics.path}: a line is not JSON ({error}); move the file aside to resume") from None
        if len(kept) != len(lines):
            logger.info("metrics.jsonl: %d line(s) after step %d (newest checkpoint) are written again",
                        len(lines) - len(kept), start)
            metrics.path.write_text("".join(line + "\n" for line in kept))
    return metrics


# --------------------------------------------------------------------------- main
class Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad number) from one rank of a job, not all."""

    def error(self, message):
        if not speaks_for_node():
            self.exit(2)
        super().error(message)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, explicit_flags(parser, argv))
    except (ValueError, FileNotFoundError) as error:     # a user's mistake: one line, from rank 0
        if args.debug:
            raise
        return report_error(error)
    except RuntimeError as error:
        if not (dist.is_initialized() and "timed out" in str(error).lower()):
            raise
        print(f"launch/train.py: error: rank {dist.get_rank()}: a collective did not complete within "
              f"{args.collective_timeout or CPU_COLLECTIVE_TIMEOUT_S:g} s (--collective-timeout): another rank "
              f"failed or is stuck, its log says which ({str(error).splitlines()[0][-160:]})", file=sys.stderr, flush=True)
        return 1


def run(args, given: set[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    world = args.world_size if args.dry_run and args.world_size else launcher_world_size()
    ds_config = check_args(args, given, world)             # every mistake that needs no model
    if args.dry_run:
        return dry_run(args, ds_config, world)
    schedule = planned_schedule(args, given)               # a resumed run's, checked against the flags
    if args.threads:
        torch.set_num_threads(args.threads)
    bound_host_memory(args)
    kind = engine_kind(args)
    checked_world = world
    rank, world = init_distributed(kind, args.collective_timeout)
    if world != checked_world:
        raise ValueError(f"the launcher announced world size {checked_world} but the process group has {world}: "
                         "batch sizes were checked for the announced one")
    quiet_logs(rank)
    args.micro_batch = args.micro_batch or max(1, args.global_batch // world)
    device = device_for(kind)
    tokenizer = load_tokenizer(args, rank)
    train_source, eval_batches = batch_sources(args, tokenizer)
    config = build_config(args, tokenizer)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab {config.vocab_size} < tokenizer vocab {len(tokenizer)}")
    model = build_model(args, config, kind, ds_config)
    if not args.deepspeed:      # under DeepSpeed the config's "adapter" block says (mlorc_dist.deepspeed)
        from mlorc_dist.methods import prepare_model
        model = prepare_model(args.optimizer, model, rank=args.rank, seed=args.seed,
                              lora_alpha=args.lora_alpha)
    signature = model_signature(model)
    trainer = Trainer(args, kind, model, world, device, ds_config)
    log_startup(trainer, ds_config, rank, world)
    batches = GlobalBatches(train_source, args.global_batch, args.micro_batch, world, rank, args.seed)
    start = load_checkpoint(trainer, batches, args, rank, signature) if args.resume else 0
    metrics = open_metrics(args, rank, start)
    reporter = open_reporters(args, rank, world, start, trainer.optimizer, device)
    profiler = None
    if args.profile_memory:
        from mlorc_dist.memory import MemoryProfiler
        profiler = MemoryProfiler(kind,
                                  trainer.engine if kind == "deepspeed" else trainer.model,
                                  trainer.optimizer, device)
    if start >= args.steps:
        logger.info("nothing left to do: the checkpoint at step %d reaches --steps %d (a larger --steps with "
                    "--extend-schedule trains on)", start, args.steps)
    progress = None
    if rank == 0 and start < args.steps:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc=f"{kind} x{world}", dynamic_ncols=True)
    saved = start
    for step in range(start + 1, args.steps + 1):
        lr = schedule.lr(step)
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
        loss = torch.tensor(sum(losses) / len(losses), device=device)
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": float(loss), "lr": lr, "step_time": elapsed,
                  "optimizer_time": optimizer_time,
                  "tokens_per_s": args.global_batch * args.seq_len / elapsed, **done}
        record.update(mfu_fields(config, args.seq_len, record["tokens_per_s"], world, device, args.bf16))
        if torch.cuda.is_available():
            record["max_allocated"] = torch.cuda.max_memory_allocated()
        if args.eval_every and step % args.eval_every == 0:
            record["eval_loss"] = evaluate(trainer, eval_batches, rank, world, device)
        metrics.write(record)
        reporter.log(record)
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(trainer, batches, step, args, rank, signature, schedule)
            saved = step
    if progress:
        progress.close()
    reporter.close()
    if saved < args.steps and not args.no_final_checkpoint:
        save_checkpoint(trainer, batches, args.steps, args, rank, signature, schedule)
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
