"""The paper's tables from result lines (Tables 3, 6, 7), as markdown and CSV, and the report
folder (tables plus plots)."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plots import write_plots
from .stats import Z95, summarize


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]  # str / int / float (ANP in %) / None (no cell)


def pairwise_table(rows: Iterable[dict]) -> Table:
    """Table 3: per method, mean, std and 95% CI of ANP (%) over all pairwise (k = 2) merges."""
    out = [
        [label, s.n, s.mean, s.std, s.ci95]
        for label, by_k in summarize(rows).items()
        if (s := by_k.get(2))
    ]
    return Table(
        "Pairwise merges: ANP (%) over task pairs (paper Table 3)",
        ["method", "pairs", "mean", "std", "ci95"],
        out,
    )


def per_k_table(rows: Iterable[dict]) -> Table:
    """Tables 6/7: mean ANP (%) over subsets per k (rows) and method (columns), plus "Average",
    the unweighted mean of a method's per-k means (as the paper's tables: e.g. Table 7's model
    averaging, (97.92 + 82.62 + 53.38) / 3 = 77.97)."""
    summary = summarize(rows)
    labels = list(summary)
    ks = sorted({k for by_k in summary.values() for k in by_k})
    body: list[list[Any]] = [
        [k, *[summary[m][k].mean if k in summary[m] else None for m in labels]] for k in ks
    ]
    avg = [statistics.fmean(s.mean for s in summary[m].values()) for m in labels]
    return Table(
        "ANP (%) by number of merged tasks (paper Tables 6, 7)",
        ["k", *labels],
        [*body, ["Average", *avg]] if ks else [],
    )


def references_table(rows: Iterable[dict]) -> Table:
    refs = [r for r in rows if r.get("type") == "reference"]
    return Table(
        "Experts on their own task (the ANP denominators)",
        ["task", "metric", "score", "n", "expert"],
        [[r["task"], r["metric"], 100 * r["score"], r["n"], r["expert"]] for r in refs],
    )


def fmt_value(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured markdown table under a bold title (floats to 2 decimals, "-" = no cell)."""
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(fmt_value(v) for v in row) + " |")
    if not table.rows:
        lines.append("| " + " | ".join("-" for _ in table.columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with full precision (empty field = no cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    for row in table.rows:
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def write_reports(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """tables.md, pairwise.csv, per_k.csv and, when matplotlib is importable, anp_vs_k.png
    (Figure 2) and gamma_trace.png (Figure 7, if any optimized cell has a trace).
    Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"pairwise": pairwise_table(rows), "per_k": per_k_table(rows)}
    md = [to_markdown(t) for t in tables.values()]
    refs = references_table(rows)
    if refs.rows:
        md.append(to_markdown(refs))
    note = (
        f"ANP in %. std: sample standard deviation over subsets; ci95: {Z95} x std / sqrt(n) "
        "(normal approximation). Average: mean of the per-k means.\n"
    )
    written = [out / "tables.md"]
    written[0].write_text("\n".join(md) + "\n" + note)
    for name, t in tables.items():
        (out / f"{name}.csv").write_text(to_csv(t))
        written.append(out / f"{name}.csv")
    return written + write_plots(rows, out)
