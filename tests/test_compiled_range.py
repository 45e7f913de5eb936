"""compiled_range: a batch's range finder under the GPU rules as one compiled call per moment.
Its pieces run eagerly too; eager, they compute lowrank's steps (in float64, to rounding);
compiled, they compute their eager selves."""
import random

import pytest
import torch

from mlorc_dist import compiled_range, lowrank


def _batch(b=5, m=30, n=20, r=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(b, m, n, generator=g, dtype=dtype)
    us = torch.randn(b, m, r, generator=g, dtype=dtype)
    vh = torch.randn(b, r, n, generator=g, dtype=dtype)
    return dense, us, vh


def test_hashed_normal_of_is_lowrank_hashed_normal_eagerly_and_compiled():
    """Eagerly the very numbers of lowrank.hashed_normal; compiled (where inductor once folded an
    arange times splitmix64's constant into index arithmetic that did not wrap: wrong values from
    the 2nd element on) the same up to the last bit of float64 log and cos, so the same float32."""
    seeds = [5, 6, 2 ** 62 + 7, 123456789]
    keys = torch.tensor(seeds)
    weyl = compiled_range.weyl_sequence(40 * 4, "cpu")
    eager = compiled_range.hashed_normal_of(keys, weyl, 40, 4)
    assert torch.equal(eager, lowrank.hashed_normal(seeds, 40, 4, torch.float64))
    got = compiled_range.compiled(compiled_range.hashed_normal_of)(keys, weyl, 40, 4)
    torch.testing.assert_close(got, eager, rtol=4e-16, atol=4e-16)
    assert torch.equal(got.float(), eager.float())


@pytest.mark.parametrize("q", [1, 2, 4, 5, 8])
def test_unrolled_cholesky_qr_is_cholesky_qr(q):
    """Entry by entry, the same factorisation as LAPACK's Cholesky and triangular solve: equal in
    float64 to rounding and orthonormal; a rank-deficient and a zero matrix stay finite (their
    damped directions are rounding noise, in either)."""
    g = torch.Generator().manual_seed(q)
    y = torch.randn(6, 40, q, generator=g, dtype=torch.float64)
    y[1, :, -1] = y[1, :, 0]                   # rank-deficient
    y[2] = 0                                   # zero
    got, want = compiled_range.cholesky_qr_unrolled(y), lowrank.cholesky_qr(y)
    assert torch.isfinite(got).all()
    full = [0, 3, 4, 5] if q > 1 else [0, 1, 3, 4, 5]
    torch.testing.assert_close(got[full], want[full], rtol=0, atol=1e-12)
    gram = got[full].mT @ got[full]
    # orthonormal to the shift's size (~11 (m q + q (q + 1)) eps per pass), as LAPACK's is
    torch.testing.assert_close(gram, torch.eye(q, dtype=y.dtype).expand_as(gram), rtol=0, atol=1e-10)


@pytest.mark.parametrize("unformed", [False, True])
@pytest.mark.parametrize("niter", [0, 1, 2])
def test_sketched_range_is_range_and_small(monkeypatch, unformed, niter):
    """A tensor or a MomentUpdate's parts: the range of lowrank.range_and_small with the same
    (hashed) test matrices, in float64 to rounding. (In float64 range_and_small orthonormalises
    by Householder QR, whose columns may differ in sign: the projections are compared.)"""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    dense, us, vh = _batch()
    seeds = [11, 12, 13, 14, 15]
    moment = lowrank.MomentUpdate(us, vh, dense, 0.9, 0.1) if unformed else dense
    want = lowrank.range_and_small(*lowrank._products(moment), 3, 1, niter, seeds)
    parts = (us, vh, torch.tensor(0.9, dtype=dense.dtype), torch.tensor(0.1, dtype=dense.dtype)) if unformed \
        else (None, None, None, None)
    weyl = compiled_range.weyl_sequence(20 * 4, "cpu")
    basis, small = compiled_range.sketched_range(dense, *parts, torch.tensor(seeds), None, weyl, 4,
                                                 niter)
    torch.testing.assert_close(basis @ basis.mT, want[0] @ want[0].mT, rtol=0, atol=1e-10)
    torch.testing.assert_close(basis @ small, want[0] @ want[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(4, dtype=basis.dtype).expand(5, 4, 4), rtol=0, atol=1e-10)


def test_a_compiled_range_and_its_factors_are_their_eager_selves_in_float32(monkeypatch):
    """The GPU rules' calls (lowrank.compress_range, then finish_compress with its compiled
    factors_from_eigh) give the factors of the eager steps (lowrank.compress_batch's operators,
    the closures over the moment) to float32 rounding."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    dense, us, vh = _batch(b=6, m=24, n=36, r=4, dtype=torch.float32, seed=1)
    seeds = list(range(100, 106))
    for moment in (dense, lowrank.MomentUpdate(us, vh, dense, 0.8, 0.2)):
        assert lowrank.defers_small_svd(moment, 6)
        pending = [(*lowrank.compress_range(moment, 4, 0, 1, seeds), 4)]
        got = lowrank.finish_compress(pending)[0]
        basis, small = lowrank.range_and_small(*lowrank._products(moment), 4, 0, 1, seeds)
        want = lowrank.factors_from_range(basis, small, 4, lowrank.gram_eigh_svd(small))
        rebuilt = [(u * s[:, None, :]) @ v for u, s, v in (got, want)]
        torch.testing.assert_close(rebuilt[0], rebuilt[1], rtol=2e-5, atol=2e-5 * rebuilt[1].abs().max().item())
        torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=0)


def test_factors_from_eigh_is_factors_from_range():
    """The compiled finish of a batch computes factors_from_range of _svd_from_eigh (float64)."""
    dense, _, _ = _batch(b=4, m=30, n=25)
    basis, small = lowrank.range_and_small(*lowrank._products(dense), 4, 0, 1, [1, 2, 3, 4])
    b64, values, vectors = lowrank.gram_eighs([small])[0]
    want = lowrank.factors_from_range(basis, small, 3, lowrank._svd_from_eigh(small, b64, values, vectors))
    for compile_it in (False, True):
        fn = compiled_range.compiled(lowrank.factors_from_eigh) if compile_it else lowrank.factors_from_eigh
        for a, b in zip(fn(basis, small, b64, values, vectors, 3), want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sketch_seeds_as_tensors_are_sketch_seed():
    """A batch's seeds from its bodies' kept body_seeds and the step counts (lowrank.SketchSeeds,
    compiled_range.step_seeds: int64 operators) are sketch_seed's Python ints, bit for bit, with
    the batch's steps equal (a 0-d count) or not, and with checksums at and above 2^63."""
    sketches = [(3, "layers.0.q", 0), (3, "layers.0.q", 512), (3, "lm_head", 0), (3, "x", 7)]
    for state_id in (0, 1):
        for steps in ([3, 3, 3, 3], [3, 4, 1, 10 ** 9]):
            want = [lowrank.sketch_seed(9, t, k, r, state_id) for t, (_, k, r) in zip(steps, sketches)]
            bases = torch.tensor([compiled_range.to_int64(lowrank.body_seed(9, k, r, state_id))
                                  for _, k, r in sketches])
            counts = lowrank.per_body(steps, torch.int64, "cpu")
            assert counts.dim() == (0 if len(set(steps)) == 1 else 1)
            assert lowrank.SketchSeeds(bases, counts).tolist() == want
    g = random.Random(0)
    for _ in range(500):
        base, step = g.getrandbits(64) | (g.getrandbits(1) << 63), g.randrange(10 ** 8)
        got = compiled_range.step_seeds(torch.tensor([compiled_range.to_int64(base)]), torch.tensor(step))
        assert got.item() == compiled_range.step_seed(base, step)
        assert 0 <= got.item() < 2 ** 63


def test_a_range_from_kept_seed_bases_is_the_range_from_seeds(monkeypatch):
    """compress_range with SketchSeeds (the step's seeds computed inside the compiled call) gives
    the numbers it gives with the same seeds as ints, bit for bit."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    dense, us, vh = _batch(b=5, m=20, n=24, r=3, dtype=torch.float32, seed=2)
    sketches = [(7, f"w{i}", 0) for i in range(5)]
    bases = torch.tensor([compiled_range.to_int64(lowrank.body_seed(1, k, r, 0)) for _, k, r in sketches])
    for moment in (dense, lowrank.MomentUpdate(us, vh, dense, 0.8, 0.2)):
        got = lowrank.compress_range(moment, 4, 0, 1, lowrank.SketchSeeds(bases, lowrank.per_body([7] * 5, torch.int64, "cpu")))
        want = lowrank.compress_range(moment, 4, 0, 1, [lowrank.sketch_seed(1, *sketch, 0) for sketch in sketches])
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="a batch of 5 matrices needs as many seeds"):
        lowrank.compress_range(dense, 4, 0, 1, lowrank.SketchSeeds(bases[:4], lowrank.per_body([7], torch.int64, "cpu")))


def test_a_failed_compile_says_what_failed(monkeypatch):
    """torch.compile failing (here a stand-in for a missing C++ compiler: a real failed trace
    changes what torch.profiler's memory timeline counts later in the process) is a RuntimeError
    naming the function."""
    def no_compiler(*args):
        raise OSError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", lambda fn, **options: no_compiler)

    def step(x):
        return x + 1
    with pytest.raises(RuntimeError, match="torch.compile could not build step \\(OSError: no C\\+\\+ compiler\\)"):
        compiled_range.compiled(step)(torch.ones(3))
    compiled_range._COMPILED.pop(step)
