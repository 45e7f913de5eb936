"""MoFaSGD, GaLore and LoRA: their defining properties, on whole and on row-sharded blocks.

The multi-process runs (MoFaSGD global scope at world size 2 against 1, local-scope replays
under ZeRO and FSDP2) are in test_distributed.py."""
from __future__ import annotations

import pytest
import torch

import mlorc_dist
from mlorc_dist import checkpoint as ckpt
from mlorc_dist.methods import METHODS, build_optimizer, check_method, prepare_model
from mlorc_dist.models import build_model, llama_config
from mlorc_dist.optim.galore import galore_projector
from mlorc_dist.pieces import Layout, MatrixSpec, Piece
from mlorc_dist.tangent import factor_update, inverse_phi, run_alone


def _orthonormal(rows, cols, dtype, generator):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=dtype, generator=generator))
    return q


def _dense_best_rank_r(u, s, v, g, beta, r):
    """The best rank-r approximation of beta U diag(s) V^T + P_T(G), formed densely."""
    pu, pv = u @ u.mT, v @ v.mT
    target = beta * (u * s) @ v.mT + pu @ g + g @ pv - pu @ g @ pv
    a, sigma, bh = torch.linalg.svd(target)
    return (a[:, :r] * sigma[:r]) @ bh[:r], sigma[:r]


def _run_ranks(generators):
    """Drive one factor-update generator per simulated rank, summing what they yield."""
    answers, results = [None] * len(generators), [None] * len(generators)
    while True:
        asked = []
        for i, generator in enumerate(generators):
            try:
                asked.append(generator.send(answers[i]))
            except StopIteration as done:
                results[i] = done.value
        if not asked:
            return results
        assert len(asked) == len(generators), "ranks disagree on the number of all-reduces"
        totals = [sum(parts[j] for parts in asked) for j in range(len(asked[0]))]
        answers = [[t.clone() for t in totals] for _ in generators]


@pytest.mark.parametrize("m,n,r", [(30, 20, 4), (20, 30, 4), (12, 64, 8), (9, 9, 4)])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_mofasgd_factor_update_is_the_best_rank_r_of_momentum_plus_tangent_gradient(m, n, r, scale):
    gen = torch.Generator().manual_seed(m * n + r)
    dtype = torch.float64
    u, v = _orthonormal(m, r, dtype, gen), _orthonormal(n, r, dtype, gen)
    s = torch.rand(r, dtype=dtype, generator=gen) + 0.1
    g = scale * torch.randn(m, n, dtype=dtype, generator=gen)
    best, sigma = _dense_best_rank_r(u, s, v, g, 0.9, r)
    u2, s2, v2 = run_alone(factor_update(u, s, v, g, 0.9))
    assert torch.allclose(s2, sigma, rtol=1e-10, atol=0)
    assert torch.allclose((u2 * s2) @ v2.mT, best, rtol=0, atol=1e-12 * float(best.abs().max()))
    eye = torch.eye(r, dtype=dtype)
    assert torch.allclose(u2.mT @ u2, eye, atol=1e-12) and torch.allclose(v2.mT @ v2, eye, atol=1e-12)


@pytest.mark.parametrize("cuts", [[0, 95, 300, 600], [0, 600], [0, 20, 40, 600], [0, 0, 333, 600]])
def test_mofasgd_row_sharded_update_equals_whole_matrix(cuts):
    """Ranks holding flat ranges of G (partial rows too, an empty one too) and their rows of U
    reach the whole-matrix result by summing what they yield."""
    gen = torch.Generator().manual_seed(1)
    m, n, r, dtype = 30, 20, 4, torch.float64
    u, v = _orthonormal(m, r, dtype, gen), _orthonormal(n, r, dtype, gen)
    s = torch.rand(r, dtype=dtype, generator=gen) + 0.5
    grad = 1e-3 * torch.randn(m, n, dtype=dtype, generator=gen)
    whole = run_alone(factor_update(u, s, v, grad, 0.9))
    generators, rows_of = [], []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        piece = Piece(MatrixSpec("w", (m, n), True), start, stop, 0)
        row0, rows = piece.first_row, piece.row_count
        g = torch.zeros(rows, n, dtype=dtype)
        skip = start - row0 * n
        g.view(-1)[skip:skip + stop - start] = grad.view(-1)[start:stop]
        own = torch.ones(rows, 1, dtype=dtype)
        if rows and start % n:
            own[0] = 0
        generators.append(factor_update(u[row0:row0 + rows], s, v, g, 0.9, rows=m, row0=row0, own=own))
        rows_of.append((row0, rows))
    for (row0, rows), (u2, s2, v2) in zip(rows_of, _run_ranks(generators)):
        assert torch.allclose(u2, whole[0][row0:row0 + rows], atol=1e-12)
        assert torch.allclose(s2, whole[1], atol=1e-12) and torch.allclose(v2, whole[2], atol=1e-12)


def test_inverse_phi_caps_and_zeroes():
    s = torch.tensor([4.0, 1e-4, 0.0])
    assert torch.equal(inverse_phi(s, max_value=100.0), torch.tensor([0.25, 100.0, 0.0]))


def _layer(rows=24, cols=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(cols, rows, bias=True).to(dtype)


def test_mofasgd_first_step_starts_from_the_weights_svd_and_moves_along_u_v():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    opt = mlorc_dist.MoFaSGD([layer.weight], lr=0.1, momentum=0.9, rank=4, oversample=20, niter=4)
    layer.weight.grad = 1e-3 * torch.randn_like(layer.weight)
    u, s, v = torch.linalg.svd(w0)
    init = (u[:, :4], s[:4], v[:4].mT)
    expected = run_alone(factor_update(*init, layer.weight.grad, 0.9))
    opt.step()
    entry = opt.state[layer.weight]["pieces"][0]
    assert torch.allclose(entry["s"], expected[1], rtol=1e-8)
    step = w0 - layer.weight.detach()
    assert torch.allclose(step, 0.1 * entry["u"] @ entry["v"].mT, atol=1e-12)   # phi = 1
    assert torch.allclose(torch.linalg.matrix_norm(step, ord=2), torch.tensor(0.1, dtype=step.dtype))


def test_mofasgd_dense_groups_run_adamw():
    layer = _layer()
    twin = _layer()
    opt = mlorc_dist.MoFaSGD([{"params": [layer.bias], "lowrank": False}], lr=1e-2, eps=1e-8)
    ref = mlorc_dist.MLorcAdamW([{"params": [twin.bias], "lowrank": False}], lr=1e-2, eps=1e-8,
                                weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn_like(layer.bias)
        layer.bias.grad, twin.bias.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(layer.bias, twin.bias)


def test_mofasgd_state_is_r_times_m_plus_n_plus_1():
    layer = _layer(dtype=torch.float32)
    opt = mlorc_dist.MoFaSGD([layer.weight], rank=4)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    assert opt.state_bytes() == 4 * 4 * (24 + 16 + 1)


def test_mofasgd_rejects_bad_settings():
    layer = _layer()
    with pytest.raises(ValueError, match="momentum"):
        mlorc_dist.MoFaSGD([layer.weight], momentum=1.0)
    with pytest.raises(ValueError, match="phi"):
        mlorc_dist.MoFaSGD([layer.weight], phi="sqrt")


# --------------------------------------------------------------------------- GaLore
@pytest.mark.parametrize("rows,cols", [(12, 30), (30, 12)])
def test_galore_refreshes_its_projector_every_t_steps_and_keeps_adam_state(rows, cols):
    layer = _layer(rows, cols)
    opt = mlorc_dist.GaLoreAdamW([layer.weight], lr=1e-2, rank=3, update_interval=4, scale=0.25)
    projectors, moments = [], []
    for step in range(1, 10):
        grad = torch.randn_like(layer.weight)
        layer.weight.grad = grad
        before = layer.weight.detach().clone()
        entry = opt.state[layer.weight]["pieces"][0] if opt.state[layer.weight] else None
        previous_m = entry["exp_avg"].clone() if entry else None
        opt.step()
        entry = opt.state[layer.weight]["pieces"][0]
        projectors.append(entry["proj"].clone())
        if step in (1, 5, 9):             # a refresh: the projector of THIS gradient's SVD
            side, proj = galore_projector(grad, 3)
            assert side == ("left" if rows <= cols else "right")
            assert torch.allclose(entry["proj"], proj)
        else:
            assert torch.equal(projectors[-1], projectors[-2])
        if step == 5:                      # moments carried over the refresh, not reset
            assert previous_m.abs().sum() > 0
            assert torch.allclose(entry["exp_avg"], 0.9 * previous_m + 0.1 * (
                entry["proj"].mT @ grad if rows <= cols else grad @ entry["proj"]))
        moments.append(entry["exp_avg"].clone())
        update = layer.weight.detach() - before
        proj = entry["proj"]
        outside = update - (proj @ proj.mT @ update if rows <= cols else update @ proj @ proj.mT)
        assert outside.abs().max() < 1e-12         # the update lies in the projected subspace


def test_galore_is_per_shard_only():
    with pytest.raises(ValueError, match="per shard"):
        mlorc_dist.GaLoreAdamW([_layer().weight], scope="global")


def test_non_reshardable_checkpoint_refuses_another_layout():
    layer = _layer(dtype=torch.float32)
    opt = mlorc_dist.MoFaSGD([layer.weight], rank=2)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    records = ckpt.optimizer_records(opt)
    twin = _layer(dtype=torch.float32)
    other = mlorc_dist.MoFaSGD([twin.weight], rank=2)
    spec = MatrixSpec("param0", (24, 16), True)
    other.attach_layout(twin.weight, Layout([Piece(spec, 0, 160, 0), Piece(spec, 160, 384, 160)],
                                            [spec], None, "test"))
    with pytest.raises(ValueError, match="resume only at the layout"):
        ckpt.load_optimizer_records(other, records)
    same = mlorc_dist.MoFaSGD([_layer(dtype=torch.float32).weight], rank=2)
    assert ckpt.load_optimizer_records(same, records)["exact"] == 1


# --------------------------------------------------------------------------- registry, LoRA
def _tiny():
    return build_model(llama_config("tiny", 256), seed=0)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_and_steps_on_a_tiny_llama(name):
    model = prepare_model(name, _tiny(), rank=4)
    optimizer = build_optimizer(name, model, lr=1e-3, dense_lr=5e-4, rank=4, galore_interval=2)
    ids = torch.randint(0, 256, (2, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable
    for group in optimizer.param_groups:
        assert group["lr_scale"] == (1.0 if group["lr"] == 1e-3 else 0.5)


def test_lora_freezes_the_base_model_and_checks_its_targets():
    model = prepare_model("lora", _tiny(), rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="not found"):
        from mlorc_dist.lora import apply_lora
        apply_lora(_tiny(), 4, target_modules=("q_proj", "qkv_proj"))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        check_method("galore8bit")
