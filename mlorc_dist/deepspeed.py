"""DeepSpeed entry point: `mlorc_dist.deepspeed.initialize`, same arguments and return value as
`deepspeed.initialize`.

    engine, optimizer, _, _ = mlorc_dist.deepspeed.initialize(model=model, config="ds_zero2.json")

The config names the optimizer and its usual hyperparameters in DeepSpeed's own block, and the
MLorc settings in a block of their own:

    "optimizer": {"type": "MLorcAdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": 0.0}},
    "mlorc": {"rank": 4, "scope": "local", "seed": 0}

Keyword arguments `mlorc={...}` override the block. We build the optimizer on the model's
parameter groups, hand it to deepspeed.initialize as a client optimizer (setting
zero_allow_untested_optimizer for the user), then attach the ZeRO layout of every flat
partition so the optimizer compresses per shard. Any other optimizer type is passed to
DeepSpeed untouched (baselines).
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path

import torch

from .engines.deepspeed_layouts import zero3_layouts, zero12_layouts
from .groups import param_groups, set_group_lrs
from .optim import GaLoreAdamW, MLorcAdamW, MLorcLion, MoFaSGD

__all__ = ["initialize", "build_optimizer", "attach_layouts", "load_config", "check_mlorc_block",
           "model_sized_buckets", "MLORC_KEYS", "OPTIMIZERS"]

logger = logging.getLogger("mlorc_dist")

OPTIMIZERS = {"mlorcadamw": MLorcAdamW, "mlorclion": MLorcLion, "mofasgd": MoFaSGD,
              "galoreadamw": GaLoreAdamW, "galore": GaLoreAdamW}   # and SwitchLoRAAdamW (optimizer_class)
# optimizer.params (DeepSpeed's own block) per class; everything else goes in the "mlorc" block
OPTIMIZER_PARAM_KEYS = {MLorcAdamW: {"lr", "betas", "eps", "weight_decay"},
                        MLorcLion: {"lr", "betas", "weight_decay"},
                        MoFaSGD: {"lr", "momentum", "betas", "eps", "weight_decay"},
                        GaLoreAdamW: {"lr", "betas", "eps", "weight_decay"}}
MLORC_KEYS = {"rank", "oversample", "niter", "scope", "seed", "factor_dtype", "nonfinite",
              "compress_embeddings", "dense_when_no_saving", "correct_bias", "decay_1d",
              "phi", "max_value", "update_interval", "scale", "dense_lr", "dense", "fused", "batched"}
ADAPTER_KEYS = {"type", "rank", "seed", "lora_alpha"}


def load_config(config) -> dict:
    """A DeepSpeed config from a path or a dict (a copy), with its "mlorc" block checked."""
    config = _read_config(config)
    check_mlorc_block(config.get("mlorc") or {})
    return config


def check_mlorc_block(block: dict) -> None:
    """ValueError naming any key of an "mlorc" block that is not an MLorc setting."""
    unknown = set(block) - MLORC_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) in the 'mlorc' block: {sorted(unknown)}; "
                         f"known: {sorted(MLORC_KEYS)}")


def _read_config(config) -> dict:
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        return json.loads(path.read_text())
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(f"config must be a path or a dict, got {type(config).__name__}")


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose value is "auto" (Hugging Face's convention for "the trainer decides")."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


# ZeRO's communication buckets sized to the model, as transformers' DeepSpeed integration fills
# "auto": DeepSpeed's defaults (5e8-element reduce and all-gather buckets, 5e7-element prefetch)
# suit 7B+ models on GPUs and hold gigabytes of buffers a smaller model never fills. ZeRO-3's
# live and reuse limits (which transformers leaves at DeepSpeed's 1e9) are two Llama decoder
# layers (12 h^2 each): at 1e9 a model under a billion parameters stays gathered whole on every
# rank from forward to backward (seen: 0.95B at world size 2 killed at 10.9 GB per rank). ZeRO-3's
# step flattens the fp32 gradients of one sub-group into a fresh tensor: sub_group_size (DeepSpeed's
# default 1e9, the whole partition of a model this size) bounds that copy, also to two layers.
MODEL_SIZED_KEYS = {"reduce_bucket_size": lambda h: h * h, "allgather_bucket_size": lambda h: h * h,
                    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                    "stage3_param_persistence_threshold": lambda h: 10 * h,
                    "stage3_max_live_parameters": lambda h: 24 * h * h,
                    "stage3_max_reuse_distance": lambda h: 24 * h * h,
                    "sub_group_size": lambda h: 24 * h * h}


def model_sized_buckets(config: dict, hidden_size: int) -> list[str]:
    """Replace every "auto" among zero_optimization's MODEL_SIZED_KEYS by its value for a model
    of `hidden_size` (in place); returns the keys filled. Values the config gives stay."""
    zero = config.get("zero_optimization") or {}
    filled = []
    for key, rule in MODEL_SIZED_KEYS.items():
        if zero.get(key) == "auto":
            zero[key] = int(rule(int(hidden_size)))
            filled.append(key)
    return filled


def normalized_type(name: str) -> str:
    """A DeepSpeed optimizer type as compared here: "MLorc-AdamW", "mlorc_adamw" -> "mlorcadamw"."""
    return str(name).replace("-", "").replace("_", "").lower()


def optimizer_class(name: str):
    """The MLorc class for a DeepSpeed optimizer type, None for any other type."""
    key = normalized_type(name)
    if key == "switchloraadamw":
        from .switchlora import SwitchLoRAAdamW      # imported on demand (it imports the optimizers)
        return SwitchLoRAAdamW
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    if key.startswith("mlorc"):
        raise ValueError(f"unknown MLorc optimizer type {name!r}; known: MLorcAdamW, MLorcLion, "
                         "MoFaSGD, GaLoreAdamW")
    return None


def build_optimizer(model: torch.nn.Module, optimizer_type: str, optimizer_params: dict,
                    mlorc: dict) -> torch.optim.Optimizer:
    """An MLorc optimizer for `model` from a DeepSpeed-style optimizer block and an mlorc block."""
    cls = optimizer_class(optimizer_type)
    if cls is None:
        raise ValueError(f"{optimizer_type!r} is not an MLorc optimizer")
    check_mlorc_block(mlorc)
    unknown = set(optimizer_params) - OPTIMIZER_PARAM_KEYS.get(cls, {"lr", "betas", "eps", "weight_decay"})
    if unknown:
        raise ValueError(f"unknown key(s) in optimizer.params for {optimizer_type}: {sorted(unknown)}")
    settings = dict(mlorc)
    accepted = set(inspect.signature(cls.__init__).parameters)
    wrong = set(settings) - accepted - {"compress_embeddings", "decay_1d", "dense_lr", "dense"}
    if wrong:
        raise ValueError(f"'mlorc' block key(s) {sorted(wrong)} do not apply to {cls.algorithm}")
    compress_embeddings = settings.pop("compress_embeddings", False)
    decay_1d = settings.pop("decay_1d", False)
    dense_lr = settings.pop("dense_lr", None)
    dense = settings.pop("dense", False)      # every tensor keeps dense state (AdamW baseline, LoRA)
    kwargs = dict(optimizer_params)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    lr = kwargs.get("lr", inspect.signature(cls.__init__).parameters["lr"].default)
    if cls.algorithm == "SwitchLoRA-AdamW":       # the adapter's A and B, then everything trainable
        from .switchlora import switchlora_param_groups
        groups = set_group_lrs(switchlora_param_groups(model, weight_decay=kwargs.get("weight_decay", 0.0)),
                               lr, dense_lr, own=lambda group: group["name"] == "lora")
    else:
        groups = set_group_lrs(param_groups(model, weight_decay=kwargs.pop("weight_decay", 0.0),
                                            compress_embeddings=compress_embeddings, decay_1d=decay_1d),
                               lr, dense_lr)
        if dense:
            for group in groups:
                group["lowrank"] = False
    return cls(groups, **kwargs, **settings)


def _module_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def attach_layouts(engine=None, optimizer=None, *, zero_optimizer=None, module=None) -> str:
    """Attach the shard layout of every tensor DeepSpeed hands `optimizer`; returns the engine
    kind ('zero1/2', 'zero3' or 'plain'). Unsupported wrappers raise ValueError.

    Either pass the DeepSpeed `engine`, or (when someone else built the engine and hands you
    its parts, as accelerate and transformers' Trainer do) `zero_optimizer=engine.optimizer` and
    `module=engine.module`."""
    import deepspeed.comm as ds_comm

    if optimizer is None:
        raise ValueError("attach_layouts needs the MLorc optimizer")
    if engine is not None:
        if zero_optimizer is not None or module is not None:
            raise ValueError("pass either engine= or zero_optimizer= and module=, not both")
        zero_optimizer, module = engine.optimizer, engine.module
    elif zero_optimizer is None or module is None:
        raise ValueError("attach_layouts needs engine=, or zero_optimizer= and module=")
    wrapper = zero_optimizer
    names = _module_names(module)
    lowrank = [bool(g.get("lowrank", True)) for g in optimizer.param_groups]
    kind = type(wrapper).__name__
    inner = getattr(wrapper, "optimizer", None)
    if kind.startswith("DeepSpeedZeroOptimizer") and inner is not optimizer:
        raise ValueError(f"DeepSpeed's {kind} steps a {type(inner).__name__}, not this "
                         f"{type(optimizer).__name__}: the engine was built with another optimizer")
    if kind == "DeepSpeedZeroOptimizer":
        if getattr(wrapper, "cpu_offload", False):
            raise ValueError("MLorc under ZeRO-1/2 with offload_optimizer is not supported")
        layouts = zero12_layouts(wrapper, names, lowrank, ds_comm.get_rank(wrapper.dp_process_group))
        engine_kind = "zero1/2"
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(wrapper, "offload_optimizer", False):
            raise ValueError("MLorc under ZeRO-3 with offload_optimizer is not supported")
        rank = ds_comm.get_rank(wrapper.dp_process_group)
        layouts = zero3_layouts(wrapper, names, lowrank, rank)
        engine_kind = "zero3"
    elif wrapper is optimizer:
        return "plain"      # ZeRO stage 0 in fp32: DeepSpeed hands the optimizer the real params
    else:
        raise ValueError(f"DeepSpeed wrapped the optimizer in {kind}, whose layout mlorc_dist does not "
                         "know (bf16 with ZeRO stage 0, or fp16 loss scaling at stage 0?): use ZeRO "
                         "stage 1, 2 or 3")
    for flat, layout, group_index in layouts:
        optimizer.attach_layout(flat, layout, optimizer.param_groups[group_index])
    return engine_kind


def _apply_adapter(model, adapter: dict):
    """The config's "adapter" block ({"type": "lora" | "switchlora", "rank": r, ...}) applied
    to the model before DeepSpeed sees it."""
    from .methods import prepare_model
    unknown = set(adapter) - ADAPTER_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) in the 'adapter' block: {sorted(unknown)}; known: {sorted(ADAPTER_KEYS)}")
    settings = dict(adapter)
    kind = settings.pop("type", None)
    if kind not in ("lora", "switchlora"):
        raise ValueError(f"'adapter' type must be 'lora' or 'switchlora', got {kind!r}")
    return prepare_model(kind, model, **settings)


def initialize(*args, model=None, config=None, mlorc: dict | None = None, **kwargs):
    """Like deepspeed.initialize(model=..., config=...), with MLorc built from the config."""
    import deepspeed

    if args:
        raise ValueError("pass arguments by keyword: initialize(model=..., config=...)")
    if model is None or config is None:
        raise ValueError("initialize needs model= and config=")
    config = load_config(config)
    unresolved = _auto_keys(config)
    if unresolved:
        raise ValueError(f"DeepSpeed config values {unresolved} are \"auto\": launch/train.py and the Hugging Face "
                         "Trainer fill those in; called directly, initialize needs numbers there")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        from .cpu_collectives import zero3_reduce_scatter_on_gloo
        if zero3_reduce_scatter_on_gloo():
            logger.info("ZeRO-3 on gloo: gradient buckets reduce-scattered by an in-place all-reduce (no clone)")
    adapter = dict(config.pop("adapter", {}) or {})
    if adapter.get("type") == "switchlora" and stage == 3:
        raise ValueError("SwitchLoRA needs whole W, A and B on every rank: ZeRO-3 shards them (use ZeRO-1/2)")
    if adapter:
        model = _apply_adapter(model, adapter)
    block = dict(config.pop("mlorc", {}) or {})
    block.update(mlorc or {})
    opt_block = config.get("optimizer") or {}
    cls = optimizer_class(opt_block.get("type", "")) if opt_block else None
    if cls is None:
        if block:
            raise ValueError(f"config has an 'mlorc' block but optimizer type "
                             f"{opt_block.get('type')!r} is not MLorcAdamW or MLorcLion")
        return deepspeed.initialize(model=model, config=config, **kwargs)
    if kwargs.get("optimizer") is not None:
        raise ValueError("the config names an MLorc optimizer; do not pass optimizer= as well")
    unknown_block = set(opt_block) - {"type", "params"}
    if unknown_block:
        raise ValueError(f"unknown key(s) in the optimizer block: {sorted(unknown_block)}")
    config.pop("optimizer")
    config["zero_allow_untested_optimizer"] = True
    optimizer = build_optimizer(model, opt_block["type"], opt_block.get("params", {}), block)
    kwargs.pop("model_parameters", None)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, config=config, optimizer=optimizer, **kwargs)
    kind = attach_layouts(engine, optimizer)
    summary = optimizer.log_treatments(f"under DeepSpeed {kind}, this rank's pieces")
    engine.mlorc_optimizer = optimizer
    engine.mlorc_treatments = summary
    return engine, ds_optimizer, loader, scheduler
