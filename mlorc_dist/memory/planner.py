"""Per-GPU memory planner: which engine / optimizer / world size fits a model on which GPU.

    python -m mlorc_dist.plan --model llama-7b --engine zero2 --world-size 8 \
        --optimizer mlorc-adamw --rank 4 --micro-batch 1 --seq 4096 --bf16

--optimizer is any method launch/train.py runs: mlorc-adamw, mlorc-lion, mofasgd, adamw, galore,
lora, switchlora; --rank (alias --lora-rank) is the method's rank r, the adapters' for lora and
switchlora. A launcher's dry run calls plan_for_run(config, engine=..., ...) with the HF config it
would build the model from, and prints peak_line(plan) (or format_plan(plan)).

The model is built on the meta device (nothing is allocated) from a named shape
(`mlorc_dist.models.LLAMA_SHAPES`) or an HF config JSON. Every rank is then planned with the
partition rules the engines really use:

    zero1/zero2  each param group (mlorc_dist.param_groups order) is one flat buffer padded to a
                 multiple of 2 x world and cut into world equal partitions (DeepSpeed
                 stage_1_and_2.py); the optimizer holds one fp32 partition per group; the pieces
                 come from mlorc_dist.engines.deepspeed_layouts.zero12_layouts itself
    zero3        every parameter is cut on its own into ceil(numel / world) elements per rank;
                 parameters of <= 1e5 elements stay whole on every rank (DeepSpeed's
                 stage3_param_persistence_threshold); sub-groups of <= 1e9 partition elements;
                 pieces from zero3_layouts
    fsdp2        Shard(0), torch.chunk rows: ceil(rows / world) rows per rank, the local storage
                 padded to that many rows on every rank (FSDP2 pre-pads its shards)
    single       one process, no sharding

MLorc state is computed by the optimizer's own code: the planner attaches each rank's layout to
a real MLorcAdamW / MLorcLion on meta tensors and calls its `plan_of` and `new_state`, so
rank clamping, dense_when_no_saving, dense head/tail rows, dense 1-D tensors and global scope
follow LowRankMomentumOptimizer exactly. AdamW: 2 moments per element of the tensor the optimizer
holds + a 4-byte fp32 step tensor per tensor (torch.optim.AdamW). GaLore: m r + 2 n r per
projected matrix (m <= n, else swapped; the attention and MLP matrices), AdamW on everything
else; GaLore has no shard-aware implementation, so sharded engines get total / world (ideal).

Adapters. The meta model gets the run's own adapters (adapt_meta_model: mlorc_dist.lora.apply_lora,
mlorc_dist.switchlora.apply_switchlora, run inside a meta device context, so A, B and SwitchLoRA's
candidate pools are meta tensors too), so the targets, names and parameter order are the run's.
    lora        peft A (r x n), B (m x r) on q/k/v/o/gate/up/down; every other parameter frozen.
                AdamW on the adapters through MLorcAdamW with every group dense (as
                methods.build_optimizer and the DeepSpeed "dense" key build it): its own
                new_state, 2 moments per adapter element
    switchlora  A and B on the same linears, whose W and b are frozen; embeddings, lm_head and
                norms keep training. SwitchLoRAAdamW on switchlora_param_groups (lora, matrices,
                vectors: the order DeepSpeed flattens), its own new_state: exp_avg, exp_avg_sq
                and the per-element step count and freeze countdown (4 numbers per element).
                Single process or ZeRO-1/2 only: zero3 / fsdp2 raise ValueError, as a run does.
                Its candidate pools (K = min(m, n) candidates a side per layer, fp32, replicated
                in every process) live in host memory: Plan.host, not the GPU peak
Frozen parameters (requires_grad False) have weights only, no grads, master or state:
    zero1/zero2  whole, in the model dtype, in every rank's module (DeepSpeed flattens and
                 partitions only what the optimizer's groups hold)
    zero3        partitioned like the others: ceil(numel / world) elements per rank in their own
                 ds_tensor (outside the flat buffers), plus whole copies under the persistence
                 threshold
    fsdp2        sharded like the others (padded Shard(0) rows, fp32)
    single       whole
Activations follow the adapters too (memory.activations: LoRA's frozen embeddings, norms and
lm_head keep less; every adapter adds its r-wide A x; ZeRO-3's linear keeps lm_head's input).

Categories (bytes per rank):
    weights         parameter storage the rank keeps (DeepSpeed bf16/fp32 flat buffers or
                    partitions, FSDP2 padded shards), frozen parameters included (shown on their
                    own as frozen_weights, a part of weights)
    grads           gradients the optimizer is handed when it steps, numel x element size
                    (DeepSpeed: the fp32 flat partition's .grad, per group / sub-group; FSDP2:
                    the local shards of the sharded grads, which live in a padded buffer); with
                    step_in_backward the most gradient bytes alive at one in-backward step: FSDP2,
                    the padded reduce-scatter output of the largest unit (a decoder layer, the
                    embeddings, the output or the root), which all of the unit's sharded grads
                    view; one process, the largest parameter's gradient (each is stepped and
                    freed as its AccumulateGrad runs)
    master          a separate fp32 copy of the rank's partition (DeepSpeed: always, fp32 runs
                    included; 0.19.8's ZeRO-3 "no copy when already fp32" branch compares a
                    torch.device with a device-name string and never fires; FSDP2, single: none)
    state_factors   MLorc U, s, Vh (GaLore: projector and low-rank moments)
    state_dense     dense moments (1-D tensors, embeddings, partial rows, small blocks; AdamW all)
    state_scalars   0-d tensors (torch AdamW's step)
    engine_buffers  buffers the engine keeps for the whole run (ZeRO-3 gradient partition buffer
                    and reduce bucket)
param_dtype "bf16" (one process and FSDP2, MLorc): weights and grads bf16, no master (FSDP2
without a MixedPrecisionPolicy: bf16 shards); MLorc's factors and dense state stay fp32.
The first six are exact: tests/test_memory.py compares them with the tensors of real 2-process
jobs (LoRA at ZeRO-1/2/3 and FSDP2, SwitchLoRA at ZeRO-1/2, fp32 and bf16; FSDP2 with step in
backward and bf16 params, its grads measured at the in-backward steps' hooks) and of one process
(both adapters; step in backward, fp32 and bf16 params). Activations, transients and the peak
are estimates (the activations are exact on CPU in those runs); every assumption is printed with
-v.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..engines.deepspeed_layouts import zero3_layouts, zero12_layouts
from ..engines.fsdp2 import _shard0_row_range
from ..optim.base import BATCH_ELEMENTS, batch_cap, batch_chunks, fused_kept_elements, resolve_fused
from ..pieces import Layout, MatrixSpec, Piece
from .activations import llama_activation_items
from .profiler import add_state_bytes

__all__ = ["PlanSettings", "Plan", "plan", "plan_model", "plan_for_run", "load_config", "build_meta_model",
           "adapt_meta_model", "format_plan", "peak_line", "GPU_SIZES_GB", "EXACT_CATEGORIES", "main"]

ENGINES = ("single", "zero1", "zero2", "zero3", "fsdp2")
OPTIMIZERS = ("mlorc-adamw", "mlorc-lion", "mofasgd", "adamw", "galore", "lora", "switchlora")
ADAPTERS = ("lora", "switchlora")
SWITCHLORA_ENGINES = ("single", "zero1", "zero2")
EXACT_CATEGORIES = ("weights", "grads", "master", "state_factors", "state_dense", "state_scalars")
GPU_SIZES_GB = (24, 40, 80, 141)
GB = 1e9
# Extra memory of one MLorc-AdamW step(), in fp32 copies of one block, by the element size of the
# tensor the optimizer holds (4: fp32, DeepSpeed's master and FSDP2 shards; 2: pure bf16), as
# measured with mlorc_dist.memory.workspace.measure_step_workspace on CPU (the same for 512x256 ..
# 4096x1024) and re-checked by tests/test_memory.py (an upper bound):
#   local, batched (the default): the B same-shaped bodies of one step() call and param group
#     are rebuilt into (B, k, n) buffers, one per moment: 2 B + c copies, B capped so that a
#     buffer holds at most optim.base.BATCH_ELEMENTS elements; each batch is freed before the
#     next is built; a batch of one body takes the per-body path (c1)
#   local, batched=False: c1 copies of the largest body
# fp32 values since negative_stats stopped making full-size int64 / where() temporaries: c1 = 3.0
# (measured 3.0); c = 1.75 (measured 1.0 at 512x256, 1.6 at 96x64: the factors and sketches
# weigh more next to small blocks).
# bf16 params are written with stochastic rounding (optim.rounding.write_weight_, one body or
# dense region at a time): its int64 element indices and hash temporaries add 7.5 fp32 copies of
# that body (measured at 512x256 and 1024x512: 13.0 alone, 2 B + 11.0 batched, 11.0 dense; the
# global-scope entries are not re-measured with it).
#   global: the matrices of the call in consecutive batches of at most BATCH_ELEMENTS whole-matrix
#     elements (optim.base._global_batches), one batch rebuilt and compressed at a time:
#     4.125 sum(this rank's blocks of the batch) + c
#   dense regions (1-D, embeddings, partial rows): d copies of the largest
MLORC_STEP_WORKSPACE = {
    4: {"batch": 2.0, "block": 1.75, "unbatched": 3.0, "global": 4.125, "global_block": 0.25, "dense": 1.0},
    2: {"batch": 2.0, "block": 11.0, "unbatched": 13.0, "global": 4.125, "global_block": 1.5, "dense": 11.0},
}
# The fused step (fused=True, local scope), measured the same way (512 x 256 and 256 x 128,
# r = 4, AdamW and Lion): fp32 0.08-0.11 per body alone, 0.08-0.22 per body of a batch (the
# factors and sketches); bf16 params add a lone body's fp32 copy of its gradient (1.08-1.11); a
# batch copies its gradients straight into the kept stacked-gradient buffer (0.08-0.22 per body,
# as fp32). Upper bounds below. Its V and stacked-gradient buffers are not in these: the optimizer keeps them
# between steps, and the plan counts them as persistent ("fused step buffers", from
# optim.base.fused_kept_elements with the GPU rule).
FUSED_STEP_WORKSPACE = {
    4: {"batch": 0.25, "block": 0.0, "unbatched": 0.25, "dense": 1.0},
    2: {"batch": 0.25, "block": 0.0, "unbatched": 1.25, "dense": 3.5},
}
# MoFaSGD (per block, never batched), measured (512 x 256, r = 4): fp32 0.12 (the direction is
# an in-place addmm_ into W; what remains are the factors' QR/SVD temporaries); bf16 4.04 (the
# gradient and the weight cast to fp32, the direction, the update's result); global scope: the
# padded weight, gradient and direction rows.
MOFASGD_STEP_WORKSPACE = {
    4: {"batch": 0.0, "block": 0.0, "unbatched": 0.25, "global": 3.0, "global_block": 0.0, "dense": 1.0},
    2: {"batch": 0.0, "block": 0.0, "unbatched": 4.25, "global": 3.0, "global_block": 0.0, "dense": 3.5},
}
# SwitchLoRAAdamW (per_element_adamw_ on each dense piece: its masks, where() results, bias
# corrections and denominator), measured the same way (512 x 256, one or four tensors): fp32
# 7.25 copies of the piece, bf16 params 9.25 (plus the gradient and value cast to fp32).
SWITCHLORA_STEP_WORKSPACE = {
    4: {"batch": 0.0, "block": 0.0, "unbatched": 0.0, "global": 0.0, "global_block": 0.0, "dense": 7.25},
    2: {"batch": 0.0, "block": 0.0, "unbatched": 0.0, "global": 0.0, "global_block": 0.0, "dense": 9.25},
}
# torch AdamW: foreach (the CUDA default) materialises one temporary per tensor of a param group
# at once (1.00x the group); the single-tensor loop 2.00x the largest tensor.
ADAMW_FOREACH_WORKSPACE = 1.0


@dataclass
class PlanSettings:
    engine: str = "zero2"
    world_size: int = 1
    optimizer: str = "mlorc-adamw"
    rank: int = 4
    micro_batch: int = 1
    seq: int = 2048
    bf16: bool = False
    activation_checkpointing: bool = False
    scope: str = "local"
    factor_dtype: str | None = None
    compress_embeddings: bool = False
    dense_when_no_saving: bool = True
    reduce_bucket_size: int = 500_000_000          # DeepSpeed default
    overlap_comm: bool | None = None               # DeepSpeed default: True at stage 3 only
    param_persistence_threshold: int = 100_000     # DeepSpeed stage3_param_persistence_threshold
    sub_group_size: int = 1_000_000_000            # DeepSpeed sub_group_size
    prefetch_bucket_size: int = 50_000_000         # DeepSpeed stage3_prefetch_bucket_size
    batched: bool = True                           # MLorc's batched=True default
    fused: bool | None = None                      # MLorc's fused step: None resolves as the
                                                   # optimizer does on a GPU (validate())
    step_in_backward: bool = False                 # mlorc_dist.step_in_backward (--step-in-backward)
    param_dtype: str = "fp32"                      # --param-dtype: bf16 weights and grads, no fp32 master

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.world_size < 1 or (self.engine == "single" and self.world_size != 1):
            raise ValueError(f"world size {self.world_size} with engine {self.engine}")
        if self.rank < 1 or self.micro_batch < 1 or self.seq < 1:
            raise ValueError("rank, micro batch and seq must be >= 1")
        if self.fused and (self.optimizer not in ("mlorc-adamw", "mlorc-lion") or self.scope != "local"):
            raise ValueError("fused applies to mlorc-adamw and mlorc-lion in local scope, got "
                             f"{self.optimizer} with scope {self.scope!r}")
        if self.step_in_backward and (self.optimizer not in ("mlorc-adamw", "mlorc-lion")
                                      or self.scope != "local" or self.engine not in ("single", "fsdp2")):
            raise ValueError("step in backward needs mlorc-adamw or mlorc-lion in local scope, in one process "
                             "or under fsdp2 (DeepSpeed reduces and steps in its engine), got "
                             f"{self.optimizer} with scope {self.scope!r} under {self.engine}")
        if self.param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"param_dtype must be fp32 or bf16, got {self.param_dtype!r}")
        if self.param_dtype == "bf16" and (self.optimizer not in ("mlorc-adamw", "mlorc-lion")
                                           or self.engine not in ("single", "fsdp2") or self.bf16):
            raise ValueError("param_dtype bf16 (bf16 weights written with stochastic rounding, no fp32 master) "
                             "needs mlorc-adamw or mlorc-lion, in one process or under fsdp2, without bf16 "
                             f"(mixed precision); got {self.optimizer} under {self.engine}"
                             + (" with bf16" if self.bf16 else ""))
        # the plan is of a GPU run: fused=None becomes what the optimizer picks on a GPU
        self.fused = (resolve_fused(self.fused, self.scope, {"cuda"})
                      if self.optimizer in ("mlorc-adamw", "mlorc-lion") else False)
        if self.optimizer == "switchlora" and self.engine not in SWITCHLORA_ENGINES:
            raise ValueError(f"SwitchLoRA needs whole W, A and B on every rank, which {self.engine} shards: "
                             f"plan it with engine {', '.join(SWITCHLORA_ENGINES)}")


@dataclass
class Plan:
    settings: PlanSettings
    model: str
    n_params: int
    ranks: list[dict]                  # per rank: category -> bytes (exact categories, engine_buffers, staging)
    activations: dict                  # saved, peak, items
    transients: dict                   # name -> bytes (estimates)
    peak: dict                         # per phase, worst rank
    assumptions: list[str] = field(default_factory=list)
    host: dict = field(default_factory=dict)    # name -> bytes in each process's host memory

    def worst(self, category: str) -> int:
        return max(r[category] for r in self.ranks)

    def total(self, category: str) -> int:
        return sum(r[category] for r in self.ranks)

    def fits(self) -> dict[str, bool]:
        return {f"{g}GB": self.peak["peak"] <= g * GB for g in GPU_SIZES_GB}

    def to_dict(self) -> dict:
        return {"model": self.model, "n_params": self.n_params, "settings": asdict(self.settings),
                "ranks": self.ranks, "activations": self.activations, "transients": self.transients,
                "peak": self.peak, "fits": self.fits(), "host": self.host, "assumptions": self.assumptions}


# --------------------------------------------------------------------------- model
def load_config(model: str, vocab_size: int | None = None):
    """A transformers config from a named shape (mlorc_dist.models.LLAMA_SHAPES, LLaMA-2 vocab
    by default) or from an HF config.json (a file or a directory holding one)."""
    from ..models import LLAMA2_VOCAB_SIZE, LLAMA_SHAPES, llama_config
    if model in LLAMA_SHAPES:
        return llama_config(model, vocab_size or LLAMA2_VOCAB_SIZE)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {model!r} is neither a known shape ({', '.join(LLAMA_SHAPES)}) "
                         "nor an HF config JSON")
    from transformers import AutoConfig
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path}: no model_type in the config")
    config = AutoConfig.for_model(**data)
    if vocab_size:
        config.vocab_size = vocab_size
    config.use_cache = False
    return config


def build_meta_model(config) -> torch.nn.Module:
    """The model on the meta device: shapes only, nothing allocated."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _adapted(model: torch.nn.Module, method: str) -> bool:
    if method == "lora":
        return hasattr(model, "peft_config")
    from ..switchlora import SwitchLoRALinear
    return any(isinstance(m, SwitchLoRALinear) for m in model.modules())


def adapt_meta_model(model: torch.nn.Module, method: str, rank: int) -> torch.nn.Module:
    """A copy of a meta-device model with the adapters of `method` ("lora", "switchlora") of
    `rank`, built by the project's own apply_lora / apply_switchlora (the targets, names and
    order a run gets) inside a meta device context, so that the adapters and SwitchLoRA's
    candidate pools are meta tensors too (nothing allocated). The model itself is left as it is."""
    import copy
    import logging
    if method not in ADAPTERS:
        raise ValueError(f"method must be one of {ADAPTERS}, got {method!r}")
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("adapt_meta_model needs a model on the meta device (build_meta_model)")
    model = copy.deepcopy(model)
    log = logging.getLogger("mlorc_dist")
    level = log.level
    log.setLevel(logging.WARNING)            # apply_* log their parameter counts at INFO
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SwitchLoRA: rank = min(m, n) leaves a layer plain LoRA
            if method == "lora":
                from ..lora import apply_lora
                return apply_lora(model, rank)
            from ..switchlora import apply_switchlora
            return apply_switchlora(model, rank)
    finally:
        log.setLevel(level)


@dataclass(frozen=True)
class _Param:
    name: str
    shape: tuple[int, ...]
    group: int
    lowrank: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _describe(model: torch.nn.Module, compress_embeddings: bool, optimizer: str = "mlorc-adamw"):
    """Param groups exactly as the method builds them (the order DeepSpeed flattens):
    mlorc_dist.param_groups (LoRA: every group dense, as methods.build_optimizer and the
    DeepSpeed "dense" key make it), switchlora_param_groups for SwitchLoRA. Frozen parameters
    are in no group."""
    if optimizer == "switchlora":
        from ..switchlora import switchlora_param_groups
        groups = [dict(g, lowrank=False) for g in switchlora_param_groups(model)]
    else:
        from ..groups import param_groups
        groups = param_groups(model, compress_embeddings=compress_embeddings)
        if optimizer == "lora":
            groups = [dict(g, lowrank=False) for g in groups]
    described = []
    for gi, group in enumerate(groups):
        described.append([_Param(name, tuple(int(d) for d in getattr(p, "ds_shape", p.shape)), gi,
                                 bool(group["lowrank"])) for name, p in group["params"]])
    return described, [bool(g["lowrank"]) for g in groups]


# --------------------------------------------------------------------------- optimizer state
def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _MLorcStatePlanner:
    """Runs the real optimizer's plan and state initialisation on meta tensors."""

    def __init__(self, settings: PlanSettings, lowrank_of_group: list[bool]):
        import mlorc_dist
        groups = [{"params": [torch.empty(2, 2, device="meta")], "lowrank": lowrank}
                  for lowrank in lowrank_of_group]
        if settings.optimizer == "switchlora":
            from ..switchlora import SwitchLoRAAdamW
            self.optimizer = SwitchLoRAAdamW(groups, scope=settings.scope)
            return
        cls = {"mlorc-adamw": mlorc_dist.MLorcAdamW, "mlorc-lion": mlorc_dist.MLorcLion,
               "mofasgd": mlorc_dist.MoFaSGD, "lora": mlorc_dist.MLorcAdamW}[settings.optimizer]
        extra = {} if cls is mlorc_dist.MoFaSGD else {"batched": settings.batched, "fused": settings.fused}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.optimizer = cls(groups, rank=settings.rank, factor_dtype=settings.factor_dtype,
                                 dense_when_no_saving=settings.dense_when_no_saving,
                                 scope=settings.scope, **extra)

    def add(self, tensor: torch.Tensor, layout: Layout, group_index: int, out: dict) -> list:
        opt = self.optimizer
        group = opt.param_groups[group_index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # rank clamping is expected on small blocks
            opt.attach_layout(tensor, layout)
            plans = opt.plan_of(tensor, group, 0)
            state = opt.new_state(tensor, group, 0)
        add_state_bytes(state, out)
        opt.detach_layout(tensor)
        return plans


def _empty_state() -> dict:
    return {"state_factors": 0, "state_dense": 0, "state_scalars": 0}


def _galore_total(params_by_group, settings: PlanSettings, state_bytes: int) -> dict:
    """GaLore (Zhao et al. 2024, Table 1): m r + 2 n r per projected m x n matrix with m <= n
    (projector m x r, Adam moments r x n); AdamW (2 m n) on the rest."""
    out = _empty_state()
    for group in params_by_group:
        for p in group:
            if len(p.shape) == 2 and p.lowrank:
                m, n = sorted(p.shape)
                r = min(settings.rank, m)
                out["state_factors"] += (m * r + 2 * n * r) * state_bytes
            else:
                out["state_dense"] += 2 * p.numel * state_bytes
    return out


# --------------------------------------------------------------------------- engines
def _zero12(params_by_group, settings, world, model_bytes, lowrank_of_group):
    """Per rank: weights, master, grads and the (tensor, layout, group) the optimizer holds."""
    align = 2 * world                      # nccl_start_alignment_factor (2) x world
    names, groups_meta = {}, []
    rows = [dict(weights=0, grads=0, master=0, engine_buffers=0, held=[], staging=0) for _ in range(world)]
    fake = SimpleNamespace(single_partition_of_fp32_groups=[], partition_size=[],
                           round_robin_bit16_groups=[], round_robin_bit16_offsets=[],
                           round_robin_bit16_meta=[], real_dp_process_group=[])
    for gi, group in enumerate(params_by_group):
        total = sum(p.numel for p in group)
        padded = -(-total // align) * align
        size = padded // world
        offsets, cursor, metas = [], 0, []
        for p in group:
            offsets.append(cursor)
            cursor += p.numel
            meta = torch.empty(p.shape, device="meta")
            names[id(meta)] = p.name
            metas.append(meta)
        groups_meta.append(metas)
        fake.partition_size.append(size)
        fake.round_robin_bit16_groups.append(metas)
        fake.round_robin_bit16_offsets.append(offsets)
        fake.round_robin_bit16_meta.append(metas)
        fake.real_dp_process_group.append(None)
        fake.single_partition_of_fp32_groups.append(torch.empty(size, device="meta"))
        for r in range(world):
            row = rows[r]
            row["weights"] += padded * model_bytes
            row["master"] += size * 4
            row["grads"] += size * 4
            # model-dtype gradients kept from backward to step: the whole gradient of every
            # parameter that overlaps the partition (DeepSpeed 0.19's grads_in_partition /
            # averaged_gradients, at stage 1 as at stage 2)
            lo, hi = r * size, (r + 1) * size
            overlapping = sum(p.numel for p, off in zip(group, offsets) if off < hi and off + p.numel > lo)
            row["staging"] += overlapping * model_bytes
    for r in range(world):
        for flat, layout, gi in zero12_layouts(fake, names, lowrank_of_group, r):
            rows[r]["held"].append((torch.empty(flat.numel(), device="meta"), layout, gi))
    return rows


def _zero3(params_by_group, all_params, settings, world, model_bytes, lowrank_of_group):
    names = {}
    persistent = sum(p.numel for p in all_params if p.numel <= settings.param_persistence_threshold)
    sub_groups, sub_to_group = [], {}
    for gi, group in enumerate(params_by_group):        # DeepSpeed _create_fp16_sub_groups
        pn = [-(-p.numel // world) for p in group]
        if settings.sub_group_size >= sum(pn):
            chunks = [group]
        else:
            chunks, current, size = [], [], 0
            for p, n in zip(group, pn):
                current.append(p)
                size += n
                if size >= settings.sub_group_size or p is group[-1]:
                    chunks.append(current)
                    current, size = [], 0
        for chunk in chunks:
            sub_to_group[len(sub_groups)] = gi
            sub_groups.append(chunk)
    fake_groups, flats = [], []
    for chunk in sub_groups:
        members = []
        for p in chunk:
            pn = -(-p.numel // world)
            obj = SimpleNamespace(ds_shape=p.shape, partition_numel=(lambda n=pn: n))
            names[id(obj)] = p.name
            members.append(obj)
        fake_groups.append(members)
        flats.append(torch.empty(sum(-(-p.numel // world) for p in chunk), device="meta"))
    fake = SimpleNamespace(fp32_partitioned_groups_flat=flats, sub_group_to_group_id=sub_to_group,
                           fp16_groups=fake_groups, sub_group_process_groups=[None] * len(flats))
    partition = sum(f.numel() for f in flats)
    comm_buckets = settings.reduce_bucket_size * model_bytes
    rows = []
    for r in range(world):
        held = [(torch.empty(flat.numel(), device="meta"), layout, gi)
                for flat, layout, gi in zero3_layouts(fake, names, lowrank_of_group, r)]
        rows.append(dict(weights=partition * model_bytes + persistent * model_bytes,
                         master=partition * 4,     # always a clone (see the module docstring)
                         grads=partition * 4,
                         engine_buffers=partition * model_bytes + comm_buckets,
                         held=held, staging=0,
                         largest_sub_group=max(f.numel() for f in flats) * 4))
    return rows


def _fsdp2(params_by_group, settings, world, units=None):
    """FSDP2 with fp32 sharded parameters (with --bf16: MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32), the sharded params stay fp32 and are the master); param_dtype bf16: bf16
    shards and gradients, no policy. Step in backward: "grads" is the largest unit's sharded
    gradients, i.e. its reduce-scatter output (padded rows; every sharded grad of the unit views it),
    alive while the unit's hooks step (units: parameter name -> FSDP unit)."""
    nbytes = 2 if settings.param_dtype == "bf16" else 4
    dtype = torch.bfloat16 if nbytes == 2 else torch.float32
    rows = [dict(weights=0, grads=0, master=0, engine_buffers=0, held=[], staging=0) for _ in range(world)]
    unit_grads = [{} for _ in range(world)]
    for group in params_by_group:
        for p in group:
            row_elems = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
            padded_rows = -(-p.shape[0] // world)
            spec = MatrixSpec(p.name, p.shape, p.lowrank and len(p.shape) == 2)
            for r in range(world):
                start, stop = _shard0_row_range(p.shape[0], world, r)
                local = (stop - start) * row_elems
                rows[r]["weights"] += padded_rows * row_elems * nbytes
                rows[r]["grads"] += local * nbytes
                unit = (units or {}).get(p.name, -1)
                unit_grads[r][unit] = unit_grads[r].get(unit, 0) + padded_rows * row_elems * nbytes
                piece = Piece(spec, start * row_elems, stop * row_elems, 0)
                layout = Layout([piece], [spec] if spec.lowrank else [], None, "fsdp2", padding=[])
                rows[r]["held"].append((torch.empty(local, dtype=dtype, device="meta"), layout, p.group))
    if settings.step_in_backward:
        for row, per_unit in zip(rows, unit_grads):
            row["grads"] = max(per_unit.values(), default=0)
    return rows


def _fsdp2_units(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> the FSDP unit launch/train.py wraps it in (mlorc_dist.build.fsdp2_units:
    decoder layers, untied embeddings, the output projection with the final norm): its index
    there, -1 for the root (whatever no unit holds)."""
    from ..build import fsdp2_units
    owner = {id(p): i for i, (_, modules, _) in enumerate(fsdp2_units(model))
             for m in modules for p in m.parameters()}
    return {name: owner.get(id(p), -1) for name, p in model.named_parameters()}


def _fsdp2_unit_numels(model: torch.nn.Module) -> tuple[int, int, int]:
    """(elements of the largest FSDP2 unit, trainable elements of the unit with the most, elements
    left in the root)."""
    from ..build import fsdp2_units
    units = [[p for m in modules for p in m.parameters()] for _, modules, _ in fsdp2_units(model)]
    sizes = [sum(p.numel() for p in unit) for unit in units]
    trainable = [sum(p.numel() for p in unit if p.requires_grad) for unit in units]
    return max(sizes, default=0), max(trainable, default=0), sum(p.numel() for p in model.parameters()) - sum(sizes)


def _single(params_by_group, settings, model_bytes, model_dtype):
    row = dict(weights=0, grads=0, master=0, engine_buffers=0, held=[], staging=0)
    for group in params_by_group:
        for p in group:
            row["weights"] += p.numel * model_bytes
            row["grads"] += p.numel * model_bytes
            spec = MatrixSpec(p.name, p.shape, p.lowrank and len(p.shape) == 2)
            layout = Layout([Piece(spec, 0, p.numel, 0)], [spec] if spec.lowrank else [], None, "plain")
            row["held"].append((torch.empty(p.numel, dtype=model_dtype, device="meta"), layout, p.group))
    if settings.step_in_backward:   # each parameter's gradient is stepped and freed by its own hook
        row["grads"] = max((p.numel for group in params_by_group for p in group), default=0) * model_bytes
    return [row]


# --------------------------------------------------------------------------- the plan
def _frozen_bytes(frozen: list[_Param], engine: str, world: int, model_bytes: int, shard_bytes: int = 4) -> int:
    """Bytes per rank of the parameters no optimizer holds (the same on every rank)."""
    if engine in ("single", "zero1", "zero2"):       # ZeRO-1/2 flatten trainable params only
        return sum(p.numel for p in frozen) * model_bytes
    if engine == "zero3":                            # each its own partition (ds_tensor)
        return sum(-(-p.numel // world) for p in frozen) * model_bytes
    total = 0                                        # fsdp2: padded Shard(0), fp32 (or bf16 params)
    for p in frozen:
        row_elems = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
        total += -(-p.shape[0] // world) * row_elems * shard_bytes
    return total


def _switchlora_host_bytes(model: torch.nn.Module) -> int:
    """Candidate pools (fp32, as built on the fp32 model before any engine casts it) and the
    per-layer slot / busy indices (int64) of every SwitchLoRA layer: host memory of each process."""
    from ..switchlora import switchlora_layers
    total = 0
    for _, layer in switchlora_layers(model):
        total += (layer.cand_A.numel() + layer.cand_B.numel()) * 4
        total += (layer.selected_A.numel() + layer.selected_B.numel() + layer.busy_until.numel()) * 8
    return total


def plan_model(model: torch.nn.Module, config, settings: PlanSettings, model_name: str = "?") -> Plan:
    """Plan `model` (on the meta device). For lora / switchlora a model without those adapters
    is adapted first (adapt_meta_model, on a copy)."""
    settings.validate()
    world = settings.world_size
    engine = settings.engine
    adapter = settings.optimizer if settings.optimizer in ADAPTERS else None
    if adapter and not _adapted(model, adapter):
        model = adapt_meta_model(model, adapter, settings.rank)
    params_by_group, lowrank_of_group = _describe(model, settings.compress_embeddings, settings.optimizer)
    all_params = [_Param(n, tuple(p.shape), -1, False) for n, p in model.named_parameters()]
    frozen = [_Param(n, tuple(p.shape), -1, False) for n, p in model.named_parameters() if not p.requires_grad]
    n_params = sum(p.numel for p in all_params)
    n_trainable = n_params - sum(p.numel for p in frozen)
    param_bf16 = settings.param_dtype == "bf16"
    model_dtype = torch.bfloat16 if settings.bf16 or param_bf16 else torch.float32
    model_bytes = _dtype_bytes(model_dtype)
    shard_bytes = 2 if param_bf16 else 4             # FSDP2's sharded parameters and gradients
    assumptions = []

    if engine in ("zero1", "zero2"):
        rows = _zero12(params_by_group, settings, world, model_bytes, lowrank_of_group)
    elif engine == "zero3":
        rows = _zero3(params_by_group, all_params, settings, world, model_bytes, lowrank_of_group)
    elif engine == "fsdp2":
        rows = _fsdp2(params_by_group, settings, world, _fsdp2_units(model))
    else:
        rows = _single(params_by_group, settings, model_bytes, model_dtype)
    if frozen:
        frozen_bytes = _frozen_bytes(frozen, engine, world, model_bytes, shard_bytes)
        for row in rows:
            row["weights"] += frozen_bytes
            row["frozen_weights"] = frozen_bytes      # a part of weights, shown on its own
        assumptions.append(
            "frozen parameters (%s elements; requires_grad False) are in weights, with no gradient, "
            "master or state: %s" % (f"{sum(p.numel for p in frozen):,}", {
                "single": "whole, model dtype",
                "zero1": "whole in every rank's module, model dtype (ZeRO-1/2 flatten and partition "
                         "trainable parameters only)",
                "zero2": "whole in every rank's module, model dtype (ZeRO-1/2 flatten and partition "
                         "trainable parameters only)",
                "zero3": "partitioned like the others, ceil(numel / world) elements each (their own "
                         "ds_tensor, outside the flat buffers), plus whole copies of those <= the "
                         "persistence threshold",
                "fsdp2": "sharded like the others (padded Shard(0) rows, fp32)"}[engine]))

    # ---- optimizer state, per rank
    largest_held = 0
    held_bytes = rows[0]["held"][0][0].element_size() if rows[0]["held"] else 4
    mlorc_workspace = 0       # elements (fp32 copies of one element) of the worst step() call
    if settings.optimizer.startswith("mlorc") or settings.optimizer in ("mofasgd", "lora", "switchlora"):
        planner = _MLorcStatePlanner(settings, lowrank_of_group)
        table = {"mofasgd": MOFASGD_STEP_WORKSPACE,
                 "switchlora": SWITCHLORA_STEP_WORKSPACE}.get(settings.optimizer, MLORC_STEP_WORKSPACE)
        ws = (FUSED_STEP_WORKSPACE if settings.fused else table)[2 if held_bytes == 2 else 4]
        batched = settings.batched and settings.optimizer != "mofasgd"
        for row in rows:
            state = _empty_state()
            calls: dict = {}      # DeepSpeed: one step() per flat tensor; FSDP2/single: one per step
            for i, (tensor, layout, gi) in enumerate(row["held"]):   # (step in backward: per tensor)
                one_call = engine in ("single", "fsdp2") and not settings.step_in_backward
                call = calls.setdefault(0 if one_call else i,
                                        {"batches": {}, "global": [], "global_max": 0, "dense": 0})
                for plan in planner.add(tensor, layout, gi, state):
                    if plan.mode == "local":
                        numel = plan.body_rows * plan.piece.matrix.cols
                        batch = call["batches"].setdefault((gi, plan.body_rows, plan.piece.matrix.cols,
                                                            plan.rank), [0, 0])
                        batch[0] += numel
                        batch[1] = numel
                        call["dense"] = max(call["dense"], plan.head, plan.tail)
                    elif plan.mode == "global":
                        numel = plan.piece.row_count * plan.piece.matrix.cols
                        whole = plan.piece.matrix.rows * plan.piece.matrix.cols
                        batches = call["global"]   # [whole-matrix elements, this rank's] per batch
                        if not batches or (batches[-1][0] and batches[-1][0] + whole > BATCH_ELEMENTS):
                            batches.append([0, 0])
                        batches[-1][0] += whole
                        batches[-1][1] += numel
                        call["global_max"] = max(call["global_max"], numel)
                    else:
                        call["dense"] = max(call["dense"], plan.piece.numel)
            kept_groups = []      # fused: (bodies, elements per body) of each batch key, all calls
            for call in calls.values():
                local = 0                 # one batch alive at a time (the optimizer frees each)
                for total, one in call["batches"].values():
                    count = total // one if batched else 1
                    kept_groups.append((count, one))
                    # the largest batch, by optim.base's rule for a GPU (the planner plans GPU runs)
                    batch = one * max(len(c) for c in batch_chunks(
                        list(range(count)), body_numel=one, device_type="cuda",
                        max_elements=batch_cap(settings.fused, "cuda")))
                    if batch == one:
                        local = max(local, ws["unbatched"] * one)
                    else:
                        local = max(local, ws["batch"] * batch + ws["block"] * one)
                # one batch of matrices alive at a time (the matrices this rank holds no rows of
                # also count towards the optimizer's batches: this can only overestimate)
                glob = ws["global"] * max(mine for _, mine in call["global"]) + ws["global_block"] * call["global_max"] \
                    if call["global"] else 0
                mlorc_workspace = max(mlorc_workspace, local, glob, ws["dense"] * call["dense"])
            if settings.fused:    # V and the stacked gradients (fp32) and weights, kept between steps
                kept = fused_kept_elements(kept_groups, "cuda", planner.optimizer.fused_buffers)
                row["fused_buffers"] = 4 * (kept["moment"] + kept["gradient"]) + held_bytes * kept["weight"]
            row.update(state)
    elif settings.optimizer == "adamw":
        for row in rows:
            state, per_group = _empty_state(), {}
            for i, (tensor, _, gi) in enumerate(row["held"]):
                nbytes = tensor.numel() * tensor.element_size()
                state["state_dense"] += 2 * nbytes
                state["state_scalars"] += 4
                key = i if engine == "zero3" else gi     # ZeRO-3 steps one sub-group per call
                per_group[key] = per_group.get(key, 0) + nbytes
            largest_held = max([largest_held, *per_group.values()])
            row.update(state)
    else:   # galore
        state_bytes = model_bytes if engine == "single" else 4
        total = _galore_total(params_by_group, settings, state_bytes)
        for row in rows:
            row.update({k: (v if engine == "single" else -(-v // world)) for k, v in total.items()})
        if engine != "single":
            assumptions.append("GaLore: the paper's state formula, shown as total / world (an ideal "
                               "split), fp32 (the DeepSpeed/FSDP2 master dtype); mlorc_dist.GaLoreAdamW "
                               "projects each rank's own rows, whose state is close to that split")

    # ---- activations (one micro-batch per rank)
    act_bytes = 2 if settings.bf16 or param_bf16 else 4
    targets = sum(1 for p in all_params if p.name.endswith(".lora_A") or ".lora_A." in p.name)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    items, extra = llama_activation_items(
        config, settings.micro_batch, settings.seq, act_bytes, settings.activation_checkpointing,
        adapter=adapter, adapter_rank=settings.rank,
        adapter_targets=targets // layers if adapter and layers else 0,
        linear_saves_input=engine == "zero3")
    saved = sum(i.bytes for i in items)
    activations = {"saved": saved, "peak": saved + extra, "extra_at_backward_peak": extra,
                   "items": [asdict(i) for i in items]}

    # ---- transients (estimates) and the peak
    transients = {}
    layer_numel = _largest_layer_numel(model)
    layer_grads = _largest_layer_numel(model, trainable=True)
    if engine == "zero2" or engine == "zero1":
        overlap = settings.overlap_comm if settings.overlap_comm is not None else False
        transients["reduce bucket(s)"] = settings.reduce_bucket_size * model_bytes * (2 if overlap else 1)
    if engine == "zero1":
        transients["full gradients before the reduction (ZeRO-1)"] = n_trainable * model_bytes
    if engine == "zero3":
        prefetch = min(settings.prefetch_bucket_size, layer_numel)
        transients["gathered params (one layer + prefetch bucket)"] = \
            (layer_numel + prefetch) * model_bytes
        transients["unsharded layer grads before the reduce"] = layer_grads * model_bytes
    if engine == "fsdp2":
        unit_numel, layer_grads, root_numel = _fsdp2_unit_numels(model)
        transients["unsharded root (what no unit holds: tied embeddings, final norm)"] = root_numel * model_bytes
        transients["unsharded unit params (the largest unit: current + prefetch)"] = 2 * unit_numel * model_bytes
        reduce_bytes = shard_bytes      # reduce_dtype fp32 with --bf16; no policy: the param dtype
        if settings.step_in_backward:   # the reduce-scatter output is the grads category
            transients[f"unsharded unit grads + {'bf16' if param_bf16 else 'fp32'} reduce-scatter in"] = \
                layer_grads * (model_bytes + reduce_bytes)
        else:
            transients[f"unsharded unit grads + {'bf16' if param_bf16 else 'fp32'} reduce-scatter in/out"] = int(
                layer_grads * (model_bytes + reduce_bytes + reduce_bytes / world))
    if settings.optimizer.startswith("mlorc") and settings.fused:
        transients["step workspace (MLorc fused: factors and sketches; bf16: fp32 gradient copies)"] = \
            int(mlorc_workspace * 4)
    elif settings.optimizer.startswith("mlorc") and settings.step_in_backward:
        transients["step workspace (MLorc in backward: one tensor per step, fp32)"] = int(mlorc_workspace * 4)
    elif settings.optimizer.startswith("mlorc"):
        transients["step workspace (MLorc: batched rebuild of same-shaped blocks, fp32)"] = \
            int(mlorc_workspace * 4)
    elif settings.optimizer == "mofasgd":
        transients["step workspace (MoFaSGD: one block's factor update; bf16: its fp32 casts)"] = int(mlorc_workspace * 4)
    elif settings.optimizer == "lora":
        transients["step workspace (AdamW on the adapters, dense: one piece at a time)"] = int(mlorc_workspace * 4)
    elif settings.optimizer == "switchlora":
        transients["step workspace (SwitchLoRA per-element AdamW: one piece at a time)"] = int(mlorc_workspace * 4)
    elif settings.optimizer == "adamw":
        transients["step workspace (AdamW foreach: 1x the largest param group)"] = \
            int(ADAMW_FOREACH_WORKSPACE * largest_held)
    fwd_extra = sum(v for k, v in transients.items() if not k.startswith("step workspace"))
    step_extra = sum(v for k, v in transients.items() if k.startswith("step workspace"))

    phases = []
    for row in rows:
        persistent = (row["weights"] + row["master"] + row["state_factors"] + row["state_dense"]
                      + row["state_scalars"] + row["engine_buffers"] + row.get("fused_buffers", 0))
        grads_bwd = row["grads"] if engine in ("single", "fsdp2") else 0
        grads_step = row.get("largest_sub_group", row["grads"])
        fwd_bwd = persistent + activations["peak"] + row["staging"] + grads_bwd + fwd_extra
        if settings.step_in_backward:   # the steps run inside backward
            fwd_bwd += step_extra
        step = persistent + grads_step + row["staging"] + step_extra
        phases.append((max(fwd_bwd, step), fwd_bwd, step, persistent))
    worst = max(phases)
    peak = {"peak": int(worst[0]), "forward_backward": int(worst[1]), "step": int(worst[2]),
            "persistent": int(worst[3])}

    assumptions += [
        "exact (same rules as the engines, checked against real jobs): weights, grads, master, "
        "optimizer state, ZeRO-3 engine buffers",
        f"activations: saved-for-backward bytes of one micro-batch ({settings.micro_batch} x "
        f"{settings.seq}) of an HF Llama with a flash-style sdpa kernel, plus the logits the "
        "output holds; the backward peak adds the fp32 logits gradient"
        + (" and one recomputed layer" if settings.activation_checkpointing else ""),
        "grad staging (model dtype, backward to step; exact, checked after backward): ZeRO-1/2 "
        "keep the whole gradient of every parameter overlapping the partition",
        "transients are estimates: DeepSpeed reduce bucket = reduce_bucket_size elements (ZeRO-1 "
        "also holds every gradient before its reduction); ZeRO-3 one decoder layer gathered + the "
        "stage3_prefetch_bucket_size elements (at most a layer) + that layer's unsharded grads; FSDP2 root unsharded through "
        "forward/backward (what no unit holds: tied embeddings), the largest unit (a decoder layer, "
        "untied embeddings, the output projection) unsharded twice (current + prefetch), its "
        "unsharded grads and fp32 reduce-scatter buffers",
        "step workspace, measured with torch.profiler's memory timeline on CPU "
        "(mlorc_dist.memory.workspace) and on an H100 (the same), in fp32 copies of a block: "
        "MLorc-AdamW local batched (default) 2 B + %.2f for the B same-shaped blocks of one "
        "step() call (%.2f for bf16 params), plus 2 B of the previous batch, still alive; "
        "unbatched %.2f (%.2f), global 4.125 x the blocks of one batch of matrices, dense regions "
        "%.2f (%.2f); torch AdamW with foreach (the CUDA default) 1.00x all the tensors of a "
        "param group at once (2.00x one tensor with the for-loop); GaLore's is not counted"
        % (MLORC_STEP_WORKSPACE[4]["block"], MLORC_STEP_WORKSPACE[2]["block"],
           MLORC_STEP_WORKSPACE[4]["unbatched"], MLORC_STEP_WORKSPACE[2]["unbatched"],
           MLORC_STEP_WORKSPACE[4]["dense"], MLORC_STEP_WORKSPACE[2]["dense"]),
        "peak = max(forward/backward, step) of the worst rank; ZeRO-3 steps one sub-group's "
        "fp32 gradient at a time",
        "fits: peak <= nominal size x 1e9 bytes (real totals are 5-7% higher, left for the CUDA "
        "context, communicator buffers and allocator fragmentation)",
    ]
    if settings.fused:
        assumptions.append(
            "fused step (fused=True): per step %.2f (bf16 params %.2f) fp32 copies of each body of "
            "a batch; kept between steps: V (MLorc-AdamW) as large as the largest batch or lone "
            "body and the stacked gradients of the largest batch of two or more, fp32, and as many "
            "stacked weights in the weights' dtype, with the GPU batching rule (same-shaped "
            "bodies up to 2^26 elements per batch)"
            % (FUSED_STEP_WORKSPACE[4]["batch"], FUSED_STEP_WORKSPACE[2]["batch"]))
    if engine == "fsdp2" and settings.bf16:
        assumptions.append("fsdp2 --bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); "
                           "sharded params, grads and optimizer state stay fp32")
    if settings.param_dtype == "bf16":
        assumptions.append("param_dtype bf16: weights and gradients bf16, no fp32 master (the optimizer writes "
                           "each weight with stochastic rounding); MLorc's factors and dense state fp32"
                           + ("; FSDP2 without a MixedPrecisionPolicy: bf16 shards, all-gathers and "
                              "reduce-scatters" if engine == "fsdp2" else ""))
    if settings.step_in_backward:
        assumptions.append(
            "step in backward (mlorc_dist.step_in_backward): each tensor is stepped by its post-accumulate-grad "
            "hook and its gradient freed; grads = the largest set alive when a hook steps (exact, measured at "
            "the hooks): " + ("one unit's sharded gradients, i.e. the padded reduce-scatter output of the "
                              "largest FSDP unit (a decoder layer, the embeddings, the output or the root), which they view"
                              if engine == "fsdp2" else "the largest single parameter's gradient")
            + "; the step workspace is one tensor's (no batching) and counts in the backward phase")
    if engine == "single" and settings.bf16:
        assumptions.append("single --bf16: pure bf16 (weights, grads and torch AdamW state in bf16, "
                           "no master copy); MLorc keeps fp32 factors and dense state")
    host = {}
    if adapter == "lora":
        assumptions.append(
            f"LoRA (peft, mlorc_dist.lora.apply_lora): rank {settings.rank} adapters A (r x n) and B "
            f"(m x r) on {targets} linears (q/k/v/o/gate/up/down), everything else frozen; AdamW on the "
            "adapters through MLorcAdamW with every group dense (methods.build_optimizer, the DeepSpeed "
            "'dense' key): 2 fp32 moments per adapter element; adapters in the model dtype (DeepSpeed "
            "and FSDP2 cast them with the model); step workspace: MLorcAdamW's dense regions, "
            "%.2f (bf16 params %.2f) fp32 copies of the largest piece"
            % (MLORC_STEP_WORKSPACE[4]["dense"], MLORC_STEP_WORKSPACE[2]["dense"]))
    if adapter == "switchlora":
        host["SwitchLoRA candidate pools + slot indices"] = _switchlora_host_bytes(model)
        assumptions.append(
            f"SwitchLoRA (mlorc_dist.switchlora): rank {settings.rank} A and B on {targets} linears whose "
            "W and b are frozen; embeddings, lm_head and norms keep training; SwitchLoRAAdamW holds 4 "
            "fp32 numbers per trainable element (exp_avg, exp_avg_sq, the per-element step count "
            "and freeze countdown); its candidate pools (K = min(m, n) candidates a side per layer, "
            "fp32) and slot indices live in host memory, replicated in every process: not in the GPU "
            "peak, shown under 'host'; step workspace (per_element_adamw_, measured with memory.workspace): "
            "%.2f (bf16 params %.2f) fp32 copies of the largest piece"
            % (SWITCHLORA_STEP_WORKSPACE[4]["dense"], SWITCHLORA_STEP_WORKSPACE[2]["dense"]))
    ranks = [{k: int(v) for k, v in row.items() if k not in ("held", "largest_sub_group")} for row in rows]
    return Plan(settings, model_name, n_params, ranks, activations, transients, peak, assumptions, host)


def _largest_layer_numel(model, trainable: bool = False) -> int:
    """Elements of the largest decoder layer (found by class name, so that adapter wrappers
    such as peft's PeftModel do not hide them); trainable=True: its trainable ones only."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        layers = getattr(getattr(model, "model", model), "layers", None)
    if not layers:
        return 0
    return max(sum(p.numel() for p in layer.parameters() if p.requires_grad or not trainable)
               for layer in layers)


def plan(model: str, settings: PlanSettings, vocab_size: int | None = None) -> Plan:
    """Plan a named shape or an HF config JSON."""
    config = load_config(model, vocab_size)
    meta = build_meta_model(config)
    return plan_model(meta, config, settings, model)


# zero_optimization keys of a DeepSpeed config -> the PlanSettings fields they set
ZERO_SIZE_KEYS = {"reduce_bucket_size": "reduce_bucket_size", "overlap_comm": "overlap_comm",
                  "stage3_param_persistence_threshold": "param_persistence_threshold",
                  "sub_group_size": "sub_group_size", "stage3_prefetch_bucket_size": "prefetch_bucket_size"}


def plan_for_run(config, *, engine: str, world_size: int, optimizer: str, rank: int, micro_batch: int,
                 seq: int, bf16: bool = False, activation_checkpointing: bool = False, scope: str = "local",
                 fused: bool | None = None, compress_embeddings: bool = False, model_name: str | None = None,
                 step_in_backward: bool = False, param_dtype: str = "fp32", zero: dict | None = None) -> Plan:
    """The plan of one training run, for a launcher's dry run: `config` is an HF config object
    (what the run builds its model from), the model is built from it on the meta device as plan()
    does (adapters too, for lora / switchlora, with `rank`). engine: single, zero1, zero2, zero3 or
    fsdp2; optimizer: one of OPTIMIZERS. Everything else is PlanSettings' defaults (DeepSpeed's
    bucket and threshold defaults). ValueError for a combination the run refuses too (SwitchLoRA
    with zero3 / fsdp2, fused with another optimizer or global scope, step in backward or bf16
    params outside MLorc / one process / fsdp2). `zero`: a DeepSpeed config's zero_optimization
    block as the run resolves it ("auto" sizes filled): its bucket sizes, overlap_comm,
    persistence threshold and sub_group_size replace DeepSpeed's defaults."""
    zero = zero or {}
    sizes = {field: bool(zero[key]) if field == "overlap_comm" else int(zero[key])
             for key, field in ZERO_SIZE_KEYS.items() if key in zero}
    settings = PlanSettings(engine=engine, world_size=world_size, optimizer=optimizer, rank=rank,
                            micro_batch=micro_batch, seq=seq, bf16=bf16,
                            activation_checkpointing=activation_checkpointing, scope=scope, fused=fused,
                            compress_embeddings=compress_embeddings, step_in_backward=step_in_backward,
                            param_dtype=param_dtype, **sizes)
    settings.validate()                 # before building anything
    name = model_name or getattr(config, "_name_or_path", None) or getattr(config, "model_type", "?")
    return plan_model(build_meta_model(config), config, settings, name)


# --------------------------------------------------------------------------- CLI
def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _fits_text(p: Plan) -> str:
    fits = p.fits()
    return "/".join(str(g) for g in GPU_SIZES_GB) + " GB: " + "/".join(
        "yes" if fits[f"{g}GB"] else "no" for g in GPU_SIZES_GB)


def peak_line(p: Plan) -> str:
    """One line: 'per-GPU peak X GB (worst rank; fits: 24/40/80/141 GB: no/yes/yes/yes)', with
    the host memory each process needs on top where the method keeps some (SwitchLoRA's pools)."""
    line = f"per-GPU peak {_gb(p.peak['peak'])} GB (worst rank; fits: {_fits_text(p)})"
    if p.host:
        line += f"; host memory per process {_gb(sum(p.host.values()))} GB (" + ", ".join(p.host) + ")"
    return line


def format_plan(p: Plan, verbose: bool = False) -> str:
    s = p.settings
    worst_rank = max(range(len(p.ranks)), key=lambda r: sum(v for k, v in p.ranks[r].items()
                                                             if k != "frozen_weights"))
    row = p.ranks[worst_rank]
    lines = [f"{p.model}: {p.n_params / 1e9:.3f}B parameters | engine {s.engine}, world {s.world_size}, "
             f"{s.optimizer}" + (f" r={s.rank}" if s.optimizer != "adamw" else "")
             + f", micro-batch {s.micro_batch} x seq {s.seq}, "
             + ("bf16 params (no master)" if s.param_dtype == "bf16" else "bf16" if s.bf16 else "fp32")
             + (", step in backward" if s.step_in_backward else "")
             + (", activation checkpointing" if s.activation_checkpointing else ""),
             f"per GPU (GB = 1e9 bytes; rank {worst_rank}, the largest):"]
    state = row["state_factors"] + row["state_dense"] + row["state_scalars"]
    weights_name = (f"weights (frozen base {_gb(row['frozen_weights'])})" if "frozen_weights" in row
                    else "weights")
    grads_name = ("gradients (step in backward: largest set alive)" if s.step_in_backward
                  else "gradients (optimizer view)")
    table = [(weights_name, row["weights"]), (grads_name, row["grads"]),
             ("fp32 master", row["master"]),
             (f"optimizer state (factors {_gb(row['state_factors'])}, "
              f"dense {_gb(row['state_dense'] + row['state_scalars'])})", state),
             ("engine buffers (persistent)", row["engine_buffers"]),
             *([("fused step buffers (V, stacked grads and weights; kept between steps)", row["fused_buffers"])]
               if "fused_buffers" in row else []),
             ("grad staging (backward -> step)", row["staging"]),
             ("activations (saved, one micro-batch)", p.activations["saved"]),
             ("activations (backward peak)", p.activations["peak"])]
    table += [(f"transient: {k}", v) for k, v in p.transients.items()]
    width = max(len(k) for k, _ in table)
    lines += [f"  {k:<{width}}  {_gb(v):>9}" for k, v in table]
    lines.append(f"  {'PEAK':<{width}}  {_gb(p.peak['peak']):>9}   (forward/backward "
                 f"{_gb(p.peak['forward_backward'])}, step {_gb(p.peak['step'])})")
    lines.append("fits on: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in p.fits().items()))
    for k, v in p.host.items():
        lines.append(f"host memory, every process (not GPU): {k} {_gb(v)} GB")
    lines.append(peak_line(p))
    if verbose:
        lines.append("activation items:")
        lines += [f"  {i['name']}: {_gb(i['bytes'])} GB ({i['formula']})" for i in p.activations["items"]]
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mlorc_dist.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a shape (tiny, demo, 100m, llama-7b, llama-13b, "
                    "llama-70b) or an HF config.json")
    ap.add_argument("--vocab-size", type=int, default=None, help="named shapes: default 32000")
    ap.add_argument("--engine", choices=ENGINES, default="zero2")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="mlorc-adamw",
                    help="the method, as launch/train.py names it (lora, switchlora: adapters)")
    ap.add_argument("--rank", "--lora-rank", dest="rank", type=int, default=4,
                    help="rank r of the method: of the momentum factors (MLorc, MoFaSGD), the "
                    "projection (GaLore) or the adapters (lora, switchlora; --lora-rank is the same)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--scope", choices=("local", "global"), default="local")
    ap.add_argument("--factor-dtype", choices=("fp32", "bf16"), default=None)
    ap.add_argument("--compress-embeddings", action="store_true")
    ap.add_argument("--reduce-bucket-size", type=int, default=500_000_000)
    ap.add_argument("--no-batched", action="store_true", help="MLorc with batched=False")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                    help="MLorc with fused=True (its kept buffers and step workspace); --no-fused: "
                    "fused=False; default: what fused=None picks on a GPU")
    ap.add_argument("--step-in-backward", action="store_true", help="each tensor stepped by its gradient "
                    "hook during backward, its gradient freed (MLorc, local scope; single or fsdp2)")
    ap.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: bf16 weights and "
                    "gradients, no fp32 master (MLorc; single or fsdp2; instead of --bf16)")
    ap.add_argument("--json", type=Path, default=None, help="also write the plan as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="activation items and assumptions")
    return ap


def main(argv=None) -> Plan:
    args = build_parser().parse_args(argv)
    settings = PlanSettings(engine=args.engine, world_size=args.world_size, optimizer=args.optimizer,
                            rank=args.rank, micro_batch=args.micro_batch, seq=args.seq, bf16=args.bf16,
                            activation_checkpointing=args.activation_checkpointing, scope=args.scope,
                            factor_dtype=args.factor_dtype, compress_embeddings=args.compress_embeddings,
                            reduce_bucket_size=args.reduce_bucket_size, batched=not args.no_batched,
                            fused=args.fused, step_in_backward=args.step_in_backward,
                            param_dtype=args.param_dtype)
    result = plan(args.model, settings, args.vocab_size)
    print(format_plan(result, args.verbose))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
