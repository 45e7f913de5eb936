"""One multi-process job of the SwitchLoRA tests: DDP and DeepSpeed ZeRO-2 on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29950 \
        tests/dist/switchlora_worker.py --out DIR --steps 10 --runs ddp zero2 ddp:fp64 zero2:fp64

Each run (engine[:fp64]) trains the same tiny Llama with SwitchLoRA (rank 8, switching every
step at a high rate) on the same global batches, each rank taking its slice, calling switch_step between
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
RANK, SEED, SWITCH_SEED, INTERVAL0, TOTAL_STEPS = 4, 3, 5, 10, 100_000
LR, WEIGHT_DECAY = 3e-3, 0.01
EPS = float(os.environ.get("SWITCHLORA_EPS", "1e-8"))


def tiny_switchlora_model(dtype=torch.float32):
    """Shapes (as tests/dist/worker.py) chosen so that ZeRO-2 at world size 2 cuts a LoRA
    factor inside a row (layers.1.mlp.gate_proj.lora_A, 4 x 40, at element 46)."""
    from transformers import LlamaConfig
    from mlorc_dist.models import build_model
    from mlorc_dist.switchlora import apply_switchlora
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=61, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager", use_cache=False)
    model = build_model(config, seed=1234, dtype=dtype)
    return apply_switchlora(model, RANK, seed=SEED)


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def train(run: str, steps: int, world: int = 1, rank: int = 0, replay: list | None = None) -> dict:
    """Train `steps` steps of run 'engine[:fp64]' (engine: 'single', 'ddp', 'zero2', or
    'replay': single process fed the gradients a ZeRO-2 run logged, `replay`, one list of
    (key, start, stop, values) per step, every rank's pieces together). Returns this rank's
    final parameters (float64), switching state, switch counts, losses and, for zero2, the
    LoRA pieces of its layout and the gradient of every piece it stepped (`grads`)."""
    from mlorc_dist.switchlora import (SwitchLoRAAdamW, switch_step, switchlora_param_groups,
                                       switchlora_state_dict)
    engine, _, precision = run.partition(":")
    model = tiny_switchlora_model(torch.float64 if precision == "fp64" else torch.float32)
    optimizer = SwitchLoRAAdamW(switchlora_param_groups(model, WEIGHT_DECAY), lr=LR, eps=EPS)
    micro = GLOBAL_BATCH // world
    layout, grads = None, None
    wrapped, switch_optimizer = model, optimizer

    def backward(loss):
        loss.backward()

    def step():
        optimizer.step()
        optimizer.zero_grad()

    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    elif engine == "zero2":
        import deepspeed
        from mlorc_dist.deepspeed import attach_layouts
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
                  # DeepSpeed 0.19 clips the gradient norm to 1.0 unless told otherwise
                  # (GRADIENT_CLIPPING_DEFAULT): DDP and the single-process run do not clip.
                  "gradient_clipping": 0.0}
        wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        kind = attach_layouts(wrapped, optimizer)
        assert kind == "zero1/2", kind
        layout = [(piece.key, piece.start, piece.stop, tuple(piece.matrix.shape))
                  for group, position, tensor in optimizer.held_tensors()
                  for piece in optimizer.layout_of(tensor, group, position).pieces
                  if ".lora_" in piece.key]
        grads = [[] for _ in range(steps)]
        log_grads(optimizer, grads)
        backward, step = wrapped.backward, wrapped.step
        switch_optimizer = wrapped.optimizer       # DeepSpeed's wrapper: switch_step unwraps it
    elif engine not in ("single", "replay"):
        raise ValueError(engine)

    losses, counts = [], []
    for index, ids in enumerate(batches(steps)):
        optimizer.current_step = index              # read by log_grads
        if engine == "replay":
            set_grads(model, replay[index])
        else:
            ids = ids[rank * micro:(rank + 1) * micro]
            loss = wrapped(input_ids=ids, labels=ids).loss
            backward(loss)
            losses.append(float(loss.detach()))
        counts.append(switch_step(wrapped, switch_optimizer, index, TOTAL_STEPS, interval0=INTERVAL0,
                                  seed=SWITCH_SEED))
        step()
    return {"params": {n: p.detach().double().clone() for n, p in model.named_parameters()},
            "switch": switchlora_state_dict(model), "counts": counts, "losses": losses,
            "layout": layout, "grads": grads}


def log_grads(optimizer, grads: list) -> None:
    """Record, at every optimizer.step(), the gradient of each piece (global coordinates)."""
    real_step = optimizer.step

    def step(*args, **kwargs):
        for group, position, tensor in optimizer.held_tensors():
            if tensor.grad is None:
                continue
            flat = tensor.grad.reshape(-1)
            for piece in optimizer.layout_of(tensor, group, position).pieces:
                grads[optimizer.current_step].append((piece.key, piece.start, piece.stop,
                                                      piece.view(flat).detach().clone()))
        return real_step(*args, **kwargs)
    optimizer.step = step


def set_grads(model, pieces: list) -> None:
    """Give every trainable parameter the gradient assembled from logged pieces."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    covered = {name: 0 for name, p in params.items() if p.requires_grad}
    for key, start, stop, values in pieces:
        params[key].grad.view(-1)[start:stop] = values.to(params[key].dtype)
        covered[key] += stop - start
    assert all(covered[n] == params[n].numel() for n in covered), "logged pieces do not tile the parameters"


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
    for run in args.runs:
        result = train(run, args.steps, world, rank)
        torch.save(result, args.out / f"{run.replace(':', '_')}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from mlorc_dist.training import exit_without_teardown
    exit_without_teardown(0)      # gloo's teardown race at interpreter exit (see its docstring)
