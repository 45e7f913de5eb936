"""Pieces: this rank's part of one parameter, in the parameter's global coordinates.

Whatever the engine, the part of an m x n parameter that one rank owns is a contiguous range
[start, stop) of its row-major flattened elements. Split it into

    head  the partial row from `start` up to the next multiple of n (may be empty)
    body  k whole rows, a (k, n) strided view of the flat buffer (no copy)
    tail  the partial row after the body (may be empty)

The optimizer math runs on these views and never learns which engine cut them. A layout maps
one tensor that the optimizer holds (a plain parameter, an FSDP2 local shard, a DeepSpeed flat
partition) to its pieces, plus the list of every matrix that any rank's copy of that tensor
touches (global scope needs every rank to take part in the same collectives).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Piece", "MatrixSpec", "Layout", "plain_layout", "row_split"]


@dataclass(frozen=True)
class MatrixSpec:
    """A parameter as the whole world sees it. `key` is stable across ranks and runs."""
    key: str
    shape: tuple[int, ...]
    lowrank: bool          # 2-D and chosen for compression (by its param group)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Piece:
    """Global flat elements [start, stop) of `matrix`, found at `offset` in the local tensor."""
    matrix: MatrixSpec
    start: int
    stop: int
    offset: int

    def __post_init__(self):
        if not 0 <= self.start <= self.stop <= self.matrix.numel:
            raise ValueError(f"piece [{self.start}, {self.stop}) is outside {self.matrix.key} "
                             f"of {self.matrix.numel} elements")
        if self.offset < 0:
            raise ValueError(f"piece of {self.matrix.key} has a negative offset {self.offset}")

    @property
    def key(self) -> str:
        return self.matrix.key

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def split(self) -> "RowSplit":
        """Head / body / tail of this piece (only meaningful for 2-D matrices)."""
        return row_split(self.start, self.stop, self.matrix.cols)

    @property
    def first_row(self) -> int:
        """The first global row this piece touches."""
        return self.start // self.matrix.cols

    @property
    def row_count(self) -> int:
        """How many global rows this piece touches (partial rows included)."""
        if self.numel == 0:
            return 0
        n = self.matrix.cols
        return (self.stop - 1) // n - self.start // n + 1

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This piece's elements in the local 1-D tensor (a view)."""
        return flat[self.offset:self.offset + self.numel]


@dataclass(frozen=True)
class RowSplit:
    """Lengths of a flat range [start, stop) of a row-major matrix with `cols` columns."""
    head: int          # elements before the first whole row
    body_row0: int     # first whole row (global index)
    body_rows: int     # number of whole rows
    tail: int          # elements after the last whole row
    cols: int

    @property
    def body_numel(self) -> int:
        return self.body_rows * self.cols


def row_split(start: int, stop: int, cols: int) -> RowSplit:
    """Split [start, stop) of a row-major (?, cols) matrix into head, whole rows, tail."""
    first_whole = -(-start // cols)     # ceil
    end_whole = stop // cols            # floor
    if first_whole > end_whole:         # inside a single row, touching neither boundary
        return RowSplit(stop - start, first_whole, 0, 0, cols)
    return RowSplit(first_whole * cols - start, first_whole, end_whole - first_whole,
                    stop - end_whole * cols, cols)


@dataclass
class Layout:
    """How one tensor held by the optimizer maps to parameters.

    pieces    what this rank holds, in increasing local offset
    matrices  every low-rank-eligible matrix that the same tensor touches on ANY rank, in an
              order that is the same on every rank (global scope runs its collectives over it)
    padding   (offset, length) runs of local elements that belong to no parameter (engine
              alignment padding); pieces and padding must tile the local tensor exactly
    process_group  the group that shares the tensor (None: no collectives)
    """
    pieces: list[Piece]
    matrices: list[MatrixSpec]
    process_group: Any = None
    engine: str = "plain"
    padding: list[tuple[int, int]] = field(default_factory=list)

    def validate(self, local_numel: int) -> None:
        """Raise ValueError unless pieces and padding tile [0, local_numel) with no gap or overlap."""
        runs = [(p.offset, p.numel, p.key) for p in self.pieces if p.numel]
        runs += [(offset, length, "padding") for offset, length in self.padding if length]
        cursor = 0
        for offset, length, what in sorted(runs):
            if offset != cursor:
                raise ValueError(f"layout ({self.engine}) leaves local elements [{cursor}, {offset}) "
                                 f"uncovered or overlapping before {what}")
            cursor += length
        if cursor != local_numel:
            raise ValueError(f"layout ({self.engine}) covers {cursor} local elements, but the tensor "
                             f"has {local_numel}: it does not cover the partition")
        keys = {m.key for m in self.matrices}
        for piece in self.pieces:
            if piece.matrix.lowrank and piece.key not in keys:
                raise ValueError(f"piece {piece.key} is not listed in the layout's matrices")


def plain_layout(param: torch.Tensor, key: str, lowrank: bool) -> Layout:
    """A whole, unsharded parameter: one piece. 2-D tensors may be compressed, others never."""
    shape = tuple(param.shape)
    spec = MatrixSpec(key, shape, lowrank and len(shape) == 2)
    return Layout([Piece(spec, 0, param.numel(), 0)], [spec] if spec.lowrank else [], None, "plain")
