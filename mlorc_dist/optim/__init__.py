"""Optimizers: one module each, thin classes over the free functions in functional.py."""
from .galore import GaLoreAdamW
from .mlorc_adamw import MLorcAdamW
from .mlorc_lion import MLorcLion
from .mofasgd import MoFaSGD

__all__ = ["MLorcAdamW", "MLorcLion", "MoFaSGD", "GaLoreAdamW"]
