"""Every training method by name: what launch/train.py, the DeepSpeed adapter and the
comparison harness select with one string.

A method has up to three parts, called in this order:
    prepare_model(name, model, ...)        before any engine wraps the model (LoRA, SwitchLoRA
                                           replace layers); the identity for the others
    build_optimizer(name, model, ...)      after the engine (FSDP2) has made its parameters
    after_step(name, model, optimizer, step, total_steps)
                                           after each optimizer step (SwitchLoRA's switching)

    adamw        dense AdamW through the same pieces as MLorc (same checkpoints)
    mlorc-adamw  MLorc-AdamW;  mlorc-lion  MLorc-Lion
    mofasgd      MoFaSGD (factored momentum on the tangent space); AdamW on dense groups
    galore       GaLore-AdamW (projected Adam, projector from an SVD every T steps)
    lora         peft LoRA adapters, AdamW on the adapters
    switchlora   SwitchLoRA adapters with candidate switching, its own AdamW
"""
from __future__ import annotations

import logging

from torch import nn

from .groups import param_groups, set_group_lrs

__all__ = ["METHODS", "prepare_model", "build_optimizer", "after_step", "check_method"]

logger = logging.getLogger("mlorc_dist")

METHODS = ("adamw", "mlorc-adamw", "mlorc-lion", "mofasgd", "galore", "lora", "switchlora")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return name


def prepare_model(name: str, model: nn.Module, *, rank: int = 8, seed: int = 0,
                  lora_alpha: float | None = None) -> nn.Module:
    """The model to hand the engine: with adapters for lora / switchlora, else `model`."""
    check_method(name)
    if name == "lora":
        from .lora import apply_lora
        return apply_lora(model, rank, alpha=lora_alpha, seed=seed)
    if name == "switchlora":
        from .switchlora import apply_switchlora
        return apply_switchlora(model, rank, seed=seed)
    return model


def build_optimizer(name: str, model: nn.Module, *, lr: float, dense_lr: float | None = None,
                    weight_decay: float = 0.0, rank: int = 4, scope: str = "local", seed: int = 0,
                    betas=None, compress_embeddings: bool = False, galore_interval: int = 200,
                    galore_scale: float = 0.25, mofasgd_momentum: float = 0.9,
                    mofasgd_phi: str = "spectral", fused: bool | None = None):
    """The optimizer of method `name` over the model's trainable parameters.

    lr is the step size of the method's own update of 2-D weights; dense_lr (default: lr)
    that of the AdamW / Lion state kept for embeddings, lm_head and 1-D tensors. Each param
    group records `lr_scale` = its lr / lr, so a schedule that sets lr keeps the ratio
    (launch/train.py's set_lr). fused is MLorc's (mlorc-adamw, mlorc-lion): True its fused step,
    False its reference path, None the default for the devices (MLorcAdamW's docstring); True
    is a ValueError for the other methods."""
    from . import optim

    check_method(name)
    if fused and name not in ("mlorc-adamw", "mlorc-lion"):
        raise ValueError(f"fused=True is MLorc's fused step (mlorc-adamw, mlorc-lion), not {name}'s")
    groups = param_groups(model, weight_decay=weight_decay, compress_embeddings=compress_embeddings)
    if not groups:
        raise ValueError(f"{name}: the model has no trainable parameter")
    set_group_lrs(groups, lr, dense_lr)
    common = dict(scope=scope, seed=seed)
    if name in ("adamw", "lora"):
        for group in groups:
            group["lowrank"] = False
        return optim.MLorcAdamW(groups, lr=lr, betas=tuple(betas or (0.9, 0.999)), rank=rank, **common)
    if name == "mlorc-adamw":
        return optim.MLorcAdamW(groups, lr=lr, betas=tuple(betas or (0.9, 0.999)), rank=rank,
                                fused=fused, **common)
    if name == "mlorc-lion":
        return optim.MLorcLion(groups, lr=lr, betas=tuple(betas or (0.95, 0.98)), rank=rank,
                               fused=fused, **common)
    if name == "mofasgd":
        return optim.MoFaSGD(groups, lr=lr, momentum=mofasgd_momentum, phi=mofasgd_phi,
                             betas=tuple(betas or (0.9, 0.999)), rank=rank, **common)
    if name == "galore":
        return optim.GaLoreAdamW(groups, lr=lr, betas=tuple(betas or (0.9, 0.999)), rank=rank,
                                 update_interval=galore_interval, scale=galore_scale, **common)
    from .switchlora import SwitchLoRAAdamW, switchlora_param_groups
    groups = set_group_lrs(switchlora_param_groups(model, weight_decay=weight_decay), lr, dense_lr,
                           own=lambda group: group["name"] == "lora")
    return SwitchLoRAAdamW(groups, lr=lr, betas=tuple(betas or (0.9, 0.999)), **common)


def after_step(name: str, model: nn.Module, optimizer, step: int, total_steps: int) -> dict:
    """Work a method does between optimizer steps (SwitchLoRA switches candidate vectors);
    returns what it did, for the metrics ({} for the other methods). `step` is the optimizer
    step just taken, counted from 1 (that is, SwitchLoRA's 0-based index of the next one)."""
    if name == "switchlora":
        from .switchlora import switch_step
        switched = switch_step(model, optimizer, step, total_steps)
        return {"switched_rows_A": switched["A"], "switched_cols_B": switched["B"]}
    return {}
