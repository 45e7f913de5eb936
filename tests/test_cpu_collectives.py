"""The CPU collectives: shard_fsdp2's in-place chunk_cat equals torch._chunk_cat; real FSDP2 runs
at world sizes 2 and 3 give FSDP2's own gradients, and ZeRO-3's reduce-scatter with
gloo_reduce_scatter DeepSpeed's own results, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlorc_dist.cpu_collectives import CPUReduceScatter, chunk_cat_rows

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "cpu_collectives_worker.py"


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("shapes", [[(10, 3), (7,), (9, 2, 2)], [(3200, 4), (5,)], [(6, 3)], [(2,), (1, 5)]])
def test_chunk_cat_rows_is_torch_chunk_cat(shapes, chunks):
    g = torch.Generator().manual_seed(len(shapes) * 10 + chunks)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    numel = sum(-(-s[0] // chunks) * chunks * torch.Size(s[1:]).numel() for s in shapes)
    expected = torch.full((numel,), 7.0, dtype=torch.float64)
    torch._chunk_cat(tensors, dim=0, num_chunks=chunks, out=expected.view(chunks, -1))
    got = torch.full((numel,), 7.0, dtype=torch.float64)      # every element written, padding zeroed
    chunk_cat_rows(tensors, 0, chunks, out=got.view(chunks, -1))
    assert torch.equal(got, expected)


def test_chunk_cat_rows_and_the_reduce_scatter_refuse_what_they_do_not_do():
    with pytest.raises(ValueError, match="dim 0"):
        chunk_cat_rows([torch.zeros(4, 4)], 1, 2, out=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="synchronously"):
        CPUReduceScatter()(torch.zeros(2), torch.zeros(4), None, None, async_op=True)


@pytest.mark.parametrize("world,port", [(2, 29690), (3, 29691)])
def test_cpu_collectives_give_the_engines_own_results_bitwise(tmp_path, world, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                             "--master_port", str(port), str(WORKER), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        stock, ours = saved["stock"], saved["ours"]
        assert set(stock) == set(ours) and len(stock) == 21
        assert all(torch.equal(stock[k], ours[k]) for k in stock), [k for k in stock if not torch.equal(stock[k], ours[k])]
        assert all(v.abs().sum() > 0 for v in ours.values())
        assert saved["unshard_in_backward"] == {"embeddings": False, "layer 0": True, "layer 1": True, "output": True}
        for stock_case, ours_case in zip(saved["zero3_stock"], saved["zero3_ours"], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(stock_case, ours_case, strict=True))
