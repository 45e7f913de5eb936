"""The fused step's C++ range finder on the CPU (mlorc_dist/optim/range_finder.cpp, skinny.py)
against lowrank's (torch.matmul and LAPACK), and its product loops (skinny.h) against torch.matmul."""
import pytest
import torch

import mlorc_dist
from mlorc_dist import lowrank
from mlorc_dist.optim import cpu_kernels, skinny


@pytest.fixture(autouse=True)
def _cpu_rules(cpu_rules):
    """Every test here is of the CPU's C++ range finder and its rules."""


# (m, n, q); the last two span several column blocks of cols (skinny.h), with a ragged last one
SHAPES = [(1, 1, 1), (3, 17, 2), (5, 33, 4), (37, 100, 8), (64, 1024, 4), (130, 7, 5), (9, 64, 3), (9, 2100, 3),
          (21, 1500, 6), (20, 50, 2), (19, 70, 7)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("m,n,q", SHAPES)
def test_kernel_products_equal_matmul(m, n, q, dtype, tol):
    g = torch.Generator().manual_seed(m * 1000 + n + q)
    a = torch.randn(m, n, generator=g, dtype=dtype)
    x_right = torch.randn(n, q, generator=g, dtype=dtype)       # a @ x
    x_left = torch.randn(m, q, generator=g, dtype=dtype)        # x^T @ a
    ext = cpu_kernels.extension()                  # every width it takes (q <= 8), used or not
    for got, want in ((ext.rows(a, x_right.mT.contiguous()), a @ x_right),
                      (ext.cols(x_left, a), x_left.mT @ a)):
        assert got.shape == want.shape and got.dtype == dtype
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_kernel_products_of_a_batch_equal_bmm(dtype, tol):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 37, 50, generator=g, dtype=dtype)
    x_right, x_left = torch.randn(3, 50, 4, generator=g, dtype=dtype), torch.randn(3, 37, 4, generator=g, dtype=dtype)
    ext = cpu_kernels.extension()
    for got, want in ((ext.rows(a, x_right.mT.contiguous()), a @ x_right), (ext.cols(x_left, a), x_left.mT @ a)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    with pytest.raises(RuntimeError, match="like the other operand"):
        ext.rows(a, x_right[0].mT.contiguous())


def _moment(kind: str, batch: int, m: int, n: int, dtype, seed: int = 0):
    """A batch of moments: "dense" (a tensor, like V), "unformed" (a MomentUpdate, like M) or
    "lowrank" (exactly rank 2: the range finder's rank-deficient case)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, m, n, generator=g, dtype=dtype)
    if kind == "lowrank":
        return torch.randn(batch, m, 2, generator=g, dtype=dtype) @ torch.randn(batch, 2, n, generator=g, dtype=dtype)
    if kind == "unformed":
        us, vh = torch.randn(batch, m, 3, generator=g, dtype=dtype), torch.randn(batch, 3, n, generator=g, dtype=dtype)
        return lowrank.MomentUpdate(us, vh, dense, 0.9, 0.1)
    return dense


def _product(u, s, vh):
    return (u * s[..., None, :]) @ vh


# (batch, m, n, rank, oversample, niter): a batch, a lone body, wide and tall bodies, power
# iterations 0-2, oversampling, a sketch as wide as the block (q = min(m, n))
CASES = [(4, 64, 48, 4, 0, 1), (1, 40, 72, 3, 2, 2), (3, 90, 20, 4, 0, 0), (2, 6, 30, 4, 2, 1),
         (2, 33, 17, 1, 0, 1), (1, 5, 5, 5, 0, 1), (2, 70, 50, 4, 4, 1), (1, 64, 64, 8, 0, 1),
         (2, 40, 30, 2, 0, 1), (3, 50, 61, 3, 0, 1), (1, 30, 90, 4, 3, 1)]     # q = 1-8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", ["dense", "unformed", "lowrank"])
@pytest.mark.parametrize("batch,m,n,rank,oversample,niter", CASES)
def test_the_cpp_range_finder_equals_lowranks(batch, m, n, rank, oversample, niter, kind, dtype, tol):
    """The same test matrices and steps as lowrank.compress_batch: the same truncated moment to
    rounding (a flat spectrum: a different Omega would change it by O(1)), orthonormal factors,
    the same singular values."""
    moment = _moment(kind, batch, m, n, dtype)
    seeds = [lowrank.sketch_seed(7, 3, "w", 16 * i, 1) for i in range(batch)]
    q = lowrank.sketch_width(rank, oversample, m, n)
    assert skinny.uses_kernel(moment.dense if kind == "unformed" else moment, q)
    u, s, vh = skinny.compress_batch(moment, rank, oversample, niter, seeds)
    want_u, want_s, want_vh = lowrank.compress_batch(moment, rank, oversample, niter, seeds)
    r = min(rank, q)
    assert u.shape == (batch, m, r) and s.shape == (batch, r) and vh.shape == (batch, r, n) and u.dtype == dtype
    want = _product(want_u, want_s, want_vh)
    assert (_product(u, s, vh) - want).abs().max() <= tol * want.abs().max()
    assert (s - want_s).abs().max() <= tol * want_s.abs().max()
    assert torch.all(s[:, :-1] >= s[:, 1:])
    eye = torch.eye(r, dtype=dtype)
    assert (u.mT @ u - eye).abs().max() <= 10 * tol and (vh @ vh.mT - eye).abs().max() <= 10 * tol


def test_the_range_finder_of_a_zero_moment_is_finite_and_orthonormal():
    """A zero moment (a body whose gradients were all zero): s = 0 and orthonormal factors, as
    LAPACK gives, not the NaN of normalising a zero vector."""
    for dtype in (torch.float32, torch.float64):
        for moment in (torch.zeros(2, 32, 24, dtype=dtype),
                       lowrank.MomentUpdate(torch.zeros(2, 32, 3, dtype=dtype), torch.zeros(2, 3, 24, dtype=dtype),
                                            torch.zeros(2, 32, 24, dtype=dtype), 0.9, 0.1)):
            u, s, vh = skinny.compress_batch(moment, 4, 0, 1, [1, 2])
            assert torch.all(s == 0)
            eye = torch.eye(4, dtype=dtype).expand(2, 4, 4)
            torch.testing.assert_close(u.mT @ u, eye, atol=1e-6, rtol=0)
            torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-6, rtol=0)
    # rank 2 < r = 4: two singular values are rounding, and the factors stay orthonormal
    u, s, vh = skinny.compress_batch(_moment("lowrank", 2, 32, 24, torch.float64), 4, 0, 1, [1, 2])
    assert torch.all(s[:, 2:] <= 1e-12 * s[:, :1])
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    torch.testing.assert_close(u.mT @ u, eye)
    torch.testing.assert_close(vh @ vh.mT, eye)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_moment_is_an_error_as_on_the_reference_path(bad):
    """A NaN or inf in a moment (a V that overflowed) cannot be compressed: torch's QR and SVD
    raise, and so does the C++ range finder (which body), never a finite compression of the
    other rows."""
    for kind in ("dense", "unformed"):
        moment = _moment(kind, 3, 48, 40, torch.float32)
        (moment.dense if kind == "unformed" else moment)[1, 30, 5] = bad
        with pytest.raises(RuntimeError, match="moment of body 1 of the batch is not finite"):
            skinny.compress_batch(moment, 4, 0, 1, [1, 2, 3])
        with pytest.raises(RuntimeError):
            lowrank.compress_batch(moment, 4, 0, 1, [1, 2, 3])
    moment = _moment("unformed", 2, 48, 40, torch.float32)
    moment.vh[0, 2, 7] = bad                                          # in the old factors
    with pytest.raises(RuntimeError, match="moment of body 0 of the batch is not finite"):
        skinny.compress_batch(moment, 4, 0, 0, [1, 2])


@pytest.mark.parametrize("scale", [1e100, 1e-160, 1e250])
def test_float64_moments_of_any_magnitude(scale):
    """No norm of the float64 small algebra over- or underflows (each QR works on its matrix
    scaled by a power of two): the same result as LAPACK's, scaled."""
    moment = _moment("dense", 2, 64, 48, torch.float64)
    u, s, vh = skinny.compress_batch(moment * scale, 4, 0, 1, [3, 4])
    want_u, want_s, want_vh = lowrank.compress_batch(moment, 4, 0, 1, [3, 4])
    want = _product(want_u, want_s, want_vh)
    assert (_product(u, s / scale, vh) - want).abs().max() <= 1e-12 * want.abs().max()
    assert (s / scale - want_s).abs().max() <= 1e-12 * want_s.abs().max()


def test_the_range_finder_gives_the_same_numbers_on_one_and_two_threads():
    moment = _moment("unformed", 3, 200, 700, torch.float32)
    lone = _moment("dense", 1, 300, 2000, torch.float32)      # a lone body: its products in parallel
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append([skinny.compress_batch(moment, 4, 0, 1, [5, 6, 7]),
                            skinny.compress_batch(lone, 4, 0, 2, [9])])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_the_range_finder_refuses_what_it_cannot_compute():
    ext = cpu_kernels.extension()
    a, empty = torch.randn(2, 8, 6), torch.empty(0)
    with pytest.raises(RuntimeError, match="one seed per body"):
        ext.range_finder(a, empty, empty, 0.0, 1.0, [1], 4, 1, 4)
    with pytest.raises(RuntimeError, match="sketch width 7 outside"):
        ext.range_finder(a, empty, empty, 0.0, 1.0, [1, 2], 7, 1, 4)
    with pytest.raises(RuntimeError, match="float32/float64 CPU tensor"):
        ext.range_finder(a.to(torch.bfloat16), empty, empty, 0.0, 1.0, [1, 2], 4, 1, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.range_finder(a.mT, empty, empty, 0.0, 1.0, [1, 2], 4, 1, 4)
    with pytest.raises(RuntimeError, match="must make keep us vh"):
        ext.range_finder(a, torch.randn(2, 8, 3), torch.randn(2, 2, 6), 0.9, 0.1, [1, 2], 4, 1, 4)
    with pytest.raises(RuntimeError, match="of a's dtype"):
        ext.range_finder(a, torch.randn(2, 8, 3).double(), torch.randn(2, 3, 6), 0.9, 0.1, [1, 2], 4, 1, 4)
    with pytest.raises(RuntimeError, match="q must be 1..8"):
        ext.range_finder(torch.randn(1, 12, 12), empty, empty, 0.0, 1.0, [1], 9, 1, 4)


def test_the_rule_for_what_runs_in_the_kernel(cpu_kernel_calls):
    a = torch.randn(2, 6, 10)
    assert skinny.uses_kernel(a, skinny.MAX_WIDTH) and skinny.uses_kernel(a.double(), 4)
    assert not skinny.uses_kernel(a, skinny.MAX_WIDTH + 1)          # wider sketches: lowrank's
    assert not skinny.uses_kernel(a.to(torch.bfloat16), 4)          # not a compute dtype
    assert not skinny.uses_kernel(a[0], 4)                          # batches only
    assert not skinny.uses_kernel(torch.randn(2, 2, 6, 10), 4)
    assert not skinny.uses_kernel(torch.empty(2, 6, 10, device="meta"), 4)
    # a wider sketch (q = 4 + 5) goes to lowrank.compress_batch, the same numbers as calling it
    moment = _moment("unformed", 2, 20, 16, torch.float64)
    for got, want in zip(skinny.compress_batch(moment, 4, 5, 1, [1, 2]),
                         lowrank.compress_batch(moment, 4, 5, 1, [1, 2])):
        assert torch.equal(got, want)
    assert cpu_kernel_calls == []
    skinny.compress_batch(moment, 4, 4, 1, [1, 2])                  # q = 8: the kernel
    assert cpu_kernel_calls == ["range_finder"]


def test_the_fused_step_uses_the_kernel_and_a_build_failure_is_an_error(monkeypatch, cpu_kernel_calls):
    calls = cpu_kernel_calls
    w = torch.nn.Parameter(torch.randn(48, 40))
    w.grad = torch.randn(48, 40)
    opt = mlorc_dist.MLorcAdamW([w], rank=4, fused=True, batched=False)
    opt.step()
    assert calls == ["adamw_blocks", "range_finder", "range_finder"]   # the update, then each moment
    mlorc_dist.MLorcAdamW([w], rank=4, fused=False).step()             # the reference path: torch only
    assert len(calls) == 3

    monkeypatch.undo()
    monkeypatch.delenv("MLORC_GPU_RULES_ON_CPU", raising=False)     # undone with the rest: the CPU's rules again
    monkeypatch.setattr(cpu_kernels, "_EXTENSION", None)

    def no_compiler(*args, **kwargs):
        raise OSError("g++: not found")
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.raises(RuntimeError, match="could not build the fused step's C\\+\\+ kernels.*g\\+\\+: not found"):
        skinny.compress_batch(torch.randn(1, 8, 8), 2, 0, 1, [1])
    # the optimizer builds it at construction (CPU parameters): the error comes before any step
    with pytest.raises(RuntimeError, match="could not build the fused step's C\\+\\+ kernels"):
        mlorc_dist.MLorcAdamW([w], rank=4, fused=True)
    with pytest.raises(RuntimeError, match="could not build the fused step's C\\+\\+ kernels"):
        mlorc_dist.MLorcAdamW([w], rank=4)            # the default on the CPU: no quiet fallback
    mlorc_dist.MLorcAdamW([w], rank=4, fused=False)                     # the reference path needs none


def test_an_overflowing_second_moment_stops_the_fused_step_as_it_stops_the_reference():
    """A finite gradient of 1e30 squares to inf in V (fp32). The non-finite check counts it (its
    L2 norm overflows): the step is skipped. Let through (nonfinite="ignore"), both paths refuse
    to compress V, the fused one with the C++ range finder's error (not factors of V's other rows)."""
    for fused in (True, False):
        for nonfinite in ("skip", "ignore"):
            torch.manual_seed(0)
            w = torch.nn.Parameter(torch.randn(48, 40))
            opt = mlorc_dist.MLorcAdamW([w], rank=4, fused=fused, nonfinite=nonfinite)
            w.grad = torch.randn(48, 40)
            opt.step()
            w.grad = torch.randn(48, 40)
            w.grad[30, 5] = 1e30
            if nonfinite == "skip":
                before = w.detach().clone()
                with pytest.warns(UserWarning, match="non-finite gradient, step skipped"):
                    opt.step()
                assert torch.equal(w, before) and opt.skipped_steps == 1
                continue
            with pytest.raises(RuntimeError, match="not finite" if fused else ""):
                opt.step()
