"""launch/train.py's --report-to: each step's metrics record to TensorBoard and / or Weights & Biases.

    check_report_to(args)                               # before the model: the packages are there
    reporter = open_reporters(args, rank, world, start, optimizer)   # every rank
    reporter.log(record)                                # every rank, after metrics.jsonl's line
    reporter.close()

Only rank 0 writes. The other ranks take part in one small all-gather per logged step: every
rank's peak memory (CUDA max allocated on a GPU, else the process's peak RSS), which rank 0
reports as memory/peak_rank<r>_mib and memory/peak_max_mib. With --report-to none (the default)
nothing is gathered and nothing is imported.

Scalars (the record's own values, named as transformers' Trainer names them where it has them):
    train/loss, train/lr, eval/loss, train/skipped_steps (the optimizer's steps skipped for a
    non-finite gradient, cumulative), perf/tokens_per_s, perf/step_time, perf/optimizer_time,
    perf/mfu, perf/model_flops_per_s, memory/...; any other number in the record as train/<key>.

TensorBoard: event files in <out>/tensorboard (torch.utils.tensorboard; a resumed run purges
the steps after its checkpoint). W&B: wandb.init(project=$WANDB_PROJECT or "mlorc-dist",
name=<out>'s name, dir=<out>, config=the flags); WANDB_MODE=offline writes <out>/wandb/offline-run-*
for `wandb sync`. A resumed run continues the same W&B run (its id is kept in <out>/wandb_run_id).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["REPORTERS", "check_report_to", "open_reporters", "Reporter", "scalars_of"]

REPORTERS = ("tensorboard", "wandb", "none")
_PACKAGES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}
_NAMES = {"loss": "train/loss", "lr": "train/lr", "eval_loss": "eval/loss", "tokens_per_s": "perf/tokens_per_s",
          "step_time": "perf/step_time", "optimizer_time": "perf/optimizer_time", "mfu": "perf/mfu",
          "model_flops_per_s": "perf/model_flops_per_s", "max_allocated": "memory/max_allocated_rank0_mib"}
_SKIPPED_KEYS = {"step", "model_flops_per_token"}
MIB = 2 ** 20


def _requested(args) -> list[str]:
    values = list(getattr(args, "report_to", None) or ["none"])
    return [v for v in dict.fromkeys(values) if v != "none"]


def check_report_to(args) -> None:
    """UsageError (launch_checks) for an unknown name, "none" with another, or a reporter whose
    package is not installed: before any model is built."""
    from .launch_checks import UsageError
    values = list(getattr(args, "report_to", None) or ["none"])
    unknown = [v for v in values if v not in REPORTERS]
    if unknown:
        raise UsageError(f"--report-to {' '.join(unknown)}: unknown; choose from {', '.join(REPORTERS)}")
    if "none" in values and len(set(values)) > 1:
        raise UsageError(f"--report-to {' '.join(values)}: 'none' cannot be combined with a reporter")
    for name in _requested(args):
        for module in _PACKAGES[name]:
            try:
                __import__(module)
            except ImportError as error:
                raise UsageError(f"--report-to {name} needs the {name} package, which is not installed ({error}): "
                                 f"pip install 'mlorc-dist[integrations]' (or pip install {name})") from None


def scalars_of(record: dict, skipped_steps: int | None = None, rank_peaks: list[float] | None = None) -> dict:
    """The scalars one record becomes (module docstring)."""
    scalars = {}
    for key, value in record.items():
        if key in _SKIPPED_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = _NAMES.get(key, f"train/{key}")
        scalars[name] = value / MIB if key == "max_allocated" else value
    if skipped_steps is not None:
        scalars["train/skipped_steps"] = skipped_steps
    if rank_peaks:
        for rank, peak in enumerate(rank_peaks):
            scalars[f"memory/peak_rank{rank}_mib"] = peak / MIB
        scalars["memory/peak_max_mib"] = max(rank_peaks) / MIB
    return scalars


def _flag_values(args) -> dict:
    """The run's flags, as W&B's config and TensorBoard's text."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in vars(args).items()}


class _TensorBoard:
    def __init__(self, args, start: int):
        from torch.utils.tensorboard import SummaryWriter
        self.directory = Path(args.out) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=start + 1 if start else None)
        self.writer.add_text("flags", "    " + json.dumps(_flag_values(args), indent=1).replace("\n", "\n    "), 0)

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    def __init__(self, args, start: int):
        import wandb
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if (getattr(args, "resume", False) and id_file.is_file()) else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlorc-dist"), name=out.resolve().name,
                              dir=str(out), config=_flag_values(args), id=run_id,
                              resume="allow" if run_id else None)
        id_file.write_text(self.run.id + "\n")
        self.directory = Path(self.run.dir).parent

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """Sends each record to the backends (rank 0) after gathering every rank's peak memory."""

    def __init__(self, backends: list, rank: int, world: int, optimizer=None, device=None):
        self.backends, self.rank, self.world, self.optimizer = backends, rank, world, optimizer
        self.device = device

    @property
    def active(self) -> bool:
        return self.device is not None          # None: --report-to none, or closed

    def _rank_peaks(self) -> list[float]:
        import torch
        import torch.distributed as dist
        if torch.cuda.is_available() and self.device is not None and self.device.type == "cuda":
            mine = float(torch.cuda.max_memory_allocated(self.device))
        else:
            from .memory.profiler import rss_bytes
            mine = float(rss_bytes()[1] or 0)
        if not (dist.is_available() and dist.is_initialized()) or self.world == 1:
            return [mine]
        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        gathered = [torch.zeros(1, dtype=torch.float64, device=on) for _ in range(self.world)]
        dist.all_gather(gathered, torch.tensor([mine], dtype=torch.float64, device=on))
        return [float(t.item()) for t in gathered]

    def log(self, record: dict) -> None:
        if not self.active:
            return
        peaks = self._rank_peaks()
        if self.rank != 0:
            return
        skipped = getattr(self.optimizer, "skipped_steps", None)
        scalars = scalars_of(record, skipped, peaks)
        for backend in self.backends:
            backend.log(scalars, int(record["step"]))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
        self.device = None


def open_reporters(args, rank: int, world: int, start: int = 0, optimizer=None, device=None) -> Reporter:
    """The run's reporter on every rank (--report-to; the backends on rank 0 only). `start`: the
    step the run resumes after; `optimizer`: for its skipped_steps; `device`: where this rank's
    peak memory is read (None: the CUDA device of LOCAL_RANK where there is one, else RSS)."""
    import torch
    names = _requested(args)
    if not names:
        return Reporter([], rank, world)
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    backends = []
    if rank == 0:
        backends = [{"tensorboard": _TensorBoard, "wandb": _WandB}[name](args, start) for name in names]
    return Reporter(backends, rank, world, optimizer, torch.device(device))
