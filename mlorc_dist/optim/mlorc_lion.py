"""MLorc-Lion: Lion whose momentum lives as rank-r factors (arXiv 2506.01897)."""
from __future__ import annotations

from ..lowrank import MomentUpdate
from .base import LowRankMomentumOptimizer
from .fused import lion_blocks_
from .functional import apply_direction, decay_factor, lion_dense_step, lion_direction, lion_moment_

__all__ = ["MLorcLion"]


class MLorcLion(LowRankMomentumOptimizer):
    """Lion with a low-rank compressed momentum: r (m + n + 1) numbers per 2-D block.

        W -= lr * sign(b1 M~ + (1 - b1) G);  M = b2 M~ + (1 - b2) G;  factors = rsvd(M);
        W -= lr * wd * W

    Same arguments as MLorcAdamW except eps and correct_bias; defaults follow the reference
    (betas (0.95, 0.98), weight_decay 0.05, niter 0: no power iteration).
    """

    moment_names = ("exp_avg",)
    algorithm = "MLorc-Lion"

    def __init__(self, params, lr: float = 1e-4, betas=(0.95, 0.98), weight_decay: float = 0.05, *,
                 rank: int = 4, oversample: int = 0, niter: int = 0, factor_dtype=None,
                 lowrank: bool = True, dense_when_no_saving: bool = True, scope: str = "local",
                 seed: int = 0, nonfinite: str = "skip", batched: bool = True, fused: bool = False,
                 stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, rank=rank,
                        oversample=oversample, niter=niter, factor_dtype=factor_dtype,
                        lowrank=lowrank, dense_when_no_saving=dense_when_no_saving)
        super().__init__(params, defaults, scope=scope, seed=seed, nonfinite=nonfinite,
                         batched=batched, fused=fused, stochastic_rounding=stochastic_rounding)

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int, rounding=None) -> None:
        beta1, beta2 = group["betas"]
        lion_dense_step(value, grad, entry[prefix + "exp_avg"], lr=group["lr"], beta1=beta1,
                        beta2=beta2, weight_decay=group["weight_decay"], rounding=rounding)

    def _lowrank_update(self, group, value, grad, prevs, floors, stats, step: int, rounding=None):
        beta1, beta2 = group["betas"]
        (m_prev,) = prevs
        apply_direction(value, lion_direction(grad, m_prev, beta1), group["lr"],
                        decay=decay_factor(group["lr"], group["weight_decay"]), rounding=rounding)
        return [lion_moment_(grad, m_prev, beta2)]     # after the direction: it needs m_prev

    def _fused_update(self, group, values, grad, factors, steps, buffer, roundings=None) -> list:
        beta1, beta2 = group["betas"]
        ((m_us, m_vh, _),) = factors
        lion_blocks_(values, grad, m_us, m_vh, beta1, group["lr"], 1.0 - group["lr"] * group["weight_decay"],
                     roundings)
        return [MomentUpdate(m_us, m_vh, grad, beta2, 1.0 - beta2)]
