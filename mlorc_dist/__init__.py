"""mlorc-dist: momentum low-rank compression optimizers that work per shard.

The core (lowrank, pieces, scopes, optim) imports only torch. Engine adapters import their
engine lazily: `mlorc_dist.deepspeed`, `mlorc_dist.engines.fsdp2`.
"""
from .backward_step import step_in_backward
from .groups import param_groups
from .lowrank import randomized_svd
from .optim import GaLoreAdamW, MLorcAdamW, MLorcLion, MoFaSGD

__all__ = ["GaLoreAdamW", "MLorcAdamW", "MLorcLion", "MoFaSGD", "param_groups", "randomized_svd",
           "step_in_backward"]
__version__ = "0.1.0"
