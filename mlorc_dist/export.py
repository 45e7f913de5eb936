"""A trained model as a plain Hugging Face directory, written one parameter at a time.

    write_hf_model(named_full_tensors, config, target, tokenizer=None, writer=rank == 0)

`named_full_tensors` yields (name, whole tensor) one parameter at a time (under FSDP2 and ZeRO-3
each is gathered just before it is yielded, a collective every rank takes part in). The writer
(rank 0) appends each tensor's bytes to the current shard as it arrives and drops it, so it holds
one tensor at a time; the other ranks drop each tensor at once. A shard closes at
`max_shard_bytes`. The result is what `save_pretrained` writes
for a model too large for one file: model-0000i-of-0000N.safetensors and
model.safetensors.index.json (or one model.safetensors), config.json, generation_config.json,
and the tokenizer, loadable by `from_pretrained`. Nothing ever holds the whole model, which
save_pretrained (it needs a model object with every weight) would. Written into a staging
directory and renamed into place, so a failed export leaves no half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["write_hf_model", "DEFAULT_MAX_SHARD_BYTES", "SafetensorsStream"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_COPY_CHUNK = 16 * 1024 ** 2


class SafetensorsStream:
    """One safetensors file written as its tensors arrive, holding none of them.

    safetensors' own `save_file` takes every tensor of a file at once (a 2 GiB shard of a 7B
    export in memory), because the header, which names each tensor's byte range, comes first.
    Here each tensor's bytes go to a side file as it arrives; `close` writes the header (8-byte
    little-endian length, JSON padded with spaces to 8 bytes, as safetensors writes it) and then
    copies the bytes behind it, 16 MiB at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self.header: dict = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        flat = tensor.detach().contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        self.header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.nbytes, self.nbytes + size]}
        if size:
            self._data.write(flat.view(torch.uint8).numpy())
        self.nbytes += size

    def close(self) -> None:
        self._data.close()
        text = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        self._data_path.unlink()


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_hf_model(named_full_tensors: Iterable[tuple[str, torch.Tensor]], config, target: str | os.PathLike,
                   tokenizer=None, *, writer: bool = True, dtype: torch.dtype = torch.float32,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path | None:
    """Write the model; returns the directory on the writer, None elsewhere. Every rank must
    iterate `named_full_tensors` to the end (its gathers are collectives)."""
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    if writer:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    shard, files, weight_map, total = None, [], {}, 0

    def flush():
        nonlocal shard
        if shard is not None:
            shard.close()
            files.append((shard.path.name, list(shard.header)))
            shard = None

    for name, tensor in named_full_tensors:
        if not writer:
            continue
        value = tensor.detach().to("cpu", dtype)
        nbytes = value.numel() * value.element_size()
        if shard is not None and shard.header and shard.nbytes + nbytes > max_shard_bytes:
            flush()
        if shard is None:
            shard = SafetensorsStream(staging / f"part-{len(files):05d}.safetensors")
        shard.add(name, value)
        total += nbytes
        del value
    if not writer:
        return None
    flush()
    if len(files) == 1:
        os.replace(staging / files[0][0], staging / "model.safetensors")
    else:
        for index, (name, names) in enumerate(files, start=1):
            final = _shard_name(index, len(files))
            os.replace(staging / name, staging / final)
            weight_map.update({n: final for n in names})
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.save_pretrained(staging)
    from transformers import GenerationConfig
    try:
        GenerationConfig.from_model_config(config).save_pretrained(staging)
    except ValueError:          # a config with no generation settings of its own
        pass
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
