"""SwitchLoRA (mlorc_dist.switchlora): the layer, the switch, the schedule, the optimizer, a short
training run on real text, and DDP / DeepSpeed ZeRO-2 at world size 2 (CPU, gloo)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mlorc_dist.models import build_model, llama_config
from mlorc_dist.switchlora import (
    DEFAULT_TARGETS,
    SwitchLoRAAdamW,
    SwitchLoRALinear,
    apply_switchlora,
    expected_switches,
    load_switchlora_state_dict,
    merge_switchlora,
    switch_count,
    switch_layer,
    switch_rate,
    switch_step,
    switchlora_layers,
    switchlora_param_groups,
    switchlora_state_dict,
    switchlora_summary,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "switchlora_worker.py"
VOCAB = 300


def tiny(dtype=torch.float32, seed=0):
    return build_model(llama_config("tiny", VOCAB), seed=seed, dtype=dtype)


def token_batch(batch=2, seq=16, seed=0):
    return torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def backward_once(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


# ----------------------------------------------------------------------------- applying it
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_apply_leaves_logits_unchanged(dtype, tol):
    model, ids = tiny(dtype), token_batch()
    before = logits(model, ids)
    apply_switchlora(model, 8)
    after = logits(model, ids)
    assert (after - before).abs().max().item() <= tol * before.abs().max().item()
    layers = switchlora_layers(model)
    assert len(layers) == 2 * len(DEFAULT_TARGETS)
    for _, layer in layers:
        assert layer.lora_B.abs().min() > 0            # B starts nonzero: W absorbed -s B A
        assert not layer.weight.requires_grad and layer.lora_A.requires_grad
        assert layer.cand_A.device.type == "cpu" and layer.cand_A.shape == (layer.pool_size, layer.in_features)
        assert layer.cand_B.shape == (layer.out_features, layer.pool_size)
        assert layer.pool_size == min(layer.in_features, layer.out_features)


def test_apply_freezes_only_replaced_weights_and_counts():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    replaced = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS)
    apply_switchlora(model, 8)
    summary = switchlora_summary(model)
    lora = sum(8 * (m.in_features + m.out_features) for _, m in switchlora_layers(model))
    assert summary == {"trainable": total - replaced + lora, "frozen": replaced, "replaced": replaced,
                       "lora": lora, "layers": 14, "pool_numbers": summary["pool_numbers"]}
    assert model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    names = [n for g in switchlora_param_groups(model) for n, _ in g["params"]]
    assert len(names) == len({n for n, p in model.named_parameters() if p.requires_grad})


def test_apply_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nn.Linear"):
        apply_switchlora(tiny(), 8, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="exceeds min"):
        apply_switchlora(tiny(), 40)                    # k_proj is 64 -> 32
    model = apply_switchlora(tiny(), 4, target_modules=["q_proj"])
    assert len(switchlora_layers(model)) == 2
    with pytest.raises(ValueError, match="already"):
        apply_switchlora(model, 4)
    with pytest.raises(ValueError, match="lowrank"):
        SwitchLoRAAdamW([{"params": list(model.parameters())[:1], "lowrank": True}])
    with pytest.raises(ValueError, match="SwitchLoRAAdamW"):
        switch_step(model, torch.optim.AdamW(model.parameters()), 0, 100)


# ----------------------------------------------------------------------------- the switch
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_switches_leave_the_function_unchanged(dtype, tol):
    model, ids = apply_switchlora(tiny(dtype), 8), token_batch(seed=1)
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model), lr=1e-2)
    before = logits(model, ids)
    merged = {n: layer.merged_weight() for n, layer in switchlora_layers(model)}
    switched = 0
    for step in range(6):                         # no optimizer step: only switches change things
        counts = switch_step(model, optimizer, step, 10_000, interval0=10)
        switched += counts["A"] + counts["B"]
    assert switched >= 40
    after = logits(model, ids)
    assert (after - before).abs().max().item() <= tol * before.abs().max().item()
    for name, layer in switchlora_layers(model):
        w = merged[name]
        assert (layer.merged_weight() - w).abs().max().item() <= tol * w.abs().max().item()


def test_switch_moves_vectors_between_factor_and_pool():
    torch.manual_seed(0)
    layer = SwitchLoRALinear(nn.Linear(12, 10, dtype=torch.float64), 3, name="layer")
    a_old, b_old = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    slot_a, slot_b = layer.free_slots("A")[0], layer.free_slots("B")[-1]
    new_a, new_b = layer.cand_A[slot_a].clone(), layer.cand_B[:, slot_b].clone()
    old_slot_a, old_slot_b = layer.selected_A[1].item(), layer.selected_B[2].item()
    switch_layer(layer, None, "layer", rows_A=[1], slots_A=[slot_a], cols_B=[2], slots_B=[slot_b], step=0)
    assert torch.equal(layer.lora_A[1], new_a) and torch.equal(layer.lora_B[:, 2], new_b)
    assert torch.equal(layer.cand_A[old_slot_a], a_old[1])          # the old row went back
    assert torch.equal(layer.cand_B[:, old_slot_b], b_old[:, 2])
    assert layer.selected_A[1] == slot_a and layer.selected_B[2] == slot_b
    assert torch.equal(layer.lora_A[[0, 2]], a_old[[0, 2]])
    assert layer.busy_until.tolist() == [0, 5, 5]
    with pytest.raises(ValueError, match="free slots"):                # a slot in use
        switch_layer(layer, None, "layer", rows_A=[0], slots_A=[slot_a], cols_B=[], slots_B=[], step=1)


def test_switch_choices_are_seeded_and_spare_busy_components():
    runs = []
    for seed in (5, 5, 6):
        model = apply_switchlora(tiny(), 8)
        for step in range(12):
            switch_step(model, None, step, 10_000, interval0=10, seed=seed)
            for _, layer in switchlora_layers(model):
                assert int((layer.busy_until > step + 5).sum()) == 0
        runs.append(torch.cat([layer.selected_A for _, layer in switchlora_layers(model)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("placement", ["between backward and step", "after step"])
def test_reset_and_freeze_of_the_counterpart(placement):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    model[0] = SwitchLoRALinear(model[0], 4, name="0")
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 16)

    def backward():
        model(x).square().mean().backward()

    def step():
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        backward()
        step()
    layer = model[0]
    if placement == "between backward and step":
        backward()
    switch_layer(layer, optimizer, "0", rows_A=[1], slots_A=layer.free_slots("A")[:1], cols_B=[2],
                 slots_B=layer.free_slots("B")[:1], step=3)
    a_state, b_state = optimizer.vector_state("0.lora_A"), optimizer.vector_state("0.lora_B")
    for name in ("exp_avg", "exp_avg_sq", "vector_step"):
        assert (b_state[name][:, 1] == 0).all() and (a_state[name][2] == 0).all()    # reset
        assert (b_state[name][:, [0, 2, 3]] != 0).all() and (a_state[name][[0, 1, 3]] != 0).all()
    assert (b_state["frozen_steps"][:, 1] == 5).all() and (a_state["frozen_steps"][2] == 5).all()
    assert a_state["vector_step"][1].eq(3).all()      # the switched vector keeps its state
    snapshots = [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone())]
    for i in range(6):
        if i or placement == "after step":
            backward()
        step()
        snapshots.append((layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))
    frozen_a = [a[2] for a, _ in snapshots]
    frozen_b = [b[:, 1] for _, b in snapshots]
    live_b = [b[:, 0] for _, b in snapshots]
    # the next 5 optimizer steps skip the frozen vectors, the 6th moves them again
    assert all(torch.equal(v, frozen_a[0]) for v in frozen_a[:6]) and not torch.equal(frozen_a[6], frozen_a[5])
    assert all(torch.equal(v, frozen_b[0]) for v in frozen_b[:6]) and not torch.equal(frozen_b[6], frozen_b[5])
    assert all(not torch.equal(live_b[i], live_b[i + 1]) for i in range(6))
    steps = optimizer.vector_state("0.lora_B")["vector_step"]
    assert steps[:, 1].eq(1).all() and steps[:, 0].eq(9).all()       # own bias-correction clocks
    assert optimizer.vector_state("0.lora_B")["frozen_steps"].eq(0).all()


def test_merge_switchlora_keeps_logits():
    model, ids = apply_switchlora(tiny(torch.float64), 8), token_batch(seed=2)
    for step in range(3):
        switch_step(model, None, step, 10_000, interval0=10)
    before = logits(model, ids)
    merge_switchlora(model)
    assert not switchlora_layers(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert (logits(model, ids) - before).abs().max().item() < 1e-12


def test_optimizer_without_switches_is_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(11)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt_ours = SwitchLoRAAdamW([{"params": [("w", ours[0]), ("b", ours[1])]}], lr=1e-2,
                               betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for step in range(20):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 2 + i))
                 for i, p in enumerate(params)]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_switching_state_round_trips():
    model = apply_switchlora(tiny(), 8)
    for step in range(3):
        switch_step(model, None, step, 10_000, interval0=10)
    saved = switchlora_state_dict(model)
    fresh = apply_switchlora(tiny(), 8)
    load_switchlora_state_dict(fresh, saved)
    for (_, a), (_, b) in zip(switchlora_layers(model), switchlora_layers(fresh)):
        assert torch.equal(a.cand_A, b.cand_A) and torch.equal(a.selected_B, b.selected_B)
        assert torch.equal(a.busy_until, b.busy_until)


# ----------------------------------------------------------------------------- the schedule
def test_schedule_rate_at_ten_percent_is_three_tenths():
    assert switch_rate(0, 1000) == 1.0
    assert switch_rate(100, 1000) == pytest.approx(0.3, rel=1e-12)
    assert switch_rate(200, 1000) == pytest.approx(0.09, rel=1e-12)
    assert expected_switches(128, 0, 1000) == pytest.approx(128 / 40)             # r / interval0
    assert 128 / expected_switches(128, 100, 1000) == pytest.approx(40 / 0.3)    # interval grew
    draws = [switch_count(0.3, torch.Generator().manual_seed(i)) for i in range(4000)]
    assert set(draws) == {0, 1} and abs(sum(draws) / 4000 - 0.3) < 0.025
    assert all(switch_count(2.0, torch.Generator().manual_seed(i)) == 2 for i in range(20))


def test_switch_step_follows_the_schedule():
    model = apply_switchlora(tiny(), 8)
    total, steps, layers = 2000, 200, 14          # steps 0 .. 10% of training, default interval 40
    expected = sum(expected_switches(8, s, total) for s in range(steps)) * layers
    seen = sum(switch_step(model, None, s, total)["A"] for s in range(steps))
    assert abs(seen - expected) < 4 * math.sqrt(expected), (seen, expected)
    # at 50% the rate has fallen to 0.3^5 of the start's: ~0.8 switches expected in 200 steps
    # (a draw, not always 0), ~400x fewer than at the start
    late = sum(switch_step(model, None, s, total)["A"] for s in range(1000, 1200))
    expected_late = sum(expected_switches(8, s, total) for s in range(1000, 1200)) * layers
    assert expected_late < expected / 100
    assert late <= expected_late + 4 * math.sqrt(expected_late) + 1, (late, expected_late)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus_ids(tmp_path_factory):
    cache = tmp_path_factory.mktemp("switchlora_cache")
    from mlorc_dist.data import default_corpus_path, load_token_ids, train_tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLORC_CACHE", str(cache))
        path = default_corpus_path()
        tokenizer = train_tokenizer([str(path)], vocab_size=VOCAB, cache_dir=cache)
        return load_token_ids(path, tokenizer, cache_dir=cache)


def _train_on_text(ids, steps: int, switching: bool) -> tuple[list[float], int]:
    from mlorc_dist.data import PackedBatches
    model = apply_switchlora(tiny(seed=3), 8)
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model, weight_decay=0.01), lr=1e-2)
    data = PackedBatches(ids, batch_size=8, seq_len=64, seed=0)
    losses, switched = [], 0
    for step in range(steps):
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if switching:
            counts = switch_step(model, optimizer, step, steps, interval0=10)
            switched += counts["A"] + counts["B"]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, switched


def test_training_on_text_lowers_the_loss(corpus_ids):
    steps = 40
    losses, switched = _train_on_text(corpus_ids, steps, switching=True)
    plain, _ = _train_on_text(corpus_ids, steps, switching=False)     # the same LoRA, never switched
    first, last, last_plain = losses[0], sum(losses[-5:]) / 5, sum(plain[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f} (mean of the last 5) in {steps} steps with {switched} "
          f"switches; {last_plain:.3f} without switching")
    assert abs(first - math.log(VOCAB)) < 0.3          # starts near uniform over the vocabulary
    assert last < first - 1.5, losses
    assert switched > 50
    assert abs(last - last_plain) < 0.3                # switching does not derail training


# ----------------------------------------------------------------------------- world size 2
@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("switchlora_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29952", str(WORKER), "--out", str(out), "--steps", "10", "--runs", "ddp", "zero2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"world size 2 job failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return {(run, rank): torch.load(out / f"{run}.rank{rank}.pt", weights_only=False)
            for run in ("ddp", "zero2") for rank in (0, 1)}


def _worker():
    sys.path.insert(0, str(WORKER.parent))
    import switchlora_worker
    return switchlora_worker


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", ["ddp", "zero2"])
def test_ranks_stay_bitwise_identical(world2, run):
    r0, r1 = world2[(run, 0)], world2[(run, 1)]
    assert sum(c["A"] + c["B"] for c in r0["counts"]) > 50
    assert r0["counts"] == r1["counts"]
    assert _same(r0["params"], r1["params"])
    for name in r0["switch"]:
        assert _same(r0["switch"][name], r1["switch"][name])


def test_zero2_matches_ddp_and_single_process(world2, rel_diff):
    ddp, zero2 = world2[("ddp", 0)], world2[("zero2", 0)]
    # ZeRO-2 cut a LoRA factor inside a row (the last piece of rank 0's LoRA partition)
    key, start, stop, shape = zero2["layout"][-1]
    assert stop < shape[0] * shape[1] and stop % shape[1] != 0
    names = list(ddp["params"])
    assert zero2["counts"] == ddp["counts"]
    # fp32, same gradients up to the order of the gradient sums: bitwise here, 1e-6 allowed
    assert rel_diff([zero2["params"][n] for n in names], [ddp["params"][n] for n in names]) < 1e-6
    single = _worker().train("single", 10)
    assert single["counts"] == ddp["counts"]
    assert rel_diff([ddp["params"][n] for n in names], [single["params"][n] for n in names]) < 1e-5


def test_zero2_replayed_single_process_is_bitwise(world2):
    """The gradients ZeRO-2 handed each rank's optimizer, replayed in one process with the same
    switches: equal bitwise, so switching on flat partitions (reset, freeze, write-back of the
    new A and B, a mid-row cut) does exactly what it does on whole parameters."""
    grads = [a + b for a, b in zip(world2[("zero2", 0)]["grads"], world2[("zero2", 1)]["grads"])]
    replay = _worker().train("replay", 10, replay=grads)
    assert _same(replay["params"], world2[("zero2", 0)]["params"])
