"""PyTorch FSDP2 (`fully_shard`): parameters are DTensors with a Shard(0) placement.

Contract: this rank holds a block of whole rows of each parameter, by torch.chunk rules
(ceil(rows / world) rows per rank; the last ranks may get fewer, or none). Its local tensor is
contiguous, so the piece is the flat range [row0 * n, (row0 + k) * n). The optimizer is built
after fully_shard, on model.parameters() (or mlorc_dist.param_groups(model)); nothing else is
needed. Other placements (Replicate, Shard(1), 2-D meshes) are refused with a ValueError.
"""
from __future__ import annotations

import torch

from ..pieces import Layout, MatrixSpec, Piece

__all__ = ["dtensor_layout"]


def _shard0_row_range(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank` under torch.chunk(rows, world_size) rules."""
    per_rank = -(-rows // world_size) if rows else 0
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def dtensor_layout(param: torch.Tensor, key: str, lowrank: bool) -> Layout:
    """The layout of an FSDP2 DTensor parameter: one piece of whole rows (maybe empty)."""
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"{key}: only 1-D meshes with a Shard(0) placement (FSDP2) are supported, "
                         f"got mesh {tuple(mesh.shape)} and placements {placements}")
    shape = tuple(param.shape)
    spec = MatrixSpec(key, shape, lowrank and len(shape) == 2)
    local = param.to_local()
    row_elems = local[0].numel() if local.dim() and local.shape[0] else (
        int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
    start_row, stop_row = _shard0_row_range(shape[0], mesh.size(), mesh.get_local_rank())
    if local.shape[0] != stop_row - start_row:
        raise ValueError(f"{key}: local shard has {local.shape[0]} rows, torch.chunk rules give "
                         f"{stop_row - start_row}: unexpected FSDP2 sharding")
    piece = Piece(spec, start_row * row_elems, stop_row * row_elems, 0)
    group = mesh.get_group()
    return Layout([piece], [spec] if spec.lowrank else [], group, "fsdp2",
                  padding=[(piece.numel, local.numel() - piece.numel)])
