"""Memory profiler, report and planner (mlorc_dist.memory, python -m mlorc_dist.plan).

One 2-process launch of tests/dist/memory_worker.py (real DeepSpeed ZeRO-1/2/3 and FSDP2 on
CPU/gloo, the "tiny" Llama, 2 steps per run) writes a MemoryProfiler report per run; the planner,
run here on the meta device, must reproduce every rank's weights / grads / master / optimizer
state bytes exactly, the activations within 25% (they are measured with saved-tensor hooks: the
bytes of every distinct storage autograd saves for backward, parameters excluded, plus the
logits the output holds), and the 2-rank totals. A second launch does the same for the adapter
methods (LoRA at ZeRO-1/2/3 and FSDP2, SwitchLoRA at ZeRO-1/2, fp32 and bf16: frozen base weights,
adapter state, activations exact). A third launch checks step in backward and bf16 parameters
under FSDP2 (the gradients alive at the in-backward steps, measured at their hooks, against the
plan's grads). The rest runs in this process: both adapters single-process, step in backward and
bf16 parameters single-process, activation checkpointing, the planner's MLorc state vs a real
optimizer, the published anchors (APOLLO's LLaMA-7B breakdown, GaLore's Table 1 formula), the
CLI, and the profiler without GPU/NVML.

Set MLORC_MEMORY_100M=1 to also run the ~100M model (world size 2, ~1 min more).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlorc_dist
from mlorc_dist.memory import MemoryProfiler, PlanSettings, plan
from mlorc_dist.memory.activations import ActivationTracker, activation_bytes
from mlorc_dist.memory.planner import (EXACT_CATEGORIES, build_meta_model, format_plan, load_config, peak_line,
                                       plan_for_run, plan_model)
from mlorc_dist.memory.report import reference_sample
from mlorc_dist.models import build_model, llama_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "memory_worker.py"
VOCAB, MICRO, SEQ, RANK = 101, 2, 32, 4
RUNS = ["zero2:mlorc-adamw", "zero2:adamw", "zero3:mlorc-adamw", "zero3:adamw", "fsdp2:mlorc-adamw",
        "fsdp2:adamw", "zero1:mlorc-adamw", "zero2:mlorc-adamw:bf16", "zero3:mlorc-adamw:bf16",
        "fsdp2:mlorc-adamw:bf16", "zero2:mlorc-adamw:fp32:global", "fsdp2:mlorc-adamw:fp32:local:sib"]


def launch(out: Path, runs: list[str], port: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), str(WORKER), "--out", str(out), "--runs", *runs, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory job failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return launch_tiny(tmp_path_factory.mktemp("memory"), RUNS, 29731, VOCAB)


def launch_tiny(out: Path, runs: list[str], port: int, vocab: int) -> Path:
    """memory_worker's runs of the "tiny" Llama with `vocab` tokens, 2 steps; their reports in `out`."""
    launch(out, runs, port, "--model", "tiny", "--vocab", str(vocab), "--micro-batch", str(MICRO),
           "--seq", str(SEQ), "--rank", str(RANK), "--steps", "2")
    return out


# Shapes that make DeepSpeed pad a flat group (the 1-D group: 7 x 42 = 294 elements, not a
# multiple of 2 x world), cut matrices mid-row, and FSDP2 shard unevenly (101 rows); GQA 3:1.
ODD = dict(model_type="llama", vocab_size=VOCAB, hidden_size=42, intermediate_size=61,
           num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
           max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
ODD_RUNS = ["zero2:mlorc-adamw", "zero2:adamw", "zero3:mlorc-adamw", "fsdp2:mlorc-adamw"]


@pytest.fixture(scope="module")
def odd_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_odd")
    (out / "config.json").write_text(json.dumps(ODD))
    launch(out, ODD_RUNS, 29733, "--model", str(out / "config.json"), "--micro-batch", "3",
           "--seq", "20", "--rank", str(RANK), "--steps", "2")
    return out


def settings_for(spec: str, world: int = 2, micro: int = MICRO, seq: int = SEQ) -> PlanSettings:
    """engine:optimizer[:precision[:scope[:sib]]] (memory_worker's runs): precision fp32, bf16
    (mixed precision) or pbf16 (bf16 parameters, no master); sib: step in backward."""
    parts = spec.split(":")
    precision = parts[2] if len(parts) > 2 else "fp32"
    return PlanSettings(engine=parts[0], world_size=world, optimizer=parts[1], rank=RANK,
                        micro_batch=micro, seq=seq, bf16=precision == "bf16",
                        param_dtype="bf16" if precision == "pbf16" else "fp32",
                        scope=parts[3] if len(parts) > 3 else "local",
                        step_in_backward=len(parts) > 4 and parts[4] == "sib")


def load_report(out: Path, spec: str) -> dict:
    return json.loads((out / f"{spec.replace(':', '_')}.json").read_text())


def backward_grads(rank_report: dict) -> list[int]:
    """Step in backward: per backward, the most gradient bytes alive at one of its in-backward
    steps (MemoryProfiler.track_backward_grads)."""
    return [s["grads_in_backward"] for s in rank_report["samples"] if "grads_in_backward" in s]


def check_exact(report: dict, planned) -> None:
    assert [r["rank"] for r in report["ranks"]] == list(range(len(planned.ranks)))
    for r, measured_rank in enumerate(report["ranks"]):
        measured = dict(reference_sample(measured_rank)["tensors"])
        if planned.settings.step_in_backward:     # no step() call: every gradient freed in backward
            assert measured["grads"] == 0 and not any(s["name"] == "step" for s in measured_rank["samples"])
            in_backward = backward_grads(measured_rank)
            assert len(in_backward) == len([s for s in measured_rank["samples"] if s["name"] == "after_backward"])
            assert len(set(in_backward)) == 1, in_backward       # every backward alike
            measured["grads"] = in_backward[0]
        for category in EXACT_CATEGORIES:
            assert measured[category] == planned.ranks[r][category], (
                f"rank {r} {category}: measured {measured[category]}, planned {planned.ranks[r][category]}")


def check_activations(report: dict, planned) -> None:
    for measured_rank in report["ranks"]:
        measured = measured_rank["peaks"]["activations"]
        assert measured > 0
        assert abs(planned.activations["saved"] - measured) <= 0.25 * measured, (
            f"activations: planned {planned.activations['saved']}, measured {measured}")


# --------------------------------------------------------------------------- real 2-process jobs
@pytest.mark.parametrize("spec", RUNS)
def test_planner_equals_measured_tensor_bytes(reports, spec):
    planned = plan("tiny", settings_for(spec), vocab_size=VOCAB)
    report = load_report(reports, spec)
    check_exact(report, planned)
    check_activations(report, planned)
    if spec.startswith("zero3"):        # gradient partition buffer + reduce bucket, exactly
        for r, rank_report in enumerate(report["ranks"]):
            assert reference_sample(rank_report)["tensors"]["engine_buffers"] == planned.ranks[r]["engine_buffers"]
    if spec.startswith(("zero1", "zero2")):   # model-dtype gradients kept from backward to step
        for r, rank_report in enumerate(report["ranks"]):
            after_backward = [s for s in rank_report["samples"] if s["name"] == "after_backward"][-1]
            assert after_backward["tensors"]["grad_staging"] == planned.ranks[r]["staging"]


@pytest.mark.parametrize("spec", ODD_RUNS)
def test_planner_equals_measured_on_odd_shapes(odd_reports, spec):
    """Padding of ZeRO-1/2 flat groups, mid-row cuts, uneven FSDP2 shards, an HF config JSON."""
    planned = plan(str(odd_reports / "config.json"), settings_for(spec, micro=3, seq=20))
    report = load_report(odd_reports, spec)
    check_exact(report, planned)
    check_activations(report, planned)
    if spec == "zero2:mlorc-adamw":
        assert planned.total("master") // 4 > planned.n_params      # the flat groups are padded
        assert planned.ranks[0]["state_factors"] != planned.ranks[1]["state_factors"]


def test_activation_estimate_is_exact_on_these_runs(reports):
    """Stronger than the 25% the issue asks for: the itemised formula is exact here (fp32, bf16)."""
    for spec in ("zero2:mlorc-adamw", "fsdp2:mlorc-adamw:bf16", "zero3:adamw"):
        planned = plan("tiny", settings_for(spec), vocab_size=VOCAB)
        for rank_report in load_report(reports, spec)["ranks"]:
            assert rank_report["peaks"]["activations"] == planned.activations["saved"]


@pytest.mark.parametrize("spec", ["zero2:mlorc-adamw", "zero3:mlorc-adamw", "fsdp2:mlorc-adamw"])
def test_report_has_both_ranks_and_totals_match_the_plan(reports, spec):
    report = load_report(reports, spec)
    planned = plan("tiny", settings_for(spec), vocab_size=VOCAB)
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    for rank_report in report["ranks"]:
        names = [s["name"] for s in rank_report["samples"]]
        assert names.count("step") == 2 and names.count("after_step") == 2
        assert rank_report["peaks"]["rss_peak"] > 0
        assert any("NVML" in n or "CUDA" in n for n in rank_report["notes"])   # said, not hidden
    for category in EXACT_CATEGORIES:
        assert report["totals"][category] == planned.total(category), category
    # the state differs by rank (uneven FSDP2 shards / ZeRO cuts), so the totals are a real sum
    table = (reports / f"{spec.replace(':', '_')}.txt").read_text().splitlines()
    assert table[1].split()[0] == "0" and table[2].split()[0] == "1"
    assert (reports / f"{spec.replace(':', '_')}.png").read_bytes()[:4] == b"\x89PNG"


# Adapters: LoRA on every engine, SwitchLoRA at ZeRO-1/2 (it refuses ZeRO-3 and FSDP2). A vocabulary
# of 1601 makes the frozen embedding and lm_head (1601 x 64 = 102,464 elements) larger than ZeRO-3's
# persistence threshold (partitioned, not kept whole, while the frozen layer weights stay whole)
# and shards them unevenly under FSDP2 (801 / 800 rows).
ADAPTER_VOCAB = 1601
ADAPTER_RUNS = ["zero3:lora", "zero2:lora", "zero1:lora", "fsdp2:lora", "zero2:switchlora", "zero1:switchlora",
                "zero3:lora:bf16", "zero2:lora:bf16", "fsdp2:lora:bf16", "zero2:switchlora:bf16"]


@pytest.fixture(scope="module")
def adapter_reports(tmp_path_factory):
    return launch_tiny(tmp_path_factory.mktemp("memory_adapters"), ADAPTER_RUNS, 29734, ADAPTER_VOCAB)


@pytest.mark.parametrize("spec", ADAPTER_RUNS)
def test_planner_equals_measured_with_adapters(adapter_reports, spec):
    """Frozen base weights (whole under ZeRO-1/2, partitioned under ZeRO-3 and FSDP2), adapter
    grads / master / state, engine buffers, grad staging and activations, all exact."""
    planned = plan("tiny", settings_for(spec), vocab_size=ADAPTER_VOCAB)
    report = load_report(adapter_reports, spec)
    check_exact(report, planned)
    for r, rank_report in enumerate(report["ranks"]):
        assert rank_report["peaks"]["activations"] == planned.activations["saved"]
        assert reference_sample(rank_report)["tensors"]["engine_buffers"] == planned.ranks[r]["engine_buffers"]
        if spec.startswith(("zero1", "zero2")):
            after_backward = [s for s in rank_report["samples"] if s["name"] == "after_backward"][-1]
            assert after_backward["tensors"]["grad_staging"] == planned.ranks[r]["staging"]
    named = list(build_meta_model(llama_config("tiny", ADAPTER_VOCAB)).named_parameters())
    base = sum(p.numel() for _, p in named)
    model_bytes = 2 if ":bf16" in spec and not spec.startswith("fsdp2") else 4   # FSDP2 shards stay fp32
    frozen = planned.ranks[0]["frozen_weights"]
    if spec.startswith(("zero1", "zero2")):       # whole on every rank
        projections = sum(p.numel() for name, p in named if name.endswith("_proj.weight"))
        assert frozen == (base if spec.split(":")[1] == "lora" else projections) * model_bytes
    else:                                         # partitioned: about half (ZeRO-3 also keeps small ones whole)
        assert 0.5 * base * model_bytes <= frozen <= 0.75 * base * model_bytes
    if spec.split(":")[1] == "lora":              # gradients of the adapters only
        assert planned.ranks[0]["grads"] < 0.1 * frozen


# Step in backward and bf16 parameters under FSDP2. With a vocabulary of 1601 the output unit
# (lm_head, 801 / 800 rows, and the final norm) holds the largest sharded gradients; RUNS has the
# vocabulary-101 case, where a decoder layer does. sib: mlorc_dist.step_in_backward.
BACKWARD_RUNS = ["fsdp2:mlorc-adamw:pbf16", "fsdp2:mlorc-adamw:pbf16:local:sib", "fsdp2:mlorc-adamw:fp32:local:sib",
                 "fsdp2:mlorc-adamw:bf16:local:sib"]


@pytest.fixture(scope="module")
def backward_reports(tmp_path_factory):
    return launch_tiny(tmp_path_factory.mktemp("memory_backward"), BACKWARD_RUNS, 29696, ADAPTER_VOCAB)


def _unit_shard_bytes(config, world: int, nbytes: int) -> dict:
    """Independently of the planner: per FSDP unit (decoder layer i, "embeddings", "output": the
    lm_head with the final norm), the padded rows of its parameters' shards on one rank
    (ceil(rows / world) rows each), in bytes."""
    units: dict = {}
    for name, p in build_meta_model(config).named_parameters():
        unit = (int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else
                "embeddings" if "embed_tokens" in name else "output")
        rows = -(-p.shape[0] // world)
        units[unit] = units.get(unit, 0) + rows * (p.numel() // p.shape[0]) * nbytes
    return units


@pytest.mark.parametrize("spec", BACKWARD_RUNS)
def test_planner_equals_measured_step_in_backward_and_bf16_params(backward_reports, reports, spec):
    """bf16 parameters: bf16 shards and grads, no master, fp32 MLorc state; step in backward:
    the gradients alive at any in-backward step are one FSDP unit's reduce-scatter output (its
    padded sharded grads view it), measured at the hooks, equal to the plan's grads."""
    config = llama_config("tiny", ADAPTER_VOCAB)
    planned = plan("tiny", settings_for(spec), vocab_size=ADAPTER_VOCAB)
    report = load_report(backward_reports, spec)
    check_exact(report, planned)
    for rank_report in report["ranks"]:
        assert rank_report["peaks"]["activations"] == planned.activations["saved"]
    nbytes = 2 if ":pbf16" in spec else 4
    units = _unit_shard_bytes(config, 2, nbytes)
    assert planned.ranks[0]["weights"] == sum(units.values())
    assert planned.ranks[0]["master"] == 0
    if spec.endswith(":sib"):
        assert planned.ranks[0]["grads"] == max(units.values()) == units["output"]
        whole = plan("tiny", settings_for(spec.rsplit(":", 2)[0]), vocab_size=ADAPTER_VOCAB)
        assert planned.ranks[0]["grads"] < whole.ranks[0]["grads"]
        for category in ("weights", "state_factors", "state_dense"):
            assert planned.ranks[0][category] == whole.ranks[0][category]
    # RUNS' vocabulary-101 step in backward: there a decoder layer's unit is the largest
    small = plan("tiny", settings_for("fsdp2:mlorc-adamw:fp32:local:sib"), vocab_size=VOCAB)
    small_units = _unit_shard_bytes(llama_config("tiny", VOCAB), 2, 4)
    assert small.ranks[0]["grads"] == max(small_units.values()) == small_units[0] > small_units["output"]
    assert backward_grads(load_report(reports, "fsdp2:mlorc-adamw:fp32:local:sib")["ranks"][0])[0] == small_units[0]


def profiled_forward_backward(prof, model, ids) -> None:
    """One forward (its logits held as activations) and backward, sampled after each."""
    with prof.track_activations() as acts:
        out = model(input_ids=ids, labels=ids)
        acts.hold(out.logits)
    prof.sample("after_forward")
    out.loss.backward()
    del out
    prof.sample("after_backward")


@pytest.mark.parametrize("vocab,param_dtype,checkpointing", [(VOCAB, "fp32", False), (ADAPTER_VOCAB, "bf16", True),
                                                             (VOCAB, "bf16", False)])
def test_step_in_backward_and_bf16_params_single_process(vocab, param_dtype, checkpointing):
    """One process, as launch/train.py --step-in-backward [--param-dtype bf16] builds it: every
    exact category against the profiler's tensors; the gradients alive at the in-backward steps
    (measured at the hooks) are the largest single parameter's, which the plan counts."""
    dtype = torch.bfloat16 if param_dtype == "bf16" else torch.float32
    config = llama_config("tiny", vocab)
    model = build_model(config, seed=0, dtype=dtype)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = mlorc_dist.MLorcAdamW(mlorc_dist.param_groups(model), lr=1e-3, rank=RANK)
    prof = MemoryProfiler("single", model, optimizer, "cpu")
    prof.track_backward_grads()
    handle = mlorc_dist.step_in_backward(optimizer, model)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, vocab, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        profiled_forward_backward(prof, model, ids)
    handle.remove()
    prof.close()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))     # stepped in backward
    planned = plan_model(build_meta_model(config), config,
                         PlanSettings(engine="single", optimizer="mlorc-adamw", rank=RANK, micro_batch=MICRO,
                                      seq=SEQ, activation_checkpointing=checkpointing, step_in_backward=True,
                                      param_dtype=param_dtype), "tiny")
    report = prof.to_dict()
    check_exact({"ranks": [report]}, planned)
    assert report["peaks"]["activations"] == planned.activations["saved"]
    largest = max(p.numel() for p in model.parameters())
    assert planned.ranks[0]["grads"] == largest * dtype.itemsize
    assert planned.ranks[0]["weights"] == sum(p.numel() for p in model.parameters()) * dtype.itemsize
    # fp32 factors and dense state whatever the parameters' dtype
    assert all(t.dtype == torch.float32 for st in optimizer.state.values() for t in _tensors(st) if t.dim())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_step_in_backward_and_bf16_params_plans_and_refusals():
    """The peak counts the in-backward step's workspace in forward/backward; each option is
    refused where a run refuses it; plan_for_run and the CLI pass both through."""
    config = llama_config("tiny", VOCAB)
    base = dict(engine="fsdp2", world_size=2, optimizer="mlorc-adamw", rank=RANK, micro_batch=MICRO, seq=SEQ)
    plain = plan("tiny", PlanSettings(**base), vocab_size=VOCAB)
    sib = plan("tiny", PlanSettings(**base, step_in_backward=True), vocab_size=VOCAB)
    step_ws = [v for k, v in sib.transients.items() if k.startswith("step workspace")][0]
    fwd = {k: v for k, v in sib.transients.items() if not k.startswith("step workspace")}
    assert "in backward" in [k for k in sib.transients if k.startswith("step workspace")][0]
    assert sib.peak["forward_backward"] == (sib.peak["persistent"] + sib.activations["peak"] + sib.ranks[0]["grads"]
                                            + sum(fwd.values()) + step_ws)
    assert sib.peak["persistent"] == plain.peak["persistent"]
    for bad in (dict(base, engine="zero2"), dict(base, optimizer="adamw"), dict(base, scope="global")):
        with pytest.raises(ValueError, match="step in backward needs"):
            PlanSettings(**bad, step_in_backward=True).validate()
    for bad in (dict(base, engine="zero3"), dict(base, optimizer="mofasgd"), dict(base, bf16=True)):
        with pytest.raises(ValueError, match="param_dtype bf16"):
            PlanSettings(**bad, param_dtype="bf16").validate()
    run = plan_for_run(config, engine="fsdp2", world_size=2, optimizer="mlorc-adamw", rank=RANK, micro_batch=MICRO,
                       seq=SEQ, step_in_backward=True, param_dtype="bf16")
    same = plan("tiny", settings_for("fsdp2:mlorc-adamw:pbf16:local:sib"), vocab_size=VOCAB)
    assert run.ranks == same.ranks and run.peak == same.peak
    from mlorc_dist.memory.planner import main
    cli = main(["--model", "tiny", "--vocab-size", str(VOCAB), "--engine", "fsdp2", "--world-size", "2",
                "--rank", str(RANK), "--micro-batch", str(MICRO), "--seq", str(SEQ), "--step-in-backward",
                "--param-dtype", "bf16"])
    assert cli.ranks == same.ranks and cli.peak == same.peak
    # launch/train.py --dry-run plans the run with both flags
    env = dict(os.environ, OMP_NUM_THREADS="1")
    dry = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--fsdp", "--model", "tiny",
                          "--vocab-size", str(VOCAB), "--world-size", "2", "--global-batch", str(2 * MICRO),
                          "--micro-batch", str(MICRO), "--seq-len", str(SEQ), "--rank", str(RANK), "--clip-grad", "0",
                          "--step-in-backward", "--param-dtype", "bf16", "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout[dry.stdout.index("{"):])
    assert summary["plan"]["per_gpu_peak"] == peak_line(same)


def test_step_in_backward_grads_at_scale():
    """LLaMA-2 70B, FSDP2 on 8: the gradients alive in backward are the largest unit's padded
    shard (a decoder layer's, in bf16), not the whole shard."""
    config = load_config("llama-70b")
    settings = PlanSettings(engine="fsdp2", world_size=8, optimizer="mlorc-adamw", micro_batch=1, seq=4096,
                            activation_checkpointing=True, step_in_backward=True, param_dtype="bf16")
    planned = plan_model(build_meta_model(config), config, settings, "llama-70b")
    h, f, kv = 8192, 28672, 1024
    layer = 2 * h * h + 2 * kv * h + 3 * h * f + 2 * h
    assert planned.ranks[0]["grads"] == 2 * layer // 8
    assert planned.ranks[0]["weights"] == 2 * planned.n_params // 8      # every dimension 0 divides by 8
    assert planned.ranks[0]["master"] == 0


@pytest.mark.skipif(os.environ.get("MLORC_MEMORY_100M") != "1", reason="set MLORC_MEMORY_100M=1 (~1 min)")
def test_100m_model_world_size_2(tmp_path):
    runs = ["zero2:mlorc-adamw", "zero3:mlorc-adamw", "fsdp2:mlorc-adamw"]
    launch(tmp_path, runs, 29732, "--model", "100m", "--vocab", "2048", "--micro-batch", "1",
           "--seq", "64", "--rank", str(RANK), "--steps", "2")
    for spec in runs:
        planned = plan("100m", settings_for(spec, micro=1, seq=64), vocab_size=2048)
        report = load_report(tmp_path, spec)
        check_exact(report, planned)
        check_activations(report, planned)


# --------------------------------------------------------------------------- single process
@pytest.mark.parametrize("dtype,checkpointing", [(torch.float32, True), (torch.bfloat16, True),
                                                 (torch.float32, False)])
def test_activation_estimate_single_process(dtype, checkpointing):
    config = llama_config("tiny", VOCAB)
    model = build_model(config, seed=0, dtype=dtype)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with ActivationTracker(model.parameters()) as acts:
        out = model(input_ids=ids, labels=ids)
        acts.hold(out.logits)
    out.loss.backward()
    saved, peak = activation_bytes(config, 3, 24, 2 if dtype == torch.bfloat16 else 4, checkpointing)
    assert abs(saved - acts.bytes) <= 0.25 * acts.bytes
    assert saved == acts.bytes          # exact with transformers 5.x; the bound above is the contract
    assert peak > saved


@pytest.mark.parametrize("scope", ["local", "global"])
def test_planned_mlorc_state_equals_a_real_optimizer(scope):
    """The planner's meta-device path vs MLorcAdamW.state_bytes() after a real step."""
    config = llama_config("tiny", VOCAB)
    model = build_model(config, seed=0)
    optimizer = mlorc_dist.MLorcAdamW(mlorc_dist.param_groups(model), rank=RANK, scope=scope)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    planned = plan_model(build_meta_model(config), config,
                         PlanSettings(engine="single", optimizer="mlorc-adamw", rank=RANK, scope=scope), "tiny")
    row = planned.ranks[0]
    assert row["state_factors"] + row["state_dense"] + row["state_scalars"] == optimizer.state_bytes()
    assert row["weights"] == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("lora", True), ("switchlora", False),
                                                  ("switchlora", True)])
def test_adapters_single_process(method, checkpointing):
    """One process, the adapters as launch/train.py builds them (methods.prepare_model and
    build_optimizer): every exact category and the activations against the profiler's tensors."""
    from mlorc_dist.methods import build_optimizer, prepare_model
    from mlorc_dist.switchlora import switchlora_summary
    config = llama_config("tiny", VOCAB)
    model = build_model(config, seed=0)
    if checkpointing:
        model.activation_checkpointing_enable()
    model = prepare_model(method, model, rank=RANK)
    model.train()
    optimizer = build_optimizer(method, model, lr=1e-3, rank=RANK)
    prof = MemoryProfiler("single", model, optimizer, "cpu")
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        profiled_forward_backward(prof, model, ids)
        optimizer.step()
        optimizer.zero_grad()
        prof.sample("after_step")
    prof.close()
    report = prof.to_dict()
    planned = plan_model(build_meta_model(config), config,
                         PlanSettings(engine="single", optimizer=method, rank=RANK, micro_batch=MICRO, seq=SEQ,
                                      activation_checkpointing=checkpointing), "tiny")
    measured = reference_sample(report)["tensors"]
    for category in EXACT_CATEGORIES:
        assert measured[category] == planned.ranks[0][category], category
    assert report["peaks"]["activations"] == planned.activations["saved"]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert planned.ranks[0]["frozen_weights"] == 4 * frozen
    if method == "switchlora":        # pools and slot indices: host memory, not in the GPU peak
        summary = switchlora_summary(model)
        host = planned.host["SwitchLoRA candidate pools + slot indices"]
        assert host == 4 * summary["pool_numbers"] + 3 * 8 * RANK * summary["layers"]
        assert "host memory per process" in peak_line(planned)
    else:
        assert planned.host == {}


def test_adapter_plans_at_scale_and_refusals():
    """LLaMA-2 7B with peft LoRA r=8 on the seven projections: 19,988,480 adapter parameters;
    the frozen base is whole per rank at ZeRO-2, an eighth at ZeRO-3 / FSDP2. SwitchLoRA
    refuses the sharding engines as a run does. plan_model leaves the caller's model alone."""
    config = load_config("llama-7b")
    meta = build_meta_model(config)
    n = 6_738_415_616
    plans = {engine: plan_model(meta, config, PlanSettings(engine=engine, world_size=8, optimizer="lora", rank=8,
                                                          bf16=True), "llama-7b")
             for engine in ("zero2", "zero3", "fsdp2")}
    assert all(p.n_params == n + 19_988_480 for p in plans.values())
    assert sum(p.numel() for p in meta.parameters()) == n and all(p.requires_grad for p in meta.parameters())
    assert plans["zero2"].ranks[0]["frozen_weights"] == 2 * n
    assert abs(plans["zero3"].ranks[0]["frozen_weights"] - 2 * n / 8) < 1e-3 * n
    assert abs(plans["fsdp2"].ranks[0]["frozen_weights"] - 4 * n / 8) < 1e-3 * n
    for p in plans.values():        # 2 fp32 moments per adapter element, an eighth each
        assert abs(p.ranks[0]["state_dense"] - 8 * 19_988_480 / 8) < 8 * 64 * 8
        assert p.ranks[0]["state_factors"] == 0
    for engine in ("zero3", "fsdp2"):
        with pytest.raises(ValueError, match="SwitchLoRA needs whole W, A and B"):
            plan("tiny", PlanSettings(engine=engine, world_size=2, optimizer="switchlora"), vocab_size=VOCAB)


def test_plan_for_run_and_peak_line():
    config = llama_config("tiny", VOCAB)
    for spec in ("zero2:lora", "zero2:switchlora", "fsdp2:mlorc-adamw", "zero3:adamw"):
        engine, optimizer = spec.split(":")
        p = plan_for_run(config, engine=engine, world_size=2, optimizer=optimizer, rank=RANK, micro_batch=MICRO,
                         seq=SEQ, bf16=False, activation_checkpointing=False, scope="local", fused=False,
                         compress_embeddings=False)
        same = plan("tiny", settings_for(spec), vocab_size=VOCAB)
        assert p.ranks == same.ranks and p.peak == same.peak and p.host == same.host
        line = peak_line(p)
        assert line.startswith(f"per-GPU peak {p.peak['peak'] / 1e9:.2f} GB (worst rank; fits: "
                               "24/40/80/141 GB: yes/yes/yes/yes)")
        assert line in format_plan(p)
    big = plan_for_run(load_config("llama-7b"), engine="single", world_size=1, optimizer="adamw", rank=4,
                       micro_batch=1, seq=4096, bf16=True, activation_checkpointing=False, scope="local",
                       fused=False, compress_embeddings=False)
    assert "fits: 24/40/80/141 GB: no/no/" in peak_line(big)
    with pytest.raises(ValueError, match="SwitchLoRA needs whole W, A and B"):
        plan_for_run(config, engine="fsdp2", world_size=2, optimizer="switchlora", rank=RANK, micro_batch=1,
                     seq=8, bf16=False, activation_checkpointing=False, scope="local", fused=False,
                     compress_embeddings=False)


def test_apollo_anchor_llama7b_adamw():
    """APOLLO (Zhu et al. 2024) LLaMA-7B, pure bf16 AdamW: ~13.5 GB weights, ~27 GB Adam state."""
    planned = plan("llama-7b", PlanSettings(engine="single", optimizer="adamw", bf16=True, seq=2048))
    row = planned.ranks[0]
    assert planned.n_params == 6_738_415_616                 # LLaMA-2 7B
    assert abs(row["weights"] / 1e9 - 13.5) < 0.05
    assert abs(row["grads"] / 1e9 - 13.5) < 0.05
    assert abs((row["state_dense"] + row["state_scalars"]) / 1e9 - 27.0) < 0.1
    assert row["state_dense"] == 2 * 2 * planned.n_params
    # the same model under MLorc r=4: the state is the dense embeddings/1-D + factors
    mlorc = plan("llama-7b", PlanSettings(engine="single", optimizer="mlorc-adamw", bf16=True, rank=4))
    m = mlorc.ranks[0]
    assert m["state_factors"] + m["state_dense"] < 0.1 * (row["state_dense"])


def test_galore_formula_llama7b():
    """GaLore (Zhao et al. 2024, Table 1): m r + 2 n r per projected m x n matrix (m <= n)."""
    r = 128
    planned = plan("llama-7b", PlanSettings(engine="single", optimizer="galore", rank=r, bf16=True))
    h, f, layers, vocab = 4096, 11008, 32, 32000
    per_layer = 4 * (h * r + 2 * h * r) + 3 * (h * r + 2 * f * r)   # q,k,v,o square; gate/up/down 4096 x 11008
    assert planned.ranks[0]["state_factors"] == 2 * layers * per_layer     # bf16
    dense = 2 * vocab * h + (2 * layers + 1) * h                            # embeddings, lm_head, norms
    assert planned.ranks[0]["state_dense"] == 2 * 2 * dense


def test_engines_shard_the_state(tmp_path):
    """Sanity of the partition rules at scale: per-GPU bytes shrink with world size as expected."""
    config = load_config("llama-7b")
    meta = build_meta_model(config)
    n = sum(p.numel() for p in meta.parameters())
    for engine in ("zero2", "zero3", "fsdp2"):
        row = plan_model(meta, config, PlanSettings(engine=engine, world_size=8, optimizer="adamw", bf16=True),
                         "llama-7b").ranks[0]
        assert abs(row["state_dense"] - 8 * n / 8) < 8 * 8 * 1e6                  # 2 fp32 moments / 8
        expected_weights = {"zero2": 2 * n, "zero3": 2 * n / 8, "fsdp2": 4 * n / 8}[engine]
        assert abs(row["weights"] - expected_weights) < 1e-3 * expected_weights


def test_cli_with_hf_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    llama_config("tiny", VOCAB).to_json_file(path)
    from mlorc_dist.memory.planner import main
    result = main(["--model", str(path), "--engine", "fsdp2", "--world-size", "2", "--optimizer",
                   "mlorc-adamw", "--rank", "4", "--micro-batch", "2", "--seq", "32", "--json",
                   str(tmp_path / "plan.json"), "-v"])
    text = capsys.readouterr().out
    assert "PEAK" in text and "fits on: 24GB yes" in text and "assumptions:" in text
    same = plan("tiny", settings_for("fsdp2:mlorc-adamw"), vocab_size=VOCAB)
    assert result.ranks == same.ranks
    assert json.loads((tmp_path / "plan.json").read_text())["ranks"] == same.ranks
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mlorc_dist.plan", "--model", "llama-70b", "--engine",
                          "zero3", "--world-size", "64", "--optimizer", "adamw", "--bf16", "--seq", "4096"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "llama-70b" in out.stdout and "fits on:" in out.stdout
    # the adapter methods; --lora-rank is --rank
    lora = main(["--model", str(path), "--engine", "zero2", "--world-size", "2", "--optimizer", "lora",
                 "--lora-rank", "4", "--micro-batch", "2", "--seq", "32"])
    text = capsys.readouterr().out
    assert lora.ranks == plan("tiny", settings_for("zero2:lora"), vocab_size=VOCAB).ranks
    assert "weights (frozen base" in text and "per-GPU peak" in text
    switch = main(["--model", str(path), "--engine", "single", "--optimizer", "switchlora", "--rank", "4",
                   "--micro-batch", "2", "--seq", "32"])
    assert switch.host and "SwitchLoRA candidate pools" in capsys.readouterr().out


def test_profiler_without_gpu_or_nvml(tmp_path, monkeypatch):
    import pynvml

    from mlorc_dist.memory import profiler as prof_module
    monkeypatch.setitem(prof_module._NVML, "state", None)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(RuntimeError("no NVML here")))
    assert prof_module.nvml_memory(0) is None
    model = build_model(llama_config("tiny", VOCAB), seed=0)
    optimizer = torch.optim.AdamW(mlorc_dist.param_groups(model), lr=1e-3)
    prof = MemoryProfiler("single", model, optimizer, "cpu")
    ids = torch.randint(0, VOCAB, (2, 8))
    profiled_forward_backward(prof, model, ids)
    optimizer.step()
    prof.sample("after_step")
    report = prof.gather_and_write(tmp_path / "m.json", tmp_path / "m.png")
    assert [s["name"] for s in report["ranks"][0]["samples"]] == ["after_forward", "after_backward",
                                                                   "step", "after_step"]
    notes = " ".join(report["ranks"][0]["notes"])
    assert "no CUDA device" in notes
    n = sum(p.numel() for p in model.parameters())
    tensors = reference_sample(report["ranks"][0])["tensors"]
    assert tensors["weights"] == tensors["grads"] == 4 * n
    assert tensors["state_dense"] == 8 * n
    assert report["ranks"][0]["peaks"]["activations"] == activation_bytes(model.config, 2, 8, 4)[0]
    assert (tmp_path / "m.png").exists() and (tmp_path / "m.txt").exists()
    prof.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lowrank,count", [(True, 1), (True, 4), (False, 1)])
def test_step_workspace_is_within_the_planned_bound(dtype, lowrank, count):
    """Re-measure one MLorc-AdamW step()'s extra memory on the reference path (torch.profiler
    memory timeline; the fused step's: test_fused_step_workspace_is_within_the_planned_bound); a
    heavier step than the planner assumes must fail here, not make the plan lie."""
    from mlorc_dist.memory.planner import MLORC_STEP_WORKSPACE
    from mlorc_dist.memory.workspace import measure_step_workspace
    measured = measure_step_workspace(
        lambda ps: mlorc_dist.MLorcAdamW([{"params": ps, "lowrank": lowrank}], rank=4, fused=False), 512, 256,
        dtype, count=count)
    ws = MLORC_STEP_WORKSPACE[2 if dtype == torch.bfloat16 else 4]
    if not lowrank:
        bound = ws["dense"]
    else:
        bound = ws["unbatched"] if count == 1 else ws["batch"] * count + ws["block"]
    assert 0.9 * bound < measured <= bound + 0.01, f"measured {measured:.4f}x, planned {bound}x"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mofasgd_step_workspace_is_within_the_planned_bound(dtype):
    from mlorc_dist.memory.planner import MOFASGD_STEP_WORKSPACE
    from mlorc_dist.memory.workspace import measure_step_workspace
    measured = measure_step_workspace(lambda ps: mlorc_dist.MoFaSGD(ps, lr=1e-2, rank=4), 512, 256, dtype)
    bound = MOFASGD_STEP_WORKSPACE[2 if dtype == torch.bfloat16 else 4]["unbatched"]
    assert measured <= bound, f"measured {measured:.4f}x, planned {bound}x"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 4])
def test_switchlora_step_workspace_is_within_the_planned_bound(dtype, count):
    """SwitchLoRAAdamW's per-element AdamW works one piece at a time: its workspace is a
    multiple of the largest piece, whatever the number of tensors."""
    from mlorc_dist.memory.planner import SWITCHLORA_STEP_WORKSPACE
    from mlorc_dist.memory.workspace import measure_step_workspace
    from mlorc_dist.switchlora import SwitchLoRAAdamW
    measured = measure_step_workspace(lambda ps: SwitchLoRAAdamW([{"params": ps, "lowrank": False}], lr=1e-3),
                                      512, 256, dtype, count=count)
    bound = SWITCHLORA_STEP_WORKSPACE[2 if dtype == torch.bfloat16 else 4]["dense"]
    assert 0.9 * bound < measured <= bound + 0.01, f"measured {measured:.4f}x, planned {bound}x"


def _meta_blocks(shapes) -> torch.nn.Module:
    """A module holding exactly these matrices, on the meta device (for plan_model)."""
    module = torch.nn.Module()
    module.blocks = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes])
    return module


def test_step_workspace_of_consecutive_batches_matches_the_plan():
    """Two shapes, four and two blocks: the planner's batch model (one batch alive at a time:
    the optimizer frees each before building the next) against the measured step, via the
    planner itself on a model with exactly those matrices."""
    from mlorc_dist.memory.workspace import measure_step_workspace_bytes
    shapes = [(96, 64)] * 4 + [(160, 64)] * 2
    measured = measure_step_workspace_bytes(
        lambda ps: mlorc_dist.MLorcAdamW([{"params": ps, "lowrank": True}], rank=4, fused=False), shapes)
    config = llama_config("tiny", VOCAB)
    planned = plan_model(_meta_blocks(shapes), config, PlanSettings(engine="single", optimizer="mlorc-adamw",
                                                                    rank=4), "blocks")
    ws = [v for k, v in planned.transients.items() if k.startswith("step workspace")][0]
    from mlorc_dist.memory.planner import MLORC_STEP_WORKSPACE
    block = MLORC_STEP_WORKSPACE[4]["block"]
    assert ws == 4 * max(2 * 4 * 96 * 64 + block * 96 * 64, 2 * 2 * 160 * 64 + block * 160 * 64)
    assert 0.97 * ws <= measured <= 1.03 * ws, (measured, ws)


FUSED_SHAPES = [(256, 256)] * 66 + [(96, 64)] * 6 + [(600, 512)] * 2 + [(200, 300)]


def _fused_groups():
    counts: dict = {}
    for shape in FUSED_SHAPES:
        counts[shape] = counts.get(shape, 0) + 1
    return [(count, rows * cols) for (rows, cols), count in counts.items()]


@pytest.mark.parametrize("cls", [mlorc_dist.MLorcAdamW, mlorc_dist.MLorcLion])
def test_fused_kept_buffers_follow_the_rule_the_planner_uses(cls):
    """The buffers a fused optimizer keeps between steps (V and the stacked gradients) are what
    optim.base.fused_kept_elements says, here with the CPU rule: 66 bodies of 256^2 make batches
    of 64 and 2 (2^22 elements a batch), the 600 x 512 bodies go alone (above 2^18 elements)."""
    from mlorc_dist.optim.base import fused_kept_elements
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in FUSED_SHAPES]
    opt = cls(params, rank=4, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()
    kept = {name: buffer.numel() for (name, _, _), buffer in opt._workspaces.items()}
    want = fused_kept_elements(_fused_groups(), "cpu", cls.fused_buffers)
    assert want["gradient"] == 64 * 256 * 256
    assert want["moment"] == (64 * 256 * 256 if cls.fused_buffers else 0)
    assert kept == {name: n for name, n in want.items() if n}


def test_the_planner_counts_the_fused_buffers_as_persistent():
    """With the GPU rule all 66 bodies of 256^2 make one batch, and the 600 x 512 pair another;
    a GPU keeps the batch's stacked weights too (fp32 here). fused=None plans the reference path
    (what it picks on a GPU)."""
    from mlorc_dist.optim.base import fused_kept_elements
    config = llama_config("tiny", VOCAB)
    settings = {fused: PlanSettings(engine="single", optimizer="mlorc-adamw", rank=4, fused=fused)
                for fused in (False, True)}
    plans = {fused: plan_model(_meta_blocks(FUSED_SHAPES), config, settings[fused], "blocks")
             for fused in (False, True)}
    kept = fused_kept_elements(_fused_groups(), "cuda", 1)
    assert kept == {"moment": 66 * 256 * 256, "gradient": 66 * 256 * 256, "weight": 66 * 256 * 256}
    assert "weight" not in fused_kept_elements(_fused_groups(), "cpu", 1)
    default = PlanSettings(engine="single", optimizer="mlorc-adamw", rank=4)
    default.validate()
    assert default.fused is False
    assert plans[True].ranks[0]["fused_buffers"] == 4 * sum(kept.values())
    assert "fused_buffers" not in plans[False].ranks[0]
    assert plans[True].peak["persistent"] - plans[False].peak["persistent"] == 4 * sum(kept.values())
    with pytest.raises(ValueError, match="fused applies to mlorc-adamw and mlorc-lion in local scope"):
        PlanSettings(optimizer="mofasgd", fused=True).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [mlorc_dist.MLorcAdamW, mlorc_dist.MLorcLion])
@pytest.mark.parametrize("count,shape", [(1, (512, 256)), (4, (512, 256)), (4, (256, 128))])
def test_fused_step_workspace_is_within_the_planned_bound(dtype, cls, count, shape):
    """What a fused step() allocates on top of what it holds and keeps (its kept buffers exist
    after the warm-up steps), against planner.FUSED_STEP_WORKSPACE."""
    from mlorc_dist.memory.planner import FUSED_STEP_WORKSPACE
    from mlorc_dist.memory.workspace import measure_step_workspace
    measured = measure_step_workspace(lambda ps: cls(ps, rank=4, fused=True), *shape, dtype=dtype, count=count)
    ws = FUSED_STEP_WORKSPACE[2 if dtype == torch.bfloat16 else 4]
    bound = ws["unbatched"] if count == 1 else ws["batch"] * count + ws["block"]
    assert measured <= bound, f"measured {measured:.4f}x, planned {bound}x"
