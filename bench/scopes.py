"""Local vs global scope vs gather-then-compress, FSDP2 at world size 2 (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 bench/scopes.py --out runs/bench_scopes.json

For one Llama built from a config, sharded with fully_shard, it times MLorc-AdamW's
optimizer.step() in local and in global scope, and a gather-then-compress baseline (what
shape-aware optimizers do elsewhere: all-gather each moment's whole matrix, compress it on every
rank, keep your rows), and counts the bytes each step sends through torch.distributed.
Rank 0 prints a table and writes JSON. Times are medians over --steps steps after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlorc_dist  # noqa: E402
from mlorc_dist.lowrank import randomized_svd, rebuild  # noqa: E402


class ByteCounter:
    """Bytes passed to all_reduce / all_gather_into_tensor while active."""

    def __init__(self):
        self.active, self.bytes = False, 0
        for name in ("all_reduce", "all_gather_into_tensor"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.bytes += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)
        return counted


@torch.no_grad()
def gather_then_compress_step(params, state, rank: int, step: int, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """The baseline: rebuild this rank's rows, all-gather whole M and V, compress them whole."""
    world = dist.get_world_size()
    for key, p in enumerate(params):
        local, grad = p.to_local(), p.grad.to_local()
        m_rows, n = p.shape
        per_rank = -(-m_rows // world)
        entry = state.setdefault(key, {"m": None, "v": None})
        prev = [rebuild(*entry[k])[rank * per_rank: rank * per_rank + local.shape[0]]
                if entry[k] is not None else torch.zeros_like(local) for k in ("m", "v")]
        m = betas[0] * prev[0] + (1 - betas[0]) * grad
        v = (betas[1] * prev[1].clamp_min(0) + (1 - betas[1]) * grad * grad)
        local.add_(-lr * m / (v.sqrt() + eps))
        for name, moment in (("m", m), ("v", v)):
            padded = torch.zeros(per_rank, n)
            padded[:moment.shape[0]] = moment
            full = torch.empty(per_rank * world, n)
            dist.all_gather_into_tensor(full, padded)
            u, s, vh = randomized_svd(full[:m_rows], 4, 0, 1, seed=step)
            entry[name] = (u, s, vh)


def build(hidden: int, layers: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scopes.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counter = ByteCounter()
    results = {}
    for variant in ("local", "global", "gather-then-compress"):
        model = build(args.hidden, args.layers, args.intermediate)
        matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
        if variant == "gather-then-compress":
            state = {}
            step_fn = lambda t: gather_then_compress_step(matrices, state, rank, t)  # noqa: E731
        else:
            opt = mlorc_dist.MLorcAdamW(matrices, lr=1e-3, rank=4, scope=variant, weight_decay=0.0)
            step_fn = lambda t: opt.step()  # noqa: E731
        g = torch.Generator().manual_seed(1)
        times, sent = [], []
        for t in range(args.steps + 2):
            ids = torch.randint(0, 2048, (2, 64), generator=g)
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            counter.bytes, counter.active = 0, True
            dist.barrier()
            start = time.perf_counter()
            step_fn(t + 1)
            dist.barrier()
            elapsed = time.perf_counter() - start
            counter.active = False
            if t >= 2:
                times.append(elapsed)
                sent.append(counter.bytes)
        results[variant] = {"step_ms": 1e3 * statistics.median(times), "bytes_per_step": int(statistics.median(sent))}
        del model
    if rank == 0:
        n_params = sum(p.numel() for p in build(args.hidden, args.layers, args.intermediate).parameters())
        base = results["gather-then-compress"]
        print(f"FSDP2, world size 2, gloo/CPU, Llama {n_params / 1e6:.1f}M params "
              f"(hidden {args.hidden}, {args.layers} layers), MLorc-AdamW r=4, step() only")
        print(f"{'variant':<22} {'step ms':>9} {'MB sent/step':>13} {'time vs gather':>15} {'bytes vs gather':>16}")
        for name, r in results.items():
            print(f"{name:<22} {r['step_ms']:>9.1f} {r['bytes_per_step'] / 1e6:>13.3f} "
                  f"{r['step_ms'] / base['step_ms']:>15.2f} {r['bytes_per_step'] / max(base['bytes_per_step'], 1):>16.4f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    else:
        build(args.hidden, args.layers, args.intermediate)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
