"""MLorc-AdamW: AdamW whose two moments live as rank-r factors (arXiv 2506.01897)."""
from __future__ import annotations

import torch

from ..lowrank import MomentUpdate, fill_negatives_, negative_fill_value, negative_stats
from .base import LowRankMomentumOptimizer
from .fused import adamw_blocks_
from .functional import (adam_apply, adam_moments_, adam_step_size, adamw_dense_step, adamw_dense_steps,
                         decay_factor)

__all__ = ["MLorcAdamW"]


class MLorcAdamW(LowRankMomentumOptimizer):
    """AdamW with low-rank compressed first and second moments.

    Each 2-D block keeps (U, s, Vh) factors of m and v: 2 r (m + n + 1) numbers instead of 2 m n.
    Every step rebuilds both moments, forms this step's M and V with the gradient, updates the
    weights with them, and recompresses them by randomized SVD. Tensors that are not 2-D, groups
    with lowrank=False, and blocks too small to save memory get plain dense AdamW state.

    Arguments (per param group unless marked *):
        lr, betas, eps, weight_decay   as torch.optim.AdamW (weight decay decoupled, applied
                                       after the update, as the reference does)
        rank                           r, clamped to each block's smaller side (with a warning)
        oversample                     extra sketch columns p (q = r + p)
        niter                          power iterations of the range finder (reference: 1)
        correct_bias                   bias correction, reference style: eps is added to the
                                       uncorrected sqrt(v) (equal to torch AdamW when eps = 0)
        factor_dtype                   dtype of the stored factors: None (fp32, float64 for
                                       float64 params) or "bf16"
        lowrank                        False keeps dense state for the whole group (embeddings,
                                       lm_head: see mlorc_dist.param_groups)
        dense_when_no_saving           a block with (k + n + 1) r >= k n keeps dense state
        scope*                         "local": each rank compresses its own rows, no
                                       collectives; "global": the whole-matrix randomized SVD
                                       from all ranks by small all-reduces (world-size invariant)
        seed*                          seeds every sketch (with step, parameter and row)
        nonfinite*                     "skip" (default: the whole step is skipped, counted in
                                       .skipped_steps, warned about; nothing changes), "raise",
                                       or "ignore" (no check: a NaN then poisons the factors)
        batched*                       compress same-shaped small bodies in one batched call
        fused*                         True: one pass per block (optim/fused.py) instead of the
                                       reference path's GEMM rebuild and elementwise passes, the
                                       first moment left unformed, V in a workspace kept between
                                       steps; on the CPU C++ kernels (optim/cpu_kernels.py: the
                                       block updates, one call per batch, and the range finder's
                                       products), on a GPU torch.compile; local scope only.
                                       False: the reference path. None (default): the fused step
                                       where it is tested equal to the reference path (local
                                       scope, CPU tensors: base.resolve_fused), else the
                                       reference path; .fused says which was chosen
        stochastic_rounding*           bf16 weights are written with stochastic rounding (every
                                       path; bits from seed, step, parameter and element:
                                       optim/rounding.py); False rounds to nearest. float32 /
                                       float64 weights are written exactly either way
    """

    moment_names = ("exp_avg", "exp_avg_sq")
    algorithm = "MLorc-AdamW"
    stats_per_matrix = 2

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, rank: int = 4, oversample: int = 0, niter: int = 1,
                 correct_bias: bool = True, factor_dtype=None, lowrank: bool = True,
                 dense_when_no_saving: bool = True, scope: str = "local", seed: int = 0,
                 nonfinite: str = "skip", batched: bool = True, fused: bool | None = None,
                 stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        oversample=oversample, niter=niter, correct_bias=correct_bias,
                        factor_dtype=factor_dtype, lowrank=lowrank,
                        dense_when_no_saving=dense_when_no_saving)
        super().__init__(params, defaults, scope=scope, seed=seed, nonfinite=nonfinite,
                         batched=batched, fused=fused, stochastic_rounding=stochastic_rounding)

    def _dense_update(self, group, value, grad, entry, prefix: str, step: int, rounding=None) -> None:
        beta1, beta2 = group["betas"]
        adamw_dense_step(value, grad, entry[prefix + "exp_avg"], entry[prefix + "exp_avg_sq"],
                         lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], step=step,
                         correct_bias=group["correct_bias"], rounding=rounding)

    def _dense_updates(self, items) -> None:
        batches, single = self._dense_batches(items)
        for item in single:
            self._dense_update(*item)
        for batch in batches:
            group, step = batch[0][0], batch[0][5]
            beta1, beta2 = group["betas"]
            adamw_dense_steps([i[1] for i in batch], [i[2] for i in batch],
                              [i[3][i[4] + "exp_avg"] for i in batch], [i[3][i[4] + "exp_avg_sq"] for i in batch],
                              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=step, correct_bias=group["correct_bias"])

    def _moment_stats(self, prevs, floors):
        """Sum of |v| over the negative entries of the rebuilt v, and their count."""
        return list(negative_stats(prevs[1], floors[1]))

    def _lowrank_update(self, group, value, grad, prevs, floors, stats, step: int, rounding=None):
        beta1, beta2 = group["betas"]
        m_prev, v_prev = prevs
        fill_negatives_(v_prev, negative_fill_value(stats[0], stats[1]), floors[1])
        m, v = adam_moments_(grad, m_prev, v_prev, beta1, beta2)
        adam_apply(value, m, v, eps=group["eps"],
                   step_size=adam_step_size(group["lr"], beta1, beta2, step, group["correct_bias"]),
                   decay=decay_factor(group["lr"], group["weight_decay"]), rounding=rounding)
        return [m, v]

    fused_buffers = 1      # V; M stays unformed

    def _fused_update(self, group, values, grad, factors, steps, buffer, roundings=None, stacked=None) -> list:
        beta1, beta2 = group["betas"]
        (m_us, m_vh, _), (v_us, v_vh, v_floors) = factors
        sizes = {step: adam_step_size(group["lr"], beta1, beta2, step, group["correct_bias"]) for step in set(steps)}
        step_sizes = [sizes[step] for step in steps]
        adamw_blocks_(values, grad, m_us, m_vh, v_us, v_vh, v_floors, beta1, beta2, step_sizes, group["eps"],
                      1.0 - group["lr"] * group["weight_decay"], buffer, roundings, stacked)
        return [MomentUpdate(m_us, m_vh, grad, beta1, 1.0 - beta1), buffer]
