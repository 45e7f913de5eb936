"""Gather every rank's memory samples on rank 0 and write one report: JSON, a text table, a PNG.

The JSON holds, per rank, its samples (named points of the step, each with exact tensor bytes
by category, RSS and, on CUDA, allocator and NVML numbers), its peaks and its notes; `totals`
sums the exact categories of `reference_sample` (right after the last optimizer step) over
ranks, so it can be compared with the planner's totals; `nodes` has, per node, the sum and the
max over its ranks of those categories, the activations and the process peaks (a rank's node:
its hostname and the launcher's node index, `profiler.node_rank`). The table and the PNG show
the per-node sums and maxima after the ranks.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["gather", "write_report", "format_table", "reference_sample", "render_png", "nodes"]

SHOWN = ("weights", "master", "grads", "grad_staging", "state_factors", "state_dense",
         "state_scalars", "engine_buffers", "gathered_weights", "activations")
PEAKS = ("rss_peak", "cuda_max_reserved", "nvml_used")


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


def _rank_values(r: dict) -> dict:
    """The bytes shown for one rank: SHOWN (reference sample; activations: measured peak) and
    PEAKS (None where not measured)."""
    ref = reference_sample(r) or {"tensors": {}}
    values = {k: r["peaks"].get("activations") if k == "activations" else ref["tensors"].get(k, 0)
              for k in SHOWN}
    values.update({k: r["peaks"].get(k) for k in PEAKS})
    return values


def nodes(ranks: list[dict]) -> list[dict]:
    """Per node (in the order of its first rank): its index, host, ranks, and the sum and the
    max over those ranks of every SHOWN category and PEAKS value (None where no rank measured
    it). A rank's node is its (host, node_rank) pair: ranks of one host with the same launcher
    node index (or none) share a node."""
    groups: dict[tuple, list[dict]] = {}
    for r in ranks:
        groups.setdefault((r.get("host", "?"), r.get("node_rank")), []).append(r)
    out = []
    for index, ((host, _), members) in enumerate(groups.items()):
        values = [_rank_values(r) for r in members]
        total, peak = {}, {}
        for key in (*SHOWN, *PEAKS):
            measured = [v[key] for v in values if v[key] is not None]
            total[key] = sum(measured) if measured else None
            peak[key] = max(measured) if measured else None
        out.append({"node": index, "host": host, "ranks": [r["rank"] for r in members], "sum": total, "max": peak})
    return out


def format_table(ranks: list[dict]) -> str:
    """One row per rank: exact bytes of the reference sample, activations, peaks (MiB); then
    per node the sum and the max over its ranks."""
    cols = ["rank", "host", *SHOWN, *PEAKS]
    rows = []
    for r in ranks:
        values = _rank_values(r)
        rows.append([str(r["rank"]), r["host"], *(_mib(values[k]) for k in (*SHOWN, *PEAKS))])
    for node in nodes(ranks):
        for kind in ("sum", "max"):
            rows.append([f"node{node['node']} {kind}", f"{node['host']} ({len(node['ranks'])} ranks)",
                         *(_mib(node[kind][k]) for k in (*SHOWN, *PEAKS))])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    notes = sorted({n for r in ranks for n in r.get("notes", [])})
    lines.append("MiB; exact tensor bytes right after the last optimizer step (grads: as handed to "
                 "it); activations: peak measured; node rows: sum and max over the node's ranks")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _stacked(ax, bars: list[dict], labels: list[str], title: str, legend: bool) -> None:
    """Stacked SHOWN categories per bar and a star for the process peak (CUDA max reserved when
    there is a GPU, else peak RSS)."""
    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for key in SHOWN:
        values = [(b[key] or 0) / 2 ** 20 for b in bars]
        if any(values):
            ax.bar(xs, values, bottom=bottoms, label=key)
            bottoms = [low + v for low, v in zip(bottoms, values)]
    cuda = any(b.get("cuda_max_reserved") for b in bars)
    marks = [((b.get("cuda_max_reserved") if cuda else b.get("rss_peak")) or 0) / 2 ** 20 for b in bars]
    ax.plot(xs, marks, "k*", markersize=10, label="CUDA max reserved" if cuda else "peak RSS")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def render_png(ranks: list[dict], path_png) -> None:
    """Stacked bars per rank: exact categories (step sample) + activations, and a star for the
    process peak; beside them the same per node, summed over the node's ranks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = nodes(ranks)
    width_ranks = max(3.0, 1.0 + 0.6 * len(ranks))
    width_nodes = max(2.0, 1.0 + 0.8 * len(grouped))
    fig, (ax, ax_nodes) = plt.subplots(1, 2, figsize=(width_ranks + width_nodes + 1.5, 4.5),
                                       gridspec_kw={"width_ratios": [width_ranks, width_nodes]})
    engine = ranks[0].get("engine", "?") if ranks else "?"
    _stacked(ax, [_rank_values(r) for r in ranks], [f"rank {r['rank']}\n{r['host']}" for r in ranks],
             f"memory per rank by category\n({engine}, {ranks[0].get('optimizer') if ranks else ''})", False)
    _stacked(ax_nodes, [n["sum"] for n in grouped],
             [f"node {n['node']}\n{n['host']}\nranks {','.join(map(str, n['ranks']))}" for n in grouped],
             "per node: sum over its ranks", True)
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
              "ranks": ranks, "totals": totals, "nodes": nodes(ranks), "table": format_table(ranks)}
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
