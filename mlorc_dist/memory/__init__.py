"""Memory: a per-rank profiler (exact tensor bytes by category, allocator, RSS, NVML), a report
gathered from every rank, and a planner that applies the engines' partition rules to a model
built on the meta device.

    from mlorc_dist.memory import MemoryProfiler, PlanSettings, plan
"""
from .activations import ActivationTracker, activation_bytes, llama_activation_items
from .profiler import MemoryProfiler, TENSOR_CATEGORIES
from .report import gather, write_report
from .planner import EXACT_CATEGORIES, GPU_SIZES_GB, Plan, PlanSettings, plan, plan_model

__all__ = ["MemoryProfiler", "TENSOR_CATEGORIES", "gather", "write_report", "ActivationTracker",
           "activation_bytes", "llama_activation_items", "EXACT_CATEGORIES", "GPU_SIZES_GB", "Plan",
           "PlanSettings", "plan", "plan_model"]
