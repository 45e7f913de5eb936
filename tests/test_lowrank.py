"""Randomized SVD and the small functions of low-rank momentum."""
import pytest
import torch

from mlorc_dist.lowrank import fix_negatives, randomized_svd, rebuild, sketch_seed


def low_rank_matrix(m, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,true_rank,rank", [((60, 40), 4, 4), ((40, 90), 3, 4), ((17, 200), 4, 6)])
def test_recovers_matrix_of_rank_at_most_r(dtype, tol, shape, true_rank, rank):
    a = low_rank_matrix(*shape, true_rank, dtype)
    u, s, vh = randomized_svd(a, rank, seed=3)
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
    err = (rebuild(u, s, vh) - a).norm() / a.norm()
    assert err < tol, err


def decaying_spectrum_matrix(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("oversample,niter,factor", [(0, 1, 1.6), (4, 1, 1.15), (4, 2, 1.05)])
def test_error_close_to_optimal_truncated_svd(oversample, niter, factor):
    a = decaying_spectrum_matrix(200, 150, 0.9)
    rank = 8
    u, s, vh = torch.linalg.svd(a)
    optimal = (a - (u[:, :rank] * s[:rank]) @ vh[:rank]).norm()
    errors = [(a - rebuild(*randomized_svd(a, rank, oversample, niter, seed=k))).norm() / optimal
              for k in range(5)]
    assert max(errors) < factor, errors
    assert min(errors) >= 1.0 - 1e-12   # never better than optimal (sanity of the measurement)


def test_random_gaussian_matrix_error_within_small_factor():
    a = torch.randn(128, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a)
    optimal = (a - (u[:, :4] * s[:4]) @ vh[:4]).norm()
    err = (a - rebuild(*randomized_svd(a, 4, 0, 1, seed=0))).norm()
    assert err <= 1.1 * optimal


def test_rank_above_smaller_side_is_exact_and_clamped():
    a = torch.randn(5, 30, dtype=torch.float64)
    u, s, vh = randomized_svd(a, 8, seed=0)
    assert s.shape == (5,)
    assert torch.allclose(rebuild(u, s, vh), a, atol=1e-12)


def test_seeded_sketch_is_reproducible_and_seed_matters():
    a = torch.randn(50, 40)
    first, again = randomized_svd(a, 4, seed=11), randomized_svd(a, 4, seed=11)
    other = randomized_svd(a, 4, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert sketch_seed(0, 1, "w", 0, 0) != sketch_seed(0, 2, "w", 0, 0)
    assert sketch_seed(0, 1, "w", 0, 0) != sketch_seed(0, 1, "w", 0, 1)


def test_bf16_input_computes_in_fp32():
    a = low_rank_matrix(30, 20, 2, torch.float32).bfloat16()
    u, s, vh = randomized_svd(a, 2, seed=0)
    assert u.dtype == torch.float32


def test_fix_negatives_uses_mean_abs_of_negative_entries():
    v = torch.tensor([[1.0, -2.0], [-4.0, 3.0]])
    fixed = fix_negatives(v)
    assert torch.equal(fixed, torch.tensor([[1.0, 3.0], [3.0, 3.0]]))
    positive = torch.tensor([0.5, 0.0, 2.0])
    assert torch.equal(fix_negatives(positive), positive)


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        randomized_svd(torch.randn(5), 2)


@pytest.mark.parametrize("niter", [0, 1])
@pytest.mark.parametrize("batch", [None, 3])
def test_svd_of_an_unformed_update_equals_the_svd_of_the_formed_matrix(niter, batch):
    """The fused step never writes b M~ + (1 - b) G: its range finder multiplies G and the old
    factors instead. Same sketch, same matrix: the same factors (float64, to rounding)."""
    from mlorc_dist.lowrank import MomentUpdate, compress, randomized_svd_of_update
    g = torch.Generator().manual_seed(3)
    lead = () if batch is None else (batch,)
    us = torch.randn(*lead, 40, 4, generator=g, dtype=torch.float64)
    vh = torch.randn(*lead, 4, 30, generator=g, dtype=torch.float64)
    dense = torch.randn(*lead, 40, 30, generator=g, dtype=torch.float64)
    seed = 7 if batch is None else [7, 8, 9]
    formed = 0.9 * (us @ vh) + 0.1 * dense
    want = randomized_svd(formed, 4, 2, niter, seed)
    got = randomized_svd_of_update(us, vh, dense, 0.9, 0.1, 4, 2, niter, seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(compress(MomentUpdate(us, vh, dense, 0.9, 0.1), 4, 2, niter, seed), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(compress(formed, 4, 2, niter, seed), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unformed_update_refuses_mismatched_shapes_and_compress_unknown_input():
    from mlorc_dist.lowrank import compress, randomized_svd_of_update
    us, vh = torch.randn(5, 2), torch.randn(2, 6)
    with pytest.raises(ValueError, match="do not make"):
        randomized_svd_of_update(us, vh, torch.randn(5, 7), 0.9, 0.1, 2)
    with pytest.raises(TypeError, match="tensor or a MomentUpdate"):
        compress([us, vh], 2)


# ---- the GPU rule's small linear algebra (lowrank.uses_gram_algebra), checked here on the CPU

@pytest.mark.parametrize("shape", [(4096, 4), (3, 512, 6), (37, 5)])
def test_cholesky_qr_is_an_orthonormal_basis_of_the_same_span(shape):
    from mlorc_dist.lowrank import cholesky_qr
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q = cholesky_qr(y)
    householder, _ = torch.linalg.qr(y)
    assert q.dtype == y.dtype and q.shape == y.shape
    torch.testing.assert_close(q.mT @ q, torch.eye(shape[-1]).expand_as(q.mT @ q), atol=1e-6, rtol=0)
    torch.testing.assert_close(q @ (q.mT @ householder), householder, atol=1e-6, rtol=0)   # same span


def test_cholesky_qr_of_zero_and_rank_deficient_input_is_finite():
    from mlorc_dist.lowrank import cholesky_qr
    assert torch.equal(cholesky_qr(torch.zeros(2, 100, 4)), torch.zeros(2, 100, 4))
    basis, _ = torch.linalg.qr(torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    y = (basis * torch.tensor([1.0, 1e-3, 1e-9, 0.0, 0.0], dtype=torch.float64)).float()
    q = cholesky_qr(y)
    assert torch.isfinite(q).all()
    # the directions above the shift come out orthonormal; those below it are damped, not NaN
    strong = q @ (q.mT @ y[:, :2])
    torch.testing.assert_close(strong, y[:, :2], atol=1e-6, rtol=0)
    assert q.norm(dim=0).max() <= 1 + 1e-5


@pytest.mark.parametrize("shape", [(4, 4096), (2, 6, 300), (5, 5)])
def test_gram_eigh_svd_equals_the_svd(shape):
    from mlorc_dist.lowrank import gram_eigh_svd
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    u, s, vh = gram_eigh_svd(b)
    _, s_ref, _ = torch.linalg.svd(b, full_matrices=False)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((u * s[..., None, :]) @ vh, b, rtol=0, atol=1e-5)
    eye = torch.eye(shape[-2]).expand(*shape[:-2], shape[-2], shape[-2])
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-5)
    assert (s[..., :-1] >= s[..., 1:]).all()                       # descending, like torch's


def test_gram_eigh_svd_of_zero_and_low_rank_input():
    from mlorc_dist.lowrank import gram_eigh_svd
    u, s, vh = gram_eigh_svd(torch.zeros(3, 4, 50))
    assert torch.equal(s, torch.zeros(3, 4)) and torch.equal(vh, torch.zeros(3, 4, 50)) and torch.isfinite(u).all()
    g = torch.Generator().manual_seed(3)
    b = torch.randn(4, 1, generator=g) @ torch.randn(1, 50, generator=g)
    u, s, vh = gram_eigh_svd(b)
    assert (s[1:] == 0).all() and (vh[1:] == 0).all()
    torch.testing.assert_close((u * s) @ vh, b, rtol=0, atol=1e-5)


def test_the_gram_rule_is_float32_batches_on_a_gpu_only(cpu_rules):
    from mlorc_dist.lowrank import uses_gram_algebra
    assert not uses_gram_algebra(torch.zeros(4, 4)) and not uses_gram_algebra(torch.zeros(2, 4, 4))   # CPU: LAPACK
    assert not uses_gram_algebra(torch.zeros(2, 4, 4, device="meta"))
    if torch.cuda.is_available():
        assert uses_gram_algebra(torch.zeros(2, 4, 4, device="cuda"))
        assert not uses_gram_algebra(torch.zeros(4, 4, device="cuda"))            # one block: cuSOLVER
        assert not uses_gram_algebra(torch.zeros(4, 4, device="cuda", dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("niter,batch", [(1, None), (0, 3), (1, 3)])
def test_randomized_svd_with_the_gram_algebra_equals_the_lapack_one(monkeypatch, niter, batch, dtype):
    """The product U diag(s) Vh does not depend on which orthonormal basis or small SVD made it.
    float64: equal up to the Cholesky QR's shift (~1e-11 relative here, the same on every CPU).
    float32: a rounding error e ~ eps s_1 moves a rank-4 truncation by up to ~e s_1 / (s_4 - s_5)
    (Wedin), and s_4 and s_5 are 4% apart in these matrices; measured at most 0.054 of the bound
    below, which is 10 times that estimate (a fixed 1e-5 max|a| is exceeded under MKL's AVX2
    code path: 1.07e-5)."""
    from mlorc_dist import lowrank
    g = torch.Generator().manual_seed(4)
    shape = (300, 200) if batch is None else (batch, 300, 200)
    a = torch.randn(*shape[:-1], 6, generator=g) @ torch.randn(*shape[:-2], 6, 200, generator=g)
    a = (a + 1e-3 * torch.randn(*shape, generator=g)).to(dtype)
    seed = 7 if batch is None else list(range(batch))
    product = lambda f: (f[0] * f[1][..., None, :]) @ f[2]             # noqa: E731
    lapack = product(lowrank.randomized_svd(a, 4, 2, niter, seed))
    monkeypatch.setattr(lowrank, "uses_gram_algebra", lambda t: t.dtype == dtype)
    gram = product(lowrank.randomized_svd(a, 4, 2, niter, seed))
    if dtype == torch.float64:
        bound = 1e-9 * a.abs().amax(dim=(-2, -1))
    else:
        s = torch.linalg.svdvals(a.double())
        bound = 10 * torch.finfo(dtype).eps * s[..., 0] ** 2 / (s[..., 3] - s[..., 4])
    assert torch.all((gram - lapack).abs().amax(dim=(-2, -1)) <= bound)


def test_test_matrices_of_a_batch_are_the_per_seed_draws(cpu_rules):
    from mlorc_dist.lowrank import gaussian_test_matrices, gaussian_test_matrix
    batch = gaussian_test_matrices(50, 3, [5, 6], torch.float32)
    assert torch.equal(batch[1], gaussian_test_matrix(50, 3, 6, torch.float32))
    if torch.cuda.is_available():       # drawn on the GPU: reproducible, seed-dependent
        one, again = (gaussian_test_matrices(50, 3, [5, 6], torch.float32, "cuda") for _ in range(2))
        assert one.device.type == "cuda" and torch.equal(one, again) and not torch.equal(one[0], one[1])


def test_noise_floor_of_a_batch_is_each_rows_floor():
    from mlorc_dist.lowrank import rebuild_noise_floor
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    batch = rebuild_noise_floor(s, torch.float32)
    assert batch.shape == (3,)
    assert all(torch.equal(batch[i], rebuild_noise_floor(s[i], torch.float32)) for i in range(3))
    assert rebuild_noise_floor(torch.zeros(0), torch.float32).shape == ()
