"""The batched parts of one MLorc-AdamW step under the GPU path's rules on the CPU
(MLORC_GPU_RULES_ON_CPU=1), each timed alone on the tensors the step makes, for 16 and 224
same-shaped bodies of 48 x 64 at q = 4 (bench/host_cost.py's cases): which parts grow with the
number of bodies. Median of 30 calls, one thread.

    python bench/host_cost_parts.py
"""
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["MLORC_GPU_RULES_ON_CPU"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from mlorc_dist import lowrank  # noqa: E402

torch.set_num_threads(1)


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
    """Each part's ms for `bodies` bodies of 48 x 64, as often as one step runs it."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(48, 64, generator=g) for _ in range(bodies)]
    workspace = torch.empty(bodies, 48, 64)
    moment = torch.randn(bodies, 48, 64, generator=g)                       # (B, k, n)
    omega, basis = torch.randn(bodies, 64, 4, generator=g), torch.randn(bodies, 48, 4, generator=g)
    sketch_k, sketch_n = torch.randn(bodies, 48, 4, generator=g), torch.randn(bodies, 64, 4, generator=g)
    small = torch.randn(2 * bodies, 4, 9, dtype=torch.float64, generator=g)
    gram = small @ small.mT                                                   # (2B, 4, 4): both moments
    seeds = list(range(bodies))
    return {
        "stack gradients and weights into workspaces": 2 * median_ms(lambda: torch.stack(grads, out=workspace)),
        "multi-tensor copy of the weights back":
            median_ms(lambda: torch._foreach_copy_(grads, list(workspace.unbind(0)))),
        "multi-tensor norm (non-finite check)": median_ms(lambda: torch._foreach_norm(grads)),
        "8 products with the dense moments (bmm)":
            4 * (median_ms(lambda: lowrank.times_skinny(moment, omega))
                 + median_ms(lambda: lowrank.skinny_t_times(basis, moment))),
        "test matrices, hashed_normal (x2)":
            2 * median_ms(lambda: lowrank.hashed_normal(seeds, 64, 4, torch.float32, "cpu")),
        "cholesky_qr (x6)": 2 * (2 * median_ms(lambda: lowrank.cholesky_qr(sketch_k))
                                 + median_ms(lambda: lowrank.cholesky_qr(sketch_n))),
        "jacobi_eigh, compiled (2B Gram matrices)": median_ms(lambda: lowrank.jacobi_eigh(gram, compiled=True)),
    }


def main():
    few, many = parts(16), parts(224)
    print(f"{'part':<48} {'16 ms':>7} {'224 ms':>7} {'ratio':>6}")
    for name in few:
        print(f"{name:<48} {few[name]:>7.3f} {many[name]:>7.3f} {many[name] / few[name]:>6.1f}")
    total_few, total_many = sum(few.values()), sum(many.values())
    print(f"{'sum':<48} {total_few:>7.3f} {total_many:>7.3f} {total_many / total_few:>6.1f}")


if __name__ == "__main__":
    main()
