"""The CPU collectives against the engines' own, on gloo, with sizes that do not divide by the
world size:
- FSDP2 as launch/train.py shards a model on a CPU mesh (mlorc_dist.build.shard_fsdp2: no
  backward prefetch, the embeddings not gathered in backward, CPUAllGather, CPUReduceScatter,
  the in-place fsdp::chunk_cat) against FSDP2's defaults on the same units: every gradient,
  whole (full_tensor) after two micro-batches accumulated;
- ZeRO-3's reduce_scatter_coalesced with mlorc_dist.deepspeed.gloo_reduce_scatter against
  DeepSpeed's own, on the same gradients (one tensor alone, several, divisible or not).

    python -m torch.distributed.run --nproc_per_node 3 tests/dist/cpu_collectives_worker.py OUT

Writes OUT/rank<r>.pt: {"stock": grads, "ours": grads, "unshard_in_backward": {...},
"zero3_stock": [...], "zero3_ours": [...]}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=1001, hidden_size=40, intermediate_size=61, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


def gradients(model, batches) -> dict[str, torch.Tensor]:
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}


def zero3_reduce_scatters(rank: int):
    from deepspeed.runtime.comm import coalesced_collectives
    from mlorc_dist.cpu_collectives import gloo_reduce_scatter, zero3_reduce_scatter_on_gloo
    g = torch.Generator().manual_seed(3 + rank)
    cases = [[(1001, 40)], [(12, 6)], [(1001, 40), (61,), (7, 5)]]
    results = {}
    for name in ("stock", "ours"):
        if name == "ours":
            assert zero3_reduce_scatter_on_gloo()
            assert coalesced_collectives._torch_reduce_scatter_fn is gloo_reduce_scatter
        g.manual_seed(3 + rank)
        results[name] = [[part.clone() for part in coalesced_collectives.reduce_scatter_coalesced(
                          [torch.randn(s, generator=g) for s in shapes])] for shapes in cases]
    return results["stock"], results["ours"]


def main(out: Path) -> None:
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    # DeepSpeed's CPU accelerator would JIT-compile a shared-memory comm op (60-70 s); every
    # collective here runs on gloo (as in tests/dist/worker.py)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from mlorc_dist.build import fsdp2_units, shard_fsdp2
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(11 + rank)
    batches = [torch.randint(0, 1001, (2, 9), generator=g) for _ in range(2)]

    stock = tiny_llama()                      # FSDP2's defaults first: ours changes a CPU kernel
    for _, modules, reshard in fsdp2_units(stock):
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, reshard_after_forward=reshard)
    fully_shard(stock, mesh=mesh)
    stock_grads = gradients(stock, batches)

    ours = tiny_llama()
    shard_fsdp2(ours, mesh)
    ours_grads = gradients(ours, batches)
    unshard = {name: modules[0]._get_fsdp_state()._fsdp_param_groups[0].unshard_in_backward
               for name, modules, _ in fsdp2_units(ours)}
    zero3_stock, zero3_ours = zero3_reduce_scatters(rank)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"stock": stock_grads, "ours": ours_grads, "unshard_in_backward": unshard,
                "zero3_stock": zero3_stock, "zero3_ours": zero3_ours}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
