"""PNG charts written next to benchmark JSON records (``--plot``)."""

from __future__ import annotations

import json
from pathlib import Path

from fastmim import files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernel_speedups(record_path: Path) -> Path:
    """Speedup over the reference provider per (shape, mode), one bar per provider."""
    plt = _pyplot()
    record = json.loads(Path(record_path).read_text())
    rows = [r for r in record["rows"] if "speedup" in r]
    groups = sorted({(json.dumps(r["shape"], sort_keys=True), r["mode"], r["dtype"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4), dpi=100)
    width = 0.8 / max(1, len(providers))
    speedup = {
        (r["provider"], json.dumps(r["shape"], sort_keys=True), r["mode"], r["dtype"]): r["speedup"] for r in rows
    }
    for i, provider in enumerate(providers):
        values = [speedup.get((provider, *g), 0.0) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=provider)
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{json.loads(s)}\n{m} {d}" for s, m, d in groups], fontsize=7)
    ax.set_ylabel("speedup (x)")
    ax.set_title(f"{record['bench']} on {record['gpu']} (torch {record['torch']})")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    out = Path(record_path).with_suffix(".png")
    files.write_figure(fig, out)
    plt.close(fig)
    return out


def plot_step_breakdown(record_path: Path) -> Path:
    """Stacked per-stage ms per step for each impl that finished, annotated with img/s."""
    plt = _pyplot()
    record = json.loads(Path(record_path).read_text())
    rows = [r for r in record["rows"] if "img_per_s" in r]
    stages = ("data_ms", "forward_ms", "backward_ms", "optimizer_ms")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    labels = [f"{r['model']}\n{r['impl']}" for r in rows]
    bottom = [0.0] * len(rows)
    for stage in stages:
        values = [r.get(stage) or 0.0 for r in rows]
        ax.bar(labels, values, bottom=bottom, label=stage.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, (r, top) in enumerate(zip(rows, bottom)):
        ax.annotate(f"{r['img_per_s']:.0f} img/s", (x, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per step (synchronised breakdown)")
    ax.set_title(f"step on {record['gpu']} (torch {record['torch']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(record_path).with_suffix(".png")
    files.write_figure(fig, out)
    plt.close(fig)
    return out
