"""SwitchLoRA (arXiv 2406.06564): LoRA for pretraining whose factors keep being switched.

Each chosen Linear y = W x + b becomes y = W x + b + s B A x with W and b frozen and A (r x n),
B (m x r) trained. Every step, about r / interval rows of A and as many columns of B are
swapped with vectors from per-layer candidate pools (K = min(m, n) slots a side, kept on the
CPU). Before A[i] is replaced by C[j],

    W += s B[:, i] (A[i] - C[j])             (a column of B: W += s (B[:, i] - C[:, j]) A[i])

so the layer computes exactly the same function (to rounding); the old A[i] goes back into the
pool. The counterpart of a switched vector (B[:, i] when A[i] was switched, and vice versa) has
its AdamW state (m, v and its own step count) zeroed and is frozen for `freeze_steps` (5)
optimizer steps. The switching rate starts at 1 / interval0 (interval0 = 40) and decays
exponentially so that it is 0.3 times that at 10% of training (`switch_rate`).

Use, single process or DDP (ZeRO-1/2 below):

    model = apply_switchlora(build_model(config, seed=0), rank=128)     # before DDP wrapping
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model), lr=1e-2)
    for step in range(total_steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        switch_step(model, optimizer, step, total_steps)    # once per optimizer step
        optimizer.step()
        optimizer.zero_grad()

switch_step must run once per optimizer step with `step` counting optimizer steps; it may run
between backward and step (as the reference does: the gradient of a switched A[i] is
s B[:, i]^T G, which does not depend on A[i], so it is still exact after the switch, and the
stale gradient of its counterpart is never applied since the counterpart is frozen) or right
after optimizer.step(). Either way the counterpart skips the next `freeze_steps` optimizer steps.

Every random choice (how many vectors, which ones, which candidates) comes from a generator
seeded with (seed, step, layer name), and every input to the switch (the model's A, B, W and
the pools) is replicated, so DDP and ZeRO-1/2 ranks switch identically with no communication.

DeepSpeed ZeRO-1/2: build SwitchLoRAAdamW on switchlora_param_groups(model), pass it to
deepspeed.initialize (with "zero_allow_untested_optimizer": true), then
mlorc_dist.deepspeed.attach_layouts(engine, optimizer), and call switch_step(engine, optimizer,
...) between engine.backward and engine.step, or after engine.step (the engine's own
optimizer wrapper is accepted for `optimizer` too). Note that DeepSpeed 0.19 clips the gradient
norm to 1.0 unless the config sets "gradient_clipping" (DDP does not clip). The model's
parameters are full replicas but the optimizer steps fp32 flat partitions: switch_step writes
the new A and B into this rank's partitions (SwitchLoRAAdamW.load_values), otherwise DeepSpeed
would copy the old values back after the step. ZeRO-3 and FSDP shard W, A and B, and the switch
needs whole vectors and whole W: refused with a ValueError.

Choices, compared with the reference code (asfsdsf/SwitchLoRA):
- Initialisation: the pools are uniform, with A's and B's standard deviations chosen so that
  s B A has the standard deviation of nn.Linear's default (Kaiming-uniform) init while
  std(A) / std(B) = (m / n)^(1/4) (the reference's balance of B dA against dB A). A's rows and
  B's columns start as pool slots 0..r-1 and W -= s B A, so applying SwitchLoRA leaves the
  model's output unchanged (the reference subtracts the same product).
- Selection: which vectors switch and which candidates replace them are both random (the
  reference's default walks both round-robin; its --discontinuous_switch draws candidates at
  random). A rank-1 component i whose counterpart is frozen is not switched again until the
  freeze ends (the reference's pointer arithmetic guarantees the same).
- Reset: only the frozen counterpart's state is zeroed, as the reference does (its
  zero_lora_states zeroes the vectors just fixed); the switched vector keeps its state, whose
  gradient history is still that of its slot (the gradient above does not depend on A[i]).
- Freezing: the reference zeroes the counterpart's gradient for 5 steps, while Adam keeps
  counting steps and applying weight decay to it; here the update is skipped outright (value,
  m, v and step count unchanged), so its bias correction starts from 1 when it moves again.
- Schedule: rate(t) = 0.3^(t / (0.1 T)), so rate(0) = 1 exactly (the reference uses t + 1). A
  fractional expected count is rounded stochastically, as in the reference.
- AdamW: torch.optim.AdamW's conventions (decay before the update, eps after the bias
  correction of sqrt(v)) with a step count per element, as the reference's StepAdamW (per row
  of A, per column of B). Without switches SwitchLoRAAdamW equals torch.optim.AdamW.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import sketch_seed
from .optim.base import LowRankMomentumOptimizer, _flat

__all__ = [
    "DEFAULT_TARGETS",
    "SwitchLoRALinear",
    "apply_switchlora",
    "switchlora_layers",
    "switchlora_summary",
    "switchlora_param_groups",
    "switch_rate",
    "expected_switches",
    "switch_count",
    "switch_step",
    "switch_layer",
    "SwitchLoRAAdamW",
    "per_element_adamw_",
    "switchlora_state_dict",
    "load_switchlora_state_dict",
    "merge_switchlora",
]

logger = logging.getLogger("mlorc_dist")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FREEZE_STEPS = 5
INTERVAL0 = 40
_KAIMING_GAIN = math.sqrt(2.0 / (1.0 + 5.0))   # nn.Linear's default: kaiming_uniform_(a=sqrt(5))


# --------------------------------------------------------------------------- the layer
def init_bounds(out_features: int, in_features: int, rank: int, scale: float) -> tuple[float, float]:
    """Uniform bounds (A, B) of the candidate pools.

    std(s B A) = s sqrt(r) std_A std_B is set to gain / sqrt(n), nn.Linear's default init, and
    std_A / std_B = (m / n)^(1/4). With s = 1 / r this is the reference's formula."""
    m, n = out_features, in_features
    product = _KAIMING_GAIN / (scale * math.sqrt(rank) * math.sqrt(n))     # std_A * std_B
    ratio = (m / n) ** 0.25                                                 # std_A / std_B
    std_a, std_b = math.sqrt(product * ratio), math.sqrt(product / ratio)
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


class SwitchLoRALinear(nn.Module):
    """y = W x + b + s B A x with W, b frozen, A (r x n) and B (m x r) trainable, and candidate
    pools for switching (see the module docstring for the rules and the initialisation).

    Not parameters and not buffers (so DDP never broadcasts them and .to() leaves them on the
    CPU): `cand_A` (K x n, its rows are candidates for rows of A), `cand_B` (m x K, its columns
    are candidates for columns of B), `selected_A` / `selected_B` (r,) the pool slot each row of
    A / column of B came from (that slot's stored value is stale while it is in use), and
    `busy_until` (r,): rank-1 component i may switch again from that step on. `name` is the
    layer's path in the model, which seeds its pools and its switches.
    """

    def __init__(self, base: nn.Linear, rank: int, *, scale: float | None = None, seed: int = 0,
                 name: str = ""):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"SwitchLoRALinear replaces an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number or None (1 / rank), got {scale!r}")
        weight = base.weight
        self.out_features, self.in_features = weight.shape
        self.rank = rank
        self.scale = 1.0 / rank if scale is None else float(scale)
        self.name = name
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

        m, n, k = self.out_features, self.in_features, min(self.out_features, self.in_features)
        self.pool_size = k
        if rank > k:
            raise ValueError(f"SwitchLoRA layer {name or '?'}: rank {rank} exceeds min(out, in) = {k}")
        if k == rank:
            warnings.warn(f"SwitchLoRA layer {name or '?'}: rank {rank} >= min(out, in) = {k}, the "
                          "pool has no free candidate: this layer is plain LoRA and never switches",
                          stacklevel=2)
        bound_a, bound_b = init_bounds(m, n, rank, self.scale)
        generator = torch.Generator().manual_seed(sketch_seed(seed, 0, name, 0, 0))

        def uniform(rows: int, cols: int, bound: float) -> torch.Tensor:   # U(-bound, bound), CPU
            values = torch.rand(rows, cols, generator=generator).mul_(2.0 * bound).sub_(bound)
            return values.to(weight.dtype)

        self.cand_A = uniform(k, n, bound_a)                                # (K, n)
        self.cand_B = uniform(m, k, bound_b)                                # (m, K)
        self.selected_A = torch.arange(rank)           # A's rows and B's columns start as slots 0..r-1
        self.selected_B = torch.arange(rank)
        self.busy_until = torch.zeros(rank, dtype=torch.long)
        self.lora_A = nn.Parameter(self.cand_A[:rank].to(weight.device).clone(memory_format=torch.contiguous_format))      # (r, n)
        self.lora_B = nn.Parameter(self.cand_B[:, :rank].to(weight.device).clone(memory_format=torch.contiguous_format))   # (m, r)
        with torch.no_grad():
            self.weight.sub_(self._scaled_product(self.lora_B, self.lora_A))

    def _scaled_product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """s left @ right in at least fp32, cast to W's dtype."""
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.scale * (left.to(compute) @ right.to(compute))).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s B A: the weight this layer applies (what a switch must leave unchanged)."""
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        return self.weight.to(compute) + self.scale * (self.lora_B.to(compute) @ self.lora_A.to(compute))

    def free_slots(self, side: str) -> torch.Tensor:
        """Pool slots of side 'A' or 'B' that no row of A / column of B holds now."""
        selected = self.selected_A if side == "A" else self.selected_B
        free = torch.ones(self.pool_size, dtype=torch.bool)
        free[selected] = False
        return free.nonzero().flatten()

    @torch.no_grad()
    def switch_A(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Replace rows `rows` of A by pool candidates `slots` (free slots), keeping the layer's
        function: W += s B[:, rows] (A[rows] - C[slots]); the old rows go back to their slots."""
        if rows.numel() == 0:
            return
        rows, slots = rows.cpu(), slots.cpu()
        a = self.lora_A
        new = self.cand_A[slots].to(device=a.device, dtype=a.dtype)                 # (k, n)
        self.weight.add_(self._scaled_product(self.lora_B[:, rows.to(a.device)],
                                              a[rows.to(a.device)] - new))          # (m, k) @ (k, n)
        self.cand_A[self.selected_A[rows]] = a[rows.to(a.device)].to(self.cand_A.device, self.cand_A.dtype)
        a[rows.to(a.device)] = new
        self.selected_A[rows] = slots

    @torch.no_grad()
    def switch_B(self, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """Replace columns `cols` of B by pool candidates `slots`, keeping the layer's function:
        W += s (B[:, cols] - C[:, slots]) A[cols]; the old columns go back to their slots."""
        if cols.numel() == 0:
            return
        cols, slots = cols.cpu(), slots.cpu()
        b = self.lora_B
        at = cols.to(b.device)
        new = self.cand_B[:, slots].to(device=b.device, dtype=b.dtype)              # (m, k)
        self.weight.add_(self._scaled_product(b[:, at] - new, self.lora_A[at]))    # (m, k) @ (k, n)
        self.cand_B[:, self.selected_B[cols]] = b[:, at].to(self.cand_B.device, self.cand_B.dtype)
        b[:, at] = new
        self.selected_B[cols] = slots

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, pool={self.pool_size}, bias={self.bias is not None}")


# --------------------------------------------------------------------------- the model
def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / a DeepSpeed engine."""
    while type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


def apply_switchlora(model: nn.Module, rank: int, *, target_modules=None, scale: float | None = None,
                     seed: int = 0) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `target_modules` (default: the
    attention and MLP projections of a Llama-style model, DEFAULT_TARGETS) by a
    SwitchLoRALinear of `rank`, in place; returns the model. The replaced weights (and biases)
    are frozen; everything else (embeddings, lm_head, norms) keeps its requires_grad. A target
    name that matches no Linear raises ValueError. Apply it before wrapping the model in DDP or
    DeepSpeed, with the same seed on every rank."""
    targets = tuple(DEFAULT_TARGETS if target_modules is None else target_modules)
    if isinstance(target_modules, str) or not targets:
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    if any(isinstance(m, SwitchLoRALinear) for m in model.modules()):
        raise ValueError("the model already holds SwitchLoRA layers")
    found: dict[str, int] = {t: 0 for t in targets}
    replacements = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found and isinstance(module, nn.Linear):
            found[leaf] += 1
            replacements.append((name, module))
    missing = [t for t, count in found.items() if count == 0]
    if missing:
        raise ValueError(f"target module(s) {missing} match no nn.Linear in {type(model).__name__}")
    for name, module in replacements:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, SwitchLoRALinear(module, rank, scale=scale, seed=seed, name=name))
    summary = switchlora_summary(model)
    logger.info("SwitchLoRA rank %d: replaced %d Linear layers (%s); parameters: %s trainable, %s frozen "
                "(%s of them replaced weights); candidate pools: %s numbers on the CPU", rank,
                summary["layers"], ", ".join(f"{t} x{c}" for t, c in found.items()),
                f"{summary['trainable']:,}", f"{summary['frozen']:,}", f"{summary['replaced']:,}",
                f"{summary['pool_numbers']:,}")
    return model


def switchlora_layers(model: nn.Module) -> list[tuple[str, SwitchLoRALinear]]:
    """(path, layer) of every SwitchLoRA layer, in module order (the same on every rank)."""
    return [(name, m) for name, m in _unwrap(model).named_modules() if isinstance(m, SwitchLoRALinear)]


def switchlora_summary(model: nn.Module) -> dict:
    """Parameter counts: trainable, frozen, replaced (frozen W and b of SwitchLoRA layers),
    lora (the A and B factors), layers, and pool_numbers (candidate vectors' elements)."""
    model = _unwrap(model)
    layers = switchlora_layers(model)
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731 (ZeRO-3)
    return {
        "trainable": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "frozen": sum(numel(p) for p in model.parameters() if not p.requires_grad),
        "replaced": sum(numel(layer.weight) + (numel(layer.bias) if layer.bias is not None else 0)
                        for _, layer in layers),
        "lora": sum(numel(layer.lora_A) + numel(layer.lora_B) for _, layer in layers),
        "layers": len(layers),
        "pool_numbers": sum(layer.cand_A.numel() + layer.cand_B.numel() for _, layer in layers),
    }


def switchlora_param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Named param groups for SwitchLoRAAdamW: "lora" (the A and B factors) and "matrices"
    (embeddings, lm_head, other trainable 2-D weights) with weight_decay, "vectors" (norms,
    biases) without. Frozen parameters are left out; empty groups dropped. Names are the
    module's parameter names, which switch_step uses to find the factors' optimizer state."""
    buckets: dict[str, list] = {"lora": [], "matrices": [], "vectors": []}
    lora_ids = {id(p) for _, layer in switchlora_layers(model) for p in (layer.lora_A, layer.lora_B)}
    for name, param in _unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in lora_ids:
            buckets["lora"].append((name, param))
        elif len(getattr(param, "ds_shape", param.shape)) >= 2:
            buckets["matrices"].append((name, param))
        else:
            buckets["vectors"].append((name, param))
    groups = [{"params": buckets["lora"], "weight_decay": weight_decay, "name": "lora"},
              {"params": buckets["matrices"], "weight_decay": weight_decay, "name": "matrices"},
              {"params": buckets["vectors"], "weight_decay": 0.0, "name": "vectors"}]
    return [g for g in groups if g["params"]]


def switchlora_state_dict(model: nn.Module) -> dict:
    """The switching state that is not in model.state_dict(): pools, selected slots, busy
    steps, per layer path (save it with the model to resume; it is the same on every rank)."""
    return {name: {"cand_A": layer.cand_A.clone(), "cand_B": layer.cand_B.clone(),
                   "selected_A": layer.selected_A.clone(), "selected_B": layer.selected_B.clone(),
                   "busy_until": layer.busy_until.clone()}
            for name, layer in switchlora_layers(model)}


def load_switchlora_state_dict(model: nn.Module, state: dict) -> None:
    """Restore what switchlora_state_dict saved (ValueError if the layers or shapes differ)."""
    layers = dict(switchlora_layers(model))
    if set(layers) != set(state):
        raise ValueError(f"SwitchLoRA state has layers {sorted(set(state) ^ set(layers))[:4]}... that "
                         "the model lacks, or the other way round")
    for name, layer in layers.items():
        for key, value in state[name].items():
            current = getattr(layer, key)
            if current.shape != value.shape:
                raise ValueError(f"{name}.{key}: saved shape {tuple(value.shape)}, model {tuple(current.shape)}")
            current.copy_(value)


@torch.no_grad()
def merge_switchlora(model: nn.Module) -> nn.Module:
    """Replace every SwitchLoRA layer by a plain nn.Linear holding W + s B A (and its bias), in
    place; returns the model (for export or evaluation without adapters). The new weights keep
    the old W's requires_grad (False)."""
    for name, layer in switchlora_layers(model):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(layer.merged_weight())
        linear.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
            linear.bias.requires_grad_(layer.bias.requires_grad)
        parent_name, _, leaf = name.rpartition(".")
        root = _unwrap(model)
        setattr(root.get_submodule(parent_name) if parent_name else root, leaf, linear)
    return model


# --------------------------------------------------------------------------- the schedule
def switch_rate(step: int, total_steps: int, *, descend_fraction: float = 0.1,
                descend_to: float = 0.3) -> float:
    """Switching rate relative to the start: descend_to ** (step / (descend_fraction * total_steps)),
    1 at step 0 and 0.3 at 10% of training with the defaults (the interval grows as 1 / rate)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (descend_fraction > 0 and 0 < descend_to <= 1):
        raise ValueError(f"need descend_fraction > 0 and 0 < descend_to <= 1, got {descend_fraction}, {descend_to}")
    return descend_to ** (step / (descend_fraction * total_steps))


def expected_switches(rank: int, step: int, total_steps: int, *, interval0: float = INTERVAL0,
                      descend_fraction: float = 0.1, descend_to: float = 0.3) -> float:
    """r / interval: how many rows of A (and columns of B) one layer switches per step, on average."""
    return rank * switch_rate(step, total_steps, descend_fraction=descend_fraction,
                              descend_to=descend_to) / interval0


def switch_count(expected: float, generator: torch.Generator) -> int:
    """floor(expected), plus one with probability frac(expected): unbiased, reproducible."""
    whole = math.floor(expected)
    return whole + int(torch.rand((), generator=generator, dtype=torch.float64).item() < expected - whole)


def _pick(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct entries of `candidates` (1-D), drawn with `generator`, sorted."""
    order = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[order].sort().values


@torch.no_grad()
def switch_step(model: nn.Module, optimizer, step: int, total_steps: int, *, interval0: float = INTERVAL0,
                freeze_steps: int = FREEZE_STEPS, descend_fraction: float = 0.1, descend_to: float = 0.3,
                seed: int = 0) -> dict:
    """One step of switching for every SwitchLoRA layer of `model` (bare, DDP or a DeepSpeed
    engine): call it once per optimizer step, between backward and optimizer.step() or right
    after the step (see the module docstring); `step` counts optimizer steps from 0.

    Per layer, with a generator seeded by (seed, step, layer path): n = switch_count(r / interval)
    rank-1 components i whose counterpart is not frozen get a new A[i] from a random free pool
    slot, then n others get a new B[:, i]; the counterparts are reset and frozen in `optimizer`
    (a SwitchLoRAAdamW or DeepSpeed's ZeRO wrapper of one, or None to switch the model alone).
    Returns {"A": rows switched, "B": columns switched}, summed over layers."""
    if interval0 < 2 * freeze_steps:
        raise ValueError(f"interval0={interval0} is below 2 x freeze_steps={freeze_steps}: more "
                         "components would be frozen than the schedule lets switch")
    if freeze_steps < 0 or step < 0:
        raise ValueError(f"need step >= 0 and freeze_steps >= 0, got {step}, {freeze_steps}")
    optimizer = _client_optimizer(optimizer)
    if optimizer is not None and not isinstance(optimizer, SwitchLoRAAdamW):
        raise ValueError(f"switch_step needs a SwitchLoRAAdamW (per-vector state and freezing), got "
                         f"{type(optimizer).__name__}")
    layers = switchlora_layers(model)
    index = optimizer.piece_index() if optimizer is not None else None
    totals = {"A": 0, "B": 0}
    for name, layer in layers:
        _refuse_sharded(name, layer)
        generator = torch.Generator().manual_seed(sketch_seed(seed, step, name, 0, 1))
        count = switch_count(expected_switches(layer.rank, step, total_steps, interval0=interval0,
                                               descend_fraction=descend_fraction, descend_to=descend_to),
                             generator)
        if count == 0:
            continue
        idle = (layer.busy_until <= step).nonzero().flatten()
        rows = _pick(idle, min(count, idle.numel(), layer.free_slots("A").numel()), generator)
        slots_a = _pick(layer.free_slots("A"), rows.numel(), generator)
        idle = idle[~torch.isin(idle, rows)]
        cols = _pick(idle, min(count, idle.numel(), layer.free_slots("B").numel()), generator)
        slots_b = _pick(layer.free_slots("B"), cols.numel(), generator)
        switch_layer(layer, optimizer, name, rows_A=rows, slots_A=slots_a, cols_B=cols, slots_B=slots_b,
                     step=step, freeze_steps=freeze_steps, index=index)
        totals["A"] += rows.numel()
        totals["B"] += cols.numel()
    return totals


def _client_optimizer(optimizer):
    """The SwitchLoRAAdamW inside a DeepSpeed ZeRO optimizer wrapper, else `optimizer`."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, SwitchLoRAAdamW) and isinstance(inner, SwitchLoRAAdamW):
        return inner
    return optimizer


def _refuse_sharded(name: str, layer: SwitchLoRALinear) -> None:
    for p in (layer.weight, layer.lora_A, layer.lora_B):
        if hasattr(p, "ds_shape") or type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            raise ValueError(f"SwitchLoRA layer {name} is sharded (ZeRO-3 or FSDP): switching needs whole "
                             "W, A and B on every rank; use DDP or DeepSpeed ZeRO-1/2")


@torch.no_grad()
def switch_layer(layer: SwitchLoRALinear, optimizer, name: str, *, rows_A: torch.Tensor,
                 slots_A: torch.Tensor, cols_B: torch.Tensor, slots_B: torch.Tensor, step: int,
                 freeze_steps: int = FREEZE_STEPS, index: dict | None = None) -> None:
    """Switch the given rows of A and columns of B of one layer (at `name` in the model) to the
    given free pool slots, mark the components busy until step + freeze_steps, and in
    `optimizer` (None: skip) reset and freeze the counterparts and load the new A and B into
    the optimizer's own copies (ZeRO flat partitions)."""
    rows_A, cols_B = torch.as_tensor(rows_A, dtype=torch.long), torch.as_tensor(cols_B, dtype=torch.long)
    slots_A, slots_B = torch.as_tensor(slots_A, dtype=torch.long), torch.as_tensor(slots_B, dtype=torch.long)
    if rows_A.numel() != slots_A.numel() or cols_B.numel() != slots_B.numel():
        raise ValueError("need as many slots as switched vectors")
    for side, slots in (("A", slots_A), ("B", slots_B)):
        if not bool(torch.isin(slots, layer.free_slots(side)).all()) or slots.unique().numel() != slots.numel():
            raise ValueError(f"{name}: slots {slots.tolist()} of pool {side} are not distinct free slots")
    if torch.isin(rows_A, cols_B).any():
        raise ValueError(f"{name}: a component cannot switch A and B in the same step")
    layer.switch_A(rows_A, slots_A)
    layer.switch_B(cols_B, slots_B)
    layer.busy_until[torch.cat([rows_A, cols_B])] = step + freeze_steps
    if optimizer is None:
        return
    prefix = f"{name}." if name else ""
    key_a, key_b = prefix + "lora_A", prefix + "lora_B"
    index = optimizer.piece_index() if index is None else index
    optimizer.reset_vectors(key_b, 1, rows_A, freeze_steps, index=index)   # B[:, i] of a switched A[i]
    optimizer.reset_vectors(key_a, 0, cols_B, freeze_steps, index=index)   # A[i] of a switched B[:, i]
    if rows_A.numel():
        optimizer.load_values(key_a, layer.lora_A, index=index)
    if cols_B.numel():
        optimizer.load_values(key_b, layer.lora_B, index=index)


# --------------------------------------------------------------------------- the optimizer
def per_element_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                       exp_avg_sq: torch.Tensor, steps: torch.Tensor, frozen: torch.Tensor, *,
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW on each element with its own step count `steps`; elements whose
    `frozen` countdown is > 0 keep their value and state, and their countdown drops by one.
    All tensors have the same shape; state in its own dtype, param written in its dtype."""
    live = frozen <= 0
    g = grad.to(exp_avg.dtype)
    steps.add_(live.to(steps.dtype))
    exp_avg.copy_(torch.where(live, exp_avg.lerp(g, 1.0 - beta1), exp_avg))
    exp_avg_sq.copy_(torch.where(live, (exp_avg_sq * beta2).addcmul_(g, g, value=1.0 - beta2), exp_avg_sq))
    t = steps.clamp_min(1.0)              # frozen elements that never moved: keep the math finite
    bias1 = 1.0 - torch.pow(beta1, t)
    bias2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt_()
    denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(eps)
    value = param.to(exp_avg.dtype)
    moved = (value * (1.0 - lr * weight_decay)).addcdiv_(exp_avg * (lr / bias1), denom, value=-1.0)
    param.copy_(torch.where(live, moved, value))
    frozen.sub_((~live).to(frozen.dtype))


class SwitchLoRAAdamW(LowRankMomentumOptimizer):
    """AdamW with a step count per element and per-vector reset and freezing, for SwitchLoRA.

    Dense state per element: exp_avg, exp_avg_sq, vector_step (its own step count, for the
    bias correction) and frozen_steps (> 0: the element is not updated; counts down each step).
    It steps on pieces like the MLorc optimizers (every group lowrank=False), so it runs on
    plain parameters, under DDP, and on DeepSpeed ZeRO-1/2 flat partitions once
    mlorc_dist.deepspeed.attach_layouts(engine, optimizer) has attached their layouts.
    Parameters are found by name (switchlora_param_groups gives named groups).

    Arguments (per param group unless marked *): lr, betas, eps, weight_decay as
    torch.optim.AdamW (decoupled decay applied before the update); nonfinite* as MLorcAdamW
    ("skip", "raise" or "ignore" a step with a non-finite gradient); scope* and seed* are
    accepted for a uniform signature with the MLorc optimizers and change nothing here (every
    piece keeps dense state: nothing is compressed, no collective is run).
    Memory: four fp32 numbers per trainable element (the two counts are kept for every
    parameter so that every piece has the same state and checkpoints copy it as dense state).
    """

    moment_names = ("exp_avg", "exp_avg_sq", "vector_step", "frozen_steps")
    algorithm = "SwitchLoRA-AdamW"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, nonfinite: str = "skip", scope: str = "local",
                 seed: int = 0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=1,
                        oversample=0, niter=0, lowrank=False, dense_when_no_saving=True,
                        factor_dtype=None)
        super().__init__(params, defaults, scope=scope, seed=seed, nonfinite=nonfinite)

    def _validate_group(self, group: dict) -> None:
        if group["lowrank"] is not False:
            raise ValueError(f"{self.algorithm} keeps dense state: a param group has lowrank="
                             f"{group['lowrank']!r} (use switchlora_param_groups(model))")
        super()._validate_group(group)

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int, rounding=None) -> None:
        beta1, beta2 = group["betas"]
        per_element_adamw_(value, grad, entry[prefix + "exp_avg"], entry[prefix + "exp_avg_sq"],
                           entry[prefix + "vector_step"], entry[prefix + "frozen_steps"],
                           lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"])

    def _lowrank_update(self, group, value, grad, prevs, floors, stats, step: int, rounding=None):
        raise AssertionError("SwitchLoRAAdamW has no low-rank blocks")

    # ---------------------------------------------------------------- per-vector access
    def piece_index(self) -> dict:
        """key -> [(tensor, plan index, piece)] for every piece this rank holds; state is
        created for tensors that have none yet (freezing may come before the first step).
        Under a plain layout (no engine) every trainable parameter must be present."""
        index: dict[str, list] = {}
        for group, position, tensor in self.held_tensors():
            plans = self.plan_of(tensor, group, position)
            state = self.state[tensor]
            if not state:
                state.update(self.new_state(tensor, group, position))
            for i, plan in enumerate(plans):
                index.setdefault(plan.piece.key, []).append((tensor, i, plan.piece))
        return index

    def _pieces_of(self, key: str, index: dict | None):
        index = self.piece_index() if index is None else index
        if key not in index and not self._sharded():
            raise ValueError(f"{self.algorithm} holds no parameter named {key!r}: build it on "
                             "switchlora_param_groups(model) (named groups) of the unwrapped model")
        return index.get(key, [])

    def _sharded(self) -> bool:
        return any(layout.engine != "plain" for layout in self._layouts.values())

    @torch.no_grad()
    def reset_vectors(self, key: str, axis: int, indices, freeze_steps: int = 0, *,
                      index: dict | None = None) -> int:
        """Zero exp_avg, exp_avg_sq and vector_step of rows (axis 0) or columns (axis 1)
        `indices` of the 2-D parameter `key`, and freeze them for `freeze_steps` steps (0: not
        frozen). Works on this rank's pieces only; returns how many elements it touched."""
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis!r}")
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        touched = 0
        if indices.numel() == 0:
            return 0
        for tensor, i, piece in self._pieces_of(key, index):
            if len(piece.matrix.shape) != 2:
                raise ValueError(f"{key} is not a matrix (shape {piece.matrix.shape})")
            entry = self.state[tensor]["pieces"][i]
            device = entry["exp_avg"].device
            flat = torch.arange(piece.start, piece.stop, device=device)             # global flat indices
            coord = flat // piece.matrix.cols if axis == 0 else flat % piece.matrix.cols
            mask = torch.isin(coord, indices.to(device))
            for name in ("exp_avg", "exp_avg_sq", "vector_step"):
                entry[name].masked_fill_(mask, 0)
            entry["frozen_steps"].masked_fill_(mask, float(freeze_steps))
            touched += int(mask.sum())
        return touched

    @torch.no_grad()
    def load_values(self, key: str, param: torch.Tensor, *, index: dict | None = None) -> None:
        """Copy the full parameter `param` (the model's, named `key`) into the tensors this
        optimizer steps, where those are not the parameter itself (ZeRO-1/2 fp32 partitions)."""
        source = param.detach().reshape(-1)
        for tensor, _, piece in self._pieces_of(key, index):
            if tensor is param or tensor.data_ptr() == param.data_ptr():
                continue
            piece.view(_flat(tensor)).copy_(source[piece.start:piece.stop])

    def vector_state(self, key: str, index: dict | None = None) -> dict:
        """This rank's state of the matrix `key` as full-size tensors, for tests and debugging
        (elements this rank does not hold are NaN)."""
        out = {}
        for tensor, i, piece in self._pieces_of(key, index):
            entry = self.state[tensor]["pieces"][i]
            for name in self.moment_names:
                full = out.setdefault(name, torch.full(piece.matrix.shape, float("nan"),
                                                       dtype=entry[name].dtype))
                full.view(-1)[piece.start:piece.stop] = entry[name].cpu()
        return out
