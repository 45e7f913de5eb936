"""The fused step (fused=True, optim/fused.py) against the reference path.

The fused block functions are plain torch, so they are checked three times: run eagerly against
the reference functions (exact math, float64); the CPU's C++ block kernels (blocks.cpp, what a
fused step runs on the CPU) against them; and inside the optimizers against fused=False (the
same training: float64 to 1e-10 over 8 steps, float32 over two steps). On a GPU the block
functions are compiled by torch.compile (Triton): the CUDA cases skip without one, and the
compiled wrapper is checked on the CPU (inductor).
The full-rank oracle through the fused step (it IS AdamW) is tests/test_optim.py's
test_full_rank_oracle_on_tiny_llama[fused]; under real engines, tests/test_distributed.py.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mlorc_dist
from mlorc_dist import MLorcAdamW, MLorcLion
from mlorc_dist.lowrank import fill_negatives_, negative_fill_value, negative_stats, rebuild
from mlorc_dist.optim import cpu_kernels, fused
from mlorc_dist.optim.functional import (adam_apply, adam_moments_, decoupled_weight_decay,
                                         lion_direction, lion_moment_, apply_direction)


def _factors(k, n, r, generator, positive=False):
    us = torch.randn(k, r, generator=generator, dtype=torch.float64)
    vh = torch.randn(r, n, generator=generator, dtype=torch.float64)
    return (us.abs(), vh.abs() - 0.3) if positive else (us, vh)     # some negative entries


def test_eager_adamw_block_is_the_reference_math():
    g = torch.Generator().manual_seed(0)
    k, n, r = 37, 29, 5
    (m_us, m_vh), (v_us, v_vh) = _factors(k, n, r, g), _factors(k, n, r, g, positive=True)
    w, grad = torch.randn(k, n, generator=g, dtype=torch.float64), torch.randn(k, n, generator=g, dtype=torch.float64)
    floor = torch.tensor(1e-3, dtype=torch.float64)
    ones = torch.ones(r, dtype=torch.float64)
    m_prev, v_prev = rebuild(m_us, ones, m_vh), rebuild(v_us, ones, v_vh)
    abs_sum, count = negative_stats(v_prev, floor)
    assert count > 10                                                # the fix really acts
    got_sum, got_count = fused.factored_negative_stats(v_us, v_vh, floor)
    torch.testing.assert_close(got_sum, abs_sum, rtol=1e-12, atol=1e-12)
    assert got_count == count
    fill = negative_fill_value(abs_sum, count)
    reference_w = w.clone()
    fill_negatives_(v_prev, fill, floor)
    m, v = adam_moments_(grad, m_prev, v_prev, 0.9, 0.99)
    adam_apply(reference_w, m, v, step_size=0.01, eps=1e-8)
    decoupled_weight_decay(reference_w, 0.02, 0.5)
    hyper = fused.scalars(floor, 0.9, 0.99, 0.01, 1e-8, 1 - 0.02 * 0.5, like=w)
    v_out = torch.empty_like(w)
    assert fused.adamw_block_(w, grad, m_us, m_vh, v_us, v_vh, *hyper, v_out) is None
    for got, want in ((v_out, v), (w, reference_w)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # M is never written: the range finder sees it as b1 M~ + (1 - b1) G
    torch.testing.assert_close(0.9 * (m_us @ m_vh) + 0.1 * grad, m, rtol=1e-12, atol=1e-12)


def test_eager_lion_block_is_the_reference_math():
    g = torch.Generator().manual_seed(1)
    k, n, r = 23, 31, 3
    m_us, m_vh = _factors(k, n, r, g)
    w, grad = torch.randn(k, n, generator=g, dtype=torch.float64), torch.randn(k, n, generator=g, dtype=torch.float64)
    m_prev = rebuild(m_us, torch.ones(r, dtype=torch.float64), m_vh)
    reference_w = w.clone()
    apply_direction(reference_w, lion_direction(grad, m_prev, 0.95), 0.01)
    decoupled_weight_decay(reference_w, 0.01, 0.1)
    m = lion_moment_(grad, m_prev, 0.98)
    assert fused.lion_block_(w, grad, m_us, m_vh, *fused.scalars(0.95, 0.01, 1 - 0.01 * 0.1, like=w)) is None
    torch.testing.assert_close(w, reference_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(0.98 * (m_us @ m_vh) + 0.02 * grad, m, rtol=1e-12, atol=1e-12)


def _tiny_llama(dtype=torch.float32, layers=2, device="cpu"):
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def _train_pair(cls, kwargs, dtype=torch.float32, steps=8, layers=2, device="cpu"):
    fast, plain = _tiny_llama(dtype, layers, device), _tiny_llama(dtype, layers, device)
    plain.load_state_dict(fast.state_dict())
    fast_opt = cls(mlorc_dist.param_groups(fast), fused=True, **kwargs)
    plain_opt = cls(mlorc_dist.param_groups(plain), fused=False, **kwargs)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 97, (4, 16), generator=g).to(device)
        for model, opt in ((fast, fast_opt), (plain, plain_opt)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    return fast, plain, fast_opt


# The fused step computes what the reference path computes, in another order: float64 runs agree
# to float64 rounding over 8 steps (measured <= 2e-15 for every case below, bf16 factors
# included: a float64 difference almost never flips a bf16 rounding). float32 runs two steps
# (the second is the first to rebuild the moments from their factors): over more steps float32
# rounding is amplified where the rank-r truncation or a threshold of the negative-entry fix is
# sensitive to it (measured 6.8e-6 after 8 steps and 3.8e-5 after 10 where two steps give
# 1.2e-6), by an amount that depends on the CPU's BLAS/LAPACK code path.
FUSED_CASES = [
    (MLorcAdamW, dict(lr=1e-2, rank=4, weight_decay=0.1)),
    (MLorcLion, dict(lr=1e-3, rank=4, weight_decay=0.1)),
    (MLorcAdamW, dict(lr=1e-2, rank=3, weight_decay=0.0, factor_dtype="bf16")),
]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cls,kwargs", FUSED_CASES)
def test_fused_step_equals_the_reference_path(cls, kwargs, batched, rel_diff):
    fast, plain, opt = _train_pair(cls, dict(kwargs, batched=batched), dtype=torch.float64)
    assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= 1e-10
    start = _tiny_llama(torch.float64)
    assert rel_diff(list(fast.parameters()), list(start.parameters())) > 1e-3         # it trained
    assert "exp_avg_u" in opt.state[fast.model.layers[0].self_attn.q_proj.weight]["pieces"][0]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cls,kwargs", FUSED_CASES)
def test_fused_float32_steps_equal_the_reference_path(cls, kwargs, batched, rel_diff):
    """The float32 kernels inside the optimizers: two steps (measured 1.2e-6; Lion 0)."""
    fast, plain, opt = _train_pair(cls, dict(kwargs, batched=batched), steps=2)
    # bf16 factors: a float32 rounding difference flips the bf16 rounding of a factor entry now
    # and then (one bf16 ulp), so the paths part by ~4e-5 at the second step instead of ~1e-6
    tol = 1e-3 if kwargs.get("factor_dtype") == "bf16" else 1e-5
    assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= tol
    assert rel_diff(list(fast.parameters()), list(_tiny_llama().parameters())) > 1e-3   # it trained


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the "
                                "lent GPU machine runs these; CI has none)")


@needs_cuda
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype,steps,tol", [(torch.float64, 8, 1e-10), (torch.float32, 2, 1e-5),
                                             (torch.bfloat16, 2, 1e-2)])
@pytest.mark.parametrize("cls,kwargs", [
    (MLorcAdamW, dict(lr=1e-2, rank=4, weight_decay=0.1)),
    (MLorcLion, dict(lr=1e-3, rank=4, weight_decay=0.1)),
])
def test_fused_step_on_cuda_equals_the_reference_path(cls, kwargs, dtype, steps, tol, batched, rel_diff):
    """The compiled kernels as Triton, and the range finder through cuBLAS / cuSOLVER. Steps and
    bounds as on the CPU (FUSED_CASES, test_fused_step_in_bf16_parameters)."""
    fast, plain, opt = _train_pair(cls, dict(kwargs, batched=batched), dtype=dtype, steps=steps, device="cuda")
    assert next(fast.parameters()).device.type == "cuda"
    assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= tol
    start = _tiny_llama(dtype, device="cuda")
    assert rel_diff(list(fast.parameters()), list(start.parameters())) > 1e-3         # it trained


@pytest.mark.parametrize("batched", [True, False])
def test_the_gpu_rule_algebra_trains_like_lapack_on_the_cpu(monkeypatch, batched, rel_diff):
    """lowrank.uses_gram_algebra forced on the CPU (Cholesky QR, Gram eigh: what float32 blocks
    on a GPU use): the fused step still equals the reference path, and both stay with the
    LAPACK-algebra run to rounding, so CI checks the GPU's algebra without a GPU. float32 only,
    two steps (measured 1.2e-6): the rule is for float32 blocks, and its algebra is exact only
    to float32 rounding by design (singular values under 1e-7 s_max are dropped, the Cholesky
    QR is shifted), so a float64 run of it is not exact either (measured 4e-11 after 8 steps)."""
    from mlorc_dist import lowrank
    kwargs = dict(lr=1e-2, rank=4, weight_decay=0.1, batched=batched)
    lapack, _, _ = _train_pair(MLorcAdamW, kwargs, steps=2)
    calls = []
    monkeypatch.setattr(lowrank, "uses_gram_algebra", lambda t: calls.append(1) or t.dtype == torch.float32)
    fast, plain, _ = _train_pair(MLorcAdamW, kwargs, steps=2)
    assert calls                                                     # the rule was consulted
    assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= 1e-5
    assert rel_diff(list(fast.parameters()), list(lapack.parameters())) <= 1e-5


@pytest.mark.parametrize("batched", [True, False])
def test_fused_step_in_bf16_parameters(rel_diff, batched):
    """bf16 parameters: the fused kernel computes in fp32 and writes bf16, like the reference.
    Two steps: a float32 rounding difference flips the bf16 rounding of a weight now and then
    (one bf16 ulp); measured 6.8e-4 to 1.2e-3 after two steps, and 3.7e-3 after eight, growing
    with every flip."""
    fast, plain, _ = _train_pair(MLorcAdamW, dict(lr=1e-2, rank=4, weight_decay=0.0, batched=batched),
                                 dtype=torch.bfloat16, steps=2)
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= 1e-2


def test_fused_needs_local_scope_and_a_bool():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="scope='local'"):
        MLorcAdamW(model.parameters(), scope="global", fused=True)
    with pytest.raises(ValueError, match="fused must be True or False"):
        MLorcLion(model.parameters(), fused="yes")


def test_a_compile_failure_is_a_clear_error(monkeypatch):
    """No quiet fallback: when torch.compile cannot build a block function (what a GPU step
    runs), the call says so."""
    def broken(*args):
        raise OSError("no Triton")
    block = fused._CompiledBlock(fused.lion_block_)
    monkeypatch.setattr(block, "compiled", broken)
    monkeypatch.setitem(fused._COMPILED, fused.lion_block_, block)
    w, grad, us, vh = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 2), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="torch.compile could not build lion_block_.*no Triton"):
        fused.compiled(fused.lion_block_)(w, grad, us, vh, *fused.scalars(0.9, 1e-2, 1.0, like=grad))


BLOCK_CASES = [   # weight dtype, rank, (B, k, n): n past one 256-column chunk and not a multiple of it
    (torch.float64, 5, (3, 7, 300)), (torch.float32, 1, (1, 1, 1)), (torch.float32, 4, (2, 33, 257)),
    (torch.float32, 9, (3, 17, 40)), (torch.float32, 16, (1, 64, 512)),
    (torch.bfloat16, 4, (2, 19, 270)), (torch.float16, 3, (2, 8, 100)),
]


@pytest.mark.parametrize("dtype,r,shape", BLOCK_CASES)
def test_cpu_block_kernels_equal_the_eager_blocks(dtype, r, shape):
    """blocks.cpp (one call per batch) against adamw_block_ / lion_block_ run eagerly per body:
    the same numbers to rounding, with the negative fix acting, for any rank, ragged column
    chunks and low-precision weights (computed in float32, written back rounded)."""
    B, k, n = shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(r * 100 + n)
    ws = [torch.randn(k, n, generator=g, dtype=compute).to(dtype) for _ in range(B)]
    grad = torch.randn(B, k, n, generator=g, dtype=compute)
    m_us, m_vh = torch.randn(B, k, r, generator=g, dtype=compute), torch.randn(B, r, n, generator=g, dtype=compute)
    v_us, v_vh = torch.rand(B, k, r, generator=g, dtype=compute), torch.rand(B, r, n, generator=g, dtype=compute) - 0.3
    floors = torch.rand(B, generator=g, dtype=compute) * 1e-3
    steps = [0.01 * (i + 1) for i in range(B)]
    eager_w, eager_v = [w.clone() for w in ws], torch.empty(B, k, n, dtype=compute)
    for i in range(B):
        fused.adamw_block_(eager_w[i], grad[i], m_us[i], m_vh[i], v_us[i], v_vh[i],
                           *fused.scalars(floors[i], 0.9, 0.99, steps[i], 1e-8, 0.998, like=grad), eager_v[i])
    kernel_w, kernel_v = [w.clone() for w in ws], torch.empty(B, k, n, dtype=compute)
    fused.adamw_blocks_(kernel_w, grad, m_us, m_vh, v_us, v_vh, floors, 0.9, 0.99, steps, 1e-8, 0.998, kernel_v)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    if r > 1:       # v_vh has negative entries: the fix acts on some rebuilt entries of every body
        assert all(((v_us[i] @ v_vh[i]) < -floors[i]).any() for i in range(B))
    torch.testing.assert_close(kernel_v, eager_v, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)
    for got, want in zip(kernel_w, eager_w):
        assert got.dtype == dtype
        torch.testing.assert_close(got.to(compute), want.to(compute), rtol=rtol, atol=rtol)
    eager_w, kernel_w = [w.clone() for w in ws], [w.clone() for w in ws]
    for i in range(B):
        fused.lion_block_(eager_w[i], grad[i], m_us[i], m_vh[i], *fused.scalars(0.95, 0.01, 0.999, like=grad))
    fused.lion_blocks_(kernel_w, grad, m_us, m_vh, 0.95, 0.01, 0.999)
    for got, want in zip(kernel_w, eager_w):
        torch.testing.assert_close(got.to(compute), want.to(compute), rtol=rtol, atol=rtol)


def test_cpu_block_kernels_give_the_same_numbers_on_two_threads():
    """at::parallel_for splits rows between threads; the statistics are summed per row, then in
    row order, so the result does not depend on the thread count."""
    g = torch.Generator().manual_seed(3)
    B, k, n, r = 2, 70, 300, 4
    ws = [torch.randn(k, n, generator=g) for _ in range(B)]
    grad = torch.randn(B, k, n, generator=g)
    m_us, m_vh = torch.randn(B, k, r, generator=g), torch.randn(B, r, n, generator=g)
    v_us, v_vh = torch.rand(B, k, r, generator=g), torch.rand(B, r, n, generator=g) - 0.3
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            w, v_out = [x.clone() for x in ws], torch.empty(B, k, n)
            fused.adamw_blocks_(w, grad, m_us, m_vh, v_us, v_vh, torch.full((B,), 1e-4), 0.9, 0.99, [0.01, 0.02],
                                1e-8, 0.999, v_out)
            results.append((w, v_out))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype,steps,tol", [(torch.float64, 4, 1e-10), (torch.float32, 2, 1e-5)])
@pytest.mark.parametrize("cls,kwargs", [
    (MLorcAdamW, dict(lr=1e-2, rank=4, weight_decay=0.1)),
    (MLorcLion, dict(lr=1e-3, rank=4, weight_decay=0.1)),
])
def test_the_gpu_rule_block_update_trains_like_the_reference_on_the_cpu(monkeypatch, cls, kwargs, dtype, steps,
                                                                         tol, rel_diff):
    """fused.runs_cpu_kernels forced False: the batch's bodies go one by one through the
    compiled block functions (what a GPU runs, here inductor on the CPU), batched and not.
    Steps and bounds as in FUSED_CASES (measured: float64 1.3e-15 after 4 steps, float32 1.2e-6
    after 2 and 5.4e-6 after 4)."""
    monkeypatch.setattr(fused, "runs_cpu_kernels", lambda t: False)
    for batched in (True, False):
        fast, plain, _ = _train_pair(cls, dict(kwargs, batched=batched), dtype=dtype, steps=steps)
        assert rel_diff(list(fast.parameters()), list(plain.parameters())) <= tol


def test_cpu_block_kernels_refuse_what_they_cannot_take():
    ext = cpu_kernels.extension()
    w, grad = torch.randn(4, 6), torch.randn(1, 4, 6)
    us, vh = torch.randn(1, 4, 2), torch.randn(1, 2, 6)
    with pytest.raises(RuntimeError, match="2 weights for a batch of 1"):
        ext.lion_blocks([w, w], grad, us, vh, 0.9, 0.1, 1.0, [])
    with pytest.raises(RuntimeError, match="contiguous \\(k, n\\) CPU tensor"):
        ext.lion_blocks([torch.randn(6, 4).mT], grad, us, vh, 0.9, 0.1, 1.0, [])
    with pytest.raises(RuntimeError, match="factors must be contiguous"):
        ext.lion_blocks([w], grad, us.double(), vh, 0.9, 0.1, 1.0, [])
    with pytest.raises(RuntimeError, match="float64 factors need float64 weights"):
        ext.lion_blocks([w], grad.double(), us.double(), vh.double(), 0.9, 0.1, 1.0, [])
    with pytest.raises(RuntimeError, match="v_out must be"):
        ext.adamw_blocks([w], grad, us, vh, us, vh, torch.zeros(1), 0.9, 0.99, [0.1], 1e-8, 1.0,
                         torch.empty(4, 6), [])
    with pytest.raises(RuntimeError, match="stochastic rounding writes bfloat16 weights"):
        ext.lion_blocks([w], grad, us, vh, 0.9, 0.1, 1.0, [1, 2, 0])
    with pytest.raises(RuntimeError, match="3 numbers per body"):
        ext.lion_blocks([w.bfloat16()], grad, us, vh, 0.9, 0.1, 1.0, [1, 2])


@pytest.mark.parametrize("batched", [True, False])
def test_a_cpu_fused_step_makes_one_kernel_call_per_batch(monkeypatch, cpu_kernel_calls, batched):
    """The tiny LLaMA's 2 layers x 7 matrices: same-shaped bodies share one block-kernel call
    when batched; one call per body otherwise. No torch.compile on the CPU."""
    monkeypatch.setattr(fused, "compiled", lambda fn: pytest.fail("torch.compile on the CPU"))
    model = _tiny_llama()
    opt = MLorcAdamW(mlorc_dist.param_groups(model), fused=True, batched=batched)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    weight = model.model.layers[0].self_attn.q_proj.weight
    version = weight._version
    opt.step()
    assert weight._version > version           # written in place, and autograd is told so
    shapes = {tuple(p.shape) for p in model.model.layers.parameters() if p.dim() == 2}
    assert cpu_kernel_calls.count("adamw_blocks") == (len(shapes) if batched else 14)
    # and one range finder call per moment of each batch (optim/skinny.py): nothing else
    assert cpu_kernel_calls.count("range_finder") == 2 * cpu_kernel_calls.count("adamw_blocks")
    assert set(cpu_kernel_calls) == {"adamw_blocks", "range_finder"}


def test_fused_is_selected_by_name_in_launch_and_deepspeed_configs():
    from mlorc_dist import deepspeed as ds_adapter
    from mlorc_dist.methods import build_optimizer
    model = _tiny_llama()
    assert build_optimizer("mlorc-adamw", model, lr=1e-3, fused=True).fused
    assert build_optimizer("mlorc-lion", model, lr=1e-4, fused=True).fused
    assert not build_optimizer("mlorc-adamw", model, lr=1e-3).fused
    with pytest.raises(ValueError, match="not mofasgd's"):
        build_optimizer("mofasgd", model, lr=1e-2, fused=True)
    opt = ds_adapter.build_optimizer(model, "MLorcAdamW", {"lr": 1e-3}, {"rank": 4, "fused": True})
    assert opt.fused
    with pytest.raises(ValueError, match="do not apply to MoFaSGD"):
        ds_adapter.build_optimizer(model, "MoFaSGD", {"lr": 1e-2}, {"rank": 4, "fused": True})


def test_more_shapes_than_dynamo_default_recompile_limit():
    """Every rank up to the unrolled limit and two dtypes: 9+ graphs of one function, past
    dynamo's default of 8 (with fullgraph=True that would be an error mid-training)."""
    k, n = 12, 10
    cases = [(torch.float32, r) for r in range(1, fused.UNROLLED_RANK + 1)] + [(torch.float64, 3)]
    for dtype, r in cases:
        g = torch.Generator().manual_seed(r)
        w, grad = torch.randn(k, n, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype)
        us, vh = torch.randn(k, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype)
        hyper = fused.scalars(0.9, 1e-2, 0.999, like=grad)
        want_w = w.clone()
        fused.lion_block_(want_w, grad, us, vh, *hyper)                           # eager
        fused.compiled(fused.lion_block_)(w, grad, us, vh, *hyper)
        torch.testing.assert_close(w, want_w)


def test_the_start_up_log_says_fused(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="mlorc_dist"):
        MLorcAdamW(mlorc_dist.param_groups(_tiny_llama()), fused=True)
    assert "MLorc-AdamW (scope=local, fused step)" in caplog.text


def test_the_second_moment_workspace_is_reused_and_not_saved():
    """fused, bodies one by one: V is written into one buffer kept between steps (no fresh
    pages each step), as large as the largest body; it is not optimizer state. Lion keeps none."""
    model = _tiny_llama()
    opt = MLorcAdamW(mlorc_dist.param_groups(model), fused=True, batched=False)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    pointers = []
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        (buffer,) = opt._workspaces.values()
        pointers.append(buffer.data_ptr())
    assert pointers[0] == pointers[1]
    largest = max(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    assert buffer.numel() == largest
    assert "workspace" not in str(opt.state_dict().keys())
    lion = MLorcLion(mlorc_dist.param_groups(model), fused=True, batched=False)
    model(input_ids=ids, labels=ids).loss.backward()
    lion.step()
    assert lion._workspaces == {}
