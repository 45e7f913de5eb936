"""The GPU path's host cost, counted on the CPU with its rules (MLORC_GPU_RULES_ON_CPU=1): a
step's operator calls, compiled-function calls and synchronisations do not grow with the number
of bodies (bench/host_cost.py counts them the same way, torch.profiler)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import mlorc_dist
from mlorc_dist import compiled_range, lowrank

HOST_COST = Path(__file__).resolve().parents[1] / "bench" / "host_cost.py"


def _host_cost():
    spec = importlib.util.spec_from_file_location("host_cost", HOST_COST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _counts(host_cost, cls, groups, steps=2, **kwargs):
    host_cost.with_gradients(groups)
    opt = cls(groups, rank=4, **kwargs)
    for _ in range(steps):
        opt.step()
    counts = host_cost.count_host_work(opt.step)
    assert counts.pop("outside_ms") > 0             # a time, not a count: compared nowhere
    return counts


@pytest.mark.parametrize("cls", [mlorc_dist.MLorcAdamW, mlorc_dist.MLorcLion])
def test_a_gpu_rules_step_costs_the_same_host_work_for_4_and_24_bodies(monkeypatch, cls):
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    host_cost = _host_cost()
    few = _counts(host_cost, cls, host_cost.same_shaped(4, 12, 20))
    many = _counts(host_cost, cls, host_cost.same_shaped(24, 12, 20))
    assert few == many
    # one block update for the batch; per moment one range finder (compiled_range.sketched_range)
    # and one call that makes its factors (lowrank.factors_from_eigh); and one Jacobi sweep call
    # per sweep for the small SVDs of every Gram-algebra batch of the step (q = 4)
    assert many["compiled_calls"] == 1 + 2 * len(cls.moment_names) + lowrank.jacobi_sweeps(4)
    assert many["syncs"] == 1                          # the non-finite check's count
    ignored = _counts(host_cost, cls, host_cost.same_shaped(24, 12, 20), nonfinite="ignore")
    assert ignored["syncs"] == 0


def test_a_7b_rank_mix_makes_one_block_call_per_shape_group_and_one_sync(monkeypatch):
    """Three shape groups of bodies (q, k, v, o; gate, up; down) and 1-D / dense regions: three
    compiled block calls, a range finder and a factor call per group and moment, and one Jacobi
    solve for all their small SVDs, and the same host work at a tenth of the layers' bodies."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    host_cost = _host_cost()
    monkeypatch.setattr(host_cost, "LLAMA7B_LAYERS", 4)
    four = _counts(host_cost, mlorc_dist.MLorcAdamW, host_cost.llama7b_rank(64))
    monkeypatch.setattr(host_cost, "LLAMA7B_LAYERS", 40)
    forty = _counts(host_cost, mlorc_dist.MLorcAdamW, host_cost.llama7b_rank(64))
    assert four == forty
    assert forty["compiled_calls"] == 3 * (1 + 2 * 2) + lowrank.jacobi_sweeps(4) and forty["syncs"] == 1


def test_a_lone_body_under_the_gpu_rules_compresses_without_a_sync(monkeypatch):
    """A batch of one (a body with no same-shaped partner) keeps Householder QR but takes the Gram
    SVD with jacobi_eigh (lowrank.uses_jacobi): no host synchronisation, where cuSOLVER's SVD
    checked its errors on the host."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    host_cost = _host_cost()
    g = torch.Generator().manual_seed(0)
    groups = [{"params": [torch.randn(12, 20, generator=g).requires_grad_(),
                          torch.randn(16, 24, generator=g).requires_grad_()]}]
    counts = _counts(host_cost, mlorc_dist.MLorcAdamW, groups, nonfinite="ignore")
    assert counts["syncs"] == 0


def test_the_switch_selects_the_gpu_rules_and_refuses_other_values(monkeypatch):
    a = torch.zeros(2, 3, 3)
    monkeypatch.delenv("MLORC_GPU_RULES_ON_CPU", raising=False)
    assert not lowrank.takes_gpu_rules("cpu") and not lowrank.uses_gram_algebra(a)
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    assert lowrank.takes_gpu_rules("cpu") and lowrank.uses_gram_algebra(a)
    assert not lowrank.uses_gram_algebra(a.double())           # float32 batches only, as on a GPU
    from mlorc_dist.optim import base, fused, skinny
    assert not fused.runs_cpu_kernels(a) and not skinny.uses_kernel(a, 4)
    assert base.batch_cap(True, "cpu") == base.BATCH_ELEMENTS
    assert len(base.batch_chunks(list(range(3)), body_numel=1 << 20, device_type="cpu")) == 1   # batched as on a GPU
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "yes")
    with pytest.raises(ValueError, match="MLORC_GPU_RULES_ON_CPU must be 0 or 1"):
        lowrank.takes_gpu_rules("cpu")


def test_hashed_normal_is_per_seed_and_standard_normal():
    """Matrix b depends on seeds[b] alone (a batch draws what its bodies draw alone), and the
    draws have a standard normal's first four moments."""
    batch = lowrank.hashed_normal([5, 6, 7], 40, 4, torch.float64)
    alone = lowrank.hashed_normal([6], 40, 4, torch.float64)
    assert torch.equal(batch[1], alone[0]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(lowrank.hashed_normal([6], 40, 4, torch.float32)[0], alone[0].float())
    z = lowrank.hashed_normal(list(range(32)), 256, 64, torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z ** 4).mean().item() - 3) < 0.05
    # the tensor splitmix64 is the reference's (checked on known outputs of the Python one)
    x = torch.tensor([0, 1, -5, 2 ** 62])
    want = [compiled_range.splitmix64(int(v)) for v in x]
    assert compiled_range.mix64(x).tolist() == want and want[1] == 6238072747940578789


def test_deferred_small_svds_equal_one_call_per_batch(monkeypatch):
    """finish_compress (one eigh for every batch of a step) gives the factors compress_batch
    gives batch by batch, in float32 under the GPU rules."""
    monkeypatch.setenv("MLORC_GPU_RULES_ON_CPU", "1")
    g = torch.Generator().manual_seed(0)
    moments = [torch.randn(3, 30, 20, generator=g), torch.randn(5, 12, 40, generator=g)]
    seeds = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert all(lowrank.defers_small_svd(m, m.shape[0]) for m in moments)
    pending = [(*lowrank.compress_range(m, 4, 1, 1, s), 4) for m, s in zip(moments, seeds)]
    for got, m, s in zip(lowrank.finish_compress(pending), moments, seeds):
        for a, b in zip(got, lowrank.compress_batch(m, 4, 1, 1, s)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
