"""Randomized SVD and the small pure functions of low-rank momentum.

Pure tensor math: no torch.distributed, no optimizer state. Shapes in comments use
A (m, n), r = rank, p = oversampling, q = r + p.

The distributed (global-scope) version of the same range finder lives in scopes.py and is
built from the same steps; `gaussian_test_matrix` is shared so that both draw the same Omega.
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from typing import NamedTuple

import torch

from .compiled_range import MAX_WIDTH as COMPILED_RANGE_WIDTH
from .compiled_range import compiled as compiled_call
from .compiled_range import (hashed_normal_of, rank_sum, sketched_range, step_seed, step_seeds,
                             to_int64, weyl_sequence)

__all__ = [
    "compute_dtype_for",
    "times_skinny",
    "skinny_t_times",
    "sketch_seed",
    "body_seed",
    "SketchSeeds",
    "per_body",
    "gaussian_test_matrix",
    "gaussian_test_matrices",
    "hashed_normal",
    "GPU_RULES_ON_CPU",
    "takes_gpu_rules",
    "uses_gram_algebra",
    "orthonormal_basis",
    "cholesky_qr",
    "small_svd",
    "gram_eigh_svd",
    "randomized_svd",
    "randomized_svd_of_update",
    "MomentUpdate",
    "compress",
    "compress_batch",
    "defers_small_svd",
    "compress_range",
    "finish_compress",
    "gram_eigh_svds",
    "gram_eighs",
    "factors_from_eigh",
    "JACOBI_MAX_WIDTH",
    "uses_jacobi",
    "jacobi_sweeps",
    "jacobi_eigh",
    "UNROLLED_JACOBI_WIDTH",
    "jacobi_sweep_unrolled",
    "range_and_small",
    "factors_from_range",
    "range_finder_svd",
    "scaled_factors",
    "rebuild",
    "fix_negatives",
    "negative_fill_value",
    "negative_stats",
    "fill_negatives_",
    "rebuild_noise_floor",
    "sketch_width",
]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """QR/SVD run in float64 for float64 tensors and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sketch_seed(seed: int, step: int, key: str, row0: int, state_id: int) -> int:
    """A reproducible 63-bit seed for one sketch, the same on every rank that computes it.

    key names the parameter (stable across ranks and runs), row0 is the first global row of
    the block being compressed (0 for whole matrices and for global scope), state_id tells
    the moments apart (0: first moment, 1: second moment). It is body_seed, the part that does
    not change from step to step, mixed with the step by splitmix64 (compiled_range.step_seed):
    a batch's seeds are then a few operators on its bodies' kept body_seeds (SketchSeeds), not
    Python per body and step.
    """
    return step_seed(body_seed(seed, key, row0, state_id), step)


@functools.lru_cache(maxsize=1 << 16)
def body_seed(seed: int, key: str, row0: int, state_id: int) -> int:
    """sketch_seed's step-independent part: a 64-bit checksum of "seed|key|row0|state_id"
    (CRC-32 in the low half, Adler-32 in the high half)."""
    text = f"{seed}|{key}|{row0}|{state_id}".encode()
    return zlib.crc32(text) | (zlib.adler32(text) << 32)


class SketchSeeds(NamedTuple):
    """A batch's sketch seeds as tensors: compiled_range.step_seeds(bases, steps), the same numbers
    as sketch_seed. bases (B,) int64: each body's body_seed (to_int64), kept between steps;
    steps: the step counts, per_body (a 0-d CPU int64 tensor where the batch's bodies agree)."""
    bases: torch.Tensor
    steps: torch.Tensor

    def tolist(self) -> list[int]:
        """The seeds as Python ints (sketch_seed's)."""
        return step_seeds(self.bases, self.steps).tolist()


def per_body(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """One value per body of a batch (a hyperparameter, a step count) as a compiled call's
    argument: a 0-d CPU tensor of `dtype` where all are equal (a scalar argument: no copy to the
    device, and a new value does not recompile), else a (B,) tensor on `device`."""
    if all(v == values[0] for v in values):
        return torch.tensor(values[0], dtype=dtype)
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def sketch_width(rank: int, oversample: int, rows: int, cols: int) -> int:
    """q = rank + oversample, clamped to the block's smaller side (a wider sketch adds nothing)."""
    return min(rank + oversample, rows, cols)


def gaussian_test_matrix(cols: int, width: int, seed: int, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Omega (cols, width), standard normal, drawn on the CPU from `seed` so every device agrees."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    omega = torch.randn(cols, width, generator=generator, dtype=torch.float64)
    return omega.to(device=device, dtype=dtype)


def gaussian_test_matrices(cols: int, width: int, seeds: list[int] | torch.Tensor, dtype: torch.dtype,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, cols, width): one standard normal test matrix per seed, for the blocks of one device.

    On the CPU: gaussian_test_matrix for each seed, stacked. Under the GPU rules
    (takes_gpu_rules): hashed_normal, drawn on the device for the whole batch by one fixed set of
    operators, whatever B (a CPU draw took 0.3-0.5 ms per 4096 x 4 matrix on the lent H100
    machine's host, plus a copy that waits for the device; the device's own generator, seeded
    per matrix, a launch per matrix). Both are reproducible from the seeds; they are different
    numbers (another generator). Global scope, where ranks must agree, draws with
    gaussian_test_matrix on the CPU (scopes.py)."""
    device = torch.device(device)
    if not takes_gpu_rules(device):
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
        return torch.stack([gaussian_test_matrix(cols, width, s, dtype) for s in seeds])
    return hashed_normal(seeds, cols, width, dtype, device)


def hashed_normal(seeds: list[int] | torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, rows, cols) standard normals, matrix b a function of seeds[b] alone: entry i of
    matrix b is the Box-Muller transform of the two 32-bit halves of splitmix64(key_b + (i + 1)
    golden), key_b = splitmix64(seeds[b]) (a counter-based generator: no state, no per-matrix
    call). One small copy of the B seeds to the device and a fixed number of operators, whatever
    B; the same numbers on every device up to the last bit of float64 log and cos."""
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.tensor(seeds, dtype=torch.int64)
    seeds = seeds.to(device, non_blocking=True)
    return hashed_normal_of(seeds, weyl_sequence(rows * cols, device), rows, cols).to(dtype)


GPU_RULES_ON_CPU = "MLORC_GPU_RULES_ON_CPU"


def takes_gpu_rules(device) -> bool:
    """Whether tensors on `device` follow the GPU path's fixed rules (compiled block functions,
    the Gram algebra for batches, device-side test matrices, the GPU batching caps): CUDA
    devices, and the CPU when the environment sets MLORC_GPU_RULES_ON_CPU=1, so that tests and
    host-cost counts (bench/host_cost.py) run the GPU path's code on a machine without one. Every
    rule that differs between the CPU and a GPU asks this. Any other value than "0", "1" or unset
    is a ValueError."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    flag = os.environ.get(GPU_RULES_ON_CPU, "0")
    if flag not in ("0", "1", ""):
        raise ValueError(f"{GPU_RULES_ON_CPU} must be 0 or 1, got {flag!r}")
    return device.type == "cpu" and flag == "1"


def uses_gram_algebra(a: torch.Tensor) -> bool:
    """The fixed rule for the range finder's small linear algebra: batches (3-D) of float32
    blocks on a GPU use cholesky_qr and gram_eigh_svd (batched GEMMs, one batched Cholesky and
    one batched eigendecomposition for the whole batch); everything else (CPU, float64, a single
    GPU block) uses Householder QR and SVD (a single float32 GPU block takes gram_eigh_svd for
    its SVD all the same: uses_jacobi). Measured on an H100 (bench/gpu_algebra.py, 4096 x 4 sketches,
    docs/BENCHMARKS.md): a batch of 8, QR 0.79 -> 0.49 ms and SVD 3.18 -> 0.75 ms (cuSOLVER's
    batched SVD makes a call per matrix); a single block, QR 0.11 vs 0.46 ms and SVD 0.48 vs
    0.57 ms (with eigh; jacobi_eigh is untimed there), so a single block keeps cuSOLVER's QR.
    All of these are host-bound there."""
    return takes_gpu_rules(a.device) and a.dtype == torch.float32 and a.dim() == 3


# The widest Gram matrix (q = rank + oversample) whose eigendecomposition takes jacobi_eigh; wider
# ones take torch.linalg.eigh (a host synchronisation on a GPU). A sweep is q - 1 rounds of
# q x q work in one compiled graph, and there are 3 ceil(log2 q) sweeps: measured with inductor's
# C++ on this project's 2-core CPU VM (448 matrices, float64), q = 4 compiles in 30 s and runs
# in 2.3 ms (LAPACK's eigh 0.8 ms; unrolled, UNROLLED_JACOBI_WIDTH: ~40 s and 0.67 ms), q = 8 in
# 67 s and 60 ms (eigh 3.3), q = 16 in 160 s and 190 ms (eigh 9); on a GPU it is untimed.
JACOBI_MAX_WIDTH = 8


def uses_jacobi(b: torch.Tensor) -> bool:
    """Whether the small SVD of b (.., q, n) takes the Gram algebra with jacobi_eigh although it
    is not a batch (uses_gram_algebra): a lone float32 block under the GPU rules with q <=
    JACOBI_MAX_WIDTH. (Its range finder keeps Householder QR, which does not synchronise.)"""
    return (takes_gpu_rules(b.device) and b.dtype == torch.float32
            and b.shape[-2] <= JACOBI_MAX_WIDTH)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Q (.., m, q) with orthonormal columns spanning y (.., m, q): cholesky_qr where
    uses_gram_algebra, else the reduced Householder QR."""
    if uses_gram_algebra(y):
        return cholesky_qr(y)
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


_GRAM_DTYPE = torch.float64


def cholesky_qr(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Q of y (.., m, q) by shifted Cholesky QR, twice: Q = y L^-T where L L^T = y^T y + shift.
    The Gram matrix and its Cholesky factor are float64 (q x q: cheap), so one pass already
    leaves Q orthonormal to ~1e-16 cond(y)^2 and the second pass to rounding. The shift
    (Fukaya et al.'s 11 (m q + q (q + 1)) eps ||y||^2, plus the smallest normal number) keeps the
    factorisation defined for rank-deficient y, a zero y included: directions of y below it
    (relative size ~1e-5, under float32 rounding) come out damped, not as NaN. Returns y's dtype.
    Batched GEMMs, a batched Cholesky and a batched triangular solve: no host synchronisation."""
    m, q = y.shape[-2:]
    basis = y.to(_GRAM_DTYPE)
    eps, tiny = torch.finfo(_GRAM_DTYPE).eps, torch.finfo(_GRAM_DTYPE).tiny
    for _ in range(passes):
        gram = basis.mT @ basis                                              # (.., q, q)
        diagonal = gram.diagonal(dim1=-2, dim2=-1)                           # a view: (.., q)
        shift = 11 * (m * q + q * (q + 1)) * eps * diagonal.sum(-1, keepdim=True) + tiny
        diagonal.add_(shift)                                                 # gram + shift I
        lower, _ = torch.linalg.cholesky_ex(gram)                            # no error check: no sync
        basis = torch.linalg.solve_triangular(lower.mT, basis, upper=True, left=False)   # basis L^-T
    return basis.to(y.dtype)


def small_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U (.., q, q), s (.., q) descending, Vh (.., q, n)) of the range finder's
    small matrix b (.., q, n), q <= n: gram_eigh_svd where uses_gram_algebra or uses_jacobi (a
    lone float32 block under the GPU rules: no cuSOLVER SVD, whose error check synchronises),
    else torch.linalg.svd."""
    if uses_gram_algebra(b) or uses_jacobi(b):
        return gram_eigh_svd(b)
    return torch.linalg.svd(b, full_matrices=False)


def gram_eigh_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """small_svd from the eigendecomposition of the float64 Gram matrix b b^T (.., q, q) = W
    diag(s^2) W^T: U = W, Vh = diag(1/s) W^T b. The eigendecomposition is jacobi_eigh (one
    compiled call, no synchronisation) for q <= JACOBI_MAX_WIDTH, else one batched
    torch.linalg.eigh (on a GPU it synchronises once; still one call where a batched SVD of
    (.., q, n) makes a call per matrix). A singular value under 1e-7 s_max (accurate to ~1e-16
    (s_max / s)^2 only, and below float32 rounding of b) is returned as 0 with a zero row of Vh:
    the product U diag(s) Vh is what the caller keeps. Returns b's dtype."""
    return gram_eigh_svds([b])[0]


def gram_eigh_svds(smalls: list) -> list[tuple]:
    """gram_eigh_svd of several batches of small matrices (.., q, n_i) with one eigensolver call
    for all of them per q (the Gram matrices are q x q whatever n_i): no synchronisation for
    q <= JACOBI_MAX_WIDTH, one (eigh's error check) for each wider q."""
    return [_svd_from_eigh(b, b64, values, vectors) for b, (b64, values, vectors) in zip(smalls, gram_eighs(smalls))]


def gram_eighs(smalls: list) -> list[tuple]:
    """(b64, values, vectors) of each batch b of small matrices (.., q, n_i): b in float64 and the
    ascending eigendecomposition of b64 b64^T, by one eigensolver call for all the batches of
    one q (gram_eigh_svds)."""
    grams = [b.to(_GRAM_DTYPE) for b in smalls]
    by_width: dict[tuple, list[int]] = {}
    for i, b64 in enumerate(grams):
        by_width.setdefault((b64.shape[-2], b64.device), []).append(i)
    out: list = [None] * len(smalls)
    for (width, _), members in by_width.items():
        products = [grams[i] @ grams[i].mT for i in members]                 # (.., q, q) each
        batch = products[0].reshape(-1, width, width) if len(products) == 1 else \
            torch.cat([p.reshape(-1, width, width) for p in products])
        if width <= JACOBI_MAX_WIDTH:
            values, vectors = jacobi_eigh(batch, compiled=True)   # ascending
        else:
            values, vectors = torch.linalg.eigh(batch)                       # ascending
        start = 0
        for i, p in zip(members, products):
            count = p[..., 0, 0].numel()
            out[i] = (grams[i], values[start:start + count].view(*p.shape[:-1]),
                      vectors[start:start + count].view(p.shape))
            start += count
    return out


def jacobi_sweeps(q: int) -> int:
    """jacobi_eigh's fixed number of sweeps for q x q matrices: 3 ceil(log2 q). Measured on float64
    batches (random symmetric, PSD of rank q / 2, two eigenvalues of multiplicity q / 2, clusters
    1e-9 apart; tests/test_jacobi.py): V diag(w) V^T = G to ~1e-15 max|G| after 4 sweeps at
    q = 4, 8 at q = 8, 10 at q = 16 (rank-deficient PSD and repeated eigenvalues are the
    slowest); the formula leaves one or two sweeps to spare."""
    return 3 * max(1, math.ceil(math.log2(max(q, 2))))


def _circle_layouts(n: int) -> tuple[list[int], list[int]]:
    """The round-robin (circle method) order of n (even) indices as layouts in which round k
    pairs position i with position i + n / 2: the first round's layout, and the permutation
    that takes each round's layout to the next one's (new position j holds old position
    perm[j]); after n - 1 rounds, every pair has met once and the layout is the first again."""
    half, order = n // 2, list(range(n))
    first = order[:half] + order[half:][::-1]
    following = [order[0], order[-1], *order[1:-1]]
    return first, [first.index(x) for x in following[:half] + following[half:][::-1]]


def jacobi_eigh(g: torch.Tensor, sweeps: int | None = None,
                compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (.., q) ascending and eigenvectors (.., q, q) of symmetric g (.., q, q), as
    torch.linalg.eigh returns them, by the cyclic Jacobi method in the round-robin parallel
    order with a fixed number of sweeps (jacobi_sweeps(q) when None): tensor operators only, no
    data-dependent control flow and no error check, so no host synchronisation. compiled=True
    runs each sweep as one compiled call for the whole batch (compiled_range.compiled; inductor's
    C++ on the CPU, Triton on a GPU; a sweep, not the whole solver, is the graph: compiling 6
    (q = 4) to 12 (q = 16) sweeps unrolled took minutes on the CPU), False the same function
    eagerly. For q <= UNROLLED_JACOBI_WIDTH a
    sweep is jacobi_sweep_unrolled on the matrices stored entry-major ((q, q, B): an entry of
    every matrix in one contiguous row), else jacobi_sweep on (B, n, n) in _circle_layouts'
    layout, an odd q padded with a zero row and column that no rotation touches. The
    eigenvector signs are arbitrary, as eigh's."""
    q = g.shape[-1]
    count = jacobi_sweeps(q) if sweeps is None else sweeps
    if q <= UNROLLED_JACOBI_WIDTH:
        a = g.reshape(-1, q * q).mT.reshape(q, q, -1).contiguous()           # (q, q, B)
        v = torch.eye(q, dtype=g.dtype, device=g.device)[..., None].expand(a.shape).contiguous()
        sweep = compiled_call(jacobi_sweep_unrolled) if compiled else jacobi_sweep_unrolled
        for _ in range(count if any(_round_robin_pairs(q)) and a.shape[-1] else 0):
            a, v = sweep(a, v)
        values = a.diagonal(dim1=0, dim2=1).reshape(*g.shape[:-1])           # (.., q)
        vectors = v.permute(2, 0, 1).reshape(g.shape)                        # (.., q, q)
    else:
        n = q + q % 2
        first, _ = _circle_layouts(n)
        a = torch.nn.functional.pad(g, (0, n - q, 0, n - q)) if n != q else g
        a = a[..., first, :][..., :, first]
        v = torch.eye(n, dtype=g.dtype, device=g.device)[:, first].expand(a.shape).contiguous()
        sweep = compiled_call(jacobi_sweep) if compiled else jacobi_sweep
        for _ in range(count):
            a, v = sweep(a, v)
        kept = [j for j in range(n) if first[j] < q]   # first[j]: the index whose vector is column j
        values, vectors = a.diagonal(dim1=-2, dim2=-1)[..., kept], v[..., :q, kept]
    values, order = values.sort(dim=-1)
    return values, vectors.gather(-1, order[..., None, :].expand(vectors.shape))


# The widest Gram matrix whose Jacobi sweep is jacobi_sweep_unrolled (each entry of every matrix a
# tensor of the batch: one fused loop over the batch). Measured on this project's 2-core CPU VM,
# float64, 6 compiled sweeps at q = 4: 32 matrices 0.49 ms, 448 matrices 0.67 ms (jacobi_sweep
# on (B, 4, 4): 0.83 and 3.0 ms), compiled in ~40 s. At q = 8 the unrolled sweep (~3000 operators)
# made GCC 12 fail with an internal compiler error, and split into one compiled call per round it
# compiled for 450 s and cost 15.7 ms for 32 matrices: wider matrices keep jacobi_sweep.
UNROLLED_JACOBI_WIDTH = 4


def _round_robin_pairs(q: int) -> list[list[tuple[int, int]]]:
    """The rounds of a sweep over q indices in the circle method's order (_circle_layouts' rounds,
    n = q rounded up to even): round k's disjoint pairs (p, r), every pair of the q indices once
    per sweep. For an odd q, the pairs with the padding index n - 1 (a rotation by 0) are left out."""
    n = q + q % 2
    layout, perm = _circle_layouts(n)
    rounds = []
    for _ in range(n - 1):
        rounds.append([(layout[i], layout[i + n // 2]) for i in range(n // 2)
                       if layout[i] < q and layout[i + n // 2] < q])
        layout = [layout[j] for j in perm]
    return rounds


def _rotation(a_pp: torch.Tensor, a_rr: torch.Tensor, a_pr: torch.Tensor) -> tuple:
    """(t, c, s) of the Jacobi rotation that zeroes a_pr (jacobi_sweep's docstring): t = tan(theta),
    the smaller root of t^2 + 2 tau t - 1 = 0, tau = (a_rr - a_pp) / (2 a_pr); t = 0 where |a_pr|
    <= eps sqrt(|a_pp a_rr|). Elementwise on tensors of any shape."""
    zero = a_pr.abs() <= torch.finfo(a_pr.dtype).eps * (a_pp * a_rr).abs().sqrt()
    tau = (a_rr - a_pp) / (2 * torch.where(zero, torch.ones_like(a_pr), a_pr))
    t = torch.where(tau >= 0, 1.0, -1.0) / (tau.abs() + torch.hypot(torch.ones_like(tau), tau))
    t = torch.where(zero, torch.zeros_like(t), t)
    c = torch.rsqrt(1 + t * t)
    return t, c, t * c


def jacobi_sweep_unrolled(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep of jacobi_eigh for q <= UNROLLED_JACOBI_WIDTH, unrolled over the entries: a and
    the eigenvectors so far v are (q, q, B) (entry (i, j) of the B matrices is row [i, j]), and
    every operator is elementwise on (B,) rows, so that a compiled sweep is a loop over the batch.
    The rounds and rotations are jacobi_sweep's (_round_robin_pairs, _rotation): a round's angles
    come from the matrix at its start; each 2 x 2 block between two of its pairs is turned by
    both rotations (J_1^T block J_2, its mirror set to the transpose: a stays exactly symmetric);
    a pair's own entries are set to their exact values (a_pr = 0, a_pp - t a_pr, a_rr + t a_pr);
    for an odd q, the round's unpaired index has its entries with each pair turned by that pair's
    rotation alone (what jacobi_sweep's zero padding does)."""
    q = a.shape[0]
    e = {}
    for i in range(q):
        for j in range(i, q):
            e[i, j] = e[j, i] = a[i, j]
    w = [[v[i, j] for j in range(q)] for i in range(q)]
    for pairs in _round_robin_pairs(q):
        turns = [(p, r, *_rotation(e[p, p], e[r, r], e[p, r])) for p, r in pairs]
        unpaired = [k for k in range(q) if all(k not in pair for pair in pairs)]     # odd q: one
        for p, r, _, c, s in turns:
            for k in unpaired:
                x, y = e[k, p], e[k, r]
                e[k, p] = e[p, k] = c * x - s * y
                e[k, r] = e[r, k] = s * x + c * y
        for k, (p1, r1, _, c1, s1) in enumerate(turns):
            for p2, r2, _, c2, s2 in turns[k + 1:]:
                x, y, z, u = e[p1, p2], e[p1, r2], e[r1, p2], e[r1, r2]
                x, z = c1 * x - s1 * z, s1 * x + c1 * z                    # rows p1, r1: J_1^T
                y, u = c1 * y - s1 * u, s1 * y + c1 * u
                x, y = c2 * x - s2 * y, s2 * x + c2 * y                    # columns p2, r2: J_2
                z, u = c2 * z - s2 * u, s2 * z + c2 * u
                e[p1, p2] = e[p2, p1] = x
                e[p1, r2] = e[r2, p1] = y
                e[r1, p2] = e[p2, r1] = z
                e[r1, r2] = e[r2, r1] = u
        for p, r, t, c, s in turns:
            a_pr = e[p, r]
            e[p, p], e[r, r] = e[p, p] - t * a_pr, e[r, r] + t * a_pr
            e[p, r] = e[r, p] = torch.zeros_like(a_pr)
            for i in range(q):
                w[i][p], w[i][r] = c * w[i][p] - s * w[i][r], s * w[i][p] + c * w[i][r]   # v J
    return (torch.stack([e[i, j] for i in range(q) for j in range(q)]).view(a.shape),
            torch.stack([w[i][j] for i in range(q) for j in range(q)]).view(v.shape))


def jacobi_sweep(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep of jacobi_eigh: its n - 1 rounds on a (.., n, n) (n even, in _circle_layouts'
    layout) and the eigenvectors so far v (.., n, n); returns both, in the same layout. Each
    round turns the n / 2 pairs (i, i + n / 2) at once by t = tan(theta), the smaller root of
    t^2 + 2 tau t - 1 = 0 with tau = (a_rr - a_pp) / (2 a_pr) (Golub and Van Loan's sym.schur2;
    t = 0 where |a_pr| <= eps sqrt(|a_pp a_rr|), a pair already decoupled: turning it by up to
    45 degrees made repeated eigenvalues converge linearly), sets the pairs' entries to their
    exact values (a_pr = 0, a_pp - t a_pr, a_rr + t a_pr: this keeps rank-deficient matrices
    converging quadratically), then moves to the next round's layout by a fixed permutation."""
    n = a.shape[-1]
    half = n // 2
    _, perm = _circle_layouts(n)
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    pairs = torch.eye(half, dtype=torch.bool, device=a.device).repeat(2, 2) & ~eye
    for _ in range(n - 1):
        diagonal = a.diagonal(dim1=-2, dim2=-1)
        a_pp, a_rr = diagonal[..., :half], diagonal[..., half:]
        a_pr = a[..., :half, half:].diagonal(dim1=-2, dim2=-1)                 # (.., n/2)
        t, c, s = _rotation(a_pp, a_rr, a_pr)     # a pair decoupled to rounding does not turn
        top, bottom, cr, sr = a[..., :half, :], a[..., half:, :], c[..., :, None], s[..., :, None]
        a = torch.cat([cr * top - sr * bottom, sr * top + cr * bottom], dim=-2)            # J^T a
        left, right, cc, sc = a[..., :half], a[..., half:], c[..., None, :], s[..., None, :]
        a = torch.cat([cc * left - sc * right, sc * left + cc * right], dim=-1)            # (J^T a) J
        exact = torch.cat([a_pp - t * a_pr, a_rr + t * a_pr], dim=-1)
        a = torch.where(eye, torch.diag_embed(exact), torch.where(pairs, 0.0, a))
        left, right = v[..., :half], v[..., half:]
        v = torch.cat([cc * left - sc * right, sc * left + cc * right], dim=-1)            # v J
        a, v = a[..., perm, :][..., :, perm], v[..., :, perm]
    return a, v


def _svd_from_eigh(b: torch.Tensor, b64: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor,
                   product=torch.matmul) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gram_eigh_svd's factors from the ascending eigh of b64 b64^T (b64: b in float64); `product`
    multiplies the q x q eigenvectors with b64."""
    values, vectors = values.flip(-1), vectors.flip(-1)
    s = values.clamp_min(0).sqrt()
    kept = s > 1e-7 * s[..., :1]
    s = torch.where(kept, s, torch.zeros_like(s))
    inverse = torch.where(kept, 1 / torch.where(kept, s, torch.ones_like(s)), torch.zeros_like(s))
    vh = product(vectors.mT, b64) * inverse[..., :, None]
    return vectors.to(b.dtype), s.to(b.dtype), vh.to(b.dtype)


def times_skinny(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for a large a (.., m, n) and a skinny x (.., n, q), returned as a transposed view.

    Computed as (x^T a^T)^T: BLAS on the CPU runs the product with the skinny factor on the
    left several times faster than a @ x (measured 0.4 vs 1.2-2.5 ms for 1024 x 1024 times
    1024 x 4, one thread); on a GPU it is the same call."""
    return (x.mT @ a.mT).mT


def skinny_t_times(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x^T @ a (.., q, n) for a skinny x (.., m, q): the fast orientation. a^T @ x is its
    transpose, never computed directly (4 ms against 0.3 ms on the CPU at 1024 x 1024, q = 4)."""
    return x.mT @ a


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 0, niter: int = 0,
                   seed: int | list[int] = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of a (m, n) by a Halko range finder.

    Returns U (m, r), s (r,), Vh (r, n) in the compute dtype (float64 for float64 input, float32
    otherwise), with r = min(rank, m, n). `niter` power iterations, each re-orthonormalised
    (as torch.pca_lowrank does). The sketch Omega (n, q) is drawn from `seed`.

    Batched: a (B, m, n) with one seed per matrix gives U (B, m, r), s (B, r), Vh (B, r, n),
    the same as B separate calls up to rounding (one QR/SVD call for all B).
    """
    if a.dim() not in (2, 3):
        raise ValueError(f"randomized_svd expects a 2-D (or batched 3-D) tensor, got shape {tuple(a.shape)}")
    return range_finder_svd(*_products(a), rank, oversample, niter, seed)


def randomized_svd_of_update(us: torch.Tensor, vh: torch.Tensor, dense: torch.Tensor, keep: float,
                             mix: float, rank: int, oversample: int = 0, niter: int = 0,
                             seed: int | list[int] = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """randomized_svd(keep * us @ vh + mix * dense) without forming that matrix: a moment update
    b M~ + (1 - b) G whose previous value M~ = us @ vh is low-rank. Each product of the range
    finder with it is one product with `dense` (a pass over G) plus two skinny ones with the
    factors, so the moment is never written to memory (the fused step's first moments).
    us (.., m, r), vh (.., r, n), dense (.., m, n), all in one compute dtype; batched like
    randomized_svd."""
    if dense.dim() not in (2, 3) or us.shape[:-1] != dense.shape[:-1] or vh.shape[-1] != dense.shape[-1]:
        raise ValueError(f"randomized_svd_of_update: shapes us {tuple(us.shape)}, vh {tuple(vh.shape)}, "
                         f"dense {tuple(dense.shape)} do not make keep * us @ vh + mix * dense")
    return range_finder_svd(*_products(MomentUpdate(us, vh, dense, keep, mix)), rank, oversample, niter, seed)


def _products(moment) -> tuple:
    """(times, t_times, shape, dtype, device) of range_finder_svd for a moment: a tensor (in its
    compute dtype) or a MomentUpdate (each product one with `dense` plus two skinny ones)."""
    if isinstance(moment, MomentUpdate):
        us, vh, dense, keep, mix = moment
        return (lambda x: _plus_product(times_skinny(dense, x), us, vh @ x, mix, keep),
                lambda x: _plus_product(skinny_t_times(x, dense), x.mT @ us, vh, mix, keep),
                dense.shape, dense.dtype, dense.device)
    a = moment.to(compute_dtype_for(moment.dtype))
    return (lambda x: times_skinny(a, x), lambda x: skinny_t_times(x, a), a.shape, a.dtype, a.device)


def _plus_product(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * base + alpha * (a @ b) in one call (addmm, baddbmm for batches): one operator
    where a product, a scaling and an addition were three (each a launch on a GPU)."""
    return (torch.baddbmm if base.dim() == 3 else torch.addmm)(base, a, b, beta=beta, alpha=alpha)


class MomentUpdate(NamedTuple):
    """The moment keep * us @ vh + mix * dense, kept unformed (see randomized_svd_of_update)."""
    us: torch.Tensor
    vh: torch.Tensor
    dense: torch.Tensor
    keep: float
    mix: float


def compress(moment, rank: int, oversample: int = 0, niter: int = 0, seed: int | list[int] = 0):
    """(U, s, Vh) of a new moment: a tensor (randomized_svd) or a MomentUpdate
    (randomized_svd_of_update). Anything else is a TypeError."""
    if isinstance(moment, torch.Tensor):
        return randomized_svd(moment, rank, oversample, niter, seed)
    if isinstance(moment, MomentUpdate):
        return randomized_svd_of_update(*moment, rank, oversample, niter, seed)
    raise TypeError(f"compress: expected a tensor or a MomentUpdate, got {type(moment).__name__}")


def compress_batch(moment, rank: int, oversample: int, niter: int, seeds: list[int]):
    """compress for the new moments of a batch of B same-shaped bodies (a (B, k, n) tensor or a
    MomentUpdate of batched parts), one seed per body: U (B, k, r), s (B, r), Vh (B, r, n). A
    batch of one is compressed as a 2-D block, as a lone body is on the reference path (on a
    GPU a 3-D batch takes the batched algebra, uses_gram_algebra)."""
    if len(seeds) == 1:
        return tuple(x[None] for x in compress(_first_of_batch(moment), rank, oversample, niter, seeds[0]))
    return compress(moment, rank, oversample, niter, seeds)


def defers_small_svd(moment, bodies: int) -> bool:
    """Whether a batch's compress_batch can be split (compress_range now, finish_compress later
    with other batches): a batch of two or more whose small SVD takes the Gram algebra."""
    dense = moment.dense if isinstance(moment, MomentUpdate) else moment
    return (bodies > 1 and dense.dim() == 3 and takes_gpu_rules(dense.device)
            and compute_dtype_for(dense.dtype) == torch.float32)          # uses_gram_algebra's rule


def compress_range(moment, rank: int, oversample: int, niter: int, seeds):
    """compress_batch's first half for a batch (defers_small_svd): (basis, small) of
    range_and_small; the moment is not needed after it. `seeds`: one int per body, or a
    SketchSeeds (its bases on the batch's device: the seeds computed there). A sketch of at most
    COMPILED_RANGE_WIDTH columns takes one compiled call for the batch
    (compiled_range.sketched_range: the same steps with the Cholesky QRs unrolled), wider ones
    range_and_small's operators."""
    unformed = isinstance(moment, MomentUpdate)
    dense = moment.dense if unformed else moment
    m, n = dense.shape[-2:]
    width = sketch_width(rank, oversample, m, n)
    if isinstance(seeds, SketchSeeds):
        bases, steps = seeds
    else:
        bases, steps = torch.tensor(seeds, dtype=torch.int64).to(dense.device, non_blocking=True), None
    if bases.shape != (dense.shape[0],):
        raise ValueError(f"a batch of {dense.shape[0]} matrices needs as many seeds, got {tuple(bases.shape)}")
    if width > COMPILED_RANGE_WIDTH:
        return range_and_small(*_products(moment), rank, oversample, niter,
                               bases if steps is None else step_seeds(bases, steps))
    if unformed:
        keep, mix = (torch.as_tensor(x, dtype=dense.dtype).reshape(()) for x in (moment.keep, moment.mix))
        parts = (moment.us, moment.vh, keep, mix)
    else:
        parts = (None, None, None, None)
    return compiled_call(sketched_range)(dense, *parts, bases, steps, weyl_sequence(n * width, dense.device),
                                         width, niter)


def finish_compress(pending: list[tuple]) -> list[tuple]:
    """compress_batch's second half for several batches, [(basis, small, rank)] ->
    [(U, s, Vh)]: their Gram-algebra small SVDs in one eigensolver call per sketch width
    (gram_eigh_svds): jacobi_eigh's sweeps once for all the step's batches (no synchronisation),
    or, for q > JACOBI_MAX_WIDTH, one eigh (one synchronisation) for all of them."""
    eighs = gram_eighs([small for _, small, _ in pending])
    return [compiled_call(factors_from_eigh)(basis, small, b64, values, vectors, rank)
            if basis.shape[-1] <= COMPILED_RANGE_WIDTH else
            factors_from_range(basis, small, rank, _svd_from_eigh(small, b64, values, vectors))
            for (basis, small, rank), (b64, values, vectors) in zip(pending, eighs)]


def factors_from_eigh(basis: torch.Tensor, small: torch.Tensor, b64: torch.Tensor, values: torch.Tensor,
                      vectors: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """factors_from_range of a batch's basis and small matrix, given the eigendecomposition of its
    Gram matrix (gram_eighs): _svd_from_eigh and the product with the basis as one function,
    compiled (one call per batch) for sketches of up to COMPILED_RANGE_WIDTH columns, its
    products with the q x q eigenvectors unrolled (compiled_range.rank_sum)."""
    return factors_from_range(basis, small, rank, _svd_from_eigh(small, b64, values, vectors, product=rank_sum),
                              product=rank_sum)


def _first_of_batch(moment):
    """Body 0 of a batch's moment (a (1, k, n) tensor or MomentUpdate) as a 2-D block."""
    if isinstance(moment, MomentUpdate):
        return MomentUpdate(moment.us[0], moment.vh[0], moment.dense[0], moment.keep, moment.mix)
    return moment[0]


def range_finder_svd(times, t_times, shape, dtype: torch.dtype, device, rank: int, oversample: int,
                     niter: int, seed: int | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Halko range finder and small SVD of a matrix A (.., m, n) = shape, known only through
    its products: times(x) = A @ x for x (.., n, q) and t_times(x) = x^T @ A for x (.., m, q).
    The steps of randomized_svd (its docstring), whatever form A takes."""
    basis, small = range_and_small(times, t_times, shape, dtype, device, rank, oversample, niter, seed)
    return factors_from_range(basis, small, rank)


def range_and_small(times, t_times, shape, dtype: torch.dtype, device, rank: int, oversample: int,
                    niter: int, seed: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """range_finder_svd's first half: the orthonormal basis (.., m, q) of A's range and the small
    matrix basis^T A (.., q, n), after which A is not needed."""
    m, n = shape[-2:]
    q = sketch_width(rank, oversample, m, n)
    if len(shape) == 2:
        omega = gaussian_test_matrices(n, q, [seed], dtype, device)[0]         # (n, q)
    else:
        if len(seed) != shape[0]:
            raise ValueError(f"a batch of {shape[0]} matrices needs as many seeds, got {len(seed)}")
        omega = gaussian_test_matrices(n, q, seed, dtype, device)              # (B, n, q)
    basis = orthonormal_basis(times(omega))                       # (.., m, q)
    for _ in range(niter):
        z = orthonormal_basis(t_times(basis).mT)                  # (.., n, q)
        basis = orthonormal_basis(times(z))                       # (.., m, q)
    return basis, t_times(basis)                                  # (.., m, q), (.., q, n)


def factors_from_range(basis: torch.Tensor, small: torch.Tensor, rank: int, svd: tuple | None = None,
                       product=torch.matmul) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """range_finder_svd's second half: U (.., m, r), s (.., r), Vh (.., r, n) from the basis, the
    small matrix and its small_svd (computed here when not given); `product` multiplies the basis
    with the small U."""
    u_small, s, vh = small_svd(small) if svd is None else svd
    r = min(rank, small.shape[-2])
    u = product(basis, u_small[..., :r])                          # (.., m, r)
    return u, s[..., :r], vh[..., :r, :]


def scaled_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U diag(s), Vh) in `dtype` (default: s's compute dtype): the two factors whose product
    rebuild() forms (the fused step forms it inside its kernel instead)."""
    dtype = dtype or compute_dtype_for(s.dtype)
    return u.to(dtype) * s.to(dtype), vh.to(dtype)


def rebuild(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """U diag(s) Vh: (m, r) (r,) (r, n) -> (m, n), computed in `dtype` (default: s's dtype)."""
    us, vh = scaled_factors(u, s, vh, dtype)
    return us @ vh


def rebuild_noise_floor(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far from 0 rounding alone puts a rebuilt entry whose true value is 0, to its order of
    magnitude: eps(dtype) s_max. An entry that is exactly 0 in the compressed moment (a row of an
    embedding whose token never appeared) comes back as +-noise of about this size; the sign of
    that noise is an accident of rounding (of summation order, so of the world size).
    Batched: s (B, r) gives the B floors."""
    if s.numel() == 0:
        return torch.zeros(s.shape[:-1], dtype=dtype, device=s.device)
    return torch.finfo(dtype).eps * s.to(dtype).abs().amax(dim=-1)


def negative_stats(v: torch.Tensor, floor: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of |v| over the entries below -floor, and their count (both in v's dtype).

    Computed as floor * count - sum(min(v + floor, 0)): both terms are >= 0, so nothing
    cancels, and it avoids torch.where with a scalar and a bool sum (a full int64 copy), each
    several times slower than these passes on the CPU."""
    count = torch.count_nonzero(v < -floor).to(v.dtype)
    return floor * count - (v + floor).clamp_max_(0).sum(), count


def negative_fill_value(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean |v| over the negative entries from its two sums (0 when there are none)."""
    return abs_sum / count.clamp_min(1)


def fill_negatives_(v: torch.Tensor, fill: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """In place: entries below -floor become `fill`; entries within the noise band
    [-floor, floor) become `floor`; the rest is left as it is. Returns v."""
    negative = v < -floor
    return v.clamp_min_(floor).masked_fill_(negative, fill)


def fix_negatives(v: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The reference's fix for a rebuilt second moment: negative entries become the mean of |v|
    over the negative entries; the rest is left as it is. Returns a new tensor.

    With floor > 0 (what the optimizers pass: the rebuild's rounding-noise level), "negative"
    means below -floor, and entries within the noise of 0 (|v| < floor) are set to the floor:
    they are zeros of the compressed moment (rows of an embedding whose tokens never appeared)
    that came back as +-noise. With floor = 0 this is exactly the reference. The floor keeps the
    result from depending on the sign of rounding noise, which would otherwise make global scope
    differ between world sizes by far more than rounding (those zeros flipping between "tiny"
    and "the mean negative value" with the summation order), and keeps sqrt(v) off exact 0.
    """
    return fill_negatives_(v.clone(), negative_fill_value(*negative_stats(v, floor)), floor)
