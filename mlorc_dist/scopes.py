"""Compression scopes. This is the only module of the core that talks to torch.distributed.

local   each rank compresses its own bodies (k whole rows) with `lowrank.randomized_svd`;
        no communication at all.
global  the randomized SVD of the WHOLE matrix, assembled from every rank's rows by a few
        batched all-reduces, with Omega drawn from a seed that all ranks share. Each rank keeps
        only the rows of U it touches; s and Vh are the same everywhere.

Global scope, for a list of blocks X_j (global shape m_j x n_j; this rank holds rows
[row0_j, row0_j + k_j), partial rows zero-padded), width q_j:

    Y_j = sum_ranks X_j[rows] Omega_j         all-reduce of sum_j m_j q_j numbers
    Q_j = qr(Y_j)                             the same on every rank
    (niter times: Z_j = qr(sum_ranks X_j^T Q_j[rows]); Y_j = sum_ranks X_j Z_j; Q_j = qr(Y_j))
    B_j = sum_ranks Q_j[rows]^T X_j           all-reduce of sum_j q_j n_j numbers
    U~, s, Vh = svd(B_j);  U_j[rows] = Q_j[rows] U~[:, :r]

so (m + n) q (1 + niter) numbers per block, against m n for a gather. With one rank holding
every row it is exactly `lowrank.randomized_svd` on the matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .lowrank import gaussian_test_matrix, sketch_width, times_skinny

__all__ = ["SCOPES", "RowBlock", "all_reduce_sum", "global_randomized_svd", "run_summed", "world_size_of"]

SCOPES = ("local", "global")


def world_size_of(group) -> int:
    """World size of `group`. None means "not shared" (a plain, unsharded tensor): 1, as when
    torch.distributed is not initialised. Engine layouts always name their group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(buffer: torch.Tensor, group) -> None:
    """In-place sum over `group`; a no-op at world size 1. Every collective of the core goes
    through here (tests count the calls by wrapping torch.distributed.all_reduce)."""
    if world_size_of(group) > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)


@dataclass
class RowBlock:
    """This rank's rows of one matrix to compress.

    rows   (k, n) tensor: global rows [row0, row0 + k), zeros where this rank holds no element
    shape  the global (m, n)
    seed   the sketch seed (identical on every rank)
    """
    rows: torch.Tensor
    row0: int
    shape: tuple[int, int]
    seed: int


def _pack(blocks: list[RowBlock], widths: list[int], side: str, dtype, device) -> tuple[torch.Tensor, list[int]]:
    """One zero buffer holding, per block, an (m, q) [side='m'] or (q, n) [side='n'] slot."""
    sizes = [(b.shape[0] if side == "m" else b.shape[1]) * q for b, q in zip(blocks, widths)]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return torch.zeros(offsets[-1], dtype=dtype, device=device), offsets


def _orth(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def global_randomized_svd(blocks: list[RowBlock], rank: int, oversample: int, niter: int,
                          group, dtype: torch.dtype
                          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank-r truncated SVDs of whole matrices from row blocks, batched into 2 + 2 niter
    all-reduces. Returns per block (U rows of this rank (k, r), s (r,), Vh (r, n))."""
    if not blocks:
        return []
    device = blocks[0].rows.device
    widths = [sketch_width(rank, oversample, *b.shape) for b in blocks]
    xs = [b.rows.to(dtype) for b in blocks]                                  # (k, n) each

    def assemble_y(right_factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Y_j = sum over ranks of X_j[rows] @ right_j, then Q_j = qr(Y_j), all (m, q)."""
        buffer, offsets = _pack(blocks, widths, "m", dtype, device)
        for j, (b, x, q) in enumerate(zip(blocks, xs, widths)):
            y = buffer[offsets[j]:offsets[j + 1]].view(b.shape[0], q)
            y[b.row0:b.row0 + x.shape[0]] = times_skinny(x, right_factors[j])   # (k, q)
        all_reduce_sum(buffer, group)
        return [_orth(buffer[offsets[j]:offsets[j + 1]].view(b.shape[0], q))
                for j, (b, q) in enumerate(zip(blocks, widths))]

    def assemble_qt_x(bases: list[torch.Tensor]) -> list[torch.Tensor]:
        """B_j = sum over ranks of Q_j[rows]^T X_j, all (q, n)."""
        buffer, offsets = _pack(blocks, widths, "n", dtype, device)
        for j, (b, x, q) in enumerate(zip(blocks, xs, widths)):
            local_q = bases[j][b.row0:b.row0 + x.shape[0]]                  # (k, q)
            buffer[offsets[j]:offsets[j + 1]].view(q, b.shape[1]).copy_(local_q.mT @ x)
        all_reduce_sum(buffer, group)
        return [buffer[offsets[j]:offsets[j + 1]].view(q, b.shape[1])
                for j, (b, q) in enumerate(zip(blocks, widths))]

    omegas = [gaussian_test_matrix(b.shape[1], q, b.seed, dtype, device)
              for b, q in zip(blocks, widths)]                                # (n, q) each
    bases = assemble_y(omegas)
    for _ in range(niter):
        zs = [_orth(bt.mT) for bt in assemble_qt_x(bases)]                  # (n, q) each
        bases = assemble_y(zs)
    smalls = assemble_qt_x(bases)                                            # (q, n) each
    results = []
    for b, x, basis, small in zip(blocks, xs, bases, smalls):
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
        r = min(rank, small.shape[0])
        local_basis = basis[b.row0:b.row0 + x.shape[0]]                       # (k, q)
        results.append((local_basis @ u_small[:, :r], s[:r], vh[:r]))
    return results


def run_summed(generators: list, group) -> list:
    """Drive factor-update generators (tangent.factor_update) of many matrices on every rank of
    `group` together. At each stage the partial sums that every live generator yields are packed
    into one buffer per dtype, summed over ranks by one all-reduce, and sent back. Every rank
    must pass generators for the same matrices in the same order (a rank holding no row of a
    matrix passes one over zero rows). Returns each generator's return value."""
    results: list = [None] * len(generators)
    answers: dict[int, list | None] = {i: None for i in range(len(generators))}
    while answers:
        asked: dict[int, list[torch.Tensor]] = {}
        for i, answer in answers.items():
            try:
                asked[i] = generators[i].send(answer)
            except StopIteration as done:
                results[i] = done.value
        by_dtype: dict[torch.dtype, list[tuple[int, int]]] = {}
        for i, tensors in asked.items():
            for j, t in enumerate(tensors):
                by_dtype.setdefault(t.dtype, []).append((i, j))
        totals: dict[int, list] = {i: list(tensors) for i, tensors in asked.items()}
        for dtype, slots in by_dtype.items():
            flat = torch.cat([asked[i][j].reshape(-1) for i, j in slots])
            all_reduce_sum(flat, group)
            offset = 0
            for i, j in slots:
                t = asked[i][j]
                totals[i][j] = flat[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
        answers = totals
    return results
