"""Step in backward: each parameter is stepped the moment its gradient is final, and the gradient
is freed, so that a step never holds the whole model's gradients (step_in_backward).

The mechanism is torch's post-accumulate-grad hook (Tensor.register_post_accumulate_grad_hook),
as torchtune's optimizer in backward uses it:
- in one process autograd calls it once per backward, after the last contribution to .grad;
- under FSDP2 (fully_shard) the hook sits on the sharded parameter, and FSDP2 calls it itself once
  that parameter's reduce-scatter has written the sharded gradient (torch/distributed/fsdp/
  _fully_shard/_fsdp_collectives.py, foreach_reduce), so the step sees the same gradient
  optimizer.step() would see after backward.
The optimizer's step_tensors steps the one tensor (its own step count, its own non-finite check).

What cannot work this way is refused with a ValueError before any step, each saying why:
global scope, optimizers other than MLorc-AdamW / MLorc-Lion, DeepSpeed engines and DDP (their
reductions and steps belong to the engine). Gradient accumulation and global-norm clipping are a
training loop's choice: launch/train.py refuses them with --step-in-backward (the first would
step on a partial gradient, the second needs every gradient before any step).
"""
from __future__ import annotations

import logging
import time

import torch

from .optim.base import LowRankMomentumOptimizer

__all__ = ["StepInBackward", "step_in_backward"]

logger = logging.getLogger("mlorc_dist")


class StepInBackward:
    """The hooks that step_in_backward registered. `.seconds`: time spent in steps since the
    last take_seconds(); remove() unregisters them (optimizer.step() then works as usual)."""

    def __init__(self, optimizer: LowRankMomentumOptimizer, params: list[torch.Tensor]):
        self.optimizer = optimizer
        self.seconds = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def _step(self, param: torch.Tensor) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            self.optimizer.step_tensors([param])
        param.grad = None
        self.seconds += time.perf_counter() - started

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def step_in_backward(optimizer, model: torch.nn.Module) -> StepInBackward:
    """Make `optimizer` step each of its parameters during backward, as soon as that parameter's
    gradient is final (under FSDP2: after its reduce-scatter), and free the gradient. Call it
    after fully_shard and after building the optimizer on the model's (sharded) parameters; then
    the training loop calls only backward() (no optimizer.step(), no zero_grad()). Every trainable
    parameter of `model` must be in the optimizer. Raises ValueError for what it cannot do."""
    if not isinstance(optimizer, LowRankMomentumOptimizer):
        raise ValueError(f"step_in_backward supports MLorcAdamW and MLorcLion (their dense groups included), "
                         f"got {type(optimizer).__name__}")
    if optimizer.scope != "local":
        raise ValueError("step_in_backward needs scope='local': global scope compresses every matrix of a step "
                         "together with collectives over all of them, which cannot run one parameter at a time "
                         "inside backward")
    kind = type(model).__name__
    if kind == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage"):
        raise ValueError("step_in_backward does not work under DeepSpeed: its engine reduces gradients in its own "
                         "buckets and steps in engine.step(), with no per-parameter hook to step from")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("step_in_backward does not work under DDP: a parameter's hook runs before DDP's "
                         "all-reduce of its gradient; use FSDP2 (fully_shard)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = {id(p) for p in params}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"step_in_backward: trainable parameters not in the optimizer (their gradients would "
                         f"never be freed): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; build "
                         "the optimizer on the model's parameters after fully_shard")
    if any(p.grad is not None for p in params):
        raise ValueError("step_in_backward: parameters already hold gradients; call optimizer.zero_grad("
                         "set_to_none=True) first")
    logger.info("%s steps each of its %d tensors during backward, as its gradient is final",
                optimizer.algorithm, len(params))
    return StepInBackward(optimizer, params)
