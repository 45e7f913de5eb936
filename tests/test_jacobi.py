"""lowrank.jacobi_eigh, the GPU rules' sync-free eigensolver for the Gram algebra's small SVDs,
against torch.linalg.eigh in float64 (random symmetric, rank-deficient PSD, repeated and
clustered eigenvalues, zero and diagonal matrices, odd sizes), and what uses it."""
import pytest
import torch

import mlorc_dist
from mlorc_dist import lowrank


def _batches(q: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    x = randn(64, q, q)
    w, _ = torch.linalg.qr(randn(64, q, q))
    repeated = torch.ones(64, q, dtype=torch.float64)
    repeated[:, : q // 2] = 3.0                                # two eigenvalues, each ~q/2 times
    clustered = 1 + 1e-9 * torch.rand(64, q, generator=g, dtype=torch.float64)
    clustered[:, 0] = 1e-3
    deficient = randn(64, q, max(1, q // 2))
    return {"random": x + x.mT,
            "psd rank q/2": deficient @ deficient.mT,
            "psd rank 1": (lambda y: y @ y.mT)(randn(64, q, 1)),
            "repeated": (w * repeated[:, None, :]) @ w.mT,
            "clustered": (w * clustered[:, None, :]) @ w.mT,
            "zero": torch.zeros(4, q, q, dtype=torch.float64),
            "diagonal": torch.diag_embed(randn(4, q))}


def _symmetric(g):
    return (g + g.mT) / 2


@pytest.mark.parametrize("q", [1, 2, 3, 4, 5, 7, 8, 13, 16])
def test_jacobi_eigh_matches_torch_eigh_in_float64(q):
    for kind, g in _batches(q).items():
        g = _symmetric(g)
        want, want_vectors = torch.linalg.eigh(g)
        values, vectors = lowrank.jacobi_eigh(g)
        scale = g.abs().amax(dim=(-2, -1)).clamp_min(1e-300)[..., None]
        assert values.shape == want.shape and vectors.shape == want_vectors.shape, kind
        assert ((values - want).abs() / scale).max() < 1e-13, kind                  # ascending, as eigh
        eye = torch.eye(q, dtype=torch.float64)
        assert (vectors.mT @ vectors - eye).abs().max() < 1e-13, kind                # orthonormal
        rebuilt = (vectors * values[..., None, :]) @ vectors.mT
        assert ((rebuilt - g).abs().amax(dim=(-2, -1)) / scale[..., 0]).max() < 1e-12, kind
        if kind == "random" and q > 1:
            # distinct eigenvalues: each eigenvector is eigh's up to its sign
            overlap = (vectors * want_vectors).sum(-2).abs()
            gaps = want.diff(dim=-1).abs()
            gap = torch.minimum(torch.cat([gaps, gaps[..., -1:]], -1), torch.cat([gaps[..., :1], gaps], -1))
            wide = gap > 1e-3 * scale
            assert ((1 - overlap)[wide]).abs().max() < 1e-10
        if kind == "repeated" and q > 1:
            # a repeated eigenvalue's eigenvectors span eigh's eigenspace: equal projectors
            low = want < 2
            for b in range(4):
                p_got = vectors[b][:, low[b]] @ vectors[b][:, low[b]].mT
                p_want = want_vectors[b][:, low[b]] @ want_vectors[b][:, low[b]].mT
                assert (p_got - p_want).abs().max() < 1e-10


def test_jacobi_sweeps_leave_room_to_spare():
    """A sweep fewer than jacobi_sweeps(q) already reaches 1e-12 on the slowest kinds measured
    (rank-deficient PSD batches, repeated eigenvalues)."""
    for q in (4, 8, 16):
        for kind in ("psd rank q/2", "repeated"):
            g = _symmetric(_batches(q, seed=1)[kind])
            values, vectors = lowrank.jacobi_eigh(g, sweeps=lowrank.jacobi_sweeps(q) - 1)
            rebuilt = (vectors * values[..., None, :]) @ vectors.mT
            assert ((rebuilt - g).norm(dim=(-2, -1)) / g.norm(dim=(-2, -1))).max() < 1e-12, (q, kind)


@pytest.mark.parametrize("q", [3, 4, 6])
def test_the_compiled_sweep_computes_the_eager_sweep(q):
    """Both sweeps (jacobi_sweep_unrolled for q <= UNROLLED_JACOBI_WIDTH, jacobi_sweep above).
    Distinct eigenvalues for q = 6: a repeated one's eigenvectors are any basis of its space, and
    the compiled sweep rounds differently."""
    g = _batches(q)["psd rank q/2" if q <= lowrank.UNROLLED_JACOBI_WIDTH else "random"]
    eager = lowrank.jacobi_eigh(g)
    compiled = lowrank.jacobi_eigh(g, compiled=True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # another batch size: the same graph (dynamic batch dimension)
    small = lowrank.jacobi_eigh(g[:5], compiled=True)
    torch.testing.assert_close(small[0], eager[0][:5], rtol=0, atol=1e-13)


def test_the_unrolled_sweep_is_the_rotations_of_jacobi_sweep():
    """One sweep of jacobi_sweep_unrolled turns the same pairs by the same angles as jacobi_sweep
    (the same rounds, stored another way): after one sweep the diagonals agree to rounding."""
    g = _symmetric(_batches(4, seed=2)["random"])
    for q in (3, 4):
        unrolled = lowrank.jacobi_eigh(g[..., :q, :q], sweeps=1)
        n = q + q % 2                                   # jacobi_sweep's padded circle layout
        first, _ = lowrank._circle_layouts(n)
        a = torch.nn.functional.pad(g[..., :q, :q], (0, n - q, 0, n - q))[..., first, :][..., :, first]
        v = torch.eye(n, dtype=g.dtype)[:, first].expand(a.shape).contiguous()
        a, v = lowrank.jacobi_sweep(a, v)
        kept = [j for j in range(n) if first[j] < q]
        values, order = a.diagonal(dim1=-2, dim2=-1)[..., kept].sort(dim=-1)
        torch.testing.assert_close(unrolled[0], values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4, 30), (4, 40)])
def test_gram_svd_with_jacobi_is_an_svd_of_float32_blocks(monkeypatch, shape):
    """gram_eigh_svd through jacobi_eigh (q = 4 <= JACOBI_MAX_WIDTH): singular values as
    torch.linalg.svd's, orthonormal U, and U diag(s) Vh = b, for a batch and for a lone block
    (small_svd of a 2-D float32 block takes it under the GPU rules: uses_jacobi)."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert lowrank.uses_gram_algebra(b) or lowrank.uses_jacobi(b)
    u, s, vh = lowrank.small_svd(b)
    torch.testing.assert_close(s, torch.linalg.svdvals(b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.mT @ u, torch.eye(4).expand(u.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close((u * s[..., None, :]) @ vh, b, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("MLORC_GPU_RULES_ON_CPU")
    assert not lowrank.uses_jacobi(b)                      # the CPU's own rules: LAPACK's SVD


def test_a_width_above_the_jacobi_limit_takes_eigh(monkeypatch):
    q = lowrank.JACOBI_MAX_WIDTH + 1
    b = torch.randn(3, q, 2 * q, generator=torch.Generator().manual_seed(4))
    called = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda g: called.append(g.shape) or real(g))
    u, s, vh = lowrank.gram_eigh_svd(b)
    assert called == [(3, q, q)]
    torch.testing.assert_close((u * s[..., None, :]) @ vh, b, rtol=1e-5, atol=1e-5)


def test_packed_factors_keep_the_state_dict_and_resume_exactly(monkeypatch):
    """step() packs a batch's factors (each body's u, s, vh are rows of one tensor per part):
    the state_dict has the same keys, shapes and dtypes as unpacked state, and a run resumed
    from it (fresh optimizer, loaded state, packed again) equals the uninterrupted run."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")

    def run(steps, resume_at=None):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(12, 20, generator=g).requires_grad_() for _ in range(5)]
        make = lambda: mlorc_dist.MLorcAdamW(params, lr=1e-2, rank=4)
        opt = make()
        for step in range(steps):
            if step == resume_at:
                saved = opt.state_dict()
                opt = make()
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, opt
    params, opt = run(4)
    entries = [opt.state[p]["pieces"][0] for p in params]
    u = [e["exp_avg_u"] for e in entries]
    assert all(t.shape == (12, 4) for t in u) and u[1].data_ptr() == u[0].data_ptr() + 12 * 4 * 4
    fresh = opt.new_state(params[0], opt.param_groups[0], 0)         # what an unpacked state holds
    assert {k: (v.shape, v.dtype) for k, v in entries[0].items() if isinstance(v, torch.Tensor)} == \
        {k: (v.shape, v.dtype) for k, v in fresh["pieces"][0].items() if isinstance(v, torch.Tensor)}
    saved = opt.state_dict()["state"]
    assert all(saved[i]["pieces"][0]["exp_avg_vh"] is entries[i]["exp_avg_vh"] for i in range(5))
    resumed, _ = run(4, resume_at=2)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
