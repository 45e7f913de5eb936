"""Parameter groups that say which tensors keep dense state."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["param_groups", "set_group_lrs"]


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of the input embedding tables and of the output projection (lm_head)."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        ids.update(id(p) for p in output.parameters())
    return ids


def param_groups(model: nn.Module, weight_decay: float = 0.0, *, compress_embeddings: bool = False,
                 decay_1d: bool = False) -> list[dict]:
    """Named param groups for the MLorc optimizers (pass the result as `params`).

    - "matrices": 2-D weights, compressed, with weight decay;
    - "embeddings": embedding tables and lm_head, dense state, with weight decay; with
      compress_embeddings (as the reference does) they are matrices like any other and join
      the "matrices" group (in model order);
    - "vectors": biases and norms, dense state, no weight decay unless decay_1d.
    Frozen parameters (requires_grad False) are left out. Empty groups are dropped.
    """
    embeddings = _embedding_params(model)
    buckets: dict[str, list] = {"matrices": [], "embeddings": [], "vectors": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings and not compress_embeddings:
            buckets["embeddings"].append((name, param))
        elif len(getattr(param, "ds_shape", param.shape)) >= 2:   # ds_shape: ZeRO-3 zero.Init
            buckets["matrices"].append((name, param))
        else:
            buckets["vectors"].append((name, param))
    groups = [
        {"params": buckets["matrices"], "weight_decay": weight_decay, "lowrank": True},
        {"params": buckets["embeddings"], "weight_decay": weight_decay, "lowrank": False},
        {"params": buckets["vectors"], "weight_decay": weight_decay if decay_1d else 0.0, "lowrank": False},
    ]
    return [g for g in groups if g["params"]]


def set_group_lrs(groups: list[dict], lr: float, dense_lr: float | None = None,
                  own=lambda group: group["lowrank"]) -> list[dict]:
    """Give each group its lr: `lr` for the groups that `own` says the method updates itself
    (default: the compressed ones), `dense_lr` (default lr) for the others (embeddings, lm_head,
    1-D tensors). Each group records lr_scale = its lr / lr, so a schedule that sets lr keeps
    the ratio (launch/train.py's set_lr). Returns `groups`."""
    dense_lr = lr if dense_lr is None else dense_lr
    for group in groups:
        group["lr"] = lr if own(group) else dense_lr
        group["lr_scale"] = group["lr"] / lr if lr else 1.0
    return groups
