"""Can one MLorc-AdamW step() (fused=True, nonfinite="ignore": no host read) be captured by a CUDA
graph? Captures one step of --bodies same-shaped fp32 bodies after --warmup eager steps on a side
stream (torch.cuda.graph's recipe) and prints "captured" or the first error that stopped the
capture, with the operator or copy that made it (a host-to-device copy of per-step values, an
allocation the graph cannot own, a sync). A capture records one step's host-side values (step
counts, bias corrections, sketch seeds) as constants: replaying it is a different step only once
those live in device buffers written before each replay; this probe does not replay.

    python bench/cuda_graph_probe.py [--bodies 16 --rows 48 --cols 64] --out runs/cuda_graph_probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlorc_dist  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bodies", type=int, default=16)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/cuda_graph_probe.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise ValueError("cuda_graph_probe needs a CUDA device (CUDA graphs exist only there)")
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(args.rows, args.cols, generator=g).mul_(0.02).cuda().requires_grad_()
              for _ in range(args.bodies)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).cuda()
    opt = mlorc_dist.MLorcAdamW(params, lr=1e-3, rank=4, fused=True, nonfinite="ignore")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(args.warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bodies": args.bodies,
              "shape": [args.rows, args.cols]}
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step()
        result["captured"] = True
    except Exception as error:    # what stopped the capture is the finding: report it whole
        result["captured"] = False
        result["error"] = f"{type(error).__name__}: {error}"
        result["where"] = [line for line in traceback.format_exc().splitlines() if "mlorc_dist" in line][-6:]
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
