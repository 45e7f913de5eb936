"""Named LLaMA shapes, from a seconds-long CPU test model up to the published LLaMA-2 70B.

``llama_config(name, vocab_size)`` gives a ``transformers.LlamaConfig``; ``build_model`` turns
it into a randomly initialised ``LlamaForCausalLM`` (nothing is downloaded). Build the large
shapes under ``with torch.device("meta"):`` to count parameters or plan memory without
allocating them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA2_VOCAB_SIZE = 32000  # the vocabulary the published LLaMA-2 checkpoints use


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers that distinguish one LLaMA size from another."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int


LLAMA_SHAPES: dict[str, LlamaShape] = {
    # Unit tests: every matrix is small and oddly shaped (160 is not a multiple of 64).
    "tiny": LlamaShape(64, 2, 4, 2, 160, 256),
    # examples/demo.py: ~1.8M non-embedding parameters, trains for minutes on 2 CPU cores.
    "demo": LlamaShape(192, 4, 6, 6, 512, 512),
    # ~85M non-embedding parameters; ~88M in all with a 2048-token vocabulary.
    "100m": LlamaShape(768, 12, 12, 12, 2048, 2048),
    # LLaMA-2 (Touvron et al., 2023), Table 1 / the released config.json files.
    "llama-7b": LlamaShape(4096, 32, 32, 32, 11008, 4096),
    "llama-13b": LlamaShape(5120, 40, 40, 40, 13824, 4096),
    "llama-70b": LlamaShape(8192, 80, 64, 8, 28672, 4096),
}


def llama_config(name: str, vocab_size: int) -> LlamaConfig:
    """The ``LlamaConfig`` of the named shape with ``vocab_size`` tokens and untied embeddings.

    The LLaMA-2 shapes reproduce the published parameter counts with
    ``vocab_size=LLAMA2_VOCAB_SIZE`` (32000).
    """
    if name not in LLAMA_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(LLAMA_SHAPES)}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    shape = LLAMA_SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=False,
        # PyTorch's scaled_dot_product_attention: runs on CPU and GPU, as fast as "eager" on CPU.
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` from ``config``; the same seed gives the same weights.

    The seed is applied inside ``torch.random.fork_rng`` so the caller's global RNG is left
    untouched. Weights are initialised in float32 and then cast to ``dtype``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)
