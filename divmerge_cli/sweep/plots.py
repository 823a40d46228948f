"""Figures 2 and 7 from result lines, with matplotlib when it is installed (an optional extra)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .results import cell_rows
from .stats import Z95, Stats, summarize


def _matplotlib():
    """(Figure, FigureCanvasAgg), or None when matplotlib is not importable."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def can_plot() -> bool:
    """Whether write_plots can draw (for the CLI to say when it cannot)."""
    return _matplotlib() is not None


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """anp_vs_k.png (Figure 2) and gamma_trace.png (Figure 7, if any optimized cell has a trace)
    in `out`; nothing when matplotlib is not importable. Returns the files written."""
    mpl = _matplotlib()
    if mpl is None:
        return []
    Figure, FigureCanvasAgg = mpl
    written = []
    cells = cell_rows(rows)
    if cells:
        written.append(
            plot_anp_vs_k(summarize(cells), out / "anp_vs_k.png", Figure, FigureCanvasAgg)
        )
    traced = [r for r in cells if r.get("trace")]
    if traced:
        written.append(plot_gamma(traced, out / "gamma_trace.png", Figure, FigureCanvasAgg))
    return written


def plot_anp_vs_k(summary: dict[str, dict[int, Stats]], path: Path, Figure, Canvas) -> Path:
    """Figure 2: mean ANP vs number of merged tasks, error bars = 95% CI over subsets."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    for i, (label, by_k) in enumerate(summary.items()):
        ks = list(by_k)
        ax.errorbar(
            ks,
            [by_k[k].mean for k in ks],
            yerr=[by_k[k].ci95 or 0.0 for k in ks],
            marker="osD^v"[i // 10 % 5],  # the color cycle repeats after 10 series
            linestyle=("-", "--")[i // 10 % 2],
            capsize=3,
            label=label,
        )
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("ANP (%)")
    ax.set_xticks(sorted({k for by_k in summary.values() for k in by_k}))
    ax.set_title(f"Mean ANP over subsets, 95% CI ({Z95} std/sqrt(n))", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # keeps the curves clear
    fig.savefig(path, dpi=120)
    return path


def plot_gamma(rows: list[dict], path: Path, Figure, Canvas) -> Path:
    """Figure 7: Gamma of the i-th task of each subset over optimizer steps (mean over groups),
    one panel per (method, position): the pairwise cells, else the smallest k with a trace."""
    from matplotlib.ticker import MaxNLocator

    ks = {r["k"] for r in rows}
    k = 2 if 2 in ks else min(ks)
    rows = [r for r in rows if r["k"] == k]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig = Figure(figsize=(4 * k, 3 * len(labels)), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(len(labels), k, squeeze=False)
    for li, label in enumerate(labels):
        for r in (r for r in rows if r["label"] == label):
            steps = [x["step"] for x in r["trace"]]
            for j in range(k):
                ys = [statistics.fmean(x["gamma"][j]) for x in r["trace"]]
                axes[li][j].plot(steps, ys, label="+".join(r["subset"]))
        for j in range(k):
            ax = axes[li][j]
            ax.set_title(f"{label}: Gamma of task {j + 1} (mean over groups)", fontsize=8)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[li][k - 1].legend(fontsize=6)
    fig.savefig(path, dpi=120)
    return path
