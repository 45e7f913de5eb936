"""launch/train.py's evaluation under a real engine, for held-out sets of every size.

Run under torchrun (FSDP2) or the deepspeed launcher (ZeRO-3), or as one process:

    python tests/dist/eval_worker.py OUT.json LARGEST [train.py flags]

Builds the engine exactly as launch/train.py does (its own functions), then for each held-out
size n = 1 .. LARGEST: evaluates; then takes one training step (which must
find the modules in the state it expects after evaluations), evaluates again, and exports with
train.py's export_hf. Rank 0 writes {"eval": {n: loss, "after_step": loss}, ...} to OUT.json.
LARGEST = 0 exports the initial weights and does nothing else.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("train", ROOT / "launch" / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


def main() -> None:
    words = [w for w in sys.argv[1:] if not w.startswith("--local_rank")]   # the deepspeed launcher's
    out, largest, argv = Path(words[0]), int(words[1]), words[2:]
    parser = train.build_parser()
    args = parser.parse_args(argv)
    world_env = train.launcher_world_size()
    ds_config = train.check_args(args, train.explicit_flags(parser, argv), world_env)
    kind = train.engine_kind(args)
    rank, world = train.init_distributed(kind, args.collective_timeout)
    args.micro_batch = args.micro_batch or max(1, args.global_batch // world)
    device = train.device_for(kind)
    torch.manual_seed(0)
    config = train.build_config(args)
    trainer = train.Trainer(args, kind, train.build_model(args, config, kind, ds_config), world, device, ds_config)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(3, config.vocab_size, (max(largest, args.global_batch), args.seq_len), generator=generator)
    labels = inputs.clone()
    labels[:, : args.seq_len // 4] = train.IGNORE_INDEX        # some ignored tokens, as in SFT
    if largest == 0:                      # the initial weights, exported as built
        train.export_hf(trainer, train.load_tokenizer(args, rank), args, rank)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    results = {size: train.evaluate(trainer, (inputs[:size], labels[:size]), rank, world, device)
               for size in range(1, largest + 1)}
    losses = []                           # one training step right after the evaluations (one global batch)
    for j in range(args.global_batch // (args.micro_batch * world)):
        lo = (j * world + rank) * args.micro_batch
        losses.append(trainer.micro_step(inputs[lo:lo + args.micro_batch], inputs[lo:lo + args.micro_batch]))
    trainer.step()
    results["after_step"] = train.evaluate(trainer, (inputs[:1], labels[:1]), rank, world, device)
    if args.export:                       # right after an evaluation, as a run whose last step evaluates
        train.export_hf(trainer, train.load_tokenizer(args, rank), args, rank)
    if rank == 0:
        out.write_text(json.dumps({"eval": results, "losses": losses, "world": world}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        from mlorc_dist.training import exit_without_teardown
        exit_without_teardown(0)
