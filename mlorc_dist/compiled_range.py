"""The range finder of a batch under the GPU rules as one compiled call per moment.

Where lowrank.uses_gram_algebra holds (float32 batches on a GPU, or on the CPU under
MLORC_GPU_RULES_ON_CPU=1), a batch's range finder for one moment, drawing its test matrices,
the products with the moment, three Cholesky QRs (niter = 1) and the small matrix, is
`sketched_range`: plain torch operators on tensors, compiled by torch.compile into one call for
the whole batch (Triton kernels and cuBLAS on a GPU, inductor's C++ and MKL on the CPU), where
the same steps run eagerly were ~50 operators per moment and batch (each a launch and host time
on a GPU). The small SVD that follows stays with lowrank.finish_compress (one Jacobi
eigensolver for every batch of a step, then lowrank.factors_from_eigh, one compiled call per
batch and moment). `compiled` is the compile wrapper of these functions and of the Jacobi
sweeps; `rank_sum` the unrolled product with a low-rank factor that they and the fused block
update share.

The pieces, each a pure function that runs eagerly too (tests compare them):
- hashed_normal_of: the counter-based standard normals of lowrank.hashed_normal, from a tensor of
  seeds and the Weyl sequence as an input tensor;
- cholesky_qr_unrolled: lowrank.cholesky_qr with its q x q Cholesky factorisation and triangular
  solve written entry by entry (q <= MAX_WIDTH), so that the compiler fuses them with the Gram
  matrix into loops over the batch;
- sketched_range: lowrank.range_and_small of a tensor or a MomentUpdate's parts.
"""
from __future__ import annotations

import torch

__all__ = ["MAX_WIDTH", "UNROLLED_RANK", "rank_sum", "CompiledFunction", "compiled", "weyl_sequence", "hashed_normal_of", "mix64",
           "splitmix64", "SEED_MASK", "to_int64", "step_seed", "step_seeds", "cholesky_qr_unrolled", "sketched_range"]

# The widest sketch whose range finder is one compiled call (the Cholesky factorisation is
# unrolled: q (q + 1) / 2 entries); wider sketches run lowrank.range_and_small's operators.
MAX_WIDTH = 8

# Up to this inner size a product with a low-rank factor is unrolled (rank_sum): the fused
# step's rebuild inside its elementwise kernel (2 r multiply-adds per entry, no m x n
# temporary), the range finder's products with the factors inside the kernels around them;
# above it, a GEMM (an unrolled sum of 64 terms compiles slowly and costs more arithmetic than
# the memory pass it saves).
UNROLLED_RANK = 8


def rank_sum(us: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """us (.., k, r) @ vh (.., r, n). For r <= UNROLLED_RANK written as r broadcast products, an
    elementwise expression that a compiler fuses into whatever consumes it (eagerly it
    materialises, like a GEMM); above, a matrix product."""
    if us.shape[-1] > UNROLLED_RANK:
        return us @ vh
    total = us[..., :, 0:1] * vh[..., 0:1, :]
    for j in range(1, us.shape[-1]):
        total = total + us[..., :, j:j + 1] * vh[..., j:j + 1, :]
    return total


# splitmix64's constants, as signed 64-bit integers (torch's int64 arithmetic wraps)
GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685
_U64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """splitmix64's output function on a Python int (the same steps as mix64 on tensors)."""
    x &= _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    x ^= x >> 31
    return x - (1 << 64) if x >> 63 else x


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >> bits on int64 as on unsigned 64-bit integers (torch shifts signed ones arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function, elementwise on int64 (wrapping multiplication)."""
    z = (z ^ _logical_shift(z, 30)) * _MIX1
    z = (z ^ _logical_shift(z, 27)) * _MIX2
    return z ^ _logical_shift(z, 31)


# sketch seeds are non-negative 63-bit integers
SEED_MASK = (1 << 63) - 1


def to_int64(x: int) -> int:
    """A 64-bit unsigned integer as the int64 with the same bits."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


def step_seed(base: int, step: int) -> int:
    """A sketch's seed at `step` from the part of it that does not change from step to step
    (lowrank.body_seed): splitmix64(base + (step + 1) golden), 63 bits. step_seeds on ints."""
    return splitmix64(base + (step + 1) * GOLDEN) & SEED_MASK


def step_seeds(bases: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """step_seed elementwise on int64 tensors: bases (B,) (to_int64 of each body_seed), steps 0-d
    or (B,); int64 arithmetic wraps as step_seed's unsigned 64-bit arithmetic does."""
    return mix64(bases + (steps + 1) * GOLDEN) & SEED_MASK


_WEYL: dict = {}


def weyl_sequence(count: int, device) -> torch.Tensor:
    """(i + 1) golden for i < count, int64 wrapping (splitmix64's counter), made once per length
    and device. An input of the compiled function, not an arange inside it: inductor folded
    arange * constant into its index arithmetic, which does not wrap as int64 does (measured:
    wrong values from the 2nd element on)."""
    key = (count, torch.device(device))
    if key not in _WEYL:
        _WEYL[key] = (torch.arange(1, count + 1, dtype=torch.int64) * GOLDEN).to(device)
    return _WEYL[key]


def hashed_normal_of(seeds: torch.Tensor, weyl: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows, cols) float64 standard normals from int64 seeds (B,) and weyl_sequence(rows cols):
    entry i of matrix b is the Box-Muller transform of the two 32-bit halves of
    splitmix64(key_b + (i + 1) golden), key_b = splitmix64(seeds[b]) (lowrank.hashed_normal)."""
    z = mix64(mix64(seeds)[:, None] + weyl)                                  # (B, rows cols)
    high = _logical_shift(z, 32).to(torch.float64)
    low = (z & 0xFFFFFFFF).to(torch.float64)
    radius = torch.sqrt(-2.0 * torch.log((high + 0.5) * 2.0 ** -32))     # (0, 1) -> no log(0)
    normal = radius * torch.cos((2.0 * torch.pi * 2.0 ** -32) * low)
    return normal.view(seeds.shape[0], rows, cols)


def cholesky_qr_unrolled(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """lowrank.cholesky_qr of a batch y (B, m, q), q <= MAX_WIDTH: the same shifted Cholesky QR
    in float64, twice, with L (L L^T = y^T y + shift) computed entry by entry as (B,) tensors
    (column Cholesky, as LAPACK's unblocked potrf) and Q = y L^-T column by column (forward
    substitution). A diagonal that rounding takes below the smallest normal number is clamped
    to it (cholesky_ex would stop there). Returns y's dtype."""
    m, q = y.shape[-2:]
    basis = y.to(torch.float64)
    eps, tiny = torch.finfo(torch.float64).eps, torch.finfo(torch.float64).tiny
    for _ in range(passes):
        gram = basis.mT @ basis                                              # (B, q, q)
        shift = 11 * (m * q + q * (q + 1)) * eps * gram.diagonal(dim1=-2, dim2=-1).sum(-1) + tiny
        lower: dict = {}
        for j in range(q):
            d = gram[:, j, j] + shift
            for k in range(j):
                d = d - lower[j, k] * lower[j, k]
            lower[j, j] = torch.sqrt(torch.clamp_min(d, tiny))
            for i in range(j + 1, q):
                e = gram[:, i, j]
                for k in range(j):
                    e = e - lower[i, k] * lower[j, k]
                lower[i, j] = e / lower[j, j]
        columns = []
        for j in range(q):                                  # y_j = sum_{k <= j} Q_k L[j, k]
            c = basis[:, :, j]
            for k in range(j):
                c = c - lower[j, k][:, None] * columns[k]
            columns.append(c / lower[j, j][:, None])
        basis = torch.stack(columns, dim=-1)
    return basis.to(y.dtype)


def sketched_range(dense: torch.Tensor, us: torch.Tensor | None, vh: torch.Tensor | None,
                   keep: torch.Tensor | None, mix: torch.Tensor | None, seeds: torch.Tensor,
                   steps: torch.Tensor | None, weyl: torch.Tensor, width: int,
                   niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lowrank.range_and_small of a batch: the orthonormal basis (B, m, q) of A's range and the
    small matrix basis^T A (B, q, n), for A = dense (B, m, n), or A = keep us @ vh + mix dense
    (a MomentUpdate: us (B, m, r), vh (B, r, n), keep and mix 0-d tensors; A is not formed), with
    the test matrices hashed_normal_of(seeds) (n, width) and niter power iterations; with `steps`
    (0-d or (B,) int64), `seeds` are the bodies' step-independent parts and the sketch seeds are
    step_seeds(seeds, steps). The
    products with dense are in the fast orientation (lowrank.times_skinny, skinny_t_times); those
    with the factors' inner rank r are rank_sum's broadcast products, fused into the kernels
    around them (a batched GEMM of 4 x 4 matrices costs a call per matrix on the CPU)."""
    if steps is not None:
        seeds = step_seeds(seeds, steps)
    omega = hashed_normal_of(seeds, weyl, dense.shape[-1], width).to(dense.dtype)

    def times(x):                                           # A x, x (B, n, q)
        y = (x.mT @ dense.mT).mT
        return y if us is None else mix * y + keep * rank_sum(us, vh @ x)

    def t_times(x):                                         # x^T A, x (B, m, q)
        y = x.mT @ dense
        return y if us is None else mix * y + keep * rank_sum(x.mT @ us, vh)

    basis = cholesky_qr_unrolled(times(omega))
    for _ in range(niter):
        z = cholesky_qr_unrolled(t_times(basis).mT)
        basis = cholesky_qr_unrolled(times(z))
    return basis, t_times(basis)


# Graphs allowed per compiled function: one per width, niter, form (tensor or MomentUpdate),
# dtype and size-1 dimension (specialised), with room to spare; dynamo's default is 8, which
# with fullgraph=True is an error.
RECOMPILE_LIMIT = 64


class CompiledFunction:
    """fn compiled by torch.compile (fullgraph, dynamic shapes: a new batch size or block shape
    does not recompile), called with dynamo's recompile limit raised to `recompile_limit`. A
    failure to compile (no C++ compiler for the CPU, no Triton for a GPU) is a RuntimeError that
    names fn, starts with `prefix` and ends with `needs`: no other computation runs quietly.
    detach=True calls it on detached aliases of its tensor arguments (same storage, so in-place
    writes land): an engine's flat partition can be a view of a tensor that autograd tracks,
    which torch.compile refuses to trace."""

    def __init__(self, fn, *, needs: str, prefix: str = "", options: dict | None = None,
                 recompile_limit: int = RECOMPILE_LIMIT, detach: bool = False):
        self.fn, self.needs, self.prefix = fn, needs, prefix
        self.recompile_limit, self.detach = recompile_limit, detach
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=options)

    def __call__(self, *args):
        if self.detach:
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        # the limit set and restored around the call: dynamo reads it only on a cache miss, and
        # config.patch costs ~17 us a call on the CPU (it builds a class), this ~4 us
        config = torch._dynamo.config
        saved, config.recompile_limit = config.recompile_limit, self.recompile_limit
        try:
            return self.compiled(*args)
        except Exception as error:     # torch.compile's errors have many types; all end here
            raise RuntimeError(
                f"{self.prefix}torch.compile could not build {self.fn.__name__} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). {self.needs}") from error
        finally:
            config.recompile_limit = saved


_COMPILED: dict = {}


def compiled(fn):
    """fn as a CompiledFunction, made once per process: the range finder, the factor call and the
    Jacobi sweeps of the GPU rules."""
    if fn not in _COMPILED:
        _COMPILED[fn] = CompiledFunction(
            fn, needs="The GPU rules need a working torch.compile (Triton on a GPU, a C++ compiler "
                      "under MLORC_GPU_RULES_ON_CPU=1).")
    return _COMPILED[fn]
