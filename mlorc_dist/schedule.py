"""The learning-rate schedule of a run, as a value that a checkpoint records.

A schedule is linear warmup to `peak` over `warmup` steps, then cosine decay to
`min_ratio * peak` at `total`. `extend(at, new_total)` continues it past a resume: from step `at`
the lr decays by a cosine from the lr it had at `at` to the same floor at `new_total`, so the
curve is continuous (a run that had already reached its floor stays there; one still warming up
keeps its warmup and decays over the new length). Extensions chain.

    schedule = Schedule(peak=1e-3, warmup=10, total=1000, min_ratio=0.1)
    schedule.lr(1)                       # 1e-4
    longer = schedule.extend(at=1000, total=2000)
    Schedule.from_state(longer.state_dict()) == longer
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Schedule", "lr_at"]


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to min_ratio * peak at
    `total`. `step` counts from 1."""
    if warmup and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _cosine_from(step: int, start: int, start_lr: float, floor: float, total: int) -> float:
    """Cosine from `start_lr` at `start` down to `floor` at `total` (then `floor`)."""
    progress = min(1.0, (step - start) / max(1, total - start))
    return floor + (start_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    peak: float
    warmup: int
    total: int
    min_ratio: float
    extensions: tuple = field(default=())   # ((at, total), ...): each continues from step `at`

    @property
    def final_total(self) -> int:
        return self.extensions[-1][1] if self.extensions else self.total

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (counted from 1)."""
        for index in range(len(self.extensions) - 1, -1, -1):
            at, total = self.extensions[index]
            if step > at:
                before = Schedule(self.peak, self.warmup, self.total, self.min_ratio, self.extensions[:index])
                return _cosine_from(step, at, before.lr(at), self.peak * self.min_ratio, total)
        return lr_at(step, peak=self.peak, warmup=self.warmup, total=self.total, min_ratio=self.min_ratio)

    def extend(self, at: int, total: int) -> "Schedule":
        """This schedule continued from step `at` to end at `total` (continuous at `at`)."""
        if total <= at:
            raise ValueError(f"an extended schedule must end after step {at}, got total {total}")
        if not self.extensions and at <= self.warmup:     # still warming up: the same warmup, a longer decay
            return Schedule(self.peak, self.warmup, total, self.min_ratio)
        return Schedule(self.peak, self.warmup, self.total, self.min_ratio, self.extensions + ((at, total),))

    def differences(self, other: "Schedule") -> list[str]:
        """What differs between two schedules' settings, as 'name: mine vs other' strings."""
        out = []
        for name in ("peak", "warmup", "min_ratio"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {mine} vs {theirs}")
        if self.final_total != other.final_total:
            out.append(f"total steps {self.final_total} vs {other.final_total}")
        return out

    def state_dict(self) -> dict:
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "min_ratio": self.min_ratio,
                "extensions": [list(e) for e in self.extensions]}

    @classmethod
    def from_state(cls, state: dict) -> "Schedule":
        return cls(float(state["peak"]), int(state["warmup"]), int(state["total"]), float(state["min_ratio"]),
                   tuple((int(a), int(t)) for a, t in state.get("extensions", ())))
