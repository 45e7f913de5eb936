"""MoFaSGD: SGD with a momentum kept as rank-r factors updated on the tangent space
(arXiv 2507.08091), per shard on the same pieces as MLorc."""
from __future__ import annotations

import math

import torch

from ..lowrank import compute_dtype_for, randomized_svd, sketch_seed
from ..scopes import RowBlock, global_randomized_svd, run_summed
from ..tangent import PHIS, factor_update, run_alone
from .base import LowRankMomentumOptimizer, _flat
from .functional import adamw_dense_step, apply_direction, apply_low_rank_direction, decoupled_weight_decay

__all__ = ["MoFaSGD"]

_INIT_STATE_ID = 7      # sketch seeds of the initial SVD of W differ from MLorc's moment sketches


class MoFaSGD(LowRankMomentumOptimizer):
    """Momentum-factorised SGD. Each compressed 2-D block keeps its momentum as U (rows x r),
    s (r), V (cols x r), initialised at the first step from the truncated SVD of the weight
    block itself. Every step the factors become the best rank-r approximation of
    momentum * M + P_T(G) (mlorc_dist.tangent.factor_update: two thin QRs and a 2r x 2r SVD,
    no m x n matrix), and W -= lr * U diag(phi(s)) V^T.

    Arguments (per param group unless marked *):
        lr                  step size of the factored update (its spectral norm is lr with
                            phi "spectral") and of AdamW on dense groups: give those groups
                            their own lr (a Muon-like lr for matrices is far above AdamW's)
        momentum            b of the factored momentum
        phi                 "spectral" (phi = 1, the paper's default: W -= lr U V^T) or
                            "inverse" (phi(s) = min(1/s, max_value), 0 where s <= eps)
        max_value           the cap of "inverse"
        betas, eps          AdamW of the dense regions (1-D tensors, embeddings, lm_head,
                            head/tail rows of a shard)
        weight_decay        decoupled, after the update
        rank                r, clamped to each block's smaller side
        oversample, niter   of the randomized truncated SVD of W that initialises the factors
        factor_dtype, lowrank, dense_when_no_saving, scope*, seed*, nonfinite*: as MLorcAdamW.
    Local scope: each rank's body rows are a matrix of their own, no communication. Global
    scope: the whole matrix's factors (U partitioned by rows, s and V on every rank), four
    batched all-reduces per step of (m + n) r, r^2, r^2 and r^2 numbers per matrix.
    Checkpoints resume exactly at the same layout; they are not resharded.
    """

    moment_names = ("exp_avg", "exp_avg_sq")      # AdamW state of the dense regions
    algorithm = "MoFaSGD"
    reshardable = False

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.9, *, phi: str = "spectral",
                 max_value: float = 1e3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 8, oversample: int = 8, niter: int = 2,
                 factor_dtype=None, lowrank: bool = True, dense_when_no_saving: bool = True,
                 scope: str = "local", seed: int = 0, nonfinite: str = "skip"):
        defaults = dict(lr=lr, momentum=momentum, phi=phi, max_value=max_value, betas=tuple(betas),
                        eps=eps, weight_decay=weight_decay, rank=rank, oversample=oversample,
                        niter=niter, factor_dtype=factor_dtype, lowrank=lowrank,
                        dense_when_no_saving=dense_when_no_saving)
        super().__init__(params, defaults, scope=scope, seed=seed, nonfinite=nonfinite, batched=False)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        b = group["momentum"]
        if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
            raise ValueError(f"{self.algorithm}: invalid momentum={b!r}: must be in [0, 1)")
        if group["phi"] not in PHIS:
            raise ValueError(f"{self.algorithm}: invalid phi={group['phi']!r}: one of {sorted(PHIS)}")
        if not (isinstance(group["max_value"], (int, float)) and math.isfinite(group["max_value"])
                and group["max_value"] > 0):
            raise ValueError(f"{self.algorithm}: invalid max_value={group['max_value']!r}: must be > 0")

    # ------------------------------------------------------------------ state and dense parts
    def _lowrank_state(self, group, plan, rows, cols, dtype, device) -> dict:
        return {"u": torch.zeros(rows, plan.rank, dtype=dtype, device=device),
                "s": torch.zeros(plan.rank, dtype=dtype, device=device),
                "v": torch.zeros(cols, plan.rank, dtype=dtype, device=device)}

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int, rounding=None) -> None:
        beta1, beta2 = group["betas"]
        adamw_dense_step(value, grad, entry[prefix + "exp_avg"], entry[prefix + "exp_avg_sq"],
                         lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], step=step, correct_bias=True)

    def _direction_factors(self, group, u, s, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(U diag(phi(s)), V^T): the update direction as a product."""
        return u * PHIS[group["phi"]](s, group["max_value"]), v.mT

    def _direction(self, group, u, s, v) -> torch.Tensor:
        """U diag(phi(s)) V^T over this block's rows."""
        left, right = self._direction_factors(group, u, s, v)
        return left @ right

    @staticmethod
    def _store(entry: dict, u, s, v) -> None:
        entry["u"].copy_(u)
        entry["s"].copy_(s)
        entry["v"].copy_(v)

    # ------------------------------------------------------------------ local scope
    def _local_update(self, group, plan, body, body_grad, entry, step: int) -> None:
        compute = compute_dtype_for(body.dtype)
        if step == 1:
            u, s, vh = randomized_svd(body.to(compute), plan.rank, group["oversample"], group["niter"],
                                      sketch_seed(self.seed, 0, plan.piece.key, plan.body_row0,
                                                  _INIT_STATE_ID))
            self._store(entry, u, s, vh.mT)
        factors = [entry[name].to(compute) for name in ("u", "s", "v")]
        u, s, v = run_alone(factor_update(*factors, body_grad.to(compute), group["momentum"]))
        self._store(entry, u, s, v)
        apply_low_rank_direction(body, *self._direction_factors(group, u, s, v), group["lr"])
        decoupled_weight_decay(body, group["lr"], group["weight_decay"])

    # ------------------------------------------------------------------ global scope
    def _global_prepare(self, matrices) -> list:
        return [None] * len(matrices)           # nothing to rebuild; the first all-reduce is the flag

    def _global_update(self, matrices, prepared) -> None:
        """Every matrix's factor update, one batch of whole matrices at a time (_global_batches:
        the same cut on every rank): one all-reduce per stage for a batch's matrices, whose row
        blocks are freed before the next batch's are made."""
        group_handle = self._shared_group(matrices)
        for batch in self._global_batches(matrices):
            self._global_update_batch([matrices[j] for j in batch], group_handle)

    def _global_update_batch(self, matrices, group_handle) -> None:
        blocks = []
        for group, param, spec, plan in matrices:
            m, n = spec.shape
            compute = compute_dtype_for(param.dtype)
            rank = min(group["rank"], m, n)
            first = self.state[param]["step"] == 1          # the weights seed the factors (_global_init)
            if plan is None:                    # this rank holds no element: zeros, same collectives
                blocks.append(dict(group=group, param=param, spec=spec, plan=None, rank=rank, row0=0,
                                   weight=torch.zeros(0, n, dtype=compute, device=param.device) if first else None,
                                   grad=torch.zeros(0, n, dtype=compute, device=param.device),
                                   entry=None, step=self.state[param]["step"]))
                continue
            piece = plan.piece
            row0, rows = piece.first_row, piece.row_count
            skip = piece.start - row0 * n
            weight = None
            if first:
                weight = torch.zeros(rows, n, dtype=compute, device=param.device)
                weight.view(-1)[skip:skip + piece.numel] = piece.view(_flat(param))
            grad = torch.zeros(rows, n, dtype=compute, device=param.device)
            grad.view(-1)[skip:skip + piece.numel] = piece.view(_flat(param.grad))
            blocks.append(dict(group=group, param=param, spec=spec, plan=plan, rank=rank, row0=row0,
                               weight=weight, grad=grad, skip=skip,
                               entry=self._state_entry(param, spec.key), step=self.state[param]["step"]))
        self._global_init([b for b in blocks if b["step"] == 1], group_handle)
        generators = []
        for b in blocks:
            n, rank, compute = b["spec"].cols, b["rank"], b["grad"].dtype
            if b["entry"] is None:
                u = b["grad"].new_zeros(0, rank)
                s, v = b["grad"].new_zeros(rank), b["grad"].new_zeros(n, rank)
            else:
                u, s, v = (b["entry"][name].to(compute) for name in ("u", "s", "v"))
            own = torch.ones(u.shape[0], 1, dtype=compute, device=u.device)
            if b["plan"] is not None and b["plan"].piece.start % n:
                own[0] = 0.0                    # a partial first row counts on the rank before
            generators.append(factor_update(u, s, v, b["grad"], b["group"]["momentum"],
                                            rows=b["spec"].rows, row0=b["row0"], own=own))
        for b, (u, s, v) in zip(blocks, run_summed(generators, group_handle)):
            if b["entry"] is None:
                continue
            self._store(b["entry"], u, s, v)
            group, piece = b["group"], b["plan"].piece
            direction = self._direction(group, u, s, v).reshape(-1)[b["skip"]:b["skip"] + piece.numel]
            value = piece.view(_flat(b["param"]))
            apply_direction(value, direction, group["lr"])
            decoupled_weight_decay(value, group["lr"], group["weight_decay"])

    def _global_init(self, blocks: list[dict], group_handle) -> None:
        """Factors from the whole-matrix truncated SVD of W (every rank takes part)."""
        by_setting: dict[tuple, list[dict]] = {}
        for b in blocks:
            group = b["group"]
            by_setting.setdefault((group["rank"], group["oversample"], group["niter"], b["grad"].dtype),
                                  []).append(b)
        for (rank, oversample, niter, compute), same in by_setting.items():
            rows = [RowBlock(b["weight"], b["row0"], b["spec"].shape,
                             sketch_seed(self.seed, 0, b["spec"].key, 0, _INIT_STATE_ID)) for b in same]
            for b, (u, s, vh) in zip(same, global_randomized_svd(rows, rank, oversample, niter,
                                                                  group_handle, compute)):
                if b["entry"] is not None:
                    self._store(b["entry"], u, s, vh.mT)
