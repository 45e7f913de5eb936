"""Memory-profiling jobs for tests/test_memory.py: real DeepSpeed ZeRO-1/2/3 and FSDP2 on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/memory_worker.py --out DIR \
        --model tiny --runs zero2:mlorc-adamw zero3:adamw fsdp2:mlorc-adamw:bf16 ...

A run is engine:optimizer[:precision[:scope[:sib]]], precision fp32, bf16 (mixed precision) or
pbf16 (FSDP2: bf16 parameters and gradients, no policy: --param-dtype bf16), "sib" stepping in
backward (mlorc_dist.step_in_backward, FSDP2 and MLorc only: the profiler's
track_backward_grads records the gradients alive at its hooks), the optimizer one of mlorc-adamw, adamw, lora
(peft adapters of rank --rank, MLorcAdamW with every group dense, as mlorc_dist.methods builds
it) or switchlora (SwitchLoRA layers of rank --rank, SwitchLoRAAdamW; ZeRO-1/2 only). Each
trains a Llama of the named shape (mlorc_dist.models.llama_config, vocabulary --vocab) or of
an HF config JSON for --steps steps with MemoryProfiler sampling after forward, backward and
step (activations measured with saved-tensor hooks), and writes DIR/<run>.json (+ .txt, .png)
through MemoryProfiler.gather_and_write on rank 0.
Param groups are mlorc_dist.param_groups(model) for every optimizer (AdamW included), as the
planner assumes; the adapter methods get theirs from mlorc_dist.methods.build_optimizer (FSDP2)
or mlorc_dist.deepspeed.initialize with an "adapter" block (DeepSpeed), as launch/train.py
builds them. DeepSpeed configs are the defaults apart from batch sizes and bf16.

DeepSpeed's CPU backend would JIT-compile a shared-memory comm op (60-70 s) on first use; every
collective here runs on gloo, so the worker replaces its builder with a no-op before
init_distributed (deliberately, for test speed; production launches are unaffected).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)


def batches(steps, vocab, global_batch, seq):
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, vocab, (global_batch, seq), generator=g) for _ in range(steps)]


def run(spec: str, args) -> None:
    import mlorc_dist
    from mlorc_dist.memory import MemoryProfiler
    from mlorc_dist.memory.planner import load_config
    from mlorc_dist.models import build_model

    parts = spec.split(":")
    engine_name, opt_name = parts[0], parts[1]
    precision = parts[2] if len(parts) > 2 else "fp32"
    scope = parts[3] if len(parts) > 3 else "local"
    world, rank = dist.get_world_size(), dist.get_rank()
    in_backward = len(parts) > 4 and parts[4] == "sib"
    model = build_model(load_config(args.model, args.vocab), seed=1234,
                        dtype=torch.bfloat16 if precision == "pbf16" else torch.float32)
    micro = args.micro_batch
    lr = 1e-3
    adapter = opt_name in ("lora", "switchlora")
    if adapter and engine_name == "fsdp2":
        from mlorc_dist.methods import prepare_model
        model = prepare_model(opt_name, model, rank=args.rank, seed=0)

    if engine_name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from mlorc_dist.build import shard_fsdp2
        mesh = init_device_mesh("cpu", (world,))
        bf16 = precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        shard_fsdp2(model, mesh, policy)        # launch/train.py's units: layers, embeddings, output
        groups = mlorc_dist.param_groups(model)
        if adapter:
            from mlorc_dist.methods import build_optimizer
            optimizer = build_optimizer(opt_name, model, lr=lr, rank=args.rank, scope=scope)
        elif opt_name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr)
        else:
            optimizer = mlorc_dist.MLorcAdamW(groups, lr=lr, rank=args.rank, scope=scope)
        profiler = MemoryProfiler("fsdp2", model, optimizer, "cpu")
        if in_backward:                  # the profiler's hooks first: they see each gradient before its step
            profiler.track_backward_grads()
            mlorc_dist.step_in_backward(optimizer, model)

        def forward(ids):
            return model(input_ids=ids, labels=ids)

        def backward(loss):
            loss.backward()

        def step():
            if not in_backward:
                optimizer.step()
                optimizer.zero_grad()
    else:
        import deepspeed
        import mlorc_dist.deepspeed as mds
        stage = {"zero1": 1, "zero2": 2, "zero3": 3}[engine_name]
        config = {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if precision == "bf16":
            config["bf16"] = {"enabled": True}
        if opt_name == "adamw":
            optimizer = torch.optim.AdamW(mlorc_dist.param_groups(model), lr=lr)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            client = optimizer
        elif adapter:
            config["optimizer"] = {"type": "SwitchLoRAAdamW" if opt_name == "switchlora" else "MLorcAdamW",
                                   "params": {"lr": lr}}
            config["adapter"] = {"type": opt_name, "rank": args.rank, "seed": 0}
            engine, _, _, _ = mds.initialize(model=model, config=config,
                                             mlorc={"dense": True} if opt_name == "lora" else {})
            client = engine.mlorc_optimizer
        else:
            config["optimizer"] = {"type": "MLorcAdamW", "params": {"lr": lr}}
            engine, _, _, _ = mds.initialize(model=model, config=config,
                                             mlorc={"rank": args.rank, "scope": scope})
            client = engine.mlorc_optimizer
        profiler = MemoryProfiler(engine_name, engine, client, "cpu")
        model = engine.module

        def forward(ids):
            return engine(input_ids=ids, labels=ids)

        def backward(loss):
            engine.backward(loss)

        def step():
            engine.step()

    for ids in batches(args.steps, args.vocab, micro * world, args.seq):
        local = ids[rank * micro:(rank + 1) * micro].clone()   # a per-rank batch, as a loader gives
        with profiler.track_activations() as acts:
            out = forward(local)
            acts.hold(out.logits)
        profiler.sample("after_forward")
        backward(out.loss)
        del out
        profiler.sample("after_backward")
        step()
        profiler.sample("after_step")
    if engine_name == "zero3":
        # ZeRO-3 replaces torch.nn.functional.linear by its own (which saves the input of every
        # linear, frozen ones included) and leaves it so; later runs of this process get the
        # plain one back
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
        torch.nn.functional.linear = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk",
                                             torch.nn.functional.linear)
    name = spec.replace(":", "_")
    profiler.gather_and_write(args.out / f"{name}.json", args.out / f"{name}.png")
    profiler.close()
    dist.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--model", default="tiny", help="a named shape or an HF config JSON")
    parser.add_argument("--vocab", type=int, default=101)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None   # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        run(spec, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from mlorc_dist.training import exit_without_teardown
    exit_without_teardown(0)      # gloo's teardown race at interpreter exit (see its docstring)
