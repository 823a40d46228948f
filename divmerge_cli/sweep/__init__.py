"""Sweeps (paper Sec. 5.2-5.3): every k-subset of tasks x every method -> merge -> scores -> ANP.

One job per file:
    config.py   the sweep file's schema, validation at load, the recipe of each cell
    results.py  the resumable results file (JSON lines) and which lines belong to a sweep
    run.py      running the cells: merge, score, append
    stats.py    mean, std and 95% interval of ANP over subsets
    tables.py   Tables 3, 6, 7 as markdown and CSV; the report folder
    plots.py    Figures 2 and 7 (matplotlib, optional)

The names below are the sweep's public interface (`from divmerge_cli.sweep import run_sweep`).
"""

from .config import (
    EvalSettings,
    MethodEntry,
    SweepConfig,
    build_recipe,
    check_checkpoints,
    load_sweep,
    method_key,
    parse_k,
    sweep_from_dict,
)
from .results import (
    append_row,
    cell_id,
    cell_rows,
    check_results_file,
    header_row,
    read_results,
    sweep_rows,
)
from .run import SweepProgress, reference_scores, run_cell, run_sweep
from .stats import Z95, Stats, stats, summarize
from .tables import (
    Table,
    fmt_value,
    pairwise_table,
    per_k_table,
    references_table,
    to_csv,
    to_markdown,
    write_reports,
)

__all__ = [
    "EvalSettings",
    "MethodEntry",
    "Stats",
    "SweepConfig",
    "SweepProgress",
    "Table",
    "Z95",
    "append_row",
    "build_recipe",
    "cell_id",
    "cell_rows",
    "check_checkpoints",
    "check_results_file",
    "fmt_value",
    "header_row",
    "load_sweep",
    "method_key",
    "pairwise_table",
    "parse_k",
    "per_k_table",
    "read_results",
    "reference_scores",
    "references_table",
    "run_cell",
    "run_sweep",
    "stats",
    "summarize",
    "sweep_from_dict",
    "sweep_rows",
    "to_csv",
    "to_markdown",
    "write_reports",
]
