"""What MLorc-AdamW and MLorc-Lion share: hyperparameter checks, layouts, treatment plans,
non-finite handling, state bytes, and checkpoints.

A subclass names its moments (AdamW: exp_avg, exp_avg_sq; Lion: exp_avg) and implements two
updates on views: `_dense_update` (one dense region with dense state) and `_lowrank_update`
(a block whose previous moments were rebuilt from factors; it returns the new moments). The
base class rebuilds and recompresses: per body in local scope, per whole matrix through
scopes.global_randomized_svd in global scope.

Data flows one way: layout (pieces) -> plan (treatment per region) -> math -> state.
"""
from __future__ import annotations

import logging
import math
import operator
import warnings
from dataclasses import dataclass, replace
from itertools import chain

import torch

from ..lowrank import (MomentUpdate, compress, compute_dtype_for, rebuild, rebuild_noise_floor,
                       scaled_factors, sketch_seed)
from .. import lowrank
from ..compiled_range import to_int64
from ..pieces import Layout, Piece, plain_layout
from ..scopes import SCOPES, RowBlock, all_reduce_sum, global_randomized_svd
from . import cpu_kernels, fused, skinny
from .rounding import Rounding, rounding_seed

logger = logging.getLogger("mlorc_dist")

NONFINITE_POLICIES = ("skip", "raise", "ignore")
_FACTOR_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


@dataclass(frozen=True)
class PiecePlan:
    """How one piece is treated.

    mode   'dense'  : the whole piece keeps dense state
           'local'  : head and tail dense, the body (rows [body_row0, +body_rows)) compressed alone
           'global' : the whole piece is part of a matrix compressed whole across ranks
    rank   the effective rank (clamped to the compressed block's smaller side)
    reason why a piece is dense (for the start-up log)
    """
    piece: Piece
    mode: str
    rank: int = 0
    head: int = 0
    body_row0: int = 0
    body_rows: int = 0
    tail: int = 0
    reason: str = ""
    whole: tuple = ()      # the local tensor's shape where this piece is all of it (_piece_views)


def _as_factor_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _FACTOR_DTYPES:
        return _FACTOR_DTYPES[value.lower()]
    raise ValueError(f"factor_dtype must be None, a torch dtype or one of {sorted(_FACTOR_DTYPES)}, "
                     f"got {value!r}")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


class LowRankMomentumOptimizer(torch.optim.Optimizer):
    """Base class; see MLorcAdamW and MLorcLion for the user-facing arguments."""

    moment_names: tuple[str, ...] = ()
    algorithm: str = "?"
    reshardable: bool = True     # checkpoints of compressed blocks load at another layout

    def __init__(self, params, defaults: dict, *, scope: str = "local", seed: int = 0,
                 nonfinite: str = "skip", batched: bool = True, fused: bool | None = None,
                 stochastic_rounding: bool = False):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        check_fused(fused, scope)
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
        self.scope = scope
        self.seed = seed
        self.batched = batched
        self.fused_requested = fused
        self.nonfinite = nonfinite
        self.stochastic_rounding = stochastic_rounding
        self.skipped_steps = 0
        self.skipped_tensors = 0     # step_tensors' skips (step in backward: one tensor at a time)
        self._layouts: dict[int, Layout] = {}
        self._attached: dict[int, tuple[torch.Tensor, dict]] = {}
        self._plans: dict[int, list[PiecePlan]] = {}
        self._warned_clamp: set[str] = set()
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self._workspace_rows: dict[tuple, tuple] = {}   # _stacked_workspace's rows per buffer
        self._deferred: list | None = None      # a step's batches awaiting their small SVDs
        # what step() keeps per batch between steps: its factors packed (_batch_factor_parts) and
        # its bodies' sketch seed bases (_sketch_seeds); an entry no step() used is dropped
        self._packs: dict[tuple, tuple] = {}
        self._packs_used: set | None = None     # the packs step() used (None: outside step())
        super().__init__(params, defaults)
        self.fused = resolve_fused(fused, scope, {p.device.type for g in self.param_groups for p in g["params"]})
        if self.fused and any(p.device.type == "cpu" and not lowrank.takes_gpu_rules(p.device) and g["lowrank"]
                              for g in self.param_groups for p in g["params"]):
            cpu_kernels.build()     # a failed build is an error here, before any step has run
        self._index_parameters()
        self.log_treatments("at construction (an engine that shards the parameters logs again once "
                            "its layout is attached)")

    def _index_parameters(self) -> None:
        """Remember the tensors in param_groups now: their position names them (param<i>) when
        the groups carry no param_names, and only they may step without an attached layout."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        self._param_index = {id(p): i for i, p in enumerate(params)}
        self._construction_ids = set(self._param_index)

    def rebind_parameters(self) -> bool:
        """Re-index after the tensors in param_groups were replaced by others (accelerate's
        FSDP2 `prepare` swaps every parameter for the DTensor that fully_shard made of it).
        Layouts and plans computed on the old tensors are dropped (their ids may be reused).
        Returns False when nothing changed; refused with a ValueError once state exists."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if all(id(p) in self._param_index for p in params):
            return False
        if len(self.state):
            raise ValueError(f"{self.algorithm}: its parameters were replaced after it had state")
        self._index_parameters()
        self._layouts.clear()
        self._plans.clear()
        self._attached.clear()
        return True

    # ------------------------------------------------------------------ hyperparameters
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _validate_group(self, group: dict) -> None:
        def need(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{self.algorithm}: invalid {field}={group.get(field)!r}: {rule}")
        lr = group["lr"]
        need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, "lr", "must be >= 0")
        betas = group["betas"]
        need(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "must be a pair")
        for i, b in enumerate(betas):
            need(isinstance(b, (int, float)) and 0.0 <= b < 1.0, "betas", f"betas[{i}] must be in [0, 1)")
        need(group["weight_decay"] >= 0, "weight_decay", "must be >= 0")
        need(isinstance(group["rank"], int) and not isinstance(group["rank"], bool)
             and group["rank"] >= 1, "rank", "must be an int >= 1")
        need(isinstance(group["oversample"], int) and group["oversample"] >= 0, "oversample",
             "must be an int >= 0")
        need(isinstance(group["niter"], int) and group["niter"] >= 0, "niter", "must be an int >= 0")
        need(isinstance(group["lowrank"], bool), "lowrank", "must be True or False")
        need(isinstance(group["dense_when_no_saving"], bool), "dense_when_no_saving",
             "must be True or False")
        group["factor_dtype"] = _as_factor_dtype(group["factor_dtype"])
        if "eps" in group:
            need(group["eps"] >= 0, "eps", "must be >= 0")

    # ------------------------------------------------------------------ layouts and plans
    def attach_layout(self, tensor: torch.Tensor, layout: Layout, group: dict | None = None) -> None:
        """Tell the optimizer how a tensor it holds (or will be handed, in `group`) maps to
        parameters; engine adapters call this. The layout is checked against the tensor and
        kept out of the checkpoint."""
        layout.validate(tensor.numel() if not _is_dtensor(tensor) else tensor.to_local().numel())
        self._layouts[id(tensor)] = layout
        self._plans.pop(id(tensor), None)
        if group is not None:
            self._attached[id(tensor)] = (tensor, group)

    def detach_layout(self, tensor: torch.Tensor) -> None:
        """Forget a tensor's layout and plan (the memory planner's tensors come and go)."""
        self._layouts.pop(id(tensor), None)
        self._plans.pop(id(tensor), None)
        self._attached.pop(id(tensor), None)

    def new_state(self, tensor: torch.Tensor, group: dict, position: int | None = None) -> dict:
        """The zero state this optimizer would create for `tensor` at its first step (factors,
        dense regions and step counter, by its plan): what checkpoints fill and planners count."""
        return self._init_state(group, tensor, self.plan_of(tensor, group, position))

    def _key_for(self, group: dict, position: int, param: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            return names[position]
        return f"param{self._param_index[id(param)]}"

    def layout_of(self, param: torch.Tensor, group: dict, position: int) -> Layout:
        """The layout of a tensor in param_groups: attached by an engine adapter, derived from a
        DTensor's placements (FSDP2), or the whole tensor. Anything else is refused."""
        layout = self._layouts.get(id(param))
        if layout is not None:
            return layout
        key = self._key_for(group, position, param) if id(param) in self._param_index else None
        if _is_dtensor(param):
            from ..engines.fsdp2 import dtensor_layout
            layout = dtensor_layout(param, key, group["lowrank"])
        elif id(param) not in self._construction_ids:
            raise ValueError(
                f"{self.algorithm} was handed a {param.dim()}-D tensor of {param.numel()} elements "
                "that it was not constructed with and that has no layout. An engine (DeepSpeed "
                "ZeRO?) flattened the parameters: create the engine with "
                "mlorc_dist.deepspeed.initialize(...) so the optimizer knows the shard layout.")
        elif hasattr(param, "ds_shape") or (param.dim() == 1 and param.numel() == 0):
            raise ValueError(
                f"{self.algorithm}: parameter {key} has shape {tuple(param.shape)} (partitioned by "
                "DeepSpeed ZeRO-3?) and no layout: use mlorc_dist.deepspeed.initialize(...)")
        else:
            layout = plain_layout(param, key, group["lowrank"])
        self._layouts[id(param)] = layout
        return layout

    def plan_of(self, param: torch.Tensor, group: dict, position: int) -> list[PiecePlan]:
        plans = self._plans.get(id(param))
        if plans is None:
            layout = self.layout_of(param, group, position)
            plans = [self._plan_piece(piece, group) for piece in layout.pieces]
            global_keys = [p.piece.key for p in plans if p.mode == "global"]
            if len(global_keys) != len(set(global_keys)):
                raise ValueError(f"{self.algorithm}: global scope needs at most one piece of a matrix "
                                 f"per rank; the {layout.engine} layout holds several of "
                                 f"{sorted({k for k in global_keys if global_keys.count(k) > 1})}")
            if len(plans) == 1:
                plans = [_with_whole(plans[0], _local(param))]
            self._plans[id(param)] = plans
        return plans

    def _effective_rank(self, key: str, rank: int, rows: int, cols: int) -> int:
        r = min(rank, rows, cols)
        if r < rank and key not in self._warned_clamp:
            self._warned_clamp.add(key)
            warnings.warn(f"{self.algorithm}: rank {rank} clamped to {r} for {key} "
                          f"(block {rows} x {cols})", stacklevel=3)
        return r

    def _plan_piece(self, piece: Piece, group: dict) -> PiecePlan:
        spec = piece.matrix
        if not spec.lowrank:
            why = "not 2-D" if len(spec.shape) != 2 else "group lowrank=False"
            return PiecePlan(piece, "dense", reason=why)
        if self.scope == "global":
            m, n = spec.shape
            r = self._effective_rank(spec.key, group["rank"], m, n)
            if not _worth_compressing(group, m, n, r):
                return PiecePlan(piece, "dense", reason="no saving")
            return PiecePlan(piece, "global", rank=r)
        split = piece.split()
        if split.body_rows == 0:
            return PiecePlan(piece, "dense", reason="no whole row")
        k, n = split.body_rows, spec.cols
        label = spec.key if k == spec.rows else f"{spec.key}[rows {split.body_row0}:{split.body_row0 + k}]"
        r = self._effective_rank(label, group["rank"], k, n)
        if not _worth_compressing(group, k, n, r):
            return PiecePlan(piece, "dense", reason="no saving")
        return PiecePlan(piece, "local", rank=r, head=split.head, body_row0=split.body_row0,
                         body_rows=k, tail=split.tail)

    def _global_matrices(self, work) -> list:
        """Every matrix compressed in global scope in this step, in the same order on every
        rank, with this rank's piece of it (or None)."""
        matrices = []
        for group, param, position, plans, _ in work:
            layout = self.layout_of(param, group, position)
            held = {plan.piece.key: plan for plan in plans if plan.mode == "global"}
            for spec in layout.matrices:
                m, n = spec.shape
                if not _worth_compressing(group, m, n, min(group["rank"], m, n)):
                    continue                  # the same rule as _plan_piece: every rank agrees
                matrices.append((group, param, spec, held.get(spec.key)))
        return matrices

    # ------------------------------------------------------------------ logging
    def held_tensors(self):
        """(group, position, tensor) for every tensor in param_groups, then for every tensor an
        engine attached that is not there right now (ZeRO-3 leaves only the sub-group being
        stepped in param_groups)."""
        seen = set()
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                seen.add(id(param))
                yield group, position, param
        for key, (tensor, group) in self._attached.items():
            if key not in seen:
                yield group, None, tensor

    def treatment_summary(self, with_keys: bool = False) -> dict:
        """Parameters, pieces and elements per treatment, from this rank's layouts (and, with
        `with_keys`, the sorted keys of those parameters, to count them over ranks)."""
        summary: dict[str, dict[str, int]] = {}

        def add(kind: str, pieces: int, elements: int, keys: set):
            entry = summary.setdefault(kind, {"pieces": 0, "elements": 0, "params": 0})
            entry["pieces"] += pieces
            entry["elements"] += elements
            entry.setdefault("_keys", set()).update(keys)

        for group, position, param in self.held_tensors():
            try:
                plans = self.plan_of(param, group, position)
            except ValueError:
                continue   # an engine has not attached its layout yet; step() will raise
            for plan in plans:
                key = {plan.piece.key}
                if plan.mode == "dense":
                    add(f"dense ({plan.reason})", 1, plan.piece.numel, key)
                elif plan.mode == "global":
                    add("low-rank (global)", 1, plan.piece.numel, key)
                else:
                    body = plan.body_rows * plan.piece.matrix.cols
                    add("low-rank (local body)", 1, body, key)
                    if plan.head + plan.tail:
                        add("dense (head/tail rows)", int(plan.head > 0) + int(plan.tail > 0),
                            plan.head + plan.tail, key)
        for entry in summary.values():
            keys = entry.pop("_keys")
            entry["params"] = len(keys)
            if with_keys:
                entry["keys"] = sorted(map(str, keys))
        return summary

    def log_treatments(self, when: str = "") -> dict:
        """Log (and return) the treatment summary of this rank; `when` says at which point."""
        summary = self.treatment_summary()
        lines = [f"{kind}: {v['params']} params, {v['pieces']} pieces, {v['elements']:,} elements"
                 for kind, v in sorted(summary.items())]
        path = "fused step" if self.fused else "reference path"
        if self.fused_requested is None:
            path += " (fused=None: the default for these devices and scope)"
        logger.info("%s (scope=%s, %s)%s: %s", self.algorithm, self.scope, path, f" {when}" if when else "",
                    "; ".join(lines) or "no parameters")
        return summary

    # ------------------------------------------------------------------ state
    def _dtypes(self, group: dict, param: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """(compute/dense-state dtype, factor dtype) for a tensor."""
        compute = compute_dtype_for(param.dtype)
        return compute, group["factor_dtype"] or compute

    def _init_state(self, group: dict, param: torch.Tensor, plans: list[PiecePlan]) -> dict:
        compute, factor = self._dtypes(group, param)
        device = param.device
        pieces = []
        for plan in plans:
            piece, entry = plan.piece, {"coords": [plan.piece.key, plan.piece.start, plan.piece.stop, plan.mode]}
            if plan.mode == "dense":
                for name in self.moment_names:
                    entry[name] = torch.zeros(piece.numel, dtype=compute, device=device)
            else:
                if plan.mode == "local":
                    rows, cols = plan.body_rows, piece.matrix.cols
                    for side, length in (("head", plan.head), ("tail", plan.tail)):
                        if length:
                            for name in self.moment_names:
                                entry[f"{side}_{name}"] = torch.zeros(length, dtype=compute, device=device)
                else:
                    rows, cols = piece.row_count, piece.matrix.cols
                entry.update(self._lowrank_state(group, plan, rows, cols, factor, device))
            pieces.append(entry)
        return {"step": 0, "pieces": pieces}

    def _lowrank_state(self, group: dict, plan: PiecePlan, rows: int, cols: int,
                       dtype: torch.dtype, device) -> dict:
        """Zero state of one compressed block of `rows` x `cols` (a local body, or this rank's
        rows of a global matrix): here (U, s, Vh) factors of every moment."""
        entry = {}
        for name in self.moment_names:
            entry[f"{name}_u"] = torch.zeros(rows, plan.rank, dtype=dtype, device=device)
            entry[f"{name}_s"] = torch.zeros(plan.rank, dtype=dtype, device=device)
            entry[f"{name}_vh"] = torch.zeros(plan.rank, cols, dtype=dtype, device=device)
        return entry

    def state_bytes(self) -> int:
        """Bytes of every optimizer-state tensor this rank holds."""
        def walk(value) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, dict):
                return sum(walk(v) for v in value.values())
            if isinstance(value, (list, tuple)):
                return sum(walk(v) for v in value)
            return 0
        return sum(walk(s) for s in self.state.values())

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mlorc"] = {"algorithm": self.algorithm, "scope": self.scope, "seed": self.seed,
                          "skipped_steps": self.skipped_steps, "skipped_tensors": self.skipped_tensors}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict from `state_dict()`. Tensors keep their saved dtypes (torch's own
        loader would cast factors and dense state to the parameter's dtype) and every piece's
        coordinates must match this optimizer's layout: a checkpoint of another model, another
        scope or another sharding is refused with a ValueError before anything is changed."""
        meta = state_dict.get("mlorc")
        if meta is None or meta.get("algorithm") != self.algorithm:
            raise ValueError(f"not a {self.algorithm} state_dict (its 'mlorc' entry is {meta!r})")
        if meta["scope"] != self.scope:
            raise ValueError(f"state_dict was saved with scope={meta['scope']!r}, this optimizer "
                             f"has scope={self.scope!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError("state_dict has a different number of param groups or parameters")
        saved_state = state_dict["state"]
        restored = {}
        for saved_group, group in zip(saved_groups, self.param_groups):
            for position, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"])):
                if saved_id not in saved_state:
                    continue
                entry = saved_state[saved_id]
                plans = self.plan_of(param, group, position)
                want = [[p.piece.key, p.piece.start, p.piece.stop, p.mode] for p in plans]
                got = [list(piece["coords"]) for piece in entry["pieces"]]
                if want != got:
                    raise ValueError(f"{self.algorithm}: state_dict pieces {got[:3]}... do not match "
                                     f"this optimizer's layout {want[:3]}... (another model, rank "
                                     "count or sharding?)")
                restored[param] = _move_state(entry, param.device)
        super().load_state_dict({**state_dict, "state": {}})
        self._packs.clear()
        for param, entry in restored.items():
            self.state[param] = entry
        self.seed = meta["seed"]
        self.skipped_steps = meta["skipped_steps"]
        self.skipped_tensors = meta.get("skipped_tensors", 0)

    # ------------------------------------------------------------------ step
    def _rounding(self, param: torch.Tensor, step: int, key: str, start: int) -> Rounding | None:
        """How the update writes this parameter's region that starts at global element `start`:
        stochastically rounded for bf16 weights (stochastic_rounding=True), else None (to nearest)."""
        if not self._may_round(param):
            return None
        if param.dtype != torch.bfloat16:
            raise ValueError(f"{self.algorithm}: stochastic rounding writes bfloat16 weights; {key} is "
                             f"{param.dtype} (pass stochastic_rounding=False to round it to nearest)")
        return Rounding(rounding_seed(self.seed, step, str(key)), start)

    def _may_round(self, param: torch.Tensor) -> bool:
        """Whether _rounding returns anything but None for this dtype (a batch of fp32 or fp64
        weights does not ask it body by body)."""
        return self.stochastic_rounding and param.dtype not in (torch.float32, torch.float64)

    def _collect_work(self, only: set | None = None):
        """(group, param, position, plans, state) of every tensor with a gradient (of those whose
        id is in `only`, when given), state created at its first step."""
        work = []
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                if param.grad is None or (only is not None and id(param) not in only):
                    continue
                plans = self.plan_of(param, group, position)
                state = self.state[param]
                if not state:
                    state.update(self._init_state(group, param, plans))
                work.append((group, param, position, plans, state))
        return work

    def _nonfinite_count(self, work) -> torch.Tensor:
        """nonfinite_count of the gradients in `work`."""
        return nonfinite_count([_local(param.grad) for _, param, _, _, _ in work])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._packs_used = set()
        try:
            self._step_work(self._collect_work())
            # packs of batches this step did not make (their state replaced, or no longer batched
            # together) are dropped: a pack holds its batch's factors alive
            self._packs = {key: self._packs[key] for key in self._packs_used}
        finally:
            self._packs_used = None
        return loss

    @torch.no_grad()
    def step_tensors(self, tensors) -> bool:
        """Step only `tensors` (those of them that have a gradient), each with its own step
        count: what mlorc_dist.step_in_backward calls as each gradient becomes final. Local
        scope only (global scope's collectives span every matrix of a step). A non-finite
        gradient (nonfinite="skip") leaves these tensors and their state unchanged, is counted
        in .skipped_tensors and warned about; returns False then."""
        if self.scope != "local":
            raise ValueError(f"{self.algorithm}: step_tensors needs scope='local' (global scope compresses "
                             "every matrix of a step together, with collectives over all of them)")
        return self._step_work(self._collect_work(only={id(t) for t in tensors}), per_tensor=True)

    def _step_work(self, work, per_tensor: bool = False) -> bool:
        """One step of the tensors in `work` (_collect_work). False when a non-finite gradient
        skipped it (nonfinite="skip"): nothing changed."""
        global_matrices = self._global_matrices(work) if self.scope == "global" else []
        bad = self._nonfinite_count(work) if self.nonfinite != "ignore" else torch.zeros(())
        if global_matrices:
            # The skip decision must be shared: a rank that skips alone would leave the others
            # waiting in the next all-reduce. The flag rides with the first collective.
            prepared = self._global_prepare(global_matrices)
            bad = self._global_first_all_reduce(global_matrices, prepared, bad)
        if self.nonfinite != "ignore" and bad.item() > 0:      # a host read: one GPU sync
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{self.algorithm}: non-finite gradient in "
                                         f"{int(bad.item())} tensor(s)")
            if per_tensor:
                self.skipped_tensors += 1
                keys = ", ".join(str(plans[0].piece.key) for _, _, _, plans, _ in work if plans)
                warnings.warn(f"{self.algorithm}: non-finite gradient of {keys}: its step skipped (it and its "
                              f"state unchanged; {self.skipped_tensors} tensor steps skipped so far)", stacklevel=4)
                return False
            self.skipped_steps += 1
            warnings.warn(f"{self.algorithm}: non-finite gradient, step skipped (no parameter or "
                          f"state changed; {self.skipped_steps} skipped so far)", stacklevel=3)
            return False
        bodies, dense = [], []
        for group, param, position, plans, state in work:
            state["step"] += 1
            for plan, entry, value, grad in zip(plans, state["pieces"], _piece_views(plans, param),
                                                _piece_views(plans, param.grad)):
                if plan.mode == "dense":
                    dense.append((group, value, grad, entry, "", state["step"],
                                  self._rounding(param, state["step"], plan.piece.key, plan.piece.start)))
                elif plan.mode == "local":
                    bodies.append(self._local_piece_update(group, plan, value, grad, entry, state["step"], dense))
        self._dense_updates(dense)
        if self.batched:
            self._local_update_batched(bodies)
        else:
            for body in bodies:
                self._local_update(*body)
        if global_matrices:
            self._global_update(global_matrices, prepared)
        return True

    def _local_piece_update(self, group, plan: PiecePlan, value, grad, entry, step: int, dense: list) -> tuple:
        """Appends the dense updates of the head and tail rows to `dense` (_dense_updates);
        returns the body's work for _local_update."""
        if value.dim() == 2:             # the whole local tensor (_piece_views): no head, no tail
            return group, plan, value, grad, entry, step
        head, body_numel = plan.head, plan.body_rows * plan.piece.matrix.cols
        rounding = self._rounding(value, step, plan.piece.key, plan.piece.start)
        if plan.head:
            dense.append((group, value[:head], grad[:head], entry, "head_", step, rounding))
        if plan.tail:
            dense.append((group, value[head + body_numel:], grad[head + body_numel:], entry, "tail_", step,
                          rounding and rounding.offset(head + body_numel)))
        cols = plan.piece.matrix.cols
        body = value[head:head + body_numel].view(plan.body_rows, cols)       # (k, n), no copy
        body_grad = grad[head:head + body_numel].view(plan.body_rows, cols)
        return group, plan, body, body_grad, entry, step

    # ------------------------------------------------------------------ low-rank updates
    def _rebuild_moments(self, entry: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """The previous moments rebuilt from their factors, (rows, cols) each."""
        return [rebuild(entry[f"{name}_u"], entry[f"{name}_s"], entry[f"{name}_vh"], dtype)
                for name in self.moment_names]

    def _body_rounding(self, plan: PiecePlan, body: torch.Tensor, step: int) -> Rounding | None:
        """_rounding of a body: its elements start at global element body_row0 x cols."""
        return self._rounding(body, step, plan.piece.key, plan.body_row0 * plan.piece.matrix.cols)

    def _body_moments(self, group, body, body_grad, entry, step: int, prevs=None, floors=None,
                      rounding: Rounding | None = None) -> list:
        """The reference path: update this body's weights from the rebuilt previous moments
        (`prevs`, rebuilt here when not given) and return its new moments (to compress,
        lowrank.compress). A batch passes its bodies' `floors` (_noise_floors), made for all at once."""
        compute = compute_dtype_for(body.dtype)
        grad = body_grad.to(compute)
        floors = self._noise_floors(entry, compute) if floors is None else floors
        prevs = self._rebuild_moments(entry, compute) if prevs is None else prevs
        return self._lowrank_update(group, body, grad, prevs, floors, self._moment_stats(prevs, floors), step,
                                    rounding)

    def _noise_floors(self, entry: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per moment, the size of rounding noise in its rebuilt entries (see
        lowrank.rebuild_noise_floor). Depends only on s, so it is the same on every rank in
        global scope."""
        return [rebuild_noise_floor(entry[f"{name}_s"], dtype) for name in self.moment_names]

    def _batch_factors(self, entries: list[dict], dtype: torch.dtype) -> list[tuple]:
        """Per moment, a batch's factors and _noise_floors computed on the stacked factors:
        (U diag(s) (B, k, r), Vh (B, r, n), floors (B,)), row i of each body i's. A few calls for
        the batch instead of several per body (on a GPU each call is a launch and host time)."""
        out = []
        for name in self.moment_names:
            u, s, vh = self._batch_factor_parts(entries, name)
            out.append((*scaled_factors(u, s[:, None, :], vh, dtype), rebuild_noise_floor(s, dtype)))
        return out

    def _batch_factor_parts(self, entries: list[dict], name: str) -> tuple:
        """One moment's factors of a batch, (U (B, k, r), s (B, r), Vh (B, r, n)). In step(), packed:
        the first step that batches these bodies together stacks their factors once and puts
        views of the stacked tensors (row i) into body i's state in their place (the same keys,
        shapes, dtypes and values: a state_dict does not change), so later steps read the batch's
        factors without a copy and _store_batch_factors writes them with one copy per part, where
        stacking and storing made a copy of every body's tensors each step (on a GPU one
        multi-tensor launch, on the CPU a per-tensor loop: ~2 us per tensor). A pack is used only
        while every body's state still holds its views (load_state_dict replaces the state). Outside
        step() (step_tensors: which tensors step together changes), stacked copies."""
        names = [f"{name}_{part}" for part in ("u", "s", "vh")]
        if self._packs_used is None:
            return tuple(torch.stack([e[part] for e in entries]) for part in names)
        key = (name, *map(id, entries))
        pack = self._packs.get(key)
        if pack is None or not all(all(map(operator.is_, map(operator.itemgetter(part), entries), views))
                                   for part, views in zip(names, pack[1])):
            stacked = tuple(torch.stack([e[part] for e in entries]) for part in names)
            views = tuple(t.unbind(0) for t in stacked)
            for part, rows in zip(names, views):
                for e, row in zip(entries, rows):
                    e[part] = row
            pack = self._packs[key] = (stacked, views)
        self._packs_used.add(key)
        return pack[0]

    def _store_batch_factors(self, entries: list[dict], name: str, u, s, vh) -> None:
        """_store_factors for one moment of a batch: row i of u, s, vh into body i's state, in
        one copy per part where step() packed the batch's factors (_batch_factor_parts), else in
        one multi-tensor copy."""
        key = (name, *map(id, entries))
        if self._packs_used is not None and key in self._packs_used:
            for target, value in zip(self._packs[key][0], (u, s, vh)):
                target.copy_(value)
            return
        targets = [e[f"{name}_{part}"] for part in ("u", "s", "vh") for e in entries]
        torch._foreach_copy_(targets, [*u.unbind(0), *s.unbind(0), *vh.unbind(0)])

    def _store_factors(self, entry: dict, factors) -> None:
        for name, (u, s, vh) in zip(self.moment_names, factors):
            entry[f"{name}_u"].copy_(u)
            entry[f"{name}_s"].copy_(s)
            entry[f"{name}_vh"].copy_(vh)

    def _local_update_batched(self, bodies: list[tuple]) -> None:
        """The same as _local_update on each body, with the bodies of one shape and group
        batched: one rebuild product, one QR and one SVD call per batch instead of one per body
        (kernel launches and LAPACK calls, not passes over memory, dominate small blocks and GPUs).
        The reference path's elementwise update runs per body, on views of the batch buffers;
        the fused step's is one call per batch on the CPU (_fused_local_update)."""
        self._deferred = []
        try:
            self._local_update_batches(bodies)
            finished = lowrank.finish_compress([pending for _, _, pending in self._deferred])
            for (entries, name, _), factors in zip(self._deferred, finished):
                self._store_batch_factors(entries, name, *factors)
        finally:
            self._deferred = None

    def _local_update_batches(self, bodies: list[tuple]) -> None:
        """_local_update_batched's work, with the small SVDs of Gram-algebra batches (a GPU's
        float32 batches) left in self._deferred: one eigensolver call for all of them afterwards
        (lowrank.finish_compress)."""
        batches: dict[tuple, list] = {}
        for body in bodies:
            group, plan, value = body[0], body[1], body[2]
            key = (id(group), plan.body_rows, plan.piece.matrix.cols, plan.rank, value.dtype, value.device)
            batches.setdefault(key, []).append(body)
        for items in (chunk for same_shape in batches.values()
                      for chunk in batch_chunks(same_shape, max_elements=batch_cap(
                          self.fused, same_shape[0][2].device.type))):
            if len(items) == 1:
                self._local_update(*items[0])
            else:
                self._local_update_batch(items)     # its buffers die when it returns

    def _local_update_batch(self, items: list[tuple]) -> None:
        """Rebuild, update and recompress a batch of same-shaped bodies of one group."""
        if self.fused:
            self._fused_local_update(items)
            return
        group, compute = items[0][0], compute_dtype_for(items[0][2].dtype)
        entries = [item[4] for item in items]
        batch_factors = self._batch_factors(entries, compute)
        floors = [[f[i] for _, _, f in batch_factors] for i in range(len(items))]
        moments = [torch.bmm(us, vh) for us, vh, _ in batch_factors]           # (B, k, n) each
        del batch_factors                 # not alive through the updates (the step's peak)
        for i, (_, plan, body, body_grad, entry, step) in enumerate(items):
            mine = [p[i] for p in moments]
            for buffer, moment in zip(mine, self._body_moments(group, body, body_grad, entry, step, mine,
                                                               floors=floors[i],
                                                               rounding=self._body_rounding(plan, body, step))):
                if moment.data_ptr() != buffer.data_ptr():          # an update that was not in place
                    buffer.copy_(moment)
        del floors
        self._compress_batch(items, moments)

    def _local_update(self, group, plan: PiecePlan, body, body_grad, entry, step: int) -> None:
        """Compress this body on its own: rebuild, update, recompress, apply. No collectives.
        The reference path (batched=False); _local_update_batch must agree with it. Fused, a
        batch of one (_fused_local_update)."""
        if self.fused:
            self._fused_local_update([(group, plan, body, body_grad, entry, step)])
            return
        moments = self._body_moments(group, body, body_grad, entry, step,
                                     rounding=self._body_rounding(plan, body, step))
        key = plan.piece.key
        self._store_factors(entry, [
            compress(moment, plan.rank, group["oversample"], group["niter"],
                     sketch_seed(self.seed, step, key, plan.body_row0, state_id))
            for state_id, moment in enumerate(moments)])

    def _fused_local_update(self, items: list[tuple]) -> None:
        """fused=True: same-shaped bodies of one group (a batch, or one body) updated from the
        stacked factors by _fused_update (on the CPU one call of the C++ block kernel, on a GPU
        one compiled call on the weights gathered into the "weight" workspace), then each moment
        of the batch recompressed in one call."""
        group, compute = items[0][0], compute_dtype_for(items[0][2].dtype)
        entries = [item[4] for item in items]
        shape, device = (len(items), *items[0][2].shape), items[0][2].device
        factors = self._batch_factors(entries, compute)
        grad = self._stacked_gradients([item[3] for item in items], shape, compute)
        buffer = self._workspace("moment", shape, compute, device) if self.fused_buffers else None
        stacked = (self._stacked_workspace("weight", shape, items[0][2].dtype, device)
                   if len(items) > 1 and not fused.runs_cpu_kernels(grad) else None)
        roundings = ([self._body_rounding(item[1], item[2], item[5]) for item in items]
                     if self._may_round(items[0][2]) else None)
        moments = self._fused_update(group, [item[2] for item in items], grad, factors,
                                     [item[5] for item in items], buffer, roundings, stacked)
        del factors
        self._compress_batch(items, moments)

    def _compress_batch(self, items: list[tuple], moments: list) -> None:
        """Recompress each new moment of a batch (B, k, n) in one call and store row i of its
        factors into body i's state: lowrank.compress_batch on the reference path,
        skinny.compress_batch on the fused one (on the CPU its C++ range finder)."""
        group, rank, entries = items[0][0], items[0][1].rank, [item[4] for item in items]
        compress_batch = skinny.compress_batch if self.fused else lowrank.compress_batch
        for state_id, (name, moment) in enumerate(zip(self.moment_names, moments)):
            if self._deferred is not None and lowrank.defers_small_svd(moment, len(items)):
                device = (moment.dense if isinstance(moment, MomentUpdate) else moment).device
                basis, small = lowrank.compress_range(moment, rank, group["oversample"], group["niter"],
                                                      self._sketch_seeds(items, state_id, device))
                self._deferred.append((entries, name, (basis, small, rank)))
                continue
            seeds = self._sketch_seeds(items, state_id, torch.device("cpu")).tolist()
            u, s, vh = compress_batch(moment, rank, group["oversample"], group["niter"], seeds)
            self._store_batch_factors(entries, name, u, s, vh)

    def _sketch_seeds(self, items: list[tuple], state_id: int, device: torch.device) -> lowrank.SketchSeeds:
        """The sketch seeds of a batch's moment state_id (sketch_seed's numbers) as a
        lowrank.SketchSeeds, its bases on `device`. In step() the bases are made once per batch and
        kept while step() batches the same bodies (in _packs, with the bodies' plans: the ids in
        the key cannot become another object's while the entry holds them), so a step's seeds are
        a few operators on the device, not Python per body; elsewhere they are made per call."""
        plans = [item[1] for item in items]
        steps = lowrank.per_body([item[5] for item in items], torch.int64, device)
        in_step, key = self._packs_used is not None, ("seeds", state_id, device, *map(id, plans))
        kept = self._packs.get(key) if in_step else None
        if kept is None:
            bases = torch.tensor([to_int64(lowrank.body_seed(self.seed, plan.piece.key, plan.body_row0, state_id))
                                  for plan in plans], dtype=torch.int64).to(device, non_blocking=True)
            kept = (plans, bases)
        if in_step:
            self._packs[key] = kept
            self._packs_used.add(key)
        return lowrank.SketchSeeds(kept[1], steps)

    def _stacked_gradients(self, grads: list, shape, dtype: torch.dtype) -> torch.Tensor:
        """The bodies' gradients as one (B, k, n) tensor of `dtype`. A lone body: its own gradient
        (a view) when it has that dtype, else a fresh copy in it. A batch: the kept "gradient"
        workspace, filled by one stack (that converts the dtype too; on the CPU half the time of a
        multi-tensor copy into its rows, which also makes a view per row)."""
        if len(grads) == 1:
            return grads[0].to(dtype)[None]
        stacked = self._workspace("gradient", shape, dtype, grads[0].device)
        return torch.stack(grads, out=stacked)

    def _workspace(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A (shape) view of a buffer this optimizer keeps between steps (fused=True): "moment"
        takes the second moment of a body, or of a batch of bodies; "gradient" a batch's
        gradients stacked; "weight" (GPU rules) a batch's weights, stacked for the compiled call. One buffer per name, dtype and device, as large as the largest use
        seen (a batch holds at most FUSED_BATCH_ELEMENTS): a fresh buffer every step costs a
        page fault per 4 KiB on the CPU (measured ~2 us each, half the time of a 1024 x 1024
        block's kernel). Not part of the state_dict."""
        numel, key = math.prod(shape), (name, dtype, torch.device(device))
        buffer = self._workspaces.get(key)
        if buffer is None or buffer.numel() < numel:
            self._workspaces.pop(key, None)         # free the old one before allocating
            self._workspace_rows.pop(key, None)
            buffer = self._workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def _stacked_workspace(self, name: str, shape, dtype: torch.dtype, device) -> fused.Stacked:
        """_workspace with its rows (the (k, n) views of a (B, k, n) shape) made once per buffer
        and shape, for the multi-tensor copy that writes a batch back (fused.Stacked): a view per
        row every step cost ~0.8 us each on the CPU."""
        view = self._workspace(name, shape, dtype, device)
        key = (name, dtype, torch.device(device))
        cached = self._workspace_rows.get(key)
        if cached is None or cached[0].shape != view.shape:
            cached = self._workspace_rows[key] = fused.Stacked(view, list(view.unbind(0)))
        return cached

    def _global_prepare(self, matrices) -> list:
        """Per matrix piece of this rank: the sums of its previous moments that the update needs
        whole-matrix values of (_moment_stats, summed over ranks by the first all-reduce). The
        moments are rebuilt one piece at a time and dropped: _global_update rebuilds them again
        batch by batch, so that the step never holds more than one batch of full-size moments."""
        prepared = []
        for group, param, spec, plan in matrices:
            if plan is None:
                prepared.append(None)
                continue
            entry = self._state_entry(param, spec.key)
            compute = compute_dtype_for(param.dtype)
            floors = self._noise_floors(entry, compute)
            stats = self._moment_stats(self._piece_moments(entry, spec, plan, compute), floors) \
                if self.stats_per_matrix else []
            prepared.append({"local_stats": stats, "floors": floors, "entry": entry})
        return prepared

    def _piece_moments(self, entry, spec, plan, compute) -> list[torch.Tensor]:
        """This rank's elements of every previous moment of a matrix piece: piece-flat tensors."""
        skip = plan.piece.start - plan.piece.first_row * spec.cols
        return [rows.reshape(-1)[skip:skip + plan.piece.numel] for rows in self._rebuild_moments(entry, compute)]

    def _global_first_all_reduce(self, matrices, prepared, bad: torch.Tensor) -> torch.Tensor:
        """One small all-reduce: the non-finite flag, then per matrix the moment statistics
        (MLorc-AdamW: sum and count of negative entries of the rebuilt second moment)."""
        width = self.stats_per_matrix
        buffer = torch.zeros(1 + width * len(matrices), dtype=torch.float64)
        buffer[0] = bad
        for j, item in enumerate(prepared):
            if item is not None and width:
                buffer[1 + width * j:1 + width * (j + 1)] = torch.stack(
                    [t.to(torch.float64).cpu() for t in item.pop("local_stats")])
        all_reduce_sum(buffer, self._shared_group(matrices))
        for j, item in enumerate(prepared):
            if item is not None:
                item["stats"] = list(buffer[1 + width * j:1 + width * (j + 1)])
        return buffer[0]

    def _global_batches(self, matrices) -> list[list[int]]:
        """`matrices` cut into consecutive batches whose whole matrices hold at most
        BATCH_ELEMENTS elements per moment (a larger matrix is a batch alone). The rule reads
        only whole-matrix shapes, the same on every rank, so every rank makes the same batches
        and the same collectives in the same order."""
        batches, current, size = [], [], 0
        for j, (_, _, spec, _) in enumerate(matrices):
            numel = spec.rows * spec.cols
            if current and size + numel > BATCH_ELEMENTS:
                batches.append(current)
                current, size = [], 0
            current.append(j)
            size += numel
        return batches + ([current] if current else [])

    def _global_update(self, matrices, prepared) -> None:
        """Update every matrix piece and compress the new moments of whole matrices, one batch
        of matrices at a time (_global_batches): a batch's previous and new moments are rebuilt,
        used and freed before the next batch's are made. Each matrix's result depends only on
        its own blocks and seeds, so the batching does not change it."""
        group_handle = self._shared_group(matrices)
        for batch in self._global_batches(matrices):
            self._global_update_batch([matrices[j] for j in batch], [prepared[j] for j in batch],
                                      group_handle)

    def _global_update_batch(self, matrices, prepared, group_handle) -> None:
        by_setting: dict[tuple, list] = {}
        for (group, param, spec, plan), item in zip(matrices, prepared):
            m, n = spec.shape
            step = self.state[param]["step"]
            compute = compute_dtype_for(param.dtype)
            if item is None:
                moments = [None] * len(self.moment_names)
                row0, rows = 0, 0
            else:
                piece = plan.piece
                value = piece.view(_flat(param))
                grad = piece.view(_flat(param.grad)).to(compute)
                stats = [t.to(compute) for t in item["stats"]]
                prevs = self._piece_moments(item["entry"], spec, plan, compute)
                moments = self._lowrank_update(group, value, grad, prevs, item["floors"], stats, step,
                                               self._rounding(param, step, spec.key, piece.start))
                del prevs, grad
                row0, rows = piece.first_row, piece.row_count
            setting = (group["rank"], group["oversample"], group["niter"], compute)
            blocks = by_setting.setdefault(setting, [])
            for state_id, moment in enumerate(moments):
                padded = torch.zeros(rows, n, dtype=compute, device=param.device)  # (k, n)
                if moment is not None:
                    skip = plan.piece.start - row0 * n
                    padded.view(-1)[skip:skip + plan.piece.numel] = moment
                seed = sketch_seed(self.seed, step, spec.key, 0, state_id)
                blocks.append((RowBlock(padded, row0, (m, n), seed), item))
            del moments
        for (rank, oversample, niter, compute), blocks in by_setting.items():
            results = global_randomized_svd([b for b, _ in blocks], rank, oversample, niter,
                                            group_handle, compute)
            per_moment = len(self.moment_names)
            for i in range(0, len(blocks), per_moment):
                item = blocks[i][1]
                if item is not None:
                    self._store_factors(item["entry"], results[i:i + per_moment])

    def _shared_group(self, matrices):
        groups = {id(self._layouts[id(param)].process_group): self._layouts[id(param)].process_group
                  for _, param, _, _ in matrices}
        if len(groups) != 1:
            raise ValueError("global scope needs every tensor of one step() to share one process group")
        return next(iter(groups.values()))

    def _state_entry(self, param, key: str) -> dict:
        for plan, entry in zip(self._plans[id(param)], self.state[param]["pieces"]):
            if plan.piece.key == key:
                return entry
        raise AssertionError(f"no state for {key}")

    # ------------------------------------------------------------------ subclasses implement
    stats_per_matrix: int = 0

    def _moment_stats(self, prevs: list[torch.Tensor], floors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sums over a block's elements that the update needs whole-matrix values of."""
        return []

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int,
                      rounding: Rounding | None = None) -> None:
        """Update one dense region; write `value` with `rounding` (rounding.write_weight_)."""
        raise NotImplementedError

    def _dense_updates(self, items: list[tuple]) -> None:
        """_dense_update on every (group, value, grad, entry, prefix, step, rounding) of a step,
        in order. A subclass overrides it with multi-tensor operators (a fixed number of calls for
        all regions of one group and step count, whatever their number: per-region calls were
        most of a GPU step's host time for the 1-D tensors of a model)."""
        for item in items:
            self._dense_update(*item)

    def _dense_batches(self, items: list[tuple]) -> tuple[list[list], list[tuple]]:
        """_dense_updates' items split into lists of one group, step count, device and dtype
        (of the region, its gradient and its state alike, written to nearest: a multi-tensor
        update each) and the rest (one _dense_update each: stochastically rounded bf16 weights)."""
        batches: dict[tuple, list] = {}
        single = []
        for item in items:
            group, value, grad, entry, prefix, step, rounding = item
            if rounding is None and all(t.dtype == value.dtype
                                        for t in (grad, *(entry[prefix + n] for n in self.moment_names))):
                batches.setdefault((id(group), step, value.dtype, value.device), []).append(item)
            else:
                single.append(item)
        return list(batches.values()), single

    def _lowrank_update(self, group, value, grad, prevs, floors, stats, step: int,
                        rounding: Rounding | None = None) -> list[torch.Tensor]:
        """Update `value` in place from grad and the rebuilt previous moments (all the same
        shape, in the compute dtype; `floors`: their rounding-noise levels; `stats`: the sums of
        _moment_stats over the whole block or matrix), written with `rounding`; return the new
        moments to compress."""
        raise NotImplementedError

    # how many of the new moments the fused step writes out (into the (B, k, n) `buffer`); the
    # others it returns unformed (lowrank.MomentUpdate)
    fused_buffers: int = 0

    def _fused_update(self, group, values: list, grad, factors, steps: list, buffer,
                      roundings: list | None = None, stacked=None) -> list:
        """fused=True, local scope: the same update as _lowrank_update, for a batch of B
        same-shaped bodies at once and from the factors instead of rebuilt moments. `values`:
        the B weights (k, n); `grad` (B, k, n) in the compute dtype; `factors`: per moment
        (U diag(s) (B, k, r), Vh (B, r, n), noise floors (B,)) (_batch_factors); `steps`: each
        body's step count; `roundings`: each body's Rounding (bf16 weights written stochastically),
        or None; `stacked`: where the GPU rules gather a batch's weights (fused.adamw_blocks_).
        Returns per moment the new moments of the batch, to compress:
        `buffer` written (when fused_buffers), or a lowrank.MomentUpdate."""
        raise NotImplementedError(f"{self.algorithm} has no fused step")


# The largest batch of same-shaped bodies compressed together, in elements of one moment's
# buffer (B x k x n): 2**26 is 256 MiB in fp32. The batch's buffers are a step's workspace, so
# this bounds it (mlorc_dist.memory.planner models the same rule).
BATCH_ELEMENTS = 1 << 26
# The fused step keeps its batch buffers between steps (no fresh pages), so its batches are
# smaller on the CPU: 2**22 elements, 16 MiB in fp32 per buffer, already many calls' worth of
# bodies. On a GPU they are BATCH_ELEMENTS, like the reference path's (two kept buffers of
# 256 MiB in fp32: V and the stacked gradients).
FUSED_BATCH_ELEMENTS = 1 << 22
# Bodies larger than this (elements) are not batched. On the CPU, measured, batching wins only
# where calls dominate (bench/optimizer_step.py: 256x256 faster, 1024x1024 slower). On a GPU
# every body that fits a batch is batched: there the step is bound by host costs per call
# (~30-50 us per operator on the lent H100 machine), and with the Gram algebra for batches
# (lowrank.uses_gram_algebra) 4 x 4096^2, r = 4, went 15.8 -> 10.9 ms (reference path) and
# 17.1 -> 10.2 ms (fused) on an H100 (bench/gpu_algebra.py, docs/BENCHMARKS.md). (Before that
# algebra, cuSOLVER's batched SVD made 4096x4096 batches slower, and the limit was 2**21.)
BATCH_MAX_BODY = {"cpu": 1 << 18}
BATCH_MAX_BODY_OTHER = BATCH_ELEMENTS


def batch_chunks(items: list, body_numel: int | None = None, device_type: str | None = None,
                 max_elements: int | None = None) -> list[list]:
    """Split same-shaped bodies into batches of at most BATCH_ELEMENTS (or max_elements)
    elements (at least one body each); bodies above the device's BATCH_MAX_BODY go one by one.
    `items` are _local_piece_update tuples (their plan and body give the size and device)."""
    if body_numel is None:
        plan = items[0][1]
        body_numel = plan.body_rows * plan.piece.matrix.cols
    if device_type is None:
        device_type = items[0][2].device.type
    if body_numel > BATCH_MAX_BODY.get(_rules_of(device_type), BATCH_MAX_BODY_OTHER):
        return [[item] for item in items]
    per_batch = max(1, (max_elements or BATCH_ELEMENTS) // max(1, body_numel))
    return [items[i:i + per_batch] for i in range(0, len(items), per_batch)]


def batch_cap(fused: bool, device_type: str) -> int:
    """Elements of a batch's moment buffer (batch_chunks' max_elements): FUSED_BATCH_ELEMENTS
    for the fused step on the CPU, BATCH_ELEMENTS otherwise."""
    return FUSED_BATCH_ELEMENTS if fused and _rules_of(device_type) == "cpu" else BATCH_ELEMENTS


def _rules_of(device_type: str) -> str:
    """The device type whose batching caps apply: "cuda" for the CPU under
    MLORC_GPU_RULES_ON_CPU=1 (lowrank.takes_gpu_rules), else the device type itself."""
    return "cuda" if device_type == "cpu" and lowrank.takes_gpu_rules("cpu") else device_type


def fused_kept_elements(groups, device_type: str, moment_buffers: int) -> dict[str, int]:
    """Elements of the workspaces a fused optimizer keeps between steps (_workspace), from its
    batches: `groups` lists (bodies, elements per body) for each set of same-shaped bodies that
    one step() batches together. "moment" (V, when moment_buffers) is as large as the largest
    batch or lone body, "gradient" (the stacked gradients) as the largest batch of two or more,
    and under the GPU rules "weight" (the stacked weights, in the weights' dtype) as "gradient".
    The memory planner uses this; tests/test_memory.py checks it against a real optimizer."""
    kept = {"moment": 0, "gradient": 0}
    for count, one in groups:
        for chunk in batch_chunks(list(range(count)), body_numel=one, device_type=device_type,
                                  max_elements=batch_cap(True, device_type)):
            if moment_buffers:
                kept["moment"] = max(kept["moment"], len(chunk) * one)
            if len(chunk) > 1:
                kept["gradient"] = max(kept["gradient"], len(chunk) * one)
    if _rules_of(device_type) != "cpu":
        kept["weight"] = kept["gradient"]
    return kept


# Where fused=None (the default) takes the fused step: the devices on which the suite tests it
# equal to the reference path in every case it runs. A GPU joins once a device run of the suite's
# CUDA cases confirms it there; until then fused=None runs the reference path on a GPU.
FUSED_BY_DEFAULT = ("cpu",)


def check_fused(fused, scope: str) -> None:
    """ValueError for a `fused` that is not None, True or False, or True with global scope."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None, True or False (None: the default for the devices), got {fused!r}")
    if fused and scope != "local":
        raise ValueError("fused=True is implemented for scope='local' (each rank's blocks); "
                         "global scope runs the reference path: pass fused=False or leave fused unset")


def resolve_fused(fused, scope: str, device_types) -> bool:
    """Whether an optimizer runs the fused step: `fused` when True or False; for None, True in
    local scope when every tensor is on a device of FUSED_BY_DEFAULT, else False (the reference
    path: global scope always, a GPU until a device run confirms the fused step there)."""
    check_fused(fused, scope)
    if fused is not None:
        return fused
    device_types = set(device_types)
    return scope == "local" and bool(device_types) and device_types <= set(FUSED_BY_DEFAULT)


def nonfinite_count(grads: list) -> torch.Tensor:
    """Number of tensors whose L2 norm is not finite (a 0-d float64 tensor on their device): a
    NaN or inf element makes it non-finite, and so do finite elements whose squares sum past the
    dtype's max (a norm above ~1.8e19 in fp32 and bf16: a gradient whose square AdamW's second
    moment cannot hold). One read of each gradient, where torch.isfinite(g).all() makes several
    (measured 0.05 vs 4-5 ms for 1M fp32 elements on one CPU thread), and one multi-tensor norm
    per dtype and device, whatever the number of tensors (the L2 norm: on the CPU 0.6 ms for
    4 x 1M fp32 elements where the L1 norm took 3.7 ms and per-tensor sums 0.35 ms); the count
    stays on the device (the caller reads it: one host synchronisation)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    by_kind: dict[tuple, list] = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    counts = [(~torch.isfinite(torch.stack(torch._foreach_norm(same, 2)))).sum().to(torch.float64)
              for same in by_kind.values()]
    return counts[0] if len(counts) == 1 else sum(c.to(counts[0].device) for c in counts)


def _worth_compressing(group: dict, rows: int, cols: int, rank: int) -> bool:
    """False when rank-r factors would not be smaller than the dense block, (rows + cols + 1) r
    >= rows cols, and the group keeps dense state for such blocks (dense_when_no_saving)."""
    return not group["dense_when_no_saving"] or (rows + cols + 1) * rank < rows * cols


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _with_whole(plan: PiecePlan, local: torch.Tensor) -> PiecePlan:
    """plan with its `whole` shape where its piece is all of the local tensor `local` and the step
    can use that tensor as it is: a 1-D dense piece, (numel,); a local body of whole rows without
    head or tail, (k, n)."""
    if plan.piece.offset != 0 or plan.piece.numel != local.numel():
        return plan
    if plan.mode == "dense":
        return replace(plan, whole=(plan.piece.numel,))
    if plan.mode == "local" and not plan.head and not plan.tail:
        return replace(plan, whole=(plan.body_rows, plan.piece.matrix.cols))
    return plan


def _piece_views(plans: list, tensor: torch.Tensor) -> list:
    """Each plan's elements of a parameter or gradient. Where one piece is all of the local
    tensor (its plan's `whole` shape, _with_whole), the tensor itself: no view operators, which
    cost host time per call on a GPU; else views of its flat elements. Called twice per tensor
    and step: its test is one shape comparison."""
    local = _local(tensor)
    whole = plans[0].whole if len(plans) == 1 else ()
    if whole and local.shape == whole and local.is_contiguous():
        return [local]
    flat = _flat(tensor)
    return [plan.piece.view(flat) for plan in plans]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The 1-D local elements of a parameter or gradient (a view)."""
    local = _local(tensor)
    if not local.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got strides {local.stride()}")
    return local.view(-1)


def _move_state(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _move_state(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_move_state(v, device) for v in value]
    return value
