"""Pieces of launch/train.py that are worth testing on their own: learning-rate schedule, batch
sources (packed pretraining windows, prompt-masked SFT records) that give every world size the
same global batches, the checkpoint directory protocol, and the JSONL metrics writer.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .schedule import lr_at  # noqa: F401  (re-exported: the schedule's own module)

__all__ = ["lr_at", "GlobalBatches", "load_pretraining_ids", "load_sft_records", "SFTBatches",
           "CheckpointDir", "MetricsWriter", "model_signature", "exit_without_teardown"]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- data
def load_pretraining_ids(path: str | Path, tokenizer, text_field: str = "text") -> torch.Tensor:
    """Token ids of a text file (.txt), JSON lines (.jsonl/.json) or parquet file, read with
    `datasets`; for records, `text_field` holds the text. Raises FileNotFoundError / ValueError."""
    from .data import load_token_ids
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix in (".txt", ".text", ".md"):
        return load_token_ids(path, tokenizer)
    texts = [record[text_field] for record in _read_records(path, [text_field])]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    if not ids:
        raise ValueError(f"{path} holds no text")
    return torch.tensor(ids, dtype=torch.long)


def _read_records(path: Path, fields: list[str]) -> list[dict]:
    import datasets
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in kinds:
        raise ValueError(f"unsupported data file type {path.suffix!r}: use .txt, .jsonl, .json or .parquet")
    data = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
    missing = [f for f in fields if f not in data.column_names]
    if missing:
        raise ValueError(f"{path} records lack field(s) {missing}; they have {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"{path} holds no records")
    return list(data)


def load_sft_records(path: str | Path, tokenizer, prompt_field: str, response_field: str,
                     seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt/response records as (input_ids, labels) [N, seq_len]: prompt + response + eos,
    truncated and right-padded; labels are IGNORE_INDEX on the prompt and the padding, so only
    the response is learned."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs, labels = [], []
    for record in _read_records(path, [prompt_field, response_field]):
        prompt = tokenizer(record[prompt_field], add_special_tokens=False)["input_ids"]
        response = tokenizer(record[response_field], add_special_tokens=False)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:seq_len]
        target = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
        padding = seq_len - len(ids)
        inputs.append(ids + [pad] * padding)
        labels.append(target + [IGNORE_INDEX] * padding)
    inputs_t, labels_t = torch.tensor(inputs), torch.tensor(labels)
    if int((labels_t != IGNORE_INDEX).sum()) == 0:
        raise ValueError(f"{path}: every response was truncated away at seq_len={seq_len}")
    return inputs_t, labels_t


class GlobalBatches:
    """Each step's global batch, drawn the same way at any world size, and this rank's share.

    source(generator, count) -> (input_ids, labels) of `count` examples. Every rank draws the
    same global batch of `global_batch` examples; micro-step j of rank r takes rows
    [(j * world + r) * micro, + micro). state_dict() makes resume exact.
    """

    def __init__(self, source, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"x world size {world_size}")
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.world_size, self.rank = world_size, rank
        self.accumulation = global_batch // (micro_batch * world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_drawn = 0

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step."""
        input_ids, labels = self.source(self.generator, self.global_batch)
        self.steps_drawn += 1
        out = []
        for j in range(self.accumulation):
            lo = (j * self.world_size + self.rank) * self.micro_batch
            out.append((input_ids[lo:lo + self.micro_batch], labels[lo:lo + self.micro_batch]))
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps_drawn": self.steps_drawn,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"checkpoint was written with global batch {state['global_batch']}, "
                             f"this run has {self.global_batch}")
        self.generator.set_state(state["generator"])
        self.steps_drawn = state["steps_drawn"]


def packed_source(ids: torch.Tensor, seq_len: int):
    """Random contiguous windows of packed tokens (labels = inputs; the model shifts them)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {seq_len}")

    def draw(generator, count):
        starts = torch.randint(ids.numel() - seq_len + 1, (count,), generator=generator)
        windows = ids[starts[:, None] + torch.arange(seq_len)]
        return windows, windows
    return draw


def sft_source(inputs: torch.Tensor, labels: torch.Tensor):
    def draw(generator, count):
        index = torch.randint(inputs.shape[0], (count,), generator=generator)
        return inputs[index], labels[index]
    return draw


# --------------------------------------------------------------------------- checkpoints
def model_signature(model: torch.nn.Module) -> list[list]:
    """[name, shape] of every parameter (true shapes under ZeRO-3 and FSDP2)."""
    return [[name, list(getattr(p, "ds_shape", p.shape))] for name, p in model.named_parameters()]


class CheckpointDir:
    """out/checkpoints/step_00000010/{meta.json, common.pt, rank0.pt, ...}.

    A checkpoint is written into step_N.tmp/ and renamed to step_N/ by rank 0 only after every
    rank has written its file, so a job killed mid-save leaves only a .tmp directory, which is
    ignored (and cleared by the next save). Files are written to a temporary name and renamed.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                      and (p / "meta.json").is_file())
        return done[-1] if done else None

    def staging(self, step: int) -> Path:
        return self.root / f"step_{step:08d}.tmp"

    def final(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    @staticmethod
    def save_file(obj: Any, path: Path) -> None:
        tmp = path.with_name(path.name + ".part")
        torch.save(obj, tmp)
        os.replace(tmp, path)

    def begin(self, step: int) -> Path:
        """Rank 0: an empty staging directory for `step`."""
        staging = self.staging(step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int, meta: dict) -> Path:
        """Rank 0, after every rank has written: meta.json, then the atomic rename."""
        staging = self.staging(step)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        final = self.final(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        return final


class MetricsWriter:
    """Appends one JSON object per line; rank 0 only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def exit_without_teardown(code: int = 0) -> None:
    """End a process that ran collectives without interpreter finalization (call it last, after
    destroy_process_group, with every file closed).

    What finalization would still do then is tear down gloo's worker threads and free tensors
    behind them, and that race aborts the process now and then ("terminate called without an active exception", SIGABRT,
    exit -6, seen once in CI after a finished 2-process DeepSpeed run; pytorch/pytorch#179291
    describes the mechanism). A finished run must not fail, so it leaves with os._exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
