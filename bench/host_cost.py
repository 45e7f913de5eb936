"""Host cost of one optimizer.step(): aten dispatches, compiled-function calls and host
synchronisations per step, and the step's time, with the GPU path's rules on the CPU
(MLORC_GPU_RULES_ON_CPU=1, lowrank.takes_gpu_rules), for growing numbers of same-shaped bodies
and for one LLaMA-2 7B FSDP2 rank's mix of shapes.

    python bench/host_cost.py --out docs/bench/host_cost_gpu_rules.json
    python bench/host_cost.py --cpu-rules --out runs/host_cost_cpu_rules.json   # the CPU's own rules
    python bench/host_cost.py --device cuda --scale 1 --out runs/host_cost_cuda.json   # on a GPU

Cases: --counts same-shaped --rows x --cols fp32 matrices (default 4, 16, 64, 224 of 48 x 64),
and "7B rank": the bodies one rank holds of LLaMA-2 7B under FSDP2 at world size 8 (per layer
q, k, v, o 512 x 4096, gate, up 1376 x 4096, down 512 x 11008: 224 bodies over 32 layers), with
every dimension divided by --scale (default 32: 16 x 128, 43 x 128, 16 x 344), and its dense
parameters at the same scale (65 norms, the embedding and lm_head rows, lowrank=False): the same
counts of tensors and shape groups. MLorc-AdamW with no speed options but rank 4 (fused=None);
torch AdamW foreach on the same tensors for comparison.

Counted by torch.profiler over one step after --warmup steps (compilation happens there):
- dispatches: aten operators called from Python or from a compiled function's wrapper (top-level
  aten events; the operators they call inside are not counted again). On a GPU each is a launch
  or an allocation, ~5-50 us of host time.
- compiled calls: calls of a torch.compile'd function ("Torch-Compiled Region" events).
- syncs: the operators that make a GPU wait for the host to read a result (aten::_local_scalar_dense:
  .item(), bool(), the linalg error checks; nonzero, masked_select, unique, ...), at any depth.
  The profiler does not say on which device the tensor read lives: torch AdamW's .item() of its
  CPU step counters (2 per tensor) are counted too, though a GPU does not wait for them.
  Copies between host and device cannot be seen on the CPU (there every tensor is on the host).
- outside ms: the time of a profiled step spent outside every torch operator and compiled call (the
  optimizer's Python), the median of 5 profiled steps: host time on any device.
Time: the median of --repeats steps, one thread unless --threads. Prints a table, writes JSON.
On a GPU (--device cuda; --scale 1 for the 7B rank at full size): the same cases on the device,
MLorc-AdamW's fused step (fused=True) and its reference path against torch AdamW foreach and
fused, each timed step synchronised; there every sync counted is one the host waits on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# operators after which the host waits for the device (on a GPU)
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
            "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
            "aten::equal", "aten::is_nonzero", "aten::nonzero_static_out"}
COMPILED_REGION = "Torch-Compiled Region"

# LLaMA-2 7B, FSDP2 Shard(0) at world size 8: one rank's rows of each matrix of a layer
LLAMA7B_LAYER = [(512, 4096)] * 4 + [(1376, 4096)] * 2 + [(512, 11008)]
LLAMA7B_LAYERS = 32
LLAMA7B_DENSE = [(2 * LLAMA7B_LAYERS + 1, 4096 // 8), (32000 // 8, 4096), (32000 // 8, 4096)]  # norms, embed, lm_head


def count_host_work(step) -> dict:
    """Dispatches, compiled calls and syncs of one call of `step` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    dispatches = compiled = syncs = 0
    for event in events:
        name = event.name
        if name.startswith(COMPILED_REGION):
            compiled += 1
        if name in SYNC_OPS:
            syncs += 1
        if name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            dispatches += parent is None
    return {"dispatches": dispatches, "compiled_calls": compiled, "syncs": syncs,
            "outside_ms": outside_operators_ms(events)}


def outside_operators_ms(events) -> float:
    """The time of a profiled step() spent outside every torch operator and compiled call: the self
    time of torch.optim's "Optimizer.step#" event, i.e. the optimizer's own Python (and the
    profiler's bookkeeping of the top-level operators). It is host time on any device, and the
    part of it that grows with the number of tensors is Python run per tensor."""
    steps = [e for e in events if e.name.startswith("Optimizer.step#")]
    if len(steps) != 1:
        raise ValueError(f"expected one Optimizer.step# event in the profile, found {len(steps)}")
    return steps[0].self_cpu_time_total / 1e3


def same_shaped(count: int, rows: int, cols: int, device="cpu") -> list[dict]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(rows, cols, generator=g).mul_(0.02).to(device).requires_grad_() for _ in range(count)]
    return [{"params": params}]


def llama7b_rank(scale: int, device="cpu") -> list[dict]:
    g = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=g).mul_(0.02).to(device).requires_grad_()
    bodies = [tensor(-(-m // scale), -(-n // scale)) for _ in range(LLAMA7B_LAYERS) for m, n in LLAMA7B_LAYER]
    norms, embed, head = LLAMA7B_DENSE
    dense = [tensor(norms[1] // scale) for _ in range(norms[0])]
    dense += [tensor(-(-embed[0] // scale), embed[1] // scale), tensor(-(-head[0] // scale), head[1] // scale)]
    return [{"params": bodies}, {"params": dense, "lowrank": False}]


def with_gradients(groups: list[dict]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    params = [p for group in groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(p.device)
    return params


def measure(name: str, groups: list[dict], args) -> list[dict]:
    import mlorc_dist
    params = with_gradients(groups)
    cuda = params[0].device.type == "cuda"
    makers = [("adamw-foreach", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True))]
    if cuda:
        makers += [("adamw-fused", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)),
                   ("mlorc-adamw", lambda: mlorc_dist.MLorcAdamW(groups, lr=1e-3, rank=4, fused=True)),
                   ("mlorc-adamw-ref", lambda: mlorc_dist.MLorcAdamW(groups, lr=1e-3, rank=4, fused=False))]
    else:
        makers += [("mlorc-adamw", lambda: mlorc_dist.MLorcAdamW(groups, lr=1e-3, rank=4))]
    rows = []
    for label, make in makers:
        opt = make()
        for _ in range(args.warmup):
            opt.step()
        counts = count_host_work(opt.step)
        counts["outside_ms"] = statistics.median([counts["outside_ms"]] + [
            count_host_work(opt.step)["outside_ms"] for _ in range(4)])
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append({"case": name, "optimizer": label, "tensors": len(params),
                     "fused": getattr(opt, "fused", None), **counts, "ms": 1e3 * statistics.median(times)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16, 64, 224])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--scale", type=int, default=32, help="7B rank case: every dimension divided by this")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-rules", action="store_true", help="the CPU's own rules (C++ kernels), not the GPU's")
    ap.add_argument("--device", default="cpu", help="cpu (the GPU path's rules, or --cpu-rules) or cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/host_cost.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and args.cpu_rules):
        raise ValueError(f"--device must be cpu or cuda (--cpu-rules: cpu only), got {args.device!r}")
    os.environ["MLORC_GPU_RULES_ON_CPU"] = "1" if device.type == "cpu" and not args.cpu_rules else "0"
    torch.set_num_threads(args.threads)
    rows = []
    for count in args.counts:
        rows += measure(f"{count} x {args.rows}x{args.cols}", same_shaped(count, args.rows, args.cols, device), args)
    rows += measure(f"7B FSDP2 rank (world 8, /{args.scale})", llama7b_rank(args.scale, device), args)
    rules = ("the CPU's rules" if args.cpu_rules else "a GPU's rules" if device.type == "cuda"
             else "the GPU path's rules (MLORC_GPU_RULES_ON_CPU=1)")
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    print(f"optimizer.step() host cost, {rules}, {label}, torch {torch.__version__}")
    print(f"{'case':<34} {'optimizer':<16} {'tensors':>7} {'dispatches':>10} {'compiled':>8} {'syncs':>5} "
          f"{'outside ms':>10} {'ms':>8}")
    for r in rows:
        print(f"{r['case']:<34} {r['optimizer']:<16} {r['tensors']:>7} {r['dispatches']:>10} "
              f"{r['compiled_calls']:>8} {r['syncs']:>5} {r['outside_ms']:>10.2f} {r['ms']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "rules": rules, "torch": torch.__version__,
                                    "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
