"""Copy into a sweep's results file the cells it shares with other results files of the same zoo,
so `divmerge sweep` skips them instead of computing them again.

    python scripts/zoo/reuse_cells.py ZOO_DIR/sweeps/stability_k3.yaml ZOO_DIR/results/per_k3.jsonl ...

A cell is shared when its label, method key and subset are one of the sweep's cells. A source
file is used only if it was written with the sweep's base, eval settings and seed and scored the
same experts on the same task definitions (else one line names it, and nothing is written). Its
reference rows come along for tasks the sweep has not scored yet, so every copied ANP keeps the
reference it was computed with.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def reuse(sweep_file: Path, sources: list[Path]) -> int:
    """Append the shared cells (and missing references) to the sweep's results; return how many
    cells were copied."""
    from divmerge_cli.sweep import read_results
    from divmerge_cli.sweep.config import build_recipe, load_sweep, method_key
    from divmerge_cli.sweep.results import (
        append_row,
        cell_id,
        check_results_file,
        drop_torn_tail,
        header_row,
    )

    cfg = load_sweep(sweep_file)
    drop_torn_tail(cfg.results)  # a killed sweep's half line would swallow the first copied row
    rows = read_results(cfg.results) if cfg.results.is_file() else []
    check_results_file(cfg, rows)
    loaded = []
    for src in sources:
        src_rows = read_results(src)
        check_results_file(dataclasses.replace(cfg, results=src), src_rows)
        loaded.append(src_rows)
    wanted = {(lb, method_key(build_recipe(cfg, lb, s)), s) for lb, s in cfg.cells()}
    have = {cell_id(r) for r in rows if r.get("type") == "cell"}
    scored = {r["task"] for r in rows if r.get("type") == "reference"}
    new: list[dict] = []
    for src_rows in loaded:
        for r in src_rows:
            if r.get("type") == "reference" and r["task"] in cfg.tasks and r["task"] not in scored:
                scored.add(r["task"])
                new.append(r)
            elif r.get("type") == "cell" and cell_id(r) in wanted - have:
                have.add(cell_id(r))
                new.append(r)
    if not any(r.get("type") == "sweep" for r in rows):
        append_row(cfg.results, header_row(cfg))
    for r in new:
        append_row(cfg.results, r)
    return sum(r.get("type") == "cell" for r in new)


def main(argv: list[str] | None = None) -> int:
    from divmerge_cli.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_file", type=Path)
    ap.add_argument("sources", type=Path, nargs="+", help="results files to copy cells from")
    a = ap.parse_args(argv)
    for p in a.sources:
        if not p.is_file():
            print(f"warning: {p}: no such results file; skipped", file=sys.stderr)
    try:
        n = reuse(a.sweep_file, [p for p in a.sources if p.is_file()])
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"copied {n} cells into the results of {a.sweep_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
