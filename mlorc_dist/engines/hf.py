"""Hugging Face transformers' Trainer and accelerate, with MLorc under DeepSpeed ZeRO and FSDP2.

transformers and accelerate are imported lazily (inside the functions), so importing this module
costs nothing more than mlorc_dist itself.

Trainer (DeepSpeed through `deepspeed=`, FSDP2 through `fsdp=` / `fsdp_config={"version": 2}`,
or neither)::

    from mlorc_dist.engines.hf import MLorcTrainer, training_arguments
    args = training_arguments(output_dir="out", deepspeed="ds_zero2.json", learning_rate=1e-3)
    trainer = MLorcTrainer(model=model, args=args, train_dataset=data,
                           optimizer_type="MLorcAdamW", mlorc={"rank": 4})
    trainer.train()          # trainer.mlorc_report: what every rank's optimizer compresses

TRL (the same hooks: MLorcTrainerMixin in front of trl.SFTTrainer / trl.DPOTrainer; any other
Trainer subclass through `trainer_class(base)`)::

    from trl import SFTConfig
    from mlorc_dist.engines.hf import MLorcSFTTrainer, training_arguments
    args = training_arguments(args_class=SFTConfig, output_dir="out", fsdp=True,
                              fsdp_config={"version": 2}, learning_rate=1e-3)
    trainer = MLorcSFTTrainer(model=model, args=args, train_dataset=records,
                              processing_class=tokenizer, mlorc={"rank": 4})

accelerate (`accelerate launch --config_file examples/accelerate_configs/... script.py`)::

    from mlorc_dist.engines import hf
    accelerator = hf.make_accelerator()
    optimizer = hf.create_optimizer(model, lr=1e-3, mlorc={"rank": 4})
    model, optimizer, loader = hf.prepare(accelerator, model, optimizer, loader)

What this module does, and why (each of these goes wrong *silently* without it):

1. Under Trainer's DeepSpeed path, `Trainer(optimizers=(opt, None))` is dropped and a default
   AdamW is built instead. MLorcTrainer builds the optimizer in `create_optimizer`, which that
   path calls, and refuses `optimizers=` / `optimizer_cls_and_kwargs=`.
2. ZeRO hands the optimizer flat 1-D partitions. Once the engine exists the shard layout of every
   partition is attached (mlorc_dist.deepspeed.attach_layouts), so each 2-D piece is compressed
   as rows of its matrix. Trainer: in `create_scheduler`, which Trainer calls right after
   accelerator.prepare and before it loads a checkpoint into the engine (resume), with
   `on_train_begin` as a fallback; accelerate: in `prepare`. Without a layout the optimizer
   raises ValueError at its first step (or checkpoint load); it never runs dense Adam.
3. On a machine without a GPU, accelerate gives each process of a multi-process launch a world of
   its own (the data is not split and nothing is synchronised) unless a gloo PartialState exists
   first: `training_arguments` / `make_accelerator` create it (`distributed_state`).
4. accelerate selects FSDP only on GPU-like devices: on CPU an FSDP2 config silently trains
   without sharding (DDP, or independent copies). `enable_fsdp` selects it (MLorcTrainer and
   `make_accelerator` call it), and `attach` checks that parameters really are Shard(0) DTensors.
5. accelerate's FSDP2 `prepare` swaps the optimizer's parameters for the DTensors `fully_shard`
   made; the optimizer is re-indexed on the new ones (names kept) before its first step.

After attaching, `attach` checks and logs, over all ranks, how many 2-D parameters there are and
how many got low-rank momentum on some piece (`report`), and raises if the optimizer the engine
steps is not the MLorc optimizer, or if an engine was asked for and the tensors are not sharded.
MLorcTrainer (and the TRL trainers) also put the counts in the training log (mlorc_lowrank_params, ...).

Limits: FSDP1 and ZeRO optimizer offload are refused. Trainer checkpoints resume exactly under
DeepSpeed; under FSDP2 Trainer saves the optimizer through torch.distributed.checkpoint, which
drops MLorc's per-piece state, so resuming raises ValueError (a warning says so up front).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from ..optim.base import LowRankMomentumOptimizer

__all__ = ["MLorcTrainer", "MLorcSFTTrainer", "MLorcDPOTrainer", "MLorcTrainerMixin", "trainer_class",
           "training_arguments", "distributed_state", "create_optimizer",
           "make_accelerator", "enable_fsdp", "prepare", "attach", "report", "find_mlorc"]

logger = logging.getLogger("mlorc_dist")


# --------------------------------------------------------------------------- process state
def _launched() -> bool:
    """Started by a multi-process launcher (torchrun, accelerate launch, deepspeed)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _no_gpu() -> bool:
    return not torch.cuda.is_available()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (60-70 s on a fresh
    machine) when it initialises torch.distributed; only its inference path uses it, and every
    collective here goes through gloo, so the build is skipped deliberately (as launch/train.py
    does)."""
    import deepspeed.comm  # noqa: F401  (a plain `import deepspeed.comm.torch as m` binds the torch package)
    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def distributed_state(deepspeed: bool | None = None):
    """accelerate's PartialState for this process, created with the gloo backend when a
    multi-process launch has no GPU (accelerate would otherwise make every process a world of
    one). Call it before TrainingArguments or Accelerator; `training_arguments` and
    `make_accelerator` do. `deepspeed` (default: ACCELERATE_USE_DEEPSPEED, which `accelerate
    launch` sets) initialises torch.distributed through DeepSpeed. Returns the state, or None when
    there is nothing to fix (a GPU, or a single process)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if not (_launched() and _no_gpu()):
        return None
    if deepspeed is None:
        deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if PartialState._shared_state:
        state = PartialState()
        if (deepspeed and state.distributed_type != DistributedType.DEEPSPEED) or state.num_processes != expected:
            raise ValueError(f"accelerate's PartialState already exists ({state.distributed_type}, "
                             f"{state.num_processes} of {expected} processes): call training_arguments / "
                             "make_accelerator / distributed_state before anything creates it (a "
                             "TrainingArguments or an Accelerator)")
        return state
    if deepspeed:
        _skip_deepspeed_shm_build()
        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"   # PartialState then initialises through DeepSpeed
        try:
            state = PartialState(backend="gloo")
        finally:
            if previous is None:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    else:
        state = PartialState(cpu=True, backend="gloo")   # MULTI_CPU: DDP works, FSDP is selected by enable_fsdp
    if state.num_processes != expected:
        raise RuntimeError(f"accelerate sees {state.num_processes} processes, WORLD_SIZE is {expected}")
    return state


def training_arguments(args_class=None, **kwargs):
    """`transformers.TrainingArguments(**kwargs)` (or `args_class(**kwargs)`: a subclass such as
    trl.SFTConfig or trl.DPOConfig), made to see every process of a multi-process launch on a
    machine without a GPU (a gloo PartialState, `use_configured_state`). On a GPU machine, or in
    a single process, it is the plain class."""
    if args_class is None:
        from transformers import TrainingArguments as args_class

    if _launched() and _no_gpu():
        distributed_state(deepspeed=bool(kwargs.get("deepspeed")))
        config = kwargs.get("accelerator_config") or {}
        if not isinstance(config, dict):
            config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        kwargs["accelerator_config"] = dict(config, use_configured_state=True)
        kwargs.setdefault("ddp_backend", "gloo")
    return args_class(**kwargs)


def enable_fsdp(accelerator, plugin=None) -> bool:
    """Make `accelerator` use FSDP when it was asked to (a plugin, or ACCELERATE_USE_FSDP, which
    `accelerate launch` sets from a config file) but did not select it: accelerate picks FSDP only
    on GPU-like devices, so on CPU it silently trains without sharding. Returns whether FSDP is in
    use."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP and getattr(state, "fsdp_plugin", None) is not None:
        return True
    if plugin is None and not _env_flag("ACCELERATE_USE_FSDP"):
        return False
    if state.num_processes < 2:
        return False                      # nothing to shard over; accelerate leaves one process alone too
    # FSDP without a plugin: an earlier Accelerator of this process selected it (the type lives on
    # in PartialState's shared state), this one was not given the plugin
    if state.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.FSDP):
        raise ValueError(f"FSDP was asked for but accelerate chose {state.distributed_type}")
    plugin = plugin if plugin is not None else FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    from accelerate import PartialState
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # AcceleratorState() copies PartialState's shared state over its own on every instantiation
    # (accelerate does the same when it selects FSDP itself)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("accelerate: FSDP%s selected on %s (accelerate does not select it there itself)",
                plugin.fsdp_version, accelerator.device)
    return True


def make_accelerator(**kwargs):
    """`accelerate.Accelerator(**kwargs)` that sees every process of a launch without a GPU and
    really uses FSDP when asked (see `distributed_state` and `enable_fsdp`)."""
    from accelerate import Accelerator

    distributed_state()
    accelerator = Accelerator(**kwargs)
    enable_fsdp(accelerator, kwargs.get("fsdp_plugin"))
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes, WORLD_SIZE is {expected}")
    return accelerator


# --------------------------------------------------------------------------- optimizer
def create_optimizer(model: torch.nn.Module, args=None, *, optimizer_type: str = "MLorcAdamW",
                     mlorc: dict | None = None, **params) -> LowRankMomentumOptimizer:
    """MLorc-AdamW or MLorc-Lion (or a peer: MoFaSGD, GaLoreAdamW) on `model`'s trainable
    parameters (mlorc_dist.param_groups: 2-D weights compressed; embeddings and lm_head dense
    unless mlorc={"compress_embeddings": True}; 1-D tensors dense, no weight decay;
    mlorc={"dense": True}: every tensor dense, AdamW, as for LoRA's adapters).

    Hyperparameters, later ones winning: the optimizer's defaults; `args` (TrainingArguments:
    learning_rate, weight_decay, and for the optimizers with Adam moments adam_beta1/2 and
    adam_epsilon); `params` (lr, betas, eps, weight_decay; MoFaSGD: momentum). `mlorc` takes the
    keys of a DeepSpeed config's "mlorc" block (rank, scope, seed, oversample, niter,
    factor_dtype, nonfinite, compress_embeddings, decay_1d, dense_when_no_saving, correct_bias,
    dense, dense_lr, and the peers' phi, max_value, update_interval, scale)."""
    from ..deepspeed import OPTIMIZER_PARAM_KEYS, build_optimizer

    cls = _trainer_optimizer_class(optimizer_type)
    kwargs: dict = {}
    if args is not None:
        kwargs.update(lr=args.learning_rate, weight_decay=args.weight_decay)
        if "eps" in OPTIMIZER_PARAM_KEYS.get(cls, ()):
            kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(params)
    return build_optimizer(model, optimizer_type, kwargs, dict(mlorc or {}))


def find_mlorc(optimizer) -> tuple[LowRankMomentumOptimizer | None, object | None]:
    """(the MLorc optimizer, the DeepSpeed ZeRO optimizer or None) inside whatever wraps it
    (accelerate's AcceleratedOptimizer, DeepSpeedOptimizerWrapper, ZeRO's optimizers, all of
    which keep what they wrap in `.optimizer`)."""
    zero, seen = None, 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, LowRankMomentumOptimizer):
            return optimizer, zero
        if type(optimizer).__name__.startswith("DeepSpeedZeroOptimizer"):
            zero = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None, zero


# --------------------------------------------------------------------------- attach and report
def _engine_tensors(mlorc: LowRankMomentumOptimizer, zero) -> list[tuple[torch.Tensor, dict, int | None]]:
    """(tensor, group, position) for every tensor the engine hands the optimizer to step."""
    if zero is not None and type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        # ZeRO-3 leaves only the sub-group being stepped in param_groups
        return [(flat, mlorc.param_groups[zero.sub_group_to_group_id[sg]], None)
                for sg, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    return [(p, g, i) for g in mlorc.param_groups for i, p in enumerate(g["params"])]


def report(mlorc: LowRankMomentumOptimizer, engine: str, tensors) -> dict:
    """What this optimizer does with every piece it holds, summed over all ranks.

    Raises ValueError if a tensor has no layout (it would raise at the first step anyway).
    Keys: engine, algorithm, scope, world_size; params_2d (2-D parameters seen on any rank),
    lowrank_params (of those, with low-rank momentum on some piece), dense_by_choice (2-D in a
    lowrank=False group: embeddings, lm_head), dense_2d (2-D in a low-rank group, dense on every
    rank: too small to save memory, or no whole row); pieces_2d / lowrank_pieces over all ranks;
    treatments (this rank's treatment_summary) and rank_treatments (every rank's)."""
    import torch.distributed as dist

    pieces = []   # (key, is_2d, in a lowrank group, mode)
    for tensor, group, position in tensors:
        for plan in mlorc.plan_of(tensor, group, position):
            spec = plan.piece.matrix
            pieces.append((spec.key, len(spec.shape) == 2, bool(group["lowrank"]), plan.mode))
    local = {"pieces": pieces, "treatments": mlorc.treatment_summary()}
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    all_pieces = [p for g in gathered for p in g["pieces"]]
    params_2d = {k for k, is2d, _, _ in all_pieces if is2d}
    lowrank = {k for k, is2d, _, mode in all_pieces if is2d and mode != "dense"}
    by_choice = {k for k, is2d, in_lowrank_group, _ in all_pieces if is2d and not in_lowrank_group}
    return {
        "engine": engine, "algorithm": mlorc.algorithm, "scope": mlorc.scope, "world_size": world,
        "params_2d": len(params_2d), "lowrank_params": len(lowrank),
        "dense_by_choice": sorted(by_choice), "dense_2d": sorted(params_2d - lowrank - by_choice),
        "pieces_2d": sum(1 for _, is2d, _, _ in all_pieces if is2d),
        "lowrank_pieces": sum(1 for _, is2d, _, mode in all_pieces if is2d and mode != "dense"),
        "treatments": local["treatments"], "rank_treatments": [g["treatments"] for g in gathered],
    }


def attach(optimizer, model, *, expect: str | None = None) -> dict:
    """Once the engine exists: attach the DeepSpeed ZeRO layouts (or re-index after FSDP2's
    parameter swap), check, log and return `report(...)`.

    `optimizer` is what the engine or accelerate returned (wrappers are looked through), `model`
    the prepared model (a DeepSpeed engine, an FSDP2 module, or a plain one). `expect`: "deepspeed"
    or "fsdp" when that engine was asked for; a ValueError then if it is not what steps the
    optimizer (no silent fallback to unsharded training)."""
    import torch.distributed as dist

    mlorc, zero = find_mlorc(optimizer)
    if mlorc is None:
        raise ValueError(f"the optimizer that will step is {type(optimizer).__name__} wrapping no MLorc "
                         "optimizer: something replaced it (Trainer's DeepSpeed path does that with "
                         "optimizers=(opt, None); use MLorcTrainer)")
    module = getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if zero is not None:
        from ..deepspeed import attach_layouts
        engine = attach_layouts(optimizer=mlorc, zero_optimizer=zero, module=module)
    elif expect == "deepspeed":
        raise ValueError(f"DeepSpeed was asked for but the optimizer is not inside a ZeRO optimizer "
                         f"({type(optimizer).__name__}); mlorc_dist supports ZeRO stages 1-3")
    else:
        mlorc.rebind_parameters()
        params = [p for g in mlorc.param_groups for p in g["params"]]
        sharded = [type(p).__name__ == "DTensor" for p in params]
        engine = "fsdp2" if any(sharded) else "plain"
        if expect == "fsdp" and world > 1 and not all(sharded):
            raise ValueError(f"FSDP was asked for but {sharded.count(False)} of {len(params)} parameters "
                             "are not DTensors: the model was not sharded by FSDP2 (accelerate on CPU "
                             "without enable_fsdp? FSDP1, which mlorc_dist does not support?)")
    summary = report(mlorc, engine, _engine_tensors(mlorc, zero))
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("%s under %s, world size %d: low-rank momentum on %d of %d 2-D parameters "
                    "(%d of %d pieces over all ranks); dense by choice: %d %s; dense (no saving / no "
                    "whole row): %s", summary["algorithm"], engine, summary["world_size"],
                    summary["lowrank_params"], summary["params_2d"], summary["lowrank_pieces"],
                    summary["pieces_2d"], len(summary["dense_by_choice"]), summary["dense_by_choice"],
                    summary["dense_2d"] or "none")
    mlorc.log_treatments(f"under {engine}, this rank's pieces")
    return summary


def prepare(accelerator, *objects):
    """`accelerator.prepare(*objects)`, then `attach` for the MLorc optimizer among them (the
    ZeRO layout under DeepSpeed; the FSDP2 parameter swap). Returns what accelerator.prepare
    returns; the report is kept in `accelerator.mlorc_report`."""
    from accelerate.utils import DistributedType

    result = accelerator.prepare(*objects)
    items = tuple(result) if isinstance(result, (tuple, list)) else (result,)   # FSDP2 returns a list
    optimizers = [o for o in items if isinstance(o, torch.optim.Optimizer) and find_mlorc(o)[0] is not None]
    models = [o for o in items if isinstance(o, torch.nn.Module)]
    if len(optimizers) != 1 or len(models) != 1:
        raise ValueError("mlorc_dist.engines.hf.prepare needs exactly one model and one MLorc optimizer "
                         f"among the objects (got {len(models)} models, {len(optimizers)} MLorc optimizers)")
    kind = accelerator.distributed_type
    expect = {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(kind)
    if expect is None:    # what `accelerate launch` asked for, when accelerate did not select it
        expect = "deepspeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else None
    accelerator.mlorc_report = attach(optimizers[0], models[0], expect=expect)
    return result


# --------------------------------------------------------------------------- Trainer, TRL
def _attach_callback(trainer):
    """A TrainerCallback whose on_train_begin (after Trainer has built the DeepSpeed engine /
    sharded the model, before the first step) attaches if create_scheduler has not already."""
    from transformers import TrainerCallback

    class _AttachCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if trainer.mlorc_report is None:
                trainer._mlorc_attach()
    return _AttachCallback()


class MLorcTrainerMixin:
    """What makes a transformers.Trainer (or any subclass of it: TRL's SFTTrainer, DPOTrainer,
    ...) train with an mlorc_dist optimizer, under DeepSpeed ZeRO (deepspeed=...), FSDP2
    (fsdp=..., fsdp_config={"version": 2}) or neither. Put it first among the bases, or use
    `trainer_class(base)`: MLorcTrainer, MLorcSFTTrainer and MLorcDPOTrainer are made that way.

    Arguments besides the base trainer's: `optimizer_type` (MLorcAdamW, MLorcLion, or a peer:
    MoFaSGD, GaLoreAdamW), `mlorc` (the keys of a DeepSpeed config's "mlorc" block: rank, scope,
    seed, compress_embeddings, dense, dense_lr, ...), `optimizer_params` (lr, betas, eps,
    weight_decay, momentum; default: from TrainingArguments). A DeepSpeed config may name the
    optimizer instead ("optimizer": {"type": "MLorcAdamW", "params": {...}} and an "mlorc" block;
    "auto" values come from TrainingArguments); arguments given here win over it. LoRA: hand
    the trainer a peft model (TRL: peft_config=...) and mlorc={"dense": True} for AdamW on the
    adapters.

    The optimizer is built in `create_optimizer`, the hook Trainer's DeepSpeed and FSDP paths
    call; a ready optimizer (optimizers=(opt, None), optimizer_cls_and_kwargs=) is refused, since
    the DeepSpeed path would silently replace it. After `train()` has set up the engine,
    `trainer.mlorc_report` holds what `attach` reported (low-rank parameters and pieces over all
    ranks; a ValueError if the optimizer about to step is not the one built here) and
    `trainer.mlorc_optimizer` the optimizer itself. Build the arguments with
    `training_arguments(...)` (`args_class=trl.SFTConfig` for TRL) so that a CPU launch sees all
    its processes."""

    def __init__(self, *args, optimizer_type: str | None = None, mlorc: dict | None = None,
                 optimizer_params: dict | None = None, **kwargs):
        name = type(self).__name__
        optimizers = kwargs.get("optimizers") or (None, None)
        if optimizers[0] is not None:
            raise ValueError(f"{name} builds its optimizer itself (Trainer's DeepSpeed path would "
                             "silently replace a ready one): pass optimizer_type=, mlorc=, optimizer_params=")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{name} builds its optimizer itself: do not pass optimizer_cls_and_kwargs")
        self.mlorc_optimizer = None
        self.mlorc_report = None
        super().__init__(*args, **kwargs)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != world:
            raise ValueError(f"accelerate sees {self.accelerator.num_processes} of the {world} processes "
                             "of this launch (on a machine without a GPU): build the training arguments with "
                             "mlorc_dist.engines.hf.training_arguments(...)")
        if self.args.deepspeed and not self.is_deepspeed_enabled:
            raise ValueError("the training arguments name a DeepSpeed config but Trainer did not enable DeepSpeed")
        fsdp_args = self.args.fsdp_plugin_args
        if fsdp_args is not None and int(fsdp_args.get("fsdp_version", 2)) != 2:
            raise ValueError(f"{name} supports FSDP2 only (fsdp_config={{'version': 2}}): FSDP1 hands "
                             "the optimizer flattened 1-D views it would train as dense vectors")
        if fsdp_args is not None and self.args.save_strategy != "no" and not self.args.save_only_model:
            warnings.warn(f"{name} under FSDP2: Trainer saves the optimizer through "
                          "torch.distributed.checkpoint, which does not keep MLorc's per-piece state; "
                          "resuming from such a checkpoint raises ValueError. Save the model only "
                          "(save_only_model=True) or use launch/train.py for resumable FSDP2 runs.",
                          stacklevel=2)
        block_type, block_params, block_mlorc = self._take_deepspeed_optimizer_block()
        self.mlorc_optimizer_type = optimizer_type or block_type or "MLorcAdamW"
        self.mlorc_settings = {**block_mlorc, **(mlorc or {})}
        self.mlorc_optimizer_params = {**block_params, **(optimizer_params or {})}
        _trainer_optimizer_class(self.mlorc_optimizer_type)
        self.add_callback(_attach_callback(self))

    # ---- the engine
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.utils import FullyShardedDataParallelPlugin
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = enable_fsdp(self.accelerator, plugin)

    def _take_deepspeed_optimizer_block(self) -> tuple[str | None, dict, dict]:
        """Move an mlorc_dist "optimizer" block and the "mlorc" block out of the DeepSpeed config
        (DeepSpeed would try to build the optimizer itself)."""
        if not self.is_deepspeed_enabled:
            return None, {}, {}
        config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        block = config.get("optimizer")
        settings = dict(config.pop("mlorc", None) or {})
        if block is None:
            return None, {}, settings
        from ..deepspeed import optimizer_class
        if optimizer_class(block.get("type", "")) is None:
            raise ValueError(f"the DeepSpeed config names optimizer {block.get('type')!r}: {type(self).__name__} "
                             f"trains with {TRAINER_OPTIMIZERS_TEXT} (remove the block or name one of them)")
        config.pop("optimizer")
        params = {k: v for k, v in (block.get("params") or {}).items() if v != "auto"}
        if "betas" in params:
            params["betas"] = tuple(params["betas"])
        return block["type"], params, settings

    # ---- the optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = create_optimizer(model, self.args, optimizer_type=self.mlorc_optimizer_type,
                                              mlorc=self.mlorc_settings, **self.mlorc_optimizer_params)
            self.mlorc_optimizer = self.optimizer
            self.mlorc_report = None          # a new optimizer: attach again once the engine exists
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Trainer calls this right after accelerator.prepare has built the DeepSpeed engine /
        # sharded the model, and before it loads a checkpoint into the engine (resume): the
        # ZeRO layouts must be attached by then.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.mlorc_report is None and self._mlorc_engine_ready():
            self._mlorc_attach()
        return scheduler

    def _mlorc_expect(self) -> str | None:
        # what was asked for, not what accelerate enabled: asking for FSDP and getting DDP is the trap
        if self.is_deepspeed_enabled or bool(self.args.deepspeed):
            return "deepspeed"
        if self.is_fsdp_enabled or self.args.fsdp_plugin_args is not None:
            return "fsdp"
        return None

    def _mlorc_engine_ready(self) -> bool:
        mlorc, zero = find_mlorc(self.optimizer)
        if mlorc is None:
            return False
        if self._mlorc_expect() == "deepspeed":
            return zero is not None
        if self._mlorc_expect() == "fsdp":
            return any(type(p).__name__ == "DTensor" for g in mlorc.param_groups for p in g["params"])
        return False

    def _mlorc_attach(self) -> None:
        mlorc, _ = find_mlorc(self.optimizer)
        if mlorc is None or mlorc is not self.mlorc_optimizer:
            raise ValueError(f"Trainer is about to step {type(self.optimizer).__name__}, not the "
                             f"{self.mlorc_optimizer_type} optimizer {type(self).__name__} built")
        self.mlorc_report = attach(self.optimizer, self.model, expect=self._mlorc_expect())
        # the counts also go to the training log (console, log_history, report_to integrations)
        self.log({f"mlorc_{key}": self.mlorc_report[key]
                  for key in ("params_2d", "lowrank_params", "pieces_2d", "lowrank_pieces")})


TRAINER_OPTIMIZERS = ("MLorcAdamW", "MLorcLion", "MoFaSGD", "GaLoreAdamW")
TRAINER_OPTIMIZERS_TEXT = "MLorcAdamW or MLorcLion, or a peer: MoFaSGD or GaLoreAdamW"


def _trainer_optimizer_class(optimizer_type: str):
    """The optimizer class a trainer builds for `optimizer_type`; ValueError for any other type
    (SwitchLoRA needs its own layers and switching between steps: launch/train.py runs it)."""
    from ..deepspeed import optimizer_class
    try:
        cls = optimizer_class(optimizer_type)
    except ValueError:
        cls = None
    if cls is None or cls.__name__ not in TRAINER_OPTIMIZERS:
        raise ValueError(f"optimizer_type must be {TRAINER_OPTIMIZERS_TEXT}, got {optimizer_type!r}")
    return cls


_TRAINER_CLASSES: dict = {}


def trainer_class(base: type, name: str | None = None) -> type:
    """`base` (transformers.Trainer or a subclass: trl.SFTTrainer, trl.DPOTrainer, your own)
    with MLorcTrainerMixin in front: the same optimizer hooks, checks and report for every
    trainer. One class per base (cached); `name` defaults to "MLorc" + the base's name."""
    if base not in _TRAINER_CLASSES:
        name = name or f"MLorc{base.__name__}"
        cls = type(name, (MLorcTrainerMixin, base), {"__module__": __name__, "__qualname__": name,
                                                      "__doc__": f"{base.__name__} with MLorcTrainerMixin: "
                                                                 f"{MLorcTrainerMixin.__doc__}"})
        _TRAINER_CLASSES[base] = cls
    return _TRAINER_CLASSES[base]


def _lazy_trainer(name: str) -> type:
    if name == "MLorcTrainer":           # subclasses transformers.Trainer: defined on first use
        from transformers import Trainer
        return trainer_class(Trainer, "MLorcTrainer")
    try:
        import trl
    except ImportError as error:
        raise ImportError(f"{name} needs TRL: pip install 'mlorc-dist[integrations]' (or trl)") from error
    return trainer_class({"MLorcSFTTrainer": trl.SFTTrainer, "MLorcDPOTrainer": trl.DPOTrainer}[name])


def __getattr__(name: str):
    if name in ("MLorcTrainer", "MLorcSFTTrainer", "MLorcDPOTrainer"):
        cls = _lazy_trainer(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
