"""Issue 27 on the demo zoo: 2025's data-free SVD merges (TSV-M, Iso-C, Iso-CTS, WUDI) against task
arithmetic, TIES and DivMerge (plain, TIES- and TSV-processed task vectors, fixed epochs and
`epochs: auto`), every subset at k = 2..4, over several builds of the demo zoo (`--seeds`).

    python scripts/svd2025_demo.py WORK [--seeds 0 1 2] [--out docs/results/svd2025_demo]

For each seed: `divmerge demo --zoo-only --seed S --root WORK/sS`, then `divmerge sweep` of the
methods below over that zoo (resumable: finished cells are skipped). Then it writes OUT/cells.csv
(one row per cell) and OUT/tables.md: mean ANP with 95 % intervals per method and k, the paired
difference of each DivMerge variant against the best data-free method at each k, and `auto`
against fixed epochs. `--report-only` skips the runs. One torch thread per process.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

LAYER = {"granularity": "layer", "samples": 100}
METHODS = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.2, "lambda": 1.0}},
    "tsv": {"merge_method": "tsv"},
    "iso_c": {"merge_method": "iso_c"},
    "iso_cts": {"merge_method": "iso_cts"},
    "wudi": {"merge_method": "wudi"},
    "divmerge_js_layer": {"merge_method": "divmerge", "parameters": LAYER},
    "divmerge_js_layer_ties": {
        "merge_method": "divmerge",
        "parameters": {**LAYER, "base_method": "ties", "density": 0.2},
    },
    "divmerge_js_layer_tsv": {
        "merge_method": "divmerge",
        "parameters": {**LAYER, "base_method": "tsv"},
    },
    "divmerge_js_layer_auto": {
        "merge_method": "divmerge",
        "parameters": {**LAYER, "epochs": "auto"},
    },
    "divmerge_js_layer_tsv_auto": {
        "merge_method": "divmerge",
        "parameters": {**LAYER, "base_method": "tsv", "epochs": "auto"},
    },
}
DATA_FREE = ["task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi"]
LEARNED = ["divmerge_js_layer", "divmerge_js_layer_tsv", "divmerge_js_layer_auto"]
AUTO = [
    ("divmerge_js_layer_auto", "divmerge_js_layer"),
    ("divmerge_js_layer_tsv_auto", "divmerge_js_layer_tsv"),
]
KS = (2, 3, 4)


def run_seed(work: Path, seed: int) -> Path:
    root = work / f"s{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "divmerge_cli.cli"]
    subprocess.run([*cli, "demo", "--zoo-only", "--seed", str(seed), "--root", str(root)],
                   check=True, env=env)  # fmt: skip
    zoo = root / "zoo"
    experts = sorted(p.name for p in (zoo / "experts").iterdir() if p.is_dir())
    spec = {
        "base_model": str(zoo / "base"),
        "experts": {t: str(zoo / "experts" / t) for t in experts},
        "tasks": str(zoo / "tasks.yaml"),
        "eval": {"split": "test", "limit": 100, "batch_size": 32},
        "seed": seed,
        "k": f"{KS[0]}..{KS[-1]}",
        "results": "svd27.jsonl",
        "methods": METHODS,
    }
    (root / "svd27.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run([*cli, "sweep", str(root / "svd27.yaml"), "--cache-dir", str(root / "cache")],
                   check=True, env=env)  # fmt: skip
    return root / "svd27.jsonl"


def read_cells(work: Path, seeds: list[int]) -> list[dict]:
    cells = []
    for s in seeds:
        for line in (work / f"s{s}" / "svd27.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("type") == "cell" and r["label"] in METHODS:
                cells.append({"method": r["label"], "k": r["k"], "seed": s,
                              "subset": "+".join(r["subset"]), "anp": 100 * r["anp"],
                              "seconds": r["seconds"]})  # fmt: skip
    return cells


def _ci(xs: list[float]) -> float:
    return 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def _pm(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {_ci(xs):.1f}"


def _paired(cells: list[dict], a: str, b: str, k: int) -> list[float]:
    of = {(c["method"], c["seed"], c["subset"]): c["anp"] for c in cells if c["k"] == k}
    return [v - of[(b, s, sub)] for (m, s, sub), v in of.items() if m == a and (b, s, sub) in of]


def _diff(d: list[float]) -> str:
    m, h = statistics.mean(d), _ci(d)
    return f"{m:+.1f} ({m - h:+.1f} .. {m + h:+.1f})"


def tables(cells: list[dict]) -> str:
    def anps(m: str, k: int) -> list[float]:
        return [c["anp"] for c in cells if c["method"] == m and c["k"] == k]

    n = {k: len(anps("ties", k)) for k in KS}
    lines = [
        "Mean ANP (%) ± 95 % interval over every subset of every zoo build; wall s per cell.",
        "",
    ]
    lines += ["| method | " + " | ".join(f"k = {k} (n = {n[k]})" for k in KS) + " | s |"]
    lines += ["|---|" + "---:|" * (len(KS) + 1)]
    for m in METHODS:
        secs = [c["seconds"] for c in cells if c["method"] == m]
        row = " | ".join(_pm(anps(m, k)) if anps(m, k) else "-" for k in KS)
        lines.append(f"| `{m}` | {row} | {statistics.mean(secs):.1f} |")
    lines += ["", "Paired differences (ANP points, 95 % interval) against the best data-free "
              "method at each k:", ""]  # fmt: skip
    lines += ["| k | best data-free | DivMerge variant | difference |", "|---|---|---|---:|"]
    for k in KS:
        best = max(DATA_FREE, key=lambda m: statistics.mean(anps(m, k)))
        for m in LEARNED:
            lines.append(
                f"| {k} | `{best}` ({statistics.mean(anps(best, k)):.1f}) | `{m}` | "
                f"{_diff(_paired(cells, m, best, k))} |"
            )
    lines += ["", "`epochs: auto` against the default 4 epochs (paired, ANP points):", ""]
    lines += [
        "| variant | " + " | ".join(f"k = {k}" for k in KS) + " |",
        "|---|" + "---:|" * len(KS),
    ]
    for a, b in AUTO:
        row = []
        for k in KS:
            d = _paired(cells, a, b, k)
            row.append(f"{_diff(d)}, worse in {sum(x < 0 for x in d)} of {len(d)}")
        lines.append(f"| `{a}` - `{b}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("work", type=Path, help="where the zoos, caches and raw results go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("docs/results/svd2025_demo"))
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    if not a.report_only:
        for s in a.seeds:
            run_seed(a.work, s)
    cells = read_cells(a.work, a.seeds)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cells[0]))
        w.writeheader()
        w.writerows(cells)
    (a.out / "tables.md").write_text(tables(cells))
    print((a.out / "tables.md").read_text())


if __name__ == "__main__":
    main()
