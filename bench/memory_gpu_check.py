"""Planner vs a real GPU (single process, one CUDA device): exact tensor categories, activations,
and the planner's peak estimate vs torch.cuda.max_memory_allocated, plus NVML through the
profiler.

    python bench/memory_gpu_check.py --out gpu_memory.json [--cases small 7b]

Cases: "workspace" = one MLorc-AdamW step()'s extra memory for 1-8 same-shaped 2048x1024
blocks (fp32, bf16; batched, unbatched, global, dense), in fp32 copies of one block; "small" = the 100m shape (vocab 32000) in fp32 and pure bf16, AdamW and MLorc-AdamW r=4,
micro-batch 2 x 1024 tokens; "7b" = LLaMA-2 7B, pure bf16 (APOLLO's setting), AdamW and
MLorc-AdamW r=4, micro-batch 1 x 4096 tokens with activation checkpointing. Two steps each; the
numbers are those of the second step. torch AdamW runs with its CUDA default (foreach).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mlorc_dist  # noqa: E402
from mlorc_dist.memory import MemoryProfiler  # noqa: E402
from mlorc_dist.memory.planner import (EXACT_CATEGORIES, PlanSettings, build_meta_model,  # noqa: E402
                                       load_config, plan_model)
from mlorc_dist.memory.report import reference_sample  # noqa: E402


def run_case(shape, vocab, optimizer, bf16, micro, seq, ckpt):
    from transformers import AutoModelForCausalLM
    config = load_config(shape, vocab)
    settings = PlanSettings(engine="single", world_size=1, optimizer=optimizer, rank=4, micro_batch=micro,
                            seq=seq, bf16=bf16, activation_checkpointing=ckpt)
    planned = plan_model(build_meta_model(config), config, settings, shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    if bf16:
        model.to(torch.bfloat16)
    if ckpt:
        model.activation_checkpointing_enable()
    model.train()
    groups = mlorc_dist.param_groups(model)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-5)
    else:
        opt = mlorc_dist.MLorcAdamW(groups, lr=1e-5, rank=4)
    prof = MemoryProfiler("single", model, opt, "cuda")
    ids = torch.randint(0, vocab, (micro, seq), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    peaks = {}
    t0 = time.time()
    for step in range(2):
        torch.cuda.reset_peak_memory_stats()
        with prof.track_activations() as acts:
            out = model(input_ids=ids, labels=ids)
            acts.hold(out.logits)
        prof.sample("after_forward")
        out.loss.backward()
        del out
        torch.cuda.synchronize()
        peaks["forward_backward"] = torch.cuda.max_memory_allocated()
        prof.sample("after_backward")
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        peaks["step"] = torch.cuda.max_memory_allocated()
        prof.sample("after_step")
        opt.zero_grad(set_to_none=True)
    elapsed = time.time() - t0
    report = prof.to_dict()
    measured = reference_sample(report)["tensors"]
    result = {
        "case": f"{shape} {optimizer} {'bf16' if bf16 else 'fp32'} b={micro} s={seq}" + (" ckpt" if ckpt else ""),
        "exact": {c: [measured[c], planned.ranks[0][c]] for c in EXACT_CATEGORIES},
        "exact_equal": all(measured[c] == planned.ranks[0][c] for c in EXACT_CATEGORIES),
        "activations": [report["peaks"].get("activations"), planned.activations["saved"]],
        "peak_measured": peaks, "peak_planned": {k: planned.peak[k] for k in ("forward_backward", "step")},
        "nvml": report["samples"][-1].get("nvml"), "cuda": report["samples"][-1].get("cuda"),
        "notes": report["notes"], "seconds": round(elapsed, 1),
    }
    prof.close()
    del model, opt, prof
    gc.collect()
    torch.cuda.empty_cache()
    return result


def workspace_case(rows, cols, dtype, count, scope="local", batched=True, lowrank=True):
    """Extra bytes of one MLorc-AdamW step() on CUDA over what exists before it, in fp32 copies
    of one (rows, cols) block (torch.cuda.max_memory_allocated)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, device="cuda", generator=g).to(dtype))
              for _ in range(count)]
    opt = mlorc_dist.MLorcAdamW([{"params": params, "lowrank": lowrank}], rank=4, scope=scope, batched=batched)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return {"case": f"workspace {rows}x{cols} {dtype} x{count} {scope} batched={batched} lowrank={lowrank}",
            "copies": extra / (rows * cols * 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=["workspace", "small", "7b"])
    args = ap.parse_args()
    cases = []
    if "workspace" in args.cases:
        for dtype in (torch.float32, torch.bfloat16):
            for count in (1, 2, 4, 8):
                cases.append(("ws", 2048, 1024, dtype, count))
            cases.append(("ws", 2048, 1024, dtype, 4, "local", False))
            cases.append(("ws", 2048, 1024, dtype, 4, "global"))
            cases.append(("ws", 2048, 1024, dtype, 1, "local", True, False))
    if "small" in args.cases:
        for bf16 in (False, True):
            for optimizer in ("adamw", "mlorc-adamw"):
                cases.append(("100m", 32000, optimizer, bf16, 2, 1024, False))
    if "7b" in args.cases:
        for optimizer in ("adamw", "mlorc-adamw"):
            cases.append(("llama-7b", 32000, optimizer, True, 1, 4096, True))
    results = []
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for case in cases:
        try:
            r = workspace_case(*case[1:]) if case[0] == "ws" else run_case(*case)
        except Exception as exc:                       # noqa: BLE001  keep the other cases
            r = {"case": str(case), "error": f"{type(exc).__name__}: {exc}"}
            gc.collect()
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
