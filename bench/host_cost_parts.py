"""The parts of one MLorc-AdamW step under the GPU path's rules on the CPU
(MLORC_GPU_RULES_ON_CPU=1), each timed alone on the tensors the step makes, for 16 and 224
same-shaped bodies of 48 x 64 at q = 4 (bench/host_cost.py's cases), beside the whole step:
which parts grow with the number of bodies. Median of 30 calls, one thread.

    python bench/host_cost_parts.py --out runs/host_cost_parts.json
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["MLORC_GPU_RULES_ON_CPU"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import mlorc_dist  # noqa: E402
from mlorc_dist import lowrank  # noqa: E402
from mlorc_dist.optim import fused  # noqa: E402

torch.set_num_threads(1)
ROWS, COLS, RANK = 48, 64, 4


def median_ms(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parts(bodies: int) -> dict:
    """Each part's ms for `bodies` bodies of 48 x 64, as often as one step runs it, and the step."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(ROWS, COLS, generator=g).mul_(0.02) for _ in range(bodies)]
    grads = [torch.randn(ROWS, COLS, generator=g).mul_(1e-3) for _ in range(bodies)]
    grad = torch.stack(grads)
    moment = torch.empty(bodies, ROWS, COLS)                                 # the V workspace
    workspace = torch.empty(bodies, ROWS, COLS)                              # the stacked weights
    stacked = fused.Stacked(workspace, list(workspace.unbind(0)))
    us, vh = torch.randn(bodies, ROWS, RANK, generator=g).mul_(1e-3), torch.randn(bodies, RANK, COLS, generator=g)
    floors = torch.full((bodies,), 1e-9)
    first = lowrank.MomentUpdate(us, vh, grad, 0.9, 0.1)
    seeds = [list(range(bodies)), list(range(bodies, 2 * bodies))]
    omega, basis = torch.randn(bodies, COLS, RANK, generator=g), torch.randn(bodies, ROWS, RANK, generator=g)

    def block():
        fused.adamw_blocks_(weights, grad, us, vh, us, vh, floors, 0.9, 0.999, [1e-3] * bodies, 1e-8, 1.0,
                            moment, None, stacked)

    block()                                                                  # V for the range finder
    pending = [(*lowrank.compress_range(m, RANK, 0, 1, s), RANK) for m, s in zip((first, moment), seeds)]

    groups = [{"params": [w.clone().requires_grad_() for w in weights]}]
    for p, gr in zip(groups[0]["params"], grads):
        p.grad = gr.clone()
    opt = mlorc_dist.MLorcAdamW(groups, lr=1e-3, rank=RANK)
    return {
        "non-finite check (multi-tensor norm)": median_ms(lambda: torch._foreach_norm(grads)),
        "stack the gradients": median_ms(lambda: torch.stack(grads, out=grad)),
        "block update (stack weights, compiled kernel, copy back)": median_ms(block),
        "range finder, first moment (one compiled call)":
            median_ms(lambda: lowrank.compress_range(first, RANK, 0, 1, seeds[0])),
        "range finder, second moment (one compiled call)":
            median_ms(lambda: lowrank.compress_range(moment, RANK, 0, 1, seeds[1])),
        "  of which 8 products with the dense moments (bmm)":
            4 * (median_ms(lambda: lowrank.times_skinny(moment, omega))
                 + median_ms(lambda: lowrank.skinny_t_times(basis, moment))),
        "small SVDs and factors (Jacobi, 2 compiled calls)": median_ms(lambda: lowrank.finish_compress(pending)),
        "whole step()": median_ms(opt.step),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/host_cost_parts.json"))
    args = ap.parse_args()
    few, many = parts(16), parts(224)
    print(f"{'part':<58} {'16 ms':>7} {'224 ms':>7} {'ratio':>6}")
    for name in few:
        print(f"{name:<58} {few[name]:>7.3f} {many[name]:>7.3f} {many[name] / few[name]:>6.1f}")
    counted = [k for k in few if not k.startswith(" ") and k != "whole step()"]
    rest_few = few["whole step()"] - sum(few[k] for k in counted)
    rest_many = many["whole step()"] - sum(many[k] for k in counted)
    print(f"{'rest of step() (Python, packing, stores)':<58} {rest_few:>7.3f} {rest_many:>7.3f} "
          f"{rest_many / rest_few:>6.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "bodies": {"16": few, "224": many}}, indent=1))


if __name__ == "__main__":
    main()
