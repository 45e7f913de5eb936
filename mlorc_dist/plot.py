"""Plot runs of launch/train.py: loss, eval loss, lr and tokens/s over steps, several runs overlaid.

    python -m mlorc_dist.plot runs/mlorc runs/adamw [--out compare.png] [--labels MLorc AdamW]
        [--smooth 10]

Each RUN_DIR holds a metrics.jsonl (or is one). One PNG with a panel each for the training
loss, the held-out loss (where the run evaluated), the learning rate and tokens/s, and one for
MFU (or the achieved model FLOP/s where the device's peak is unknown) when the runs recorded it. A run that was
resumed wrote each step once (launch/train.py keeps the file that way); a step found twice
counts from its last line. --out defaults to RUN_DIR/metrics.png for one run and compare.png
in the runs' common parent directory for several.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["read_metrics", "plot_runs", "main"]

PANELS = (("loss", "training loss"), ("eval_loss", "held-out loss"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens / s"))


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The records of a run directory's metrics.jsonl (or of that file), one per step, by step."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (a launch/train.py --out directory?)")
    by_step: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue          # a run killed while writing its last line
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _smoothed(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _labels(runs: list[Path], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(runs):
            raise ValueError(f"{len(given)} labels for {len(runs)} runs")
        return list(given)
    names = [r.name if r.is_dir() else r.parent.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in runs]


def default_out(runs: list[Path]) -> Path:
    directories = [r if r.is_dir() else r.parent for r in runs]
    if len(directories) == 1:
        return directories[0] / "metrics.png"
    return Path(os.path.commonpath([str(d.resolve()) for d in directories])) / "compare.png"


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike | None = None, labels: list[str] | None = None,
              smooth: int = 1, dpi: int = 110) -> Path:
    """Write the PNG of these runs; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("no run directory given")
    data = [read_metrics(r) for r in runs]
    names = _labels(runs, labels)
    panels = list(PANELS)
    if any("mfu" in rec for records in data for rec in records):
        panels.append(("mfu", "model FLOPs utilisation"))
    elif any("model_flops_per_s" in rec for records in data for rec in records):
        panels.append(("model_flops_per_s", "model FLOP/s (all ranks)"))
    columns = 2 if len(panels) <= 4 else 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (key, title) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        drawn = False
        for n, (records, name) in enumerate(zip(data, names)):
            points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            colour = colours[n % len(colours)]
            if key == "eval_loss":
                ax.plot(steps, values, "o-", color=colour, markersize=3, label=name)
            else:
                ax.plot(steps, _smoothed(list(values), smooth if key != "lr" else 1), color=colour,
                        linewidth=1.2, label=name)
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded" + (" (--eval-every)" if key == "eval_loss" else ""),
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
        elif index == 0:
            ax.legend(fontsize=7)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    if smooth > 1:
        fig.suptitle(f"moving average over {smooth} steps (lr and held-out loss as recorded)", fontsize=9)
    fig.tight_layout()
    target = Path(out) if out is not None else default_out(runs)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    plt.close(fig)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlorc_dist.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="launch/train.py --out directories (or metrics.jsonl files)")
    parser.add_argument("--out", help="the PNG (default: RUN_DIR/metrics.png, or compare.png beside several runs)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the directories' names)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over this many steps")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = plot_runs(args.runs, args.out, args.labels, max(1, args.smooth))
    except (FileNotFoundError, ValueError) as error:
        print(f"python -m mlorc_dist.plot: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
