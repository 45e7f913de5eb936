"""A trained model as a plain Hugging Face directory, written one parameter at a time.

    write_hf_model(named_full_tensors, config, target, tokenizer=None, writer=rank == 0)

`named_full_tensors` yields (name, whole tensor) one parameter at a time (under FSDP2 and ZeRO-3
each is gathered just before it is yielded, a collective every rank takes part in). The writer
(rank 0) keeps at most one safetensors shard of `max_shard_bytes` in memory and writes it when
full; the other ranks drop each tensor at once. The result is what `save_pretrained` writes
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
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["write_hf_model", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_hf_model(named_full_tensors: Iterable[tuple[str, torch.Tensor]], config, target: str | os.PathLike,
                   tokenizer=None, *, writer: bool = True, dtype: torch.dtype = torch.float32,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path | None:
    """Write the model; returns the directory on the writer, None elsewhere. Every rank must
    iterate `named_full_tensors` to the end (its gathers are collectives)."""
    from safetensors.torch import save_file

    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    if writer:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, str(staging / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in named_full_tensors:
        if not writer:
            continue
        value = tensor.detach().to("cpu", dtype).contiguous()
        if shard and shard_bytes + value.nbytes > max_shard_bytes:
            flush()
        shard[name] = value
        shard_bytes += value.nbytes
        total += value.nbytes
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
