"""LoRA through the peft library (a baseline; not re-implemented here)."""
from __future__ import annotations

import logging

from torch import nn

__all__ = ["LLAMA_TARGETS", "apply_lora", "merge_lora"]

logger = logging.getLogger("mlorc_dist")

# Attention and MLP projections of Llama-style models (Hugging Face names).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model: nn.Module, rank: int = 8, *, alpha: float | None = None, dropout: float = 0.0,
               target_modules=LLAMA_TARGETS, seed: int = 0) -> nn.Module:
    """The model with peft LoRA adapters (frozen W, trainable B A of rank r, scale alpha / r;
    alpha defaults to 2 r) on `target_modules`. Everything else is frozen, as peft does.
    Logs the trainable and frozen parameter counts. A target name that matches no module
    raises ValueError (peft's own error, reworded)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} not found in {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)              # A's initialisation, the same on every rank
        wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA (peft) rank %d on %s: %s trainable, %s frozen parameters", rank,
                ",".join(target_modules), f"{trainable:,}", f"{total - trainable:,}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into W (for export)."""
    return model.merge_and_unload()
