"""Statistics of ANP over a method's subsets: mean, sample std, a 95% interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from .results import cell_rows

Z95 = 1.96  # 95% CI half-width = Z95 * std / sqrt(n): normal approximation, not a t-interval


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float | None  # sample std (n - 1 denominator); None for a single cell
    ci95: float | None  # Z95 * std / sqrt(n), normal approximation


def stats(values: list[float]) -> Stats:
    n = len(values)
    if n < 2:
        return Stats(n, values[0], None, None)
    sd = statistics.stdev(values)
    return Stats(n, statistics.fmean(values), sd, Z95 * sd / math.sqrt(n))


def summarize(rows: Iterable[dict]) -> dict[str, dict[int, Stats]]:
    """label -> k -> Stats of ANP (%) over that k's subsets. Labels in order of first appearance."""
    groups: dict[str, dict[int, list[float]]] = {}
    for r in cell_rows(rows):
        groups.setdefault(r["label"], {}).setdefault(int(r["k"]), []).append(100 * r["anp"])
    return {label: {k: stats(v) for k, v in sorted(by_k.items())} for label, by_k in groups.items()}
