"""A Hugging Face model directory (safetensors) read by slices, so that a rank reads only its shard.

    weights = SafetensorsDir("ckpt/llama")          # the index: which file holds which tensor
    source = weights.source_for(model)              # every parameter found, shapes checked
    source.rows("model.layers.0.mlp.up_proj.weight", 128, 256)    # FSDP2: a rank's rows
    source.flat("model.embed_tokens.weight", 0, 1000)             # ZeRO-3: a rank's flat range

mlorc_dist.build.fill hands each parameter its values from such a source (or from the seeded
initialisation): whole (one process, ZeRO-1/2), its rows (FSDP2 DTensors), or its flat partition
(ZeRO-3 under zero.Init). Reads go through safetensors' `safe_open(...).get_slice`, which reads
only the bytes of the rows asked for (torch.distributed.checkpoint's HuggingFaceStorageReader
would do the same for FSDP2 but not for ZeRO-3's flat partitions, and would need the state
dict's names to match the files', which tied and prefixed names do not).

Names: a file's name may lack the model's base_model_prefix (old GPT-2 files say "h.0..." for
"transformer.h.0..."); a tied parameter (lm_head.weight = embed_tokens.weight) is found under
any of its names. A parameter found in no file, a tensor that is no parameter or buffer of the
model, a shape that differs, a missing or unreadable file, or an index naming a tensor its file
does not hold is a ValueError naming them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["SafetensorsDir", "FileSource"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _short(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class SafetensorsDir:
    """The tensors of an HF model directory: name -> (file, shape, dtype), from the headers."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index}: not a safetensors index ({error})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise ValueError(f"--init-from {self.directory}: neither {INDEX_NAME} nor {SINGLE_NAME} there "
                             "(a Hugging Face model directory with safetensors weights)")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise ValueError(f"{index}: names {path.name}, which is missing")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        self.files[key] = path
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as error:      # safetensors raises its own types for a bad header
                raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        if weight_map is not None:
            wrong = {key for key, name in weight_map.items() if self.files.get(key) != self.directory / name}
            if wrong:
                raise ValueError(f"{index} does not match its files: {_short(wrong)} not where it says")
        self._handles: dict[Path, object] = {}

    def _handle(self, key: str):
        from safetensors import safe_open
        path = self.files[key]
        if path not in self._handles:       # the file's header is parsed once; data is read on demand
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (dimension 0), read alone."""
        try:
            if not self.shapes[key]:
                return self._handle(key).get_tensor(key)
            return self._handle(key).get_slice(key)[start:stop]
        except Exception as error:          # a file cut short after its header
            raise ValueError(f"{self.files[key]}: cannot read {key} ({error})") from None

    def whole(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        return self.rows(key, 0, shape[0] if shape else 0)

    def source_for(self, model: nn.Module) -> "FileSource":
        """A FileSource for `model`, with every parameter matched to a tensor of the files."""
        return FileSource(self, model)


class FileSource:
    """The values of a model's parameters read from a SafetensorsDir, by model name."""

    def __init__(self, weights: SafetensorsDir, model: nn.Module):
        self.weights = weights
        prefix = getattr(model, "base_model_prefix", "") or ""
        names_of: dict[int, list[str]] = {}
        shape_of: dict[int, tuple] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
            shape_of[id(param)] = tuple(getattr(param, "ds_shape", param.shape))
        buffers = {name for name, _ in model.named_buffers()}

        def model_name(key: str) -> str:
            known = key in buffers or any(key in names for names in names_of.values())
            return key if known or not prefix else f"{prefix}.{key}"

        by_model_name = {model_name(key): key for key in weights.files}
        self.key: dict[str, str] = {}      # every model name of a parameter -> its file key
        missing, extra = [], set(by_model_name) - buffers
        for ident, names in names_of.items():
            found = [by_model_name[n] for n in names if n in by_model_name]
            extra -= set(names)
            if not found:
                missing.append(names[0])
                continue
            for key in found:
                if weights.shapes[key] != shape_of[ident]:
                    raise ValueError(f"{weights.files[key]}: {key} has shape {list(weights.shapes[key])}, the "
                                     f"model's {names[0]} {list(shape_of[ident])}")
            for name in names:
                self.key[name] = found[0]
        if missing:
            raise ValueError(f"--init-from {weights.directory}: no tensor for the model's {_short(missing)} "
                             f"({len(missing)} missing)")
        if extra:
            raise ValueError(f"--init-from {weights.directory}: tensors the model has no parameter for: "
                             f"{_short(by_model_name[n] for n in extra)} (in "
                             f"{_short({weights.files[by_model_name[n]].name for n in extra})})")
        self.buffer_keys = {name: by_model_name[name] for name in buffers if name in by_model_name}

    def whole(self, module: nn.Module, attr: str, name: str, shape: tuple) -> torch.Tensor:
        return self.weights.whole(self.key[name])

    def rows(self, module: nn.Module, attr: str, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        return self.weights.rows(self.key[name], start, stop)

    def flat(self, module: nn.Module, attr: str, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened parameter: the rows that hold them, read alone."""
        if not shape:
            return self.weights.whole(self.key[name]).reshape(-1)[start:stop]
        row = max(1, int(torch.Size(shape[1:]).numel()))
        first, last = start // row, -(-stop // row)
        block = self.weights.rows(self.key[name], first, last).reshape(-1)
        return block[start - first * row: stop - first * row]

    def buffers(self, model: nn.Module):
        """(buffer, value) of every buffer the files hold (persistent buffers saved with a model)."""
        found = dict(model.named_buffers())
        for name, key in self.buffer_keys.items():
            yield found[name], self.weights.whole(key)
