"""One multi-process job of the distributed tests: real DeepSpeed ZeRO-1/2/3 and FSDP2 on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/worker.py --out DIR \
        --runs zero2:mlorc-adamw:local:full zero2:adamw fsdp2:mlorc-adamw:global:4 ...

A run is engine:optimizer[:scope:rank[:dtype]]. Each run trains the same tiny Llama (shapes
chosen so that ZeRO cuts matrices mid-row and FSDP2 shards are uneven) for --steps steps on the
same global batches, each rank taking its slice. Rank 0 writes DIR/<run>.pt with the initial and
final full parameters, those after --early-steps steps, and the losses; every rank writes
DIR/<run>.rank<r>.pt with its pieces, state bytes, the torch.distributed calls made inside
optimizer.step(), and (local scope) the gradient each piece received at every step, so that a
test can replay the run single-process.

DeepSpeed's CPU backend would JIT-compile a shared-memory comm op (60-70 s) on first use; we
use gloo for every collective, so the worker replaces its builder with a no-op before
init_distributed (deliberately, for test speed; production launches are unaffected).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)

VOCAB, GLOBAL_BATCH, SEQ = 101, 6, 12
COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "broadcast", "all_to_all", "all_to_all_single", "reduce", "barrier", "scatter", "gather",
           "all_gather_object", "broadcast_object_list", "send", "recv")


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    # Shapes chosen so that ZeRO-1/2 (no round robin) cuts a matrix mid-row at world size 2 and 3
    # (embeddings compressed, so they sit in the matrices' group) and FSDP2 shards are uneven.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=61, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(1234)
    return LlamaForCausalLM(config).to(dtype)


def batches(steps):
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


class CollectiveCounter:
    """Counts torch.distributed calls (and all-reduced elements) while `active`."""

    def __init__(self):
        self.active = False
        self.calls: dict[str, int] = {}
        self.all_reduce_elements = 0
        for name in COUNTED:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name == "all_reduce":
                    self.all_reduce_elements += args[0].numel()
            return original(*args, **kwargs)
        return counted


def wrap_step(optimizer, counter, grad_log):
    """Count collectives inside step() and record the gradient of every piece (local scope)."""
    real_step = optimizer.step

    def step(*args, **kwargs):
        if grad_log is not None:
            for group in optimizer.param_groups:
                for position, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    flat = (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).reshape(-1)
                    for piece in optimizer.layout_of(p, group, position).pieces:
                        grad_log.append((optimizer.state[p].get("step", 0) + 1, piece.key, piece.start,
                                         piece.stop, piece.view(flat).detach().clone()))
        counter.active = True
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.active = False
    optimizer.step = step


def make_optimizer_kwargs(opt_name, scope, rank_arg):
    full = rank_arg == "full"
    kwargs = dict(rank=VOCAB if full else int(rank_arg), scope=scope, seed=7,
                  dense_when_no_saving=not full, compress_embeddings=True)
    if opt_name.endswith("-fused"):       # the fused step (mlorc_dist/optim/fused.py)
        opt_name = opt_name.removesuffix("-fused")
        kwargs["fused"] = True
    if opt_name == "mlorc-adamw":
        # eps ~ 0 makes full-rank MLorc equal torch AdamW (see MLorcAdamW's bias correction); at
        # rank 4 it would divide by rebuilt second moments near 0 and amplify rounding, so the
        # low-rank runs use the usual 1e-8.
        eps = 1e-30 if full else 1e-8
        return "MLorcAdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=eps, weight_decay=0.0), kwargs
    if opt_name == "mofasgd":
        return "MoFaSGD", dict(lr=1e-2, momentum=0.9, betas=(0.9, 0.999), weight_decay=0.0), kwargs
    if opt_name == "galore":
        kwargs["update_interval"] = 5
        return "GaLoreAdamW", dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0), kwargs
    return "MLorcLion", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0), kwargs


def full_params(model, engine_name):
    """name -> full parameter tensor (float64 copy), gathered where the engine shards."""
    if engine_name in ("zero3", "zero3init"):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().double().clone() for n, p in model.named_parameters()}
    if engine_name == "fsdp2":
        return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def run(spec: str, steps: int, early_steps: int, out: Path, counter: CollectiveCounter):
    parts = spec.split(":")
    engine_name, opt_name = parts[0], parts[1]
    scope, rank_arg = (parts[2], parts[3]) if len(parts) > 3 else ("local", "full")
    precision = parts[4] if len(parts) > 4 else "fp32"
    dtype = torch.float64 if precision == "fp64" else torch.float32   # bf16: the engine casts
    world, rank = dist.get_world_size(), dist.get_rank()
    if engine_name == "zero3init":   # parameters partitioned as they are created (ds_shape)
        import deepspeed
        importlib.import_module("torch._dynamo")  # imported inside zero.Init it fails (Tensor.__new__ is patched)
        with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": GLOBAL_BATCH,
                                                      "zero_optimization": {"stage": 3}}):
            model = tiny_llama(dtype)
        initial = full_params(model, "zero3")
    else:
        model = tiny_llama(dtype)
        initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    micro = GLOBAL_BATCH // world
    grad_log = [] if (opt_name != "adamw" and scope == "local") else None

    if engine_name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        import mlorc_dist
        from mlorc_dist.build import shard_fsdp2
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                      reduce_dtype=torch.float32 if precision == "bf16" else None)
        shard_fsdp2(model, mesh, policy)     # launch/train.py's units and CPU collectives
        if opt_name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-30, weight_decay=0.0)
        else:
            cls_name, params, kwargs = make_optimizer_kwargs(opt_name, scope, rank_arg)
            compress = kwargs.pop("compress_embeddings")
            optimizer = getattr(mlorc_dist, cls_name)(
                mlorc_dist.param_groups(model, compress_embeddings=compress), **params, **kwargs)

        def train_step(ids):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            return loss
        mlorc_opt = optimizer if opt_name != "adamw" else None
    elif engine_name == "zero2raw":
        # The trap this library exists for: plain deepspeed.initialize with an MLorc client
        # optimizer flattens the parameters. The first step must refuse, never run dense Adam.
        import deepspeed
        import mlorc_dist
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               optimizer=mlorc_dist.MLorcAdamW(model.parameters()))
        ids = batches(1)[0][rank * micro:(rank + 1) * micro]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        before = [p.detach().clone() for p in engine.module.parameters()]
        try:
            engine.step()
            error = None
        except ValueError as exc:
            error = str(exc)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        torch.save({"error": error, "unchanged": unchanged}, out / f"zero2raw.rank{rank}.pt")
        dist.barrier()
        return
    else:
        import mlorc_dist.deepspeed as mds
        stage = {"zero1": 1, "zero2": 2, "zero2rr": 2, "zero3": 3, "zero3init": 3}[engine_name]
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if precision == "bf16":
            config["bf16"] = {"enabled": True}
        if engine_name == "zero2rr":
            config["zero_optimization"]["round_robin_gradients"] = True
        if opt_name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-30, weight_decay=0.0)
            import deepspeed
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            mlorc_opt = None
        else:
            cls_name, params, kwargs = make_optimizer_kwargs(opt_name, scope, rank_arg)
            config["optimizer"] = {"type": cls_name, "params": {**params, "betas": list(params["betas"])}}
            engine, _, _, _ = mds.initialize(model=model, config=config, mlorc=kwargs)
            mlorc_opt = engine.mlorc_optimizer

        def train_step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss
        model = engine.module
    if mlorc_opt is not None:
        wrap_step(mlorc_opt, counter, grad_log)

    losses, early = [], None
    for step, ids in enumerate(batches(steps), start=1):
        loss = train_step(ids[rank * micro:(rank + 1) * micro])
        losses.append(float(loss.detach()))
        if step == early_steps:
            early = full_params(model, engine_name)
    final = full_params(model, engine_name)
    name = spec.replace(":", "_")
    if rank == 0:
        torch.save({"initial": initial, "early": early, "final": final, "losses": losses, "world": world},
                   out / f"{name}.pt")
    if mlorc_opt is not None:
        layouts = []
        for group in mlorc_opt.param_groups:
            for position, p in enumerate(group["params"]):
                layout = mlorc_opt.layout_of(p, group, position)
                layouts.append([(pc.key, list(pc.matrix.shape), pc.start, pc.stop, pc.matrix.lowrank)
                                for pc in layout.pieces])
        if engine_name.startswith("zero3"):   # ZeRO-3 leaves only one sub-group's tensor in param_groups
            layouts = [[(pc.key, list(pc.matrix.shape), pc.start, pc.stop, pc.matrix.lowrank)
                        for pc in lay.pieces] for lay in
                       (mlorc_opt._layouts[id(f)] for f in engine.optimizer.fp32_partitioned_groups_flat)]
        torch.save({"layouts": layouts, "state_bytes": mlorc_opt.state_bytes(),
                    "calls": dict(counter.calls), "all_reduce_elements": counter.all_reduce_elements,
                    "grad_log": grad_log, "treatments": mlorc_opt.treatment_summary()},
                   out / f"{name}.rank{rank}.pt")
    counter.calls.clear()
    counter.all_reduce_elements = 0
    dist.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--early-steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None   # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    counter = CollectiveCounter()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        run(spec, args.steps, args.early_steps, args.out, counter)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from mlorc_dist.training import exit_without_teardown
    exit_without_teardown(0)      # gloo's teardown race at interpreter exit (see its docstring)
