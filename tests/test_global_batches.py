"""Global scope's step in batches of matrices (optim.base._global_batches): the same result as
all matrices at once, and a workspace of one batch, which the planner counts."""
from __future__ import annotations

import pytest
import torch

import mlorc_dist
from mlorc_dist.optim import base

SHAPES = [(96, 64)] * 3 + [(160, 64)] * 2 + [(64, 96)] * 3


def _run(shapes, steps=3, cls=mlorc_dist.MLorcAdamW):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    optimizer = cls([{"params": params, "lowrank": True}], lr=1e-2, rank=4, scope="global")
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("cls", [mlorc_dist.MLorcAdamW, mlorc_dist.MLorcLion, mlorc_dist.MoFaSGD])
def test_batches_give_bitwise_the_result_of_one_batch(monkeypatch, cls):
    whole, whole_opt = _run(SHAPES, cls=cls)
    monkeypatch.setattr(base, "BATCH_ELEMENTS", 2 * 96 * 64)
    batched, batched_opt = _run(SHAPES, cls=cls)
    matrices = [(None, None, type("S", (), {"rows": r, "cols": c})(), None) for r, c in SHAPES]
    cuts = batched_opt._global_batches(matrices)
    assert len(cuts) > 3 and sorted(j for b in cuts for j in b) == list(range(len(SHAPES)))
    assert all(sum(SHAPES[j][0] * SHAPES[j][1] for j in b) <= 2 * 96 * 64 or len(b) == 1 for b in cuts)
    for a, b in zip(whole, batched):
        assert torch.equal(a, b)
    for a, b in zip(whole, batched):
        for key, value in whole_opt.state[a]["pieces"][0].items():
            other = batched_opt.state[b]["pieces"][0][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def _one_batch_workspaces(monkeypatch, cls, optimizer: str, block: int):
    """Eight 512 x 256 matrices in global scope: the step workspace of all at once, then with
    batches of two, and the planner's step workspace for the batched run, in bytes."""
    from mlorc_dist.memory import planner
    from mlorc_dist.memory.planner import PlanSettings, plan_model
    from mlorc_dist.memory.workspace import measure_step_workspace_bytes
    from mlorc_dist.models import llama_config
    shapes = [(512, 256)] * 8

    def make(ps):
        return cls([{"params": ps, "lowrank": True}], rank=4, scope="global")
    all_at_once = measure_step_workspace_bytes(make, shapes)
    monkeypatch.setattr(base, "BATCH_ELEMENTS", 2 * block)
    monkeypatch.setattr(planner, "BATCH_ELEMENTS", 2 * block)
    measured = measure_step_workspace_bytes(make, shapes)
    module = torch.nn.Module()
    module.blocks = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes])
    planned = plan_model(module, llama_config("tiny", 2048),
                         PlanSettings(engine="single", optimizer=optimizer, rank=4, scope="global"), "blocks")
    ws = [v for k, v in planned.transients.items() if k.startswith("step workspace")][0]
    return all_at_once, measured, ws


def test_global_step_workspace_is_one_batch_and_planned(monkeypatch):
    """Eight 512 x 256 matrices, batches of two: the step's extra memory is one batch's (about a
    quarter of all at once), within the planner's bound, which it also equals to 3 %."""
    from mlorc_dist.memory.planner import MLORC_STEP_WORKSPACE
    block = 512 * 256
    all_at_once, measured, ws = _one_batch_workspaces(monkeypatch, mlorc_dist.MLorcAdamW, "mlorc-adamw", block)
    ws_rule = MLORC_STEP_WORKSPACE[4]
    assert ws == 4 * (ws_rule["global"] * 2 * block + ws_rule["global_block"] * block)
    assert measured <= ws * 1.03, (measured, ws)
    assert measured < 0.4 * all_at_once, (measured, all_at_once)


def test_mofasgd_global_step_workspace_is_one_batch_and_planned(monkeypatch):
    """MoFaSGD's global step also holds one batch of matrices at a time, within the planner's bound."""
    all_at_once, measured, ws = _one_batch_workspaces(monkeypatch, mlorc_dist.MoFaSGD, "mofasgd", 512 * 256)
    assert measured <= ws * 1.03, (measured, ws)
    assert measured < 0.4 * all_at_once, (measured, all_at_once)
