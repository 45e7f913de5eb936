"""One multi-process job of the SwitchLoRA tests: DDP and DeepSpeed ZeRO-2 on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29950 \
        tests/dist/switchlora_worker.py --out DIR --steps 10 --runs ddp zero2

Each run trains the same tiny Llama with SwitchLoRA (rank 8, switching every step at a high
rate) on the same global batches, each rank taking its slice, calling switch_step between
backward and step. Every rank writes DIR/<run>.rank<r>.pt with its final parameters, its
candidate pools and busy steps, the switch counts and the losses, so the test can compare the
ranks bitwise, the engines with each other, and both with a single-process run (`train`, which
the test imports and calls in-process with world size 1).

DeepSpeed's CPU backend would JIT-compile a shared-memory comm op (60-70 s) on first use; we
use gloo for every collective, so the worker replaces its builder with a no-op before
init_distributed (deliberately, for test speed, as tests/dist/worker.py does).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)

VOCAB, GLOBAL_BATCH, SEQ = 97, 4, 16
RANK, SEED, SWITCH_SEED, INTERVAL0, TOTAL_STEPS = 8, 3, 5, 10, 100_000
LR, WEIGHT_DECAY = 3e-3, 0.01


def tiny_switchlora_model():
    from mlorc_dist.models import build_model, llama_config
    from mlorc_dist.switchlora import apply_switchlora
    model = build_model(llama_config("tiny", VOCAB), seed=1234)
    return apply_switchlora(model, RANK, seed=SEED)


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def train(engine: str, steps: int, world: int = 1, rank: int = 0) -> dict:
    """Train `steps` steps under `engine` ('single', 'ddp' or 'zero2'); returns this rank's
    final parameters (float64), switching state, switch counts and losses."""
    from mlorc_dist.switchlora import (SwitchLoRAAdamW, switch_step, switchlora_param_groups,
                                       switchlora_state_dict)
    model = tiny_switchlora_model()
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model, WEIGHT_DECAY), lr=LR)
    micro = GLOBAL_BATCH // world
    layout = None
    if engine == "single":
        wrapped = model

        def backward(loss):
            loss.backward()

        def step():
            optimizer.step()
            optimizer.zero_grad()
    elif engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)

        def backward(loss):
            loss.backward()

        def step():
            optimizer.step()
            optimizer.zero_grad()
    elif engine == "zero2":
        import deepspeed
        from mlorc_dist.deepspeed import attach_layouts
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        kind = attach_layouts(wrapped, optimizer)
        assert kind == "zero1/2", kind
        # Where this rank's partition of the LoRA group cuts its last matrix: the test checks
        # that a cut falls inside a row (the hard case for mapping pieces to rows and columns).
        layout = [(piece.key, piece.start, piece.stop, tuple(piece.matrix.shape))
                  for _, _, tensor in optimizer.held_tensors()
                  for piece in optimizer.layout_of(tensor, optimizer.param_groups[0], 0).pieces
                  if ".lora_" in piece.key]
        backward, step = wrapped.backward, wrapped.step
    else:
        raise ValueError(engine)

    losses, counts = [], []
    for index, ids in enumerate(batches(steps)):
        ids = ids[rank * micro:(rank + 1) * micro]
        loss = wrapped(input_ids=ids, labels=ids).loss
        backward(loss)
        counts.append(switch_step(wrapped, optimizer, index, TOTAL_STEPS, interval0=INTERVAL0,
                                  seed=SWITCH_SEED))
        step()
        losses.append(float(loss.detach()))
    return {"params": {n: p.detach().double().clone() for n, p in model.named_parameters()},
            "switch": switchlora_state_dict(model), "counts": counts, "losses": losses,
            "layout": layout}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)
    import torch.distributed as dist
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None   # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    args.out.mkdir(parents=True, exist_ok=True)
    for engine in args.runs:
        result = train(engine, args.steps, world, rank)
        torch.save(result, args.out / f"{engine}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
