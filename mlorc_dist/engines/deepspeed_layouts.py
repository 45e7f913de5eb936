"""DeepSpeed ZeRO layouts: what each stage hands the client optimizer, as pieces.

ZeRO-1 / ZeRO-2 (DeepSpeedZeroOptimizer)
    Param group i is flattened, in `round_robin_bit16_groups[i]` order, each parameter at
    `round_robin_bit16_offsets[i][j]` (shapes in `round_robin_bit16_meta[i]`; optional alignment
    padding between parameters), padded at the end and cut into world_size partitions of
    P = partition_size[i] elements. Rank r's client optimizer holds ONE 1-D fp32 tensor per
    group, `single_partition_of_fp32_groups[i]`, = flat elements [r P, (r + 1) P). A matrix may
    be cut anywhere, mid-row included. step() is called once per group.

ZeRO-3 (DeepSpeedZeroOptimizer_Stage3)
    Each parameter is partitioned on its own: pn = ceil(numel / world) elements per rank, rank r
    holding flattened elements [r pn, min((r + 1) pn, numel)) in a ds_tensor of pn elements
    (the rest is padding, uninitialised memory). Sub-group sg's fp32 buffer
    `fp32_partitioned_groups_flat[sg]` is those ds_tensors back to back. step() is called once
    per sub-group with only that buffer in `param_groups[sub_group_to_group_id[sg]]`. True shapes
    are `ds_shape` (module params show (0,) while partitioned).

Padding (between parameters, at the end, inside ZeRO-3 chunks) is declared in the layout and
never read or written by the optimizer.
"""
from __future__ import annotations

from ..pieces import Layout, MatrixSpec, Piece

__all__ = ["zero12_layouts", "zero3_layouts"]


def _spec(name: str, shape, lowrank: bool) -> MatrixSpec:
    shape = tuple(int(d) for d in shape)
    return MatrixSpec(name, shape, lowrank and len(shape) == 2)


def _padding_runs(pieces: list[Piece], total: int) -> list[tuple[int, int]]:
    """(offset, length) of every local range no piece covers."""
    runs, cursor = [], 0
    for piece in sorted(pieces, key=lambda p: p.offset):
        if piece.offset > cursor:
            runs.append((cursor, piece.offset - cursor))
        cursor = piece.offset + piece.numel
    if total > cursor:
        runs.append((cursor, total - cursor))
    return runs


def zero12_layouts(zero_optimizer, names: dict[int, str], lowrank_of_group: list[bool],
                   rank: int) -> list[tuple[object, Layout, int]]:
    """(flat fp32 partition, layout, param group index) for every param group of ZeRO-1/2."""
    result = []
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        size = zero_optimizer.partition_size[i]
        lo_rank, hi_rank = rank * size, (rank + 1) * size
        pieces, matrices = [], []
        for param, offset, meta in zip(zero_optimizer.round_robin_bit16_groups[i],
                                       zero_optimizer.round_robin_bit16_offsets[i],
                                       zero_optimizer.round_robin_bit16_meta[i]):
            spec = _spec(names[id(param)], meta.shape, lowrank_of_group[i])
            if spec.lowrank:
                matrices.append(spec)
            lo, hi = max(offset, lo_rank), min(offset + spec.numel, hi_rank)
            if hi > lo:
                pieces.append(Piece(spec, lo - offset, hi - offset, lo - lo_rank))
        layout = Layout(pieces, matrices, zero_optimizer.real_dp_process_group[i], "zero1/2",
                        padding=_padding_runs(pieces, flat.numel()))
        result.append((flat, layout, i))
    return result


def zero3_layouts(zero_optimizer, names: dict[int, str], lowrank_of_group: list[bool],
                  rank: int) -> list[tuple[object, Layout, int]]:
    """(flat fp32 sub-group buffer, layout, param group index) for every ZeRO-3 sub-group."""
    result = []
    for sg, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        group_id = zero_optimizer.sub_group_to_group_id[sg]
        pieces, matrices, cursor = [], [], 0
        for param in zero_optimizer.fp16_groups[sg]:
            spec = _spec(names[id(param)], param.ds_shape, lowrank_of_group[group_id])
            if spec.lowrank:
                matrices.append(spec)
            chunk = param.partition_numel()
            lo, hi = min(rank * chunk, spec.numel), min((rank + 1) * chunk, spec.numel)
            if hi > lo:
                pieces.append(Piece(spec, lo, hi, cursor))
            cursor += chunk
        layout = Layout(pieces, matrices, zero_optimizer.sub_group_process_groups[sg], "zero3",
                        padding=_padding_runs(pieces, flat.numel()))
        result.append((flat, layout, group_id))
    return result
