"""Model FLOPs of a training step and model FLOPs utilisation (MFU).

    per_token = model_flops_per_token(config, seq_len)    # 6 N + 12 L d_attn seq
    fields = mfu_fields(config, seq_len, tokens_per_s, world_size, device, bf16)
    # {"model_flops_per_token": ..., "model_flops_per_s": ..., "mfu": ...}   (mfu: known GPUs)

Model FLOPs count what the model needs, not what the hardware did (PaLM's definition, appendix B):
per token, a forward and backward pass costs 6 N for the N weights of its matrix products (2 N
forward, 4 N backward) and 12 L d_attn s for attention's two products over a sequence of s tokens
(L layers, d_attn = heads x head dim; the causal mask is not discounted). Activation
recomputation is not counted, nor are the embedding lookups; the LM head is (it is a product).
N is counted on the model built on the meta device from its config, as the memory planner
builds it (mlorc_dist.memory.planner.build_meta_model): the weights of every linear layer
(transformers' Conv1D too), the LM head even where it is tied to the embeddings. Adapters
(LoRA) are not in the config, so a LoRA run is counted as its base model.

MFU = achieved model FLOP/s over all ranks / (world size x the device's peak). The peak is the
dense tensor-core figure of the GPU's datasheet for the run's precision (bf16; fp32 runs use
TF32's where torch lets matmuls use it, else plain fp32), from `PEAK_TFLOPS` by device name, or
MLORC_PEAK_TFLOPS (per device) where set. Without a known peak (the CPU, an unlisted GPU) only
the achieved FLOP/s are reported.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

__all__ = ["model_flops_per_token", "matmul_params", "peak_flops", "mfu_fields", "PEAK_TFLOPS"]

# Dense (no sparsity) peak TFLOP/s per device: (bf16 tensor cores, TF32 tensor cores, fp32).
# Matched in this order against torch.cuda.get_device_name(), case-insensitively.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("GB200", (2500.0, 1250.0, 80.0)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),          # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, 15.7, 15.7)),           # fp16 tensor cores (V100 has no bf16)
    ("MI300X", (1307.4, 653.7, 163.4)),
    ("MI250X", (383.0, 95.7, 47.9)),
)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_width(config) -> tuple[int, int]:
    """(layers, heads x head dim) of a transformers config (Llama, GPT-2 and similar names)."""
    config = _text_config(config)
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if getattr(config, k, None)), 0)
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads")
                  if getattr(config, k, None)), 0)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, None)), 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return int(layers), int(heads * head_dim)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the model's matrix products: every nn.Linear (the LM head included, tied or
    not) and transformers' Conv1D; the 2-D parameters outside embeddings where there is none."""
    total, seen = 0, False
    for module in model.modules():
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or (kind == "Conv1D" and weight is not None):
            shape = getattr(weight, "ds_shape", None) or weight.shape
            total += int(shape[0]) * int(shape[1])
            seen = True
    if seen:
        return total
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)


_PER_TOKEN: dict[tuple[str, int], float] = {}
_FAILED: set[str] = set()
logger = logging.getLogger("mlorc_dist")


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a model of this transformers config on sequences of
    `seq_len` tokens: 6 N + 12 L d_attn seq (module docstring). Cached per config and length."""
    key = (config.to_json_string(use_diff=False), int(seq_len))
    if key not in _PER_TOKEN:
        from .memory.planner import build_meta_model
        n = matmul_params(build_meta_model(copy.deepcopy(config)))
        layers, width = _attention_width(config)
        _PER_TOKEN[key] = 6.0 * n + 12.0 * layers * width * int(seq_len)
    return _PER_TOKEN[key]


def _matmul_precision_is_tf32() -> bool:
    """Whether fp32 matmuls may run as TF32 (torch.backends.cuda.matmul.allow_tf32 = True sets this
    precision to "high" too)."""
    return torch.get_float32_matmul_precision() != "highest"


def peak_flops(device, bf16: bool) -> float | None:
    """The device's dense peak FLOP/s for this precision; None where it is not known (the CPU,
    an unlisted GPU). MLORC_PEAK_TFLOPS overrides the table."""
    override = os.environ.get("MLORC_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for pattern, (half, tf32, fp32) in PEAK_TFLOPS:
        if pattern.lower() in name:
            return 1e12 * (half if bf16 else tf32 if _matmul_precision_is_tf32() else fp32)
    return None


def mfu_fields(config, seq_len: int, tokens_per_s: float, world_size: int, device, bf16: bool) -> dict:
    """The fields of one metrics record: model_flops_per_token, model_flops_per_s (achieved,
    all ranks together) and, where the device's peak is known, mfu (a fraction of world size x
    peak). Empty, with one warning, where the model cannot be built on the meta device."""
    try:
        per_token = model_flops_per_token(config, seq_len)
    except Exception as error:       # noqa: BLE001  (an architecture the meta build cannot make)
        name = type(config).__name__
        if name not in _FAILED:
            _FAILED.add(name)
            logger.warning("model FLOPs not counted for %s (%s: %s): no MFU fields", name,
                           type(error).__name__, error)
        return {}
    achieved = per_token * tokens_per_s
    fields = {"model_flops_per_token": per_token, "model_flops_per_s": achieved}
    peak = peak_flops(device, bf16)
    if peak:
        fields["mfu"] = achieved / (peak * max(1, world_size))
    return fields
