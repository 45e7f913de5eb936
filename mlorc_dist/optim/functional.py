"""The update rules as free functions on plain tensors (no state objects, no distributed).

Elementwise rules work on any shape (1-D dense regions, 2-D bodies, flat pieces). All of them
update `param` in place and return nothing, or return the new moments.
"""
from __future__ import annotations

import math

import torch

from .rounding import Rounding, write_weight_

__all__ = [
    "adam_step_size",
    "adamw_dense_step",
    "adam_moments_",
    "adam_apply",
    "lion_dense_step",
    "lion_direction",
    "lion_moment_",
    "decoupled_weight_decay",
    "decay_factor",
    "apply_direction",
    "apply_low_rank_direction",
]


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """lr * sqrt(1 - b2^t) / (1 - b1^t): the reference's (Hugging Face style) bias correction.

    Unlike torch.optim.AdamW, eps is then added to the UNcorrected sqrt(v): the two agree
    exactly when eps == 0 and differ by eps * (1 - sqrt(1 - b2^t)) in the denominator otherwise.
    """
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def decoupled_weight_decay(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W -= lr * wd * W, applied after the update as the reference does."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)


def adam_moments_(grad: torch.Tensor, m_prev: torch.Tensor, v_prev: torch.Tensor,
                  beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M = b1 m + (1 - b1) G, V = b2 v + (1 - b2) G*G, written over m_prev and v_prev (the
    rebuilt temporaries: no new m x n tensor)."""
    m = m_prev.lerp_(grad, 1.0 - beta1)            # m + (1 - b1) (g - m)
    v = v_prev.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return m, v


def adam_apply(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step_size: float,
               eps: float, decay: float = 1.0, rounding: Rounding | None = None) -> None:
    """W = (W - step_size * M / (sqrt(V) + eps)) * decay (decay = 1 - lr wd: the decoupled weight
    decay, after the update), computed in m's dtype and written once in param's dtype: rounded
    stochastically with `rounding` (bf16 weights), else to nearest."""
    denom = v.sqrt().add_(eps)
    if param.dtype == m.dtype:
        param.addcdiv_(m, denom, value=-step_size)
        if decay != 1.0:
            param.mul_(decay)
        return
    new = param.to(m.dtype).addcdiv_(m, denom, value=-step_size)
    if decay != 1.0:
        new.mul_(decay)
    write_weight_(param, new, rounding)


def decay_factor(lr: float, weight_decay: float) -> float:
    """The decoupled weight decay as a factor: 1 - lr wd (decoupled_weight_decay's)."""
    return 1.0 - lr * weight_decay if weight_decay != 0.0 else 1.0


def adamw_dense_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, step: int, correct_bias: bool,
                     rounding: Rounding | None = None) -> None:
    """Plain AdamW on one dense region, with the same conventions as MLorc-AdamW."""
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    adam_apply(param, exp_avg, exp_avg_sq, step_size=adam_step_size(lr, beta1, beta2, step, correct_bias),
               eps=eps, decay=decay_factor(lr, weight_decay), rounding=rounding)


def lion_direction(grad: torch.Tensor, m_prev: torch.Tensor, beta1: float) -> torch.Tensor:
    """sign(b1 m + (1 - b1) G)."""
    return torch.lerp(grad, m_prev, beta1).sign_()


def lion_moment_(grad: torch.Tensor, m_prev: torch.Tensor, beta2: float) -> torch.Tensor:
    """b2 m + (1 - b2) G, written over m_prev."""
    return m_prev.lerp_(grad, 1.0 - beta2)


def apply_direction(param: torch.Tensor, direction: torch.Tensor, lr: float, *, decay: float = 1.0,
                    rounding: Rounding | None = None) -> None:
    """W = (W - lr * direction) * decay, computed in the direction's dtype, written once in
    param's (rounded stochastically with `rounding`) (Lion's sign, MoFaSGD's U V^T, GaLore's
    projected-back update)."""
    if param.dtype == direction.dtype:
        param.add_(direction, alpha=-lr)
        if decay != 1.0:
            param.mul_(decay)
        return
    new = param.to(direction.dtype) - lr * direction
    if decay != 1.0:
        new.mul_(decay)
    write_weight_(param, new, rounding)


def apply_low_rank_direction(param: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                             lr: float) -> None:
    """W -= lr * left @ right for a 2-D param, left (k, r), right (r, n) in param's dtype: one
    in-place GEMM (addmm_) that reads and writes W once and makes no k x n temporary (MoFaSGD's
    U diag(phi(s)) V^T). Other dtypes go through apply_direction."""
    if param.dtype == left.dtype and param.dim() == 2 and param.is_contiguous():
        param.addmm_(left, right, alpha=-lr)
    else:
        apply_direction(param, left @ right, lr)


def lion_dense_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *,
                    lr: float, beta1: float, beta2: float, weight_decay: float,
                    rounding: Rounding | None = None) -> None:
    """Plain Lion on one dense region, with the same conventions as MLorc-Lion
    (update, then decoupled weight decay)."""
    g = grad.to(exp_avg.dtype)
    apply_direction(param, lion_direction(g, exp_avg, beta1), lr, decay=decay_factor(lr, weight_decay),
                    rounding=rounding)
    exp_avg.lerp_(g, 1.0 - beta2)

