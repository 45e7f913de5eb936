"""bf16 weights written with stochastic rounding (optim/rounding.py): unbiased, reproducible from
(seed, step, parameter, element), the same bits in every code path (reference, the CPU C++
kernels, the block functions the GPU compiles), and what keeps small updates from being lost."""
from __future__ import annotations

import pytest
import torch

from mlorc_dist import MLorcAdamW, MLorcLion
from mlorc_dist.optim import fused
from mlorc_dist.optim.rounding import Rounding, random_bits, rounding_seed, stochastic_round

BF16_EPS = 2.0 ** -7          # spacing of bf16 values in [1, 2)


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    n = 1 << 18
    for frac in (1 / 8, 1 / 2, 0.9):
        x = torch.full((n,), 1.0 + frac * BF16_EPS)
        for sign in (1, -1):
            y = stochastic_round(sign * x, random_bits(Rounding(7, 0), n, "cpu")).float()
            assert set(y.abs().unique().tolist()) == {1.0, 1.0 + BF16_EPS}
            up = (y.abs() > 1).double().mean().item()
            assert abs(up - frac) < 5 * (frac * (1 - frac) / n) ** 0.5, (frac, sign, up)
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(stochastic_round(exact, random_bits(Rounding(3, 5), 1000, "cpu")).float(), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    out = stochastic_round(special, torch.full((4,), 65535, dtype=torch.int32)).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan() and out[3] == 0


def test_bits_depend_on_seed_and_element_index_only():
    seed = rounding_seed(0, 3, "model.layers.0.mlp.up_proj.weight")
    whole = random_bits(Rounding(seed, 0), 1000, "cpu")
    assert torch.equal(whole[400:], random_bits(Rounding(seed, 400), 600, "cpu"))     # any split
    assert not torch.equal(whole, random_bits(Rounding(seed + 1, 0), 1000, "cpu"))
    assert rounding_seed(0, 3, "a") != rounding_seed(0, 4, "a") != rounding_seed(1, 3, "a")
    counts = torch.bincount(whole.long() >> 12, minlength=16).double()          # 16 roughly equal bins
    assert counts.min() > 30 and counts.max() < 100


def _train(cls, fused_step: bool, steps: int, stochastic: bool = True, state=None, start_params=None):
    torch.manual_seed(0)
    shapes = [(64, 48), (64, 48), (96, 40), (48,)]
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    if start_params is not None:
        for p, q in zip(params, start_params):
            p.data.copy_(q)
    opt = cls(params, lr=1e-3, rank=2, weight_decay=0.1, fused=fused_step, stochastic_rounding=stochastic)
    if state is not None:
        opt.load_state_dict(state)
    done = state["state"][0]["step"] if state is not None else 0
    for t in range(done, done + steps):
        g = torch.Generator().manual_seed(100 + t)       # gradients that do not depend on the weights
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
    return params, opt


def _agree_within_one_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal, but for the rare element whose float32 value landed within rounding noise of its
    random threshold: one bf16 step apart, on a tiny fraction of elements."""
    diff = (a.float() - b.float()).abs()
    assert (diff <= BF16_EPS * a.float().abs().clamp_min(1e-30) * 1.01).all()
    assert (diff > 0).double().mean() < 1e-3


@pytest.mark.parametrize("cls", [MLorcAdamW, MLorcLion])
def test_the_cpu_kernel_rounds_as_the_reference(cls):
    reference, _ = _train(cls, fused_step=False, steps=5)
    kernel, _ = _train(cls, fused_step=True, steps=5)
    for a, b in zip(reference, kernel):
        _agree_within_one_rounding(a, b)


@pytest.mark.parametrize("lion", [False, True])
def test_the_compiled_block_functions_round_as_the_cpu_kernel(lion):
    """fused.adamw_block_ / lion_block_ (what a GPU compiles; run eagerly here) with a round_key
    write what blocks.cpp writes for the same body."""
    torch.manual_seed(1)
    k, n, r = 24, 40, 3
    w = torch.randn(k, n).bfloat16()
    g = torch.randn(1, k, n)
    m_us, m_vh = torch.randn(1, k, r) * 0.1, torch.randn(1, r, n) * 0.1
    v_us, v_vh = torch.rand(1, k, r) * 0.1, torch.rand(1, r, n) * 0.1
    rounding = Rounding(rounding_seed(5, 2, "w"), 3 * n)
    kernel_w, block_w = w.clone(), w.clone()
    if lion:
        fused.lion_blocks_([kernel_w], g, m_us, m_vh, 0.9, 1e-2, 0.999, [rounding])
        fused.lion_block_(block_w, g[0], m_us[0], m_vh[0], *fused.scalars(0.9, 1e-2, 0.999, like=g),
                          torch.tensor([*rounding.halves, rounding.start]))
    else:
        floors, v_out = torch.full((1,), 1e-6), torch.empty(1, k, n)
        fused.adamw_blocks_([kernel_w], g, m_us, m_vh, v_us, v_vh, floors, 0.9, 0.999, [1e-2], 1e-8, 0.999,
                            v_out, [rounding])
        fused.adamw_block_(block_w, g[0], m_us[0], m_vh[0], v_us[0], v_vh[0],
                           *fused.scalars(1e-6, 0.9, 0.999, 1e-2, 1e-8, 0.999, like=g), torch.empty(k, n),
                           torch.tensor([*rounding.halves, rounding.start]))
    assert not torch.equal(kernel_w, w)
    _agree_within_one_rounding(kernel_w, block_w)


@pytest.mark.parametrize("fused_step", [False, True])
def test_a_resumed_run_rounds_as_the_uninterrupted_one(fused_step):
    whole, _ = _train(MLorcAdamW, fused_step, steps=6)
    half, opt = _train(MLorcAdamW, fused_step, steps=3)
    state = opt.state_dict()
    resumed, _ = _train(MLorcAdamW, fused_step, steps=3, state=state, start_params=[p.detach() for p in half])
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)


def test_round_to_nearest_loses_small_updates_and_stochastic_rounding_keeps_them():
    """1000 weights at 1.0, a constant gradient, Adam's step ~ lr = 1e-4 per step (1/78 of bf16's
    spacing at 1): rounded to nearest nothing moves; stochastically the mean follows the fp32 path."""
    means = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
        opt = MLorcAdamW([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=stochastic)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        means[stochastic] = p.float().mean().item()
    assert means[False] == 1.0
    assert abs(means[True] - (1.0 - 200 * 1e-4)) < 2e-3


def test_float32_weights_are_untouched_by_the_option_and_float16_is_refused():
    a, _ = _train_fp32(True)
    b, _ = _train_fp32(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    p = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.float16))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="stochastic_rounding=False"):
        MLorcAdamW([p]).step()
    with pytest.raises(ValueError, match="stochastic_rounding must be True or False"):
        MLorcAdamW([p], stochastic_rounding="yes")


def _train_fp32(stochastic):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 24)), torch.nn.Parameter(torch.randn(24))]
    opt = MLorcAdamW(params, lr=1e-2, rank=2, stochastic_rounding=stochastic)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt
