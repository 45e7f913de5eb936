"""The fused step's C++ skinny products (mlorc_dist/optim/skinny.cpp) against torch.matmul."""
import pytest
import torch

import mlorc_dist
from mlorc_dist import lowrank
from mlorc_dist.optim import cpu_kernels, skinny

SHAPES = [(1, 1, 1), (3, 17, 2), (5, 33, 4), (37, 100, 8), (64, 1024, 4), (130, 7, 5), (9, 64, 3)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("m,n,q", SHAPES)
def test_kernel_products_equal_matmul(m, n, q, dtype, tol):
    g = torch.Generator().manual_seed(m * 1000 + n + q)
    a = torch.randn(m, n, generator=g, dtype=dtype)
    x_right = torch.randn(n, q, generator=g, dtype=dtype)       # a @ x
    x_left = torch.randn(m, q, generator=g, dtype=dtype)        # x^T @ a
    ext = cpu_kernels.extension()                  # every width it takes (q <= 8), used or not
    assert skinny.uses_kernel(a, q) == (q <= skinny.MAX_WIDTH)
    for got, want in ((ext.rows(a, x_right.mT.contiguous()), a @ x_right),
                      (ext.cols(x_left, a), x_left.mT @ a),
                      (skinny.times_skinny(a, x_right), a @ x_right),
                      (skinny.skinny_t_times(x_left, a), x_left.mT @ a)):
        assert got.shape == want.shape and got.dtype == dtype
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_kernel_products_of_a_batch_equal_bmm(dtype, tol):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 37, 50, generator=g, dtype=dtype)
    x_right, x_left = torch.randn(3, 50, 4, generator=g, dtype=dtype), torch.randn(3, 37, 4, generator=g, dtype=dtype)
    for got, want in ((skinny.times_skinny(a, x_right), a @ x_right),
                      (skinny.skinny_t_times(x_left, a), x_left.mT @ a)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    with pytest.raises(RuntimeError, match="like the other operand"):
        cpu_kernels.extension().rows(a, x_right[0].mT.contiguous())


def test_kernel_takes_views_and_transposed_sketches():
    """The range finder hands it Q factors (column-major) and views of a flat gradient."""
    flat = torch.randn(3 + 40 * 24)
    a = flat[3:].view(40, 24)
    basis, _ = torch.linalg.qr(torch.randn(40, 4))
    omega = torch.randn(4, 24).mT
    torch.testing.assert_close(skinny.skinny_t_times(basis, a), basis.mT @ a)
    torch.testing.assert_close(skinny.times_skinny(a, omega), a @ omega)


def test_the_rule_for_what_runs_in_the_kernel():
    a = torch.randn(6, 10)
    assert not skinny.uses_kernel(a, skinny.MAX_WIDTH + 1)          # wider sketches: matmul
    assert not skinny.uses_kernel(a.to(torch.bfloat16), 4)          # not a compute dtype
    assert skinny.uses_kernel(torch.randn(2, 6, 10), 4)             # a batch of bodies too
    assert not skinny.uses_kernel(torch.randn(2, 2, 6, 10), 4)
    assert not skinny.uses_kernel(torch.empty(6, 10, device="meta"), 4)
    x = torch.randn(10, 9)
    torch.testing.assert_close(skinny.times_skinny(a, x), lowrank.times_skinny(a, x))
    with pytest.raises(RuntimeError, match="q must be 1..8"):        # the kernel itself refuses
        cpu_kernels.extension().rows(a, x.mT.contiguous())
    with pytest.raises(RuntimeError, match="float32/float64 CPU tensor"):
        cpu_kernels.extension().cols(torch.randn(6, 2).to(torch.bfloat16), a.to(torch.bfloat16))


def test_the_fused_step_uses_the_kernel_and_a_build_failure_is_an_error(monkeypatch, cpu_kernel_calls):
    calls = cpu_kernel_calls
    w = torch.nn.Parameter(torch.randn(48, 40))
    w.grad = torch.randn(48, 40)
    opt = mlorc_dist.MLorcAdamW([w], rank=4, fused=True, batched=False)
    opt.step()
    assert calls.count("rows") == 4 and calls.count("cols") == 4      # niter=1: 2 + 2 per moment
    assert calls.count("adamw_blocks") == 1                            # and the block update
    assert mlorc_dist.MLorcAdamW([w], rank=4)._skinny_kernels is None  # the reference path: matmul

    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "_EXTENSION", None)

    def no_compiler(*args, **kwargs):
        raise OSError("g++: not found")
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.raises(RuntimeError, match="could not build the fused step's C\\+\\+ kernels.*g\\+\\+: not found"):
        skinny.times_skinny(torch.randn(8, 8), torch.randn(8, 2))
    # the optimizer builds it at construction (CPU parameters): the error comes before any step
    with pytest.raises(RuntimeError, match="could not build the fused step's C\\+\\+ kernels"):
        mlorc_dist.MLorcAdamW([w], rank=4, fused=True)
    mlorc_dist.MLorcAdamW([w], rank=4)                                  # the reference path needs none
