"""GaLore-AdamW (arXiv 2403.03507), per shard on the same pieces as MLorc: a baseline."""
from __future__ import annotations

import torch

from ..lowrank import compute_dtype_for
from .base import LowRankMomentumOptimizer
from .functional import adam_moments_, adam_step_size, adamw_dense_step, apply_direction, decoupled_weight_decay

__all__ = ["GaLoreAdamW", "galore_projector", "project", "project_back"]


def galore_projector(grad: torch.Tensor, rank: int) -> tuple[str, torch.Tensor]:
    """The projector from a full SVD of grad (k, n): the left r singular vectors (k, r) when
    k <= n, else the right ones (n, r). Returns (side, P)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    if grad.shape[0] <= grad.shape[1]:
        return "left", u[:, :rank]
    return "right", vh[:rank].mT


def project(grad: torch.Tensor, side: str, proj: torch.Tensor) -> torch.Tensor:
    """The r-dim gradient: P^T G (r, n) on the left side, G Q (k, r) on the right."""
    return proj.mT @ grad if side == "left" else grad @ proj


def project_back(low: torch.Tensor, side: str, proj: torch.Tensor) -> torch.Tensor:
    """An update in the r-dim space back to the block's shape: P N or N Q^T."""
    return proj @ low if side == "left" else low @ proj.mT


class GaLoreAdamW(LowRankMomentumOptimizer):
    """AdamW in a low-rank projection of each gradient block.

    Every `update_interval` steps (from the first) the projector is taken from a full SVD of
    the block's gradient; Adam's moments live in the projected r-dim space and are NOT reset
    when the projector changes (as in GaLore); the normalised update is projected back and
    scaled by `scale` (alpha). State per block (k x n, k <= n): P (k x r) and two r x n moments.

    Local scope only: each rank projects its own body rows (per shard, no communication).
    Dense AdamW for 1-D tensors, embeddings/lm_head (groups with lowrank=False) and the
    head/tail rows of a shard. Other arguments as MLorcAdamW. Checkpoints resume exactly at the
    same layout; they are not resharded.
    """

    moment_names = ("exp_avg", "exp_avg_sq")
    algorithm = "GaLore-AdamW"
    reshardable = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, rank: int = 128, update_interval: int = 200,
                 scale: float = 0.25, factor_dtype=None, lowrank: bool = True,
                 dense_when_no_saving: bool = True, scope: str = "local", seed: int = 0,
                 nonfinite: str = "skip"):
        if scope != "local":
            raise ValueError(f"GaLore-AdamW runs per shard: scope must be 'local', got {scope!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_interval=update_interval, scale=scale, oversample=0, niter=0,
                        factor_dtype=factor_dtype, lowrank=lowrank,
                        dense_when_no_saving=dense_when_no_saving)
        super().__init__(params, defaults, scope=scope, seed=seed, nonfinite=nonfinite, batched=False)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        interval = group["update_interval"]
        if not (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1):
            raise ValueError(f"{self.algorithm}: invalid update_interval={interval!r}: an int >= 1")
        if not (isinstance(group["scale"], (int, float)) and group["scale"] > 0):
            raise ValueError(f"{self.algorithm}: invalid scale={group['scale']!r}: must be > 0")

    def _lowrank_state(self, group, plan, rows, cols, dtype, device) -> dict:
        r = plan.rank
        if rows <= cols:
            proj, moment = (rows, r), (r, cols)
        else:
            proj, moment = (cols, r), (rows, r)
        compute = compute_dtype_for(dtype)
        return {"proj": torch.zeros(proj, dtype=dtype, device=device),
                "exp_avg": torch.zeros(moment, dtype=compute, device=device),
                "exp_avg_sq": torch.zeros(moment, dtype=compute, device=device)}

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int, rounding=None) -> None:
        beta1, beta2 = group["betas"]
        adamw_dense_step(value, grad, entry[prefix + "exp_avg"], entry[prefix + "exp_avg_sq"],
                         lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], step=step, correct_bias=True)

    def _local_update(self, group, plan, body, body_grad, entry, step: int) -> None:
        compute = entry["exp_avg"].dtype
        grad = body_grad.to(compute)
        side = "left" if body.shape[0] <= body.shape[1] else "right"
        if (step - 1) % group["update_interval"] == 0:
            _, proj = galore_projector(grad, plan.rank)
            entry["proj"].copy_(proj)
        proj = entry["proj"].to(compute)
        beta1, beta2 = group["betas"]
        m, v = adam_moments_(project(grad, side, proj), entry["exp_avg"], entry["exp_avg_sq"],
                             beta1, beta2)
        low = m / (v.sqrt() + group["eps"])
        step_size = adam_step_size(group["lr"], beta1, beta2, step, True) * group["scale"]
        apply_direction(body, project_back(low, side, proj), step_size)
        decoupled_weight_decay(body, group["lr"], group["weight_decay"])
