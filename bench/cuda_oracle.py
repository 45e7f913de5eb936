"""The full-rank oracle on a GPU: MLorc-AdamW at rank >= min(m, n) tracks torch AdamW (eps = 0).

    python bench/cuda_oracle.py            # prints the relative parameter difference per dtype
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlorc_dist  # noqa: E402


def run(dtype, scope, steps=30):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32)).to("cuda", dtype)  # noqa: E731
    model, reference = make(), make()
    reference.load_state_dict(model.state_dict())
    opt = mlorc_dist.MLorcAdamW(model.parameters(), lr=3e-3, eps=0.0, weight_decay=0.0, rank=96,
                                dense_when_no_saving=False, scope=scope)
    ref = torch.optim.AdamW(reference.parameters(), lr=3e-3, eps=0.0, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        x = torch.randn(128, 64, device="cuda", dtype=dtype, generator=g)
        y = torch.tanh(x[:, :32])
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    num = sum(((a - b).double() ** 2).sum() for a, b in zip(model.parameters(), reference.parameters()))
    den = sum((b.double() ** 2).sum() for b in reference.parameters())
    return float((num / den).sqrt())


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for dtype in (torch.float64, torch.float32):
        for scope in ("local", "global"):
            print(f"full-rank oracle {dtype} {scope}: relative difference {run(dtype, scope):.2e}")
