"""Gather every rank's memory samples on rank 0 and write one report: JSON, a text table, a PNG.

The JSON holds, per rank, its samples (named points of the step, each with exact tensor bytes
by category, RSS and, on CUDA, allocator and NVML numbers), its peaks and its notes; `totals`
sums the exact categories of `reference_sample` (right after the last optimizer step) over
ranks, so it can be compared with the planner's totals.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["gather", "write_report", "format_table", "reference_sample", "render_png"]

SHOWN = ("weights", "master", "grads", "grad_staging", "state_factors", "state_dense",
         "state_scalars", "engine_buffers", "gathered_weights", "activations")


def gather(rank_report: dict) -> list[dict]:
    """Every rank's report, in rank order, on every rank (all_gather_object crosses nodes: it
    runs on the default process group, whatever its backend)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [rank_report]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, rank_report)
    return sorted(reports, key=lambda r: r["rank"])


def reference_sample(rank_report: dict) -> dict | None:
    """What the planner's exact categories are compared with: the sample taken right after the
    last optimizer step (the weights, master and state as the run keeps them: ZeRO-3 releases
    its persistent parameters during the step), with "grads" from the last "step" sample (the
    gradients handed to the optimizer). Without a step: the last sample."""
    samples = rank_report["samples"]
    if not samples:
        return None
    steps = [i for i, s in enumerate(samples) if s["name"] == "step"]
    if not steps:
        return samples[-1]
    step = samples[steps[-1]]
    after = samples[steps[-1] + 1] if steps[-1] + 1 < len(samples) else step
    tensors = dict(after["tensors"])
    tensors["grads"] = step["tensors"]["grads"]
    return {**after, "name": f"{after['name']} (grads: step)", "tensors": tensors}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.2f}"


def format_table(ranks: list[dict]) -> str:
    """One row per rank: exact bytes of the reference sample, activations, peaks (MiB)."""
    cols = ["rank", "host", *SHOWN, "rss_peak", "cuda_max_reserved", "nvml_used"]
    rows = []
    for r in ranks:
        ref = reference_sample(r) or {"tensors": {}}
        acts = r["peaks"].get("activations")
        cells = [str(r["rank"]), r["host"]]
        cells += [_mib(acts if k == "activations" else ref["tensors"].get(k, 0)) for k in SHOWN]
        cells += [_mib(r["peaks"].get(k)) for k in ("rss_peak", "cuda_max_reserved", "nvml_used")]
        rows.append(cells)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    notes = sorted({n for r in ranks for n in r.get("notes", [])})
    lines.append("MiB; exact tensor bytes right after the last optimizer step (grads: as handed to "
                 "it); activations: peak measured")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def render_png(ranks: list[dict], path_png) -> None:
    """Stacked bars per rank: exact categories (step sample) + activations; a dot for the process
    peak (CUDA max reserved when there is a GPU, else peak RSS)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.6 * len(ranks)), 4.5))
    xs = list(range(len(ranks)))
    bottoms = [0.0] * len(ranks)
    for key in SHOWN:
        values = []
        for r in ranks:
            ref = reference_sample(r) or {"tensors": {}}
            value = r["peaks"].get("activations", 0) if key == "activations" else ref["tensors"].get(key, 0)
            values.append(value / 2 ** 20)
        if any(values):
            ax.bar(xs, values, bottom=bottoms, label=key)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    marks = []
    for r in ranks:
        p = r["peaks"]
        marks.append((p.get("cuda_max_reserved") or p.get("rss_peak") or 0) / 2 ** 20)
    label = "CUDA max reserved" if any(r["peaks"].get("cuda_max_reserved") for r in ranks) else "peak RSS"
    ax.plot(xs, marks, "k*", markersize=10, label=label)
    ax.set_xticks(xs, [f"rank {r['rank']}\n{r['host']}" for r in ranks], fontsize=7)
    ax.set_ylabel("MiB")
    engine = ranks[0].get("engine", "?") if ranks else "?"
    ax.set_title(f"memory per rank by category\n({engine}, {ranks[0].get('optimizer') if ranks else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path_png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(ranks: list[dict], path_json, path_png=None, plan: dict | None = None) -> dict:
    """Write the JSON report (and `<name>.txt` with the table, and the PNG); return the report."""
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    totals: dict[str, int] = {}
    for r in ranks:
        ref = reference_sample(r) or {"tensors": {}}
        for k, v in ref["tensors"].items():
            if k != "activations":
                totals[k] = totals.get(k, 0) + v
    report = {"world_size": len(ranks), "engine": ranks[0].get("engine") if ranks else None,
              "ranks": ranks, "totals": totals, "table": format_table(ranks)}
    if plan is not None:
        report["plan"] = plan
    path_json.write_text(json.dumps(report, indent=1))
    path_json.with_suffix(".txt").write_text(report["table"] + "\n")
    if path_png is not None:
        try:
            render_png(ranks, path_png)
        except ImportError as exc:                     # matplotlib missing: say so, keep the rest
            report["png_error"] = str(exc)
    return report
