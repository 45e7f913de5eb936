"""Writing float32 results into bfloat16 weights with stochastic rounding.

A bf16 weight keeps 8 bits of mantissa: an update smaller than half its spacing is lost when
rounded to nearest, every step, so a weight with no fp32 master stops learning once updates are
small (Zamirai et al. 2020, "Revisiting BFloat16 training"). Stochastic rounding rounds x up with
probability (x - down) / (up - down), so the expected written value is x: add 16 uniform random
bits to x's float32 bit pattern and cut the low 16 (the carry does the rounding up), as torchao's
bf16 stochastic rounding does.

The random bits are a hash of (seed, element index), not a generator's stream: they depend only
on the optimizer's seed, the step, the parameter's name and the element's index in the whole
parameter, so every code path (this reference, the CPU C++ kernel in blocks.cpp, the compiled GPU
functions) draws the same bits for an element, a resumed run draws what the uninterrupted run
drew, and ranks never need to agree on anything: the bits of an element are the same at any
world size. blocks.cpp's round_bits is the same function in C++.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["Rounding", "rounding_seed", "hashed_bits", "random_bits", "flat_keys", "stochastic_round", "write_weight_"]

_MASK32 = 0xFFFFFFFF
# the two multipliers of the 32-bit mixer: odd and below 2^31, so that (x < 2^32) * m fits in
# int64 without overflow in the tensor version
_MUL1, _MUL2 = 0x7FEB352D, 0x2C1B3C6D


@dataclass(frozen=True)
class Rounding:
    """How to write one region's bf16 weights: the stochastic-rounding seed of (optimizer seed,
    step, parameter) and the index of the region's first element in the whole parameter."""
    seed: int
    start: int

    def offset(self, elements: int) -> "Rounding":
        """The Rounding of the region that starts `elements` further on."""
        return Rounding(self.seed, self.start + elements)

    @property
    def halves(self) -> tuple[int, int]:
        """The seed's low and high 32 bits (what the kernels take)."""
        return self.seed & _MASK32, (self.seed >> 32) & _MASK32


def rounding_seed(seed: int, step: int, key: str) -> int:
    """A reproducible 64-bit seed for stochastic rounding of parameter `key` at `step`."""
    text = f"round|{seed}|{step}|{key}".encode()
    return zlib.crc32(text) | (zlib.adler32(text) << 32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def hashed_bits(index: torch.Tensor, lo, hi) -> torch.Tensor:
    """16 uniform random bits (int32 in [0, 65536)) of each element index (int64) under the seed
    halves lo, hi (Python ints or 0-d int64 tensors: the compiled block functions pass tensors)."""
    return (_mix32(_mix32((index & _MASK32) ^ lo) ^ hi) >> 16).to(torch.int32)


def random_bits(rounding: Rounding, numel: int, device) -> torch.Tensor:
    """hashed_bits of the region's `numel` elements."""
    lo, hi = rounding.halves
    return hashed_bits(torch.arange(rounding.start, rounding.start + numel, dtype=torch.int64, device=device), lo, hi)


def flat_keys(roundings: list[Rounding] | None) -> list[int]:
    """(seed_lo, seed_hi, start) per body, flattened: the C++ block kernels' round_keys (empty: to
    nearest)."""
    return [x for r in roundings for x in (*r.halves, r.start)] if roundings else []


def stochastic_round(value: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 `value` rounded to bfloat16, up with probability equal to its distance from the
    bf16 value below, given 16 random bits per element (random_bits). Non-finite values are
    rounded to nearest (adding bits to inf or NaN would change what they are)."""
    if value.dtype != torch.float32:
        raise ValueError(f"stochastic rounding reads float32 values, got {value.dtype}")
    pattern = value.view(torch.int32)
    rounded = ((pattern + bits.view(value.shape)) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(value), rounded, value).to(torch.bfloat16)


def write_weight_(param: torch.Tensor, value: torch.Tensor, rounding: Rounding | None) -> None:
    """param (any float dtype) = value (the compute dtype): rounded stochastically when `rounding`
    is given (bf16 weights), else to nearest."""
    if rounding is None or param.dtype == value.dtype:
        param.copy_(value)
        return
    if param.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding writes bfloat16 weights, not {param.dtype}")
    flat_param, flat_value = param.view(-1), value.contiguous().view(-1)
    # in chunks: the bits' int64 temporaries are ~10 copies of what they round (an embedding's
    # region at once was the largest transient of a 7B step)
    for start in range(0, flat_value.numel(), CHUNK):
        part = flat_value[start:start + CHUNK]
        flat_param[start:start + CHUNK].copy_(stochastic_round(part, random_bits(rounding.offset(start), part.numel(),
                                                                                 part.device)))


CHUNK = 1 << 20          # elements stochastically rounded at a time (write_weight_)
