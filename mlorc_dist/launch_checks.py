"""What launch/train.py checks before any process group, tokenizer or model exists, and how it
settles a DeepSpeed config against its command line.

* `explicit_flags(parser, argv)`: the options the user actually typed (a default is not a
  choice, so it never overrides a config).
* `check_args(args, given, world)`: every mistake that needs no model, in one place, each a
  `UsageError` naming the flag, the file or the field.
* `resolve_deepspeed_config(config, args, given, world, path)`: Hugging Face's precedence for a
  DeepSpeed JSON: a value may be "auto" (launch/train.py decides), or set in only one place, or
  set in both to the same value; anything else is an error naming both values. Optimizer flags
  (`--optimizer`, `--rank`, ...) are an error under `--deepspeed`: the JSON chooses the
  optimizer there.
* `report_error(...)`: a user's mistake as one line on stderr, from rank 0 only.

Nothing here imports deepspeed or transformers, so a mistake is reported in well under a second.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["UsageError", "explicit_flags", "check_args", "launcher_world_size", "speaks_for_node", "resolve_deepspeed_config", "report_error",
           "DATA_SUFFIXES", "checkpointable", "METHOD_FLAGS",
           "planned_schedule"]

DATA_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
# Optimizer flags of FSDP2 / single-process runs, and where a DeepSpeed JSON holds the same choice.
METHOD_FLAGS = {
    "optimizer": ("--optimizer", "optimizer.type"),
    "rank": ("--rank", "mlorc.rank"),
    "scope": ("--scope", "mlorc.scope"),
    "fused": ("--fused", "mlorc.fused"),
    "dense_lr": ("--dense-lr", "mlorc.dense_lr"),
    "galore_interval": ("--galore-interval", "mlorc.update_interval"),
    "galore_scale": ("--galore-scale", "mlorc.scale"),
    "mofasgd_momentum": ("--mofasgd-momentum", "optimizer.params.momentum"),
    "mofasgd_phi": ("--mofasgd-phi", "mlorc.phi"),
    "lora_alpha": ("--lora-alpha", "adapter.lora_alpha"),
    "compress_embeddings": ("--compress-embeddings", "mlorc.compress_embeddings"),
}


SILENT_RANK_EXIT_DELAY_S = 3.0
FIRST_RECORD_MAX_CHARS = 1 << 20


class UsageError(ValueError):
    """A mistake in what the user asked for (flags, config, files): reported in one line."""


# --------------------------------------------------------------------------- flags
def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The `dest`s of the options present on the command line (whatever their value)."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return set(vars(given)) - {"help"}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def launcher_world_size() -> int:
    """The world size the launcher announces (torchrun and deepspeed: WORLD_SIZE; mpirun:
    OMPI_COMM_WORLD_SIZE or PMI_SIZE), 1 without a launcher."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def check_args(args, given: set[str], world: int) -> dict | None:
    """Every check that needs no model, tokenizer or process group (`world` from the launcher's
    environment). Returns the resolved DeepSpeed config under --deepspeed (`args` updated to
    match it), else None. Raises UsageError."""
    from .methods import METHODS
    _require(not (args.deepspeed and args.fsdp), "choose one of --deepspeed and --fsdp")
    _require(args.optimizer in METHODS, f"--optimizer {args.optimizer!r} does not exist; known: {', '.join(METHODS)}")
    _require(args.scope in ("local", "global"), f"--scope must be local or global, got {args.scope!r}")
    _require(args.mofasgd_phi in ("spectral", "inverse"), f"--mofasgd-phi must be spectral or inverse, got {args.mofasgd_phi!r}")
    positive = {"rank": "--rank", "steps": "--steps", "global_batch": "--global-batch", "eval_batches": "--eval-batches",
                "galore_interval": "--galore-interval"}
    for dest, flag in positive.items():
        value = getattr(args, dest)
        _require(value is not None and value >= 1, f"{flag} must be >= 1, got {value}")
    for dest, flag in {"micro_batch": "--micro-batch", "threads": "--threads", "world_size": "--world-size",
                       "collective_timeout": "--collective-timeout"}.items():
        value = getattr(args, dest)
        _require(value is None or value >= 1, f"{flag} must be >= 1, got {value}")
    _require(math.isfinite(args.mmap_threshold_mb) and 0 <= args.mmap_threshold_mb <= 32,
             f"--mmap-threshold-mb must be within [0, 32] (0: glibc's own threshold, which rises to 32 MiB), "
             f"got {args.mmap_threshold_mb}")
    _require(args.seq_len >= 2, f"--seq-len must be >= 2 (a token and its successor), got {args.seq_len}")
    for dest, flag in {"lr": "--lr", "dense_lr": "--dense-lr", "galore_scale": "--galore-scale"}.items():
        value = getattr(args, dest)
        _require(value is None or (math.isfinite(value) and value > 0), f"{flag} must be a positive number, got {value}")
    for dest, flag in {"weight_decay": "--weight-decay", "clip_grad": "--clip-grad", "warmup_steps": "--warmup-steps",
                       "eval_every": "--eval-every", "save_every": "--save-every"}.items():
        value = getattr(args, dest)
        _require(math.isfinite(value) and value >= 0, f"{flag} must be >= 0, got {value}")
    _require(0.0 <= args.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    _require(0.0 <= args.mofasgd_momentum < 1.0, f"--mofasgd-momentum must be in [0, 1), got {args.mofasgd_momentum}")
    if args.betas is not None:
        _require(all(0.0 <= b < 1.0 for b in args.betas), f"--betas must be in [0, 1), got {args.betas}")
    _require(not (args.extend_schedule and not args.resume), "--extend-schedule continues a checkpoint: it needs --resume")
    _require(not (args.fused and args.scope == "global"),
             "--fused is the local-scope step (each rank compresses its own rows): drop --fused or use --scope local")
    _require(not (args.fused and args.optimizer not in ("mlorc-adamw", "mlorc-lion")) or args.deepspeed,
             f"--fused is MLorc's fused step (mlorc-adamw, mlorc-lion), not {args.optimizer}'s")
    _require(args.world_size is None or args.dry_run, "--world-size plans a --dry-run; a run's world size is "
             "the launcher's (torchrun --nproc_per_node, deepspeed --num_gpus)")
    for dest, flag in (("model", "--model"), ("vocab_size", "--vocab-size")):
        _require(not (args.init_from and dest in given), f"{flag} is given with --init-from {args.init_from}, whose "
                 "config.json sets the model: drop one")
    _check_model(args)
    _check_data(args)
    from .reporting import check_report_to
    check_report_to(args)              # --report-to's packages are installed
    if args.deepspeed:
        config = _read_json(args.deepspeed)
        for dest, (flag, key) in METHOD_FLAGS.items():
            if dest in given:
                raise UsageError(f"{flag} {_shown(getattr(args, dest))} is given with --deepspeed {args.deepspeed}, "
                                 f"whose {key} is {_shown(_lookup(config, key))}: "
                                 "under --deepspeed the JSON chooses the optimizer; set it there and drop the flag")
        config = resolve_deepspeed_config(config, args, given, world, args.deepspeed)
        adapter = (config.get("adapter") or {}).get("type")
        method = adapter or "deepspeed"
    else:
        method = args.optimizer
        config = None
        _require(not (args.fsdp and args.optimizer == "switchlora"),
                 "SwitchLoRA needs whole W, A and B on every rank, which FSDP2 shards: run it in one "
                 "process or with --deepspeed ds_configs/switchlora.json (ZeRO-1/2)")
        _require(world == 1 or args.fsdp, f"{world} processes but neither --fsdp nor --deepspeed: the ranks "
                 "would train separate copies that never share gradients")
        micro = args.micro_batch or max(1, args.global_batch // world)
        _require(args.global_batch % (micro * world) == 0,
                 f"--global-batch {args.global_batch} is not a multiple of micro batch {micro} x world size {world}")
        if args.step_in_backward:
            _check_step_in_backward(args, args.global_batch // (micro * world))
    _require(not (args.deepspeed and args.step_in_backward),
             "--step-in-backward does not work under --deepspeed: DeepSpeed's engine reduces gradients in its own "
             "buckets and steps in engine.step(), with no per-parameter hook; use --fsdp or one process")
    _require(not (args.deepspeed and args.param_dtype != "fp32"),
             "--param-dtype bf16 is for one process and --fsdp; under --deepspeed use its \"bf16\" block "
             "(mixed precision with an fp32 master)")
    _require(not (args.param_dtype != "fp32" and args.bf16),
             "--param-dtype bf16 already computes in bf16 (bf16 weights and gradients, no fp32 master); --bf16 is "
             "mixed precision with an fp32 master: choose one")
    _require(not (args.param_dtype != "fp32" and method not in ("mlorc-adamw", "mlorc-lion")),
             f"--param-dtype bf16 writes the weights with stochastic rounding, which MLorc-AdamW and MLorc-Lion do; "
             f"{method} would round every update to nearest: use --bf16")
    _require(not (args.export and method in ("lora", "switchlora")),
             "--export writes a plain HF model, and merging adapters into it is not supported: drop --export "
             "for lora / switchlora")
    if not args.dry_run:
        _check_out(args)
    return config


def _check_step_in_backward(args, accumulation: int) -> None:
    """--step-in-backward steps each parameter inside backward (mlorc_dist.step_in_backward)."""
    _require(args.optimizer in ("mlorc-adamw", "mlorc-lion"),
             f"--step-in-backward is implemented for mlorc-adamw and mlorc-lion, not {args.optimizer}")
    _require(args.scope == "local", "--step-in-backward needs --scope local: global scope compresses every matrix "
             "of a step together, with collectives over all of them")
    _require(accumulation == 1, f"--step-in-backward steps on each backward's gradient, but global batch "
             f"{args.global_batch} / (micro batch x world size) accumulates {accumulation} backwards per step: "
             "make --micro-batch x world size equal --global-batch")
    _require(args.clip_grad == 0, f"--step-in-backward steps each parameter before the global gradient norm exists, "
             f"so it cannot clip to it (--clip-grad {args.clip_grad:g}): pass --clip-grad 0")


def _check_model(args) -> None:
    if args.init_from:
        _require(Path(args.init_from, "config.json").is_file(),
                 f"--init-from {args.init_from}: no config.json there (a local Hugging Face model directory)")
        return
    if args.model.endswith(".json"):
        _require(Path(args.model).is_file(), f"--model {args.model}: file not found")
        try:
            json.loads(Path(args.model).read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"--model {args.model}: not valid JSON ({error})") from None
        return
    from .models import LLAMA_SHAPES
    _require(args.model in LLAMA_SHAPES, f"--model {args.model!r} is neither a shape ({', '.join(LLAMA_SHAPES)}) "
             "nor a config .json file")


def _check_data(args) -> None:
    if args.task == "sft":
        _require(bool(args.data), "--task sft needs --data with prompt/response records (.jsonl, .json or .parquet)")
    if not args.data:
        return
    path = Path(args.data)
    _require(path.exists(), f"--data {args.data}: data file not found")
    if path.is_dir():
        return          # a prepared corpus: its index is checked when it is opened
    _require(path.suffix in DATA_SUFFIXES, f"--data {args.data}: unsupported file type {path.suffix!r} "
             f"(use {', '.join(DATA_SUFFIXES)})")
    _require(path.stat().st_size > 0, f"--data {args.data}: the file is empty")
    if args.task == "sft":
        _require(DATA_SUFFIXES[path.suffix] != "text", f"--data {args.data}: --task sft reads records "
                 "(.jsonl, .json or .parquet) with prompt and response fields")
        fields = [args.prompt_field, args.response_field]
    else:
        fields = [args.text_field]
    if DATA_SUFFIXES[path.suffix] == "text":
        return
    present = _first_record_fields(path)
    if present is not None:
        missing = [f for f in fields if f not in present]
        _require(not missing, f"--data {args.data}: records lack field(s) {missing} (they have {sorted(present)}); "
                 "choose them with --text-field / --prompt-field / --response-field")


def _first_record_fields(path: Path) -> set[str] | None:
    """The field names of the first record, read cheaply (None where that is not possible:
    a .json array, which `datasets` checks when it reads the file)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return set(pq.read_schema(path).names)
        except Exception as error:   # pyarrow's errors have no common base
            raise UsageError(f"--data {path}: not a readable parquet file ({error})") from None
    with path.open() as handle:
        while True:
            line = handle.readline(FIRST_RECORD_MAX_CHARS)     # bounded: a .json array may be one line
            if not line:
                raise UsageError(f"--data {path}: no records")
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return set(record) if isinstance(record, dict) else None


def _check_out(args) -> None:
    from .training import CheckpointDir
    out = Path(args.out)
    previous = CheckpointDir(out / "checkpoints").latest()
    if not args.resume and (previous is not None or (out / "metrics.jsonl").exists()):
        raise UsageError(f"--out {args.out} already holds a run ({previous or 'metrics.jsonl'}): pass --resume to "
                         "continue it, or choose another --out (nothing was overwritten)")


# --------------------------------------------------------------------------- DeepSpeed
def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--deepspeed {path}: file not found") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--deepspeed {path}: not valid JSON ({error})") from None


def _lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _store(config: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _shown(value) -> str:
    if value is None:
        return "unset"
    return json.dumps(value) if not isinstance(value, str) else value


def checkpointable(config: dict) -> bool:
    """Whether launch/train.py can write this DeepSpeed config's optimizer into a checkpoint:
    mlorc_dist's own optimizers only (DeepSpeed's own keep their state where our records cannot
    reach it)."""
    from .deepspeed import optimizer_class
    return optimizer_class((config.get("optimizer") or {}).get("type", "")) is not None


# (args dest, flag, JSON path); "auto" or an absent key in the JSON takes the command line's value
_SHARED = (("micro_batch", "--micro-batch", "train_micro_batch_size_per_gpu"),
           ("global_batch", "--global-batch", "train_batch_size"),
           ("clip_grad", "--clip-grad", "gradient_clipping"),
           ("lr", "--lr", "optimizer.params.lr"),
           ("weight_decay", "--weight-decay", "optimizer.params.weight_decay"),
           ("betas", "--betas", "optimizer.params.betas"),
           ("bf16", "--bf16", "bf16.enabled"))


def resolve_deepspeed_config(config: dict, args, given: set[str], world: int, path: str) -> dict:
    """The config with every "auto" (or absent) shared value taken from the command line, and
    `args` updated with the values the JSON sets. Raises UsageError on a disagreement, naming
    both values, and on an optimizer that does not exist or cannot be checkpointed when asked to."""
    from .deepspeed import check_mlorc_block, optimizer_class
    try:
        check_mlorc_block(config.get("mlorc") or {})
    except ValueError as error:
        raise UsageError(f"--deepspeed {path}: {error}") from None
    opt_type = (config.get("optimizer") or {}).get("type")
    _require(opt_type is not None, f"--deepspeed {path}: no optimizer block")
    try:
        known = optimizer_class(opt_type) is not None
    except ValueError as error:
        raise UsageError(f"--deepspeed {path}: {error}") from None
    _require(known or opt_type.lower() in ("adamw", "adam"), f"--deepspeed {path}: optimizer type {opt_type!r} "
             "does not exist here; use MLorcAdamW, MLorcLion, MoFaSGD, GaLoreAdamW, SwitchLoRAAdamW or AdamW")
    if (config.get("adapter") or {}).get("type") == "switchlora":
        _require((config.get("zero_optimization") or {}).get("stage", 0) in (0, 1, 2),
                 f"--deepspeed {path}: SwitchLoRA needs whole W, A and B on every rank; ZeRO-3 shards them (use stage 1 or 2)")
    _require(isinstance(config.get("bf16", {}), dict) and isinstance(config.get("fp16", {}), dict),
             f"--deepspeed {path}: \"bf16\" and \"fp16\" are blocks ({{\"enabled\": ...}})")
    _require("scheduler" not in config, f"--deepspeed {path}: launch/train.py sets the lr of every step from its own "
             "schedule (--warmup-steps, --min-lr-ratio, --steps); remove the JSON's \"scheduler\" block")
    shared = _SHARED + ((("seed", "--seed", "mlorc.seed"),) if "mlorc" in config else ())
    for dest, flag, key in shared:
        mine, theirs = getattr(args, dest), _lookup(config, key)
        if theirs is None or theirs == "auto":
            if dest == "micro_batch" and mine is None:
                continue                     # derived below from the global batch
            if dest == "betas" and mine is None:
                if theirs == "auto":
                    del config["optimizer"]["params"]["betas"]   # the optimizer's own default
                continue
            if dest == "bf16" and theirs is None and not mine:
                continue
            _store(config, key, list(mine) if dest == "betas" else mine)
            continue
        if dest == "betas":
            theirs = [float(b) for b in theirs]
            mine = None if mine is None else [float(b) for b in mine]
        if dest in given and mine != theirs:
            raise UsageError(f"{flag} {_shown(mine)} disagrees with {path}'s \"{key}\": {_shown(theirs)}; set it in one "
                             "place (or write \"auto\" in the JSON to take the command line's)")
        setattr(args, dest, tuple(theirs) if dest == "betas" else theirs)
    for value, key in ((args.micro_batch, "train_micro_batch_size_per_gpu"), (args.global_batch, "train_batch_size")):
        _require(value is None or (isinstance(value, int) and value >= 1),
                 f"--deepspeed {path}: \"{key}\" must be an integer >= 1, got {value!r}")
    if args.micro_batch is None:
        args.micro_batch = max(1, args.global_batch // world)
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    _require(args.global_batch % (args.micro_batch * world) == 0,
             f"global batch {args.global_batch} is not a multiple of micro batch {args.micro_batch} x world size {world}")
    accumulation = args.global_batch // (args.micro_batch * world)
    theirs = config.get("gradient_accumulation_steps")
    if theirs not in (None, "auto") and theirs != accumulation:
        raise UsageError(f"{path}'s \"gradient_accumulation_steps\": {theirs} disagrees with global batch "
                         f"{args.global_batch} / (micro batch {args.micro_batch} x world size {world}) = {accumulation}; "
                         "write \"auto\" there")
    config["gradient_accumulation_steps"] = accumulation
    from .deepspeed import MODEL_SIZED_KEYS, model_sized_buckets
    if any(_lookup(config, f"zero_optimization.{key}") == "auto" for key in MODEL_SIZED_KEYS):
        model_sized_buckets(config, model_hidden_size(args))
    _check_resolved(config, args, path)
    if isinstance(config.get("bf16"), dict) and config["bf16"].get("enabled") is False:
        del config["bf16"]
    wants_checkpoints = args.save_every or not args.no_final_checkpoint
    _require(checkpointable(config) or not wants_checkpoints,
             f"--deepspeed {path}: launch/train.py checkpoints mlorc_dist's optimizers only, and this config runs "
             f"DeepSpeed's own {opt_type}: use ds_configs/adamw.json (AdamW through mlorc_dist's pieces), or pass "
             "--no-final-checkpoint without --save-every")
    return config


def model_hidden_size(args) -> int:
    """The hidden size of the model the flags name (--init-from's or --model's config, or a
    named shape), read without building it."""
    if args.init_from or args.model.endswith(".json"):
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(args.init_from or args.model, local_files_only=True)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        _require(isinstance(hidden, int), f"{args.init_from or args.model}: no hidden_size to size ZeRO's \"auto\" buckets by")
        return hidden
    from .models import LLAMA_SHAPES
    return LLAMA_SHAPES[args.model].hidden_size      # the shape's own number: no config (and its warnings) built


def _check_resolved(config: dict, args, path: str) -> None:
    """The values the JSON set, checked as the flags are; and no "auto" left for DeepSpeed."""
    from .deepspeed import _auto_keys
    left = _auto_keys(config)
    _require(not left, f"--deepspeed {path}: {left} are \"auto\", which launch/train.py fills only for batch sizes, "
             "gradient clipping, bf16, the optimizer's lr, betas and weight decay, and ZeRO's bucket sizes: give "
             "numbers there")
    _require(isinstance(args.clip_grad, (int, float)) and args.clip_grad >= 0,
             f"--deepspeed {path}: \"gradient_clipping\" must be a number >= 0, got {args.clip_grad!r}")
    _require(isinstance(args.lr, (int, float)) and math.isfinite(args.lr) and args.lr > 0,
             f"--deepspeed {path}: \"optimizer.params.lr\" must be a positive number, got {args.lr!r}")
    bf16 = bool(_lookup(config, "bf16.enabled"))
    _require(not (bf16 and _lookup(config, "fp16.enabled")), f"--deepspeed {path}: bf16 and fp16 are both enabled")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    _require(not (bf16 and stage == 0 and checkpointable(config)),
             f"--deepspeed {path}: bf16 at ZeRO stage 0 hands the optimizer DeepSpeed's own wrapper, whose layout "
             "mlorc_dist does not know: use ZeRO stage 1, 2 or 3")


# --------------------------------------------------------------------------- reporting
def speaks_for_node() -> bool:
    """Whether this process reports a usage error: the first rank of each node (a mistake in flags
    or files is the same on every rank, and a node-local file may be missing on one node only).
    The others wait a moment first: the launcher stops every rank when the first one exits, and
    the one that explains must not be stopped before it has printed."""
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        return True
    time.sleep(SILENT_RANK_EXIT_DELAY_S)
    return False


def report_error(error: BaseException, prog: str = "launch/train.py") -> int:
    """One line on stderr (speaks_for_node); returns exit code 2."""
    if speaks_for_node():
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr, flush=True)
    return 2


# --------------------------------------------------------------------------- resume
def planned_schedule(args, given: set[str]):
    """The run's lr schedule. A fresh run's comes from the flags. A resumed run keeps the one its
    newest checkpoint recorded: --steps, --lr, --warmup-steps and --min-lr-ratio left out are
    taken from it (into `args`), typed ones that would change it are an error, except a new
    --steps with --extend-schedule (the lr then continues from its value at the checkpoint)."""
    from .schedule import Schedule
    from .training import CheckpointDir
    latest = CheckpointDir(Path(args.out) / "checkpoints").latest() if args.resume else None
    if latest is None:
        return Schedule(args.lr, args.warmup_steps, args.steps, args.min_lr_ratio)
    try:
        meta = json.loads((latest / "meta.json").read_text())
        step = int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{latest / 'meta.json'}: not a checkpoint's meta data ({error})") from None
    if meta.get("global_batch") not in (None, args.global_batch):
        raise UsageError(f"--global-batch {args.global_batch} differs from {latest}'s {meta['global_batch']}: a "
                         "resumed run draws the same global batches")
    if "schedule" not in meta:          # a checkpoint that records no schedule: the flags' is taken as it
        return Schedule(args.lr, args.warmup_steps, args.steps, args.min_lr_ratio)
    saved = Schedule.from_state(meta["schedule"])
    # under --deepspeed the lr is the JSON's (resolved into args.lr): it must agree like a typed flag
    for dest, flag, value in (("lr", "--lr", saved.peak), ("warmup_steps", "--warmup-steps", saved.warmup),
                              ("min_lr_ratio", "--min-lr-ratio", saved.min_ratio)):
        typed = dest in given or (dest == "lr" and args.deepspeed)
        if typed and getattr(args, dest) != value:
            where = f"{args.deepspeed}'s optimizer.params.lr" if dest == "lr" and args.deepspeed else flag
            raise UsageError(f"--resume: {latest} was written with {flag.lstrip('-')} {value}, and {where} is "
                             f"{getattr(args, dest)}: a resumed run keeps its lr schedule (leave it out)")
        setattr(args, dest, value)
    if "steps" not in given:
        args.steps = saved.final_total
    if args.steps == saved.final_total or args.steps <= step:
        return saved
    if not args.extend_schedule:
        raise UsageError(f"--steps {args.steps} changes the lr schedule of {latest}, which ends at step "
                         f"{saved.final_total}: leave --steps out, or pass --extend-schedule to continue the lr "
                         f"from its value at step {step} down to its floor at step {args.steps}")
    return saved.extend(step, args.steps)
