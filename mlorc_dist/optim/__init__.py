"""Optimizers: one module each, thin classes over the free functions in functional.py."""
from .mlorc_adamw import MLorcAdamW
from .mlorc_lion import MLorcLion

__all__ = ["MLorcAdamW", "MLorcLion"]
