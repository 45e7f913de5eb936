"""Checkpoints of sharded MLorc runs that load at any world size.

Factor states are not shaped like the flat partitions, so engine checkpoint formats (DeepSpeed's
fragment API, universal checkpoints) do not see them. Here every rank writes its own records,
each in the global coordinates of one parameter:

    master record     (key, start, stop, fp32 values)            the weights this rank updates
    optimizer record  (key, shape, start, stop, mode, state)     one piece's optimizer state

A rank loading the checkpoint reads the records of every old rank and fills its own pieces:
- a piece with the same coordinates and mode as a saved one gets that state verbatim (exact
  resume at the same world size, any engine);
- global scope at another world size: the rows of U it needs, s and Vh: exact;
- anything else (local scope at another world size, another scope): the moments of its
  elements are rebuilt from the saved factors and dense values, and its bodies recompressed.

All functions work on this rank only, on the optimizer's layouts: no collectives.
"""
from __future__ import annotations

import ctypes
import mmap
from collections import defaultdict

import torch

from .host_memory import libc
from .lowrank import compute_dtype_for, randomized_svd, rebuild, sketch_seed
from .optim.base import LowRankMomentumOptimizer, _flat
from .pieces import Piece

__all__ = ["master_records", "load_master_records", "optimizer_records", "load_optimizer_records", "read_file"]


def read_file(path) -> dict:
    """One checkpoint file, memory-mapped: a rank loading it reads from disk only the records
    that overlap its own pieces (the others' bytes are never paged in), so a resume at any
    world size holds O(its shard), not every rank's file. A missing, truncated or foreign file
    is a ValueError naming it."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing from the checkpoint (written by fewer ranks, or deleted)")
    try:
        loaded = torch.load(path, weights_only=True, mmap=True)
    except Exception as error:      # torch's zip reader and unpickler raise several types
        raise ValueError(f"{path}: not a readable checkpoint file, truncated or corrupt "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    _MAPPED.extend(_mappings_of(path))
    return loaded


# Address ranges of the checkpoint files read_file mapped. A record's pages, once copied into the
# rank's tensors, are dropped from the process (release_pages): otherwise a resume holds the shard
# twice in its resident set, once in its tensors and once in the file's mapped pages (the kernel
# reclaims those only under memory pressure, so they still count in RSS and memory limits).
_MAPPED: list[tuple[int, int]] = []
_MADV_DONTNEED = 4


def _mappings_of(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (from /proc/self/maps; none elsewhere)."""
    import os
    target, ranges = os.path.realpath(path), []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a record read by read_file from this process's resident set (madvise
    MADV_DONTNEED; the file's pages stay in the page cache, and reading the record again faults
    them back in). Only for addresses inside a mapping of a checkpoint file: anonymous memory
    would be zeroed, so anything else is left alone."""
    if tensor.numel() == 0:
        return
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    for lo, hi in _MAPPED:
        if lo <= begin and end <= hi:
            page = mmap.PAGESIZE
            first, last = begin // page * page, min(hi, -(-end // page) * page)
            libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
            return


def forget_mappings() -> None:
    """After a resume: the files' mappings are gone once their tensors are freed."""
    _MAPPED.clear()


def _pieces(optimizer: LowRankMomentumOptimizer):
    """(tensor, plan, state entry or None, step) for every piece this rank holds."""
    for group, position, tensor in optimizer.held_tensors():
        plans = optimizer.plan_of(tensor, group, position)
        state = optimizer.state.get(tensor) or {}
        entries = state.get("pieces", [None] * len(plans))
        for plan, entry in zip(plans, entries):
            yield group, tensor, plan, entry, state.get("step", 0)


def master_records(optimizer: LowRankMomentumOptimizer) -> list[tuple]:
    """This rank's weights, as (key, start, stop, values) in the optimizer's own precision. The
    values are views, not copies: torch.save writes each underlying storage once, so saving adds
    no second copy of the rank's shard to its memory."""
    records = []
    for _, tensor, plan, _, _ in _pieces(optimizer):
        piece = plan.piece
        records.append((piece.key, piece.start, piece.stop, piece.view(_flat(tensor)).detach()))
    return records


def load_master_records(optimizer: LowRankMomentumOptimizer, records: list[tuple]) -> None:
    """Write saved weights into this rank's pieces (records of any world size)."""
    by_key = defaultdict(list)
    for key, start, stop, values in records:
        by_key[key].append((start, stop, values))
    for _, tensor, plan, _, _ in _pieces(optimizer):
        piece = plan.piece
        target = piece.view(_flat(tensor))
        filled = 0
        for start, stop, values in by_key.get(piece.key, []):
            lo, hi = max(start, piece.start), min(stop, piece.stop)
            if hi > lo:
                with torch.no_grad():
                    target[lo - piece.start:hi - piece.start].copy_(values[lo - start:hi - start])
                release_pages(values[lo - start:hi - start])
                filled += hi - lo
        if filled != piece.numel:
            raise ValueError(f"checkpoint holds {filled} of the {piece.numel} elements of {piece.key}"
                             f"[{piece.start}:{piece.stop}] (a checkpoint of another model?)")


def optimizer_records(optimizer: LowRankMomentumOptimizer) -> list[dict]:
    """This rank's optimizer state, one record per piece, in global coordinates (views of the
    state's tensors, as master_records)."""
    records = []
    for _, _, plan, entry, step in _pieces(optimizer):
        if entry is None:
            continue
        piece = plan.piece
        records.append({"key": piece.key, "shape": list(piece.matrix.shape), "start": piece.start,
                        "stop": piece.stop, "mode": plan.mode, "step": step,
                        "state": {k: v.detach() for k, v in entry.items() if torch.is_tensor(v)}})   # views
    return records


def _moment_values(record: dict, name: str, cols: int, dtype) -> torch.Tensor:
    """The moment `name` of every element of a saved piece, flat (rebuilding factors)."""
    state, start, stop = record["state"], record["start"], record["stop"]
    numel = stop - start
    if record["mode"] == "dense":
        return state[name].to(dtype)
    factors = rebuild(state[f"{name}_u"], state[f"{name}_s"], state[f"{name}_vh"], dtype)
    if record["mode"] == "global":
        skip = start - (start // cols) * cols
        return factors.reshape(-1)[skip:skip + numel]
    head = state.get(f"head_{name}", torch.zeros(0)).to(dtype)
    tail = state.get(f"tail_{name}", torch.zeros(0)).to(dtype)
    return torch.cat([head, factors.reshape(-1), tail])


def _gather_values(records: list[dict], name: str, lo: int, hi: int, cols: int, dtype) -> torch.Tensor:
    """Moment values of flat elements [lo, hi) of one parameter, from the saved pieces."""
    out = torch.empty(hi - lo, dtype=dtype)
    filled = 0
    for record in records:
        a, b = max(record["start"], lo), min(record["stop"], hi)
        if b > a:
            values = _moment_values(record, name, cols, dtype)
            out[a - lo:b - lo] = values[a - record["start"]:b - record["start"]]
            filled += b - a
    if filled != hi - lo:
        raise ValueError(f"checkpoint optimizer state covers {filled} of {hi - lo} elements of "
                         f"{records[0]['key'] if records else '?'}")
    return out


def load_optimizer_records(optimizer: LowRankMomentumOptimizer, records: list[dict]) -> dict:
    """Fill this rank's optimizer state from the records of every old rank. Returns counts of
    how each piece was restored: 'exact' (same piece saved), 'global rows', 'dense values'
    (copied element by element), 'recompressed' (moments rebuilt, then compressed anew)."""
    by_key = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    counts = {"exact": 0, "global rows": 0, "dense values": 0, "recompressed": 0}
    steps = {record["step"] for record in records}
    if len(steps) > 1:
        raise ValueError(f"checkpoint pieces disagree on the step count: {sorted(steps)}")
    step = steps.pop() if steps else 0
    for group, position, tensor in list(optimizer.held_tensors()):
        plans = optimizer.plan_of(tensor, group, position)
        fresh = optimizer.new_state(tensor, group, position)
        fresh["step"] = step
        for plan, entry in zip(plans, fresh["pieces"]):
            piece = plan.piece
            saved = by_key.get(piece.key)
            if not saved:
                raise ValueError(f"checkpoint has no optimizer state for {piece.key}")
            if list(saved[0]["shape"]) != list(piece.matrix.shape):
                raise ValueError(f"checkpoint shape {saved[0]['shape']} of {piece.key} differs from "
                                 f"the model's {list(piece.matrix.shape)}")
            same = [r for r in saved if (r["start"], r["stop"], r["mode"]) ==
                    (piece.start, piece.stop, plan.mode)]
            if same:
                for k, v in same[0]["state"].items():
                    entry[k].copy_(v)
                    release_pages(v)
                counts["exact"] += 1
            elif plan.mode != "dense" and not optimizer.reshardable:
                raise ValueError(f"{optimizer.algorithm} checkpoints resume only at the layout they "
                                 f"were saved with; {piece.key}[{piece.start}:{piece.stop}] "
                                 f"({plan.mode}) was not saved (another world size or engine?)")
            elif plan.mode == "global" and all(r["mode"] == "global" for r in saved):
                _restore_global_rows(entry, plan, saved, optimizer.moment_names)
                counts["global rows"] += 1
            else:
                _recompress(optimizer, group, entry, plan, saved, step,
                            compute_dtype_for(_flat(tensor).dtype))
                counts["dense values" if plan.mode == "dense" else "recompressed"] += 1
        optimizer.state[tensor] = fresh
    return counts


def _restore_global_rows(entry: dict, plan, saved: list[dict], moments) -> None:
    """Global scope: s and Vh are the same on every rank; take the rows of U this piece needs."""
    row0, rows = plan.piece.first_row, plan.piece.row_count
    for name in moments:
        entry[f"{name}_s"].copy_(saved[0]["state"][f"{name}_s"])
        entry[f"{name}_vh"].copy_(saved[0]["state"][f"{name}_vh"])
        u = entry[f"{name}_u"]
        filled = torch.zeros(rows, dtype=torch.bool)
        for record in saved:
            old = Piece(plan.piece.matrix, record["start"], record["stop"], 0)
            first, count = old.first_row, old.row_count
            a, b = max(first, row0), min(first + count, row0 + rows)
            if b > a:
                u[a - row0:b - row0] = record["state"][f"{name}_u"][a - first:b - first]
                filled[a - row0:b - row0] = True
        if rows and not bool(filled.all()):
            raise ValueError(f"checkpoint lacks rows of U for {plan.piece.key}")


def _recompress(optimizer, group, entry: dict, plan, saved: list[dict], step: int, dtype) -> None:
    """Rebuild the moments of this piece's elements and compress them as this plan says."""
    piece = plan.piece
    cols = piece.matrix.cols if len(piece.matrix.shape) == 2 else 1
    for state_id, name in enumerate(optimizer.moment_names):
        if plan.mode == "dense":
            entry[name].copy_(_gather_values(saved, name, piece.start, piece.stop, cols, dtype))
            continue
        if plan.mode == "global":
            m, n = piece.matrix.shape
            whole = _gather_values(saved, name, 0, m * n, n, dtype).view(m, n)
            u, s, vh = randomized_svd(whole, plan.rank, group["oversample"], group["niter"],
                                      sketch_seed(optimizer.seed, step, piece.key, 0, state_id))
            row0 = piece.first_row
            entry[f"{name}_u"].copy_(u[row0:row0 + piece.row_count])
            entry[f"{name}_s"].copy_(s)
            entry[f"{name}_vh"].copy_(vh)
            continue
        values = _gather_values(saved, name, piece.start, piece.stop, cols, dtype)
        head, body = plan.head, plan.body_rows * cols
        if plan.head:
            entry[f"head_{name}"].copy_(values[:head])
        if plan.tail:
            entry[f"tail_{name}"].copy_(values[head + body:])
        u, s, vh = randomized_svd(values[head:head + body].view(plan.body_rows, cols), plan.rank,
                                  group["oversample"], group["niter"],
                                  sketch_seed(optimizer.seed, step, piece.key, plan.body_row0, state_id))
        entry[f"{name}_u"].copy_(u)
        entry[f"{name}_s"].copy_(s)
        entry[f"{name}_vh"].copy_(vh)
