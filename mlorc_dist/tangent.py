"""MoFaSGD's momentum factor update (arXiv 2507.08091), as pure tensor math.

The momentum lives as M = U diag(s) V^T (U: m x r, V: n x r, orthonormal columns). One step
replaces it by the best rank-r approximation of

    b M + P_T(G),   P_T(G) = U U^T G + G V V^T - U U^T G V V^T   (the tangent space at U, V)

without forming any m x n matrix. Split G V = U A + X with X orthogonal to U, and
G^T U = V A^T + Y with Y orthogonal to V (A = U^T G V). Then

    b M + P_T(G) = [U  Qx] [[b diag(s) + A, Ry^T], [Rx, 0]] [V  Qy]^T,   X = Qx Rx,  Y = Qy Ry

so the new factors come from the SVD of a (2r x 2r) core. (The reference writes the same thing
with qr([U | GV]) and qr([V | G^T U]); projecting U out first keeps the QR of the small gradient
block well scaled when U has unit columns and G V is tiny.)

Rows may be sharded: a rank holds rows [row0, row0 + k) of U and of the gradient (full V, s on
every rank). Sums over rows are then partial per rank. `factor_update` is written as a
generator: every sum over rows is yielded as a list of per-rank partials and the caller sends
back the totals. `run_alone` answers with the partials themselves (one rank holding every row,
no communication); `scopes.run_summed` batches the yields of many matrices into one all-reduce
per stage (4 all-reduces per step, whatever the number of matrices).

Rows of a partial row split between two ranks are held by both (each sees part of the row of
G); a 0/1 `own` weight per row makes every such row count once in sums of products of rows.
"""
from __future__ import annotations

from typing import Generator

import torch

__all__ = ["factor_update", "run_alone", "rows_qr", "spectral_phi", "inverse_phi", "PHIS"]


def run_alone(generator: Generator):
    """Drive a factor-update generator with no other rank: every partial sum is the total."""
    try:
        sent = next(generator)
        while True:
            sent = generator.send(sent)
    except StopIteration as done:
        return done.value


def _weighted(x: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    return x if own is None else x * own


def rows_qr(x: torch.Tensor, own: torch.Tensor | None, sharded: bool):
    """Generator: thin QR of a row-sharded x (k, c) -> (Q rows (k, l), R (l, c)), x = Q R.

    Unsharded: Householder QR (l = min(k, c)). Sharded: from the Gram matrix x^T x (summed over
    ranks), twice (the second pass restores the orthogonality the first loses in rounding).
    Directions of x that rounding cannot tell from 0 (Gram eigenvalue below c eps times the
    largest) are dropped: Q then has fewer columns and R as many rows, and x = Q R still holds
    to rounding. The same Gram on every rank gives the same R and the same decision everywhere."""
    if not sharded:
        q, r = torch.linalg.qr(x, mode="reduced")
        return q, r
    gram = (yield [_weighted(x, own).mT @ x])[0]                       # (c, c)
    lam, w = torch.linalg.eigh(gram)
    floor = lam.max().clamp_min(0) * x.shape[1] * torch.finfo(x.dtype).eps
    keep = lam > floor
    if not bool(keep.any()):
        return x.new_zeros(x.shape[0], 0), x.new_zeros(0, x.shape[1])
    root = lam[keep].sqrt()
    q = x @ (w[:, keep] / root)                                         # (k, l)
    r = root[:, None] * w[:, keep].mT                                   # (l, c)
    gram2 = (yield [_weighted(q, own).mT @ q])[0]                       # (l, l), about I
    chol = torch.linalg.cholesky(gram2)                                 # lower L, gram2 = L L^T
    q = torch.linalg.solve_triangular(chol, q.mT, upper=False).mT       # q L^-T
    return q, chol.mT @ r


def factor_update(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: float,
                  *, rows: int | None = None, row0: int = 0, own: torch.Tensor | None = None):
    """Generator: the new (U rows, s, V) of the best rank-r approximation of
    beta U diag(s) V^T + P_T(G).

    u (k, r): this rank's rows of U;  s (r,);  v (n, r);  g (k, n): this rank's rows of the
    gradient (zeros where it holds no element of a partial row);  rows: the matrix's m when
    sharded (None: this rank holds the whole matrix, nothing is yielded);  row0: first row;
    own (k, 1): 1 for rows this rank counts in sums over rows, 0 for the others.

    Yields: [G V in global row coordinates (m, r), G^T U (n, r)], then r x r sums. Every rank
    must send back the sums over ranks (or the yielded values themselves when alone)."""
    sharded = rows is not None
    k, r = u.shape
    gv_rows, gtu = g @ v, g.mT @ u                                      # (k, r), (n, r) partial
    if sharded:
        gv_all = g.new_zeros(rows, v.shape[1])
        gv_all[row0:row0 + k] = gv_rows
        gv_all, gtu = yield [gv_all, gtu]                               # whole rows, whole sum
        gv_rows = gv_all[row0:row0 + k]
    a = gtu.mT @ v                                                      # U^T G V (r, r)
    x = gv_rows - u @ a                                                 # G V without its U part
    y = gtu - v @ a.mT                                                  # G^T U without its V part
    # A second projection ("twice is enough") removes what rounding left along U and V.
    cx = _weighted(u, own).mT @ x
    if sharded:
        (cx,) = yield [cx]
    cy = v.mT @ y
    x, y = x - u @ cx, y - v @ cy
    qx, rx = yield from rows_qr(x, own, sharded)                        # (k, l), (l, r)
    qy, ry = torch.linalg.qr(y, mode="reduced")                          # the same on every rank
    top = beta * torch.diag(s.to(a.dtype)) + a + cx + cy.mT
    core = torch.cat([torch.cat([top, ry.mT], 1),
                      torch.cat([rx, rx.new_zeros(rx.shape[0], ry.shape[0])], 1)], 0)
    p, sigma, qh = torch.linalg.svd(core, full_matrices=False)
    r_new = min(r, sigma.shape[0])
    u_new = torch.cat([u, qx], 1) @ p[:, :r_new]
    v_new = torch.cat([v, qy], 1) @ qh[:r_new].mT
    return u_new, sigma[:r_new], v_new


def spectral_phi(s: torch.Tensor, max_value: float = 0.0) -> torch.Tensor:
    """phi(s) = 1: the update U V^T, every direction with the same step (the paper's default)."""
    return torch.ones_like(s)


def inverse_phi(s: torch.Tensor, max_value: float = 1e3) -> torch.Tensor:
    """phi(s) = min(1 / s, max_value), 0 where s <= eps (the released configs)."""
    eps = torch.finfo(s.dtype).eps
    safe = torch.where(s > eps, s, torch.ones_like(s))
    return torch.where(s > eps, safe.reciprocal().clamp_max(max_value), torch.zeros_like(s))


PHIS = {"spectral": spectral_phi, "inverse": inverse_phi}
