"""How far each expert moved from the base, and how the moves overlap: the task vectors τ_i = θ_i - θ_0.

    python scripts/zoo/task_vectors.py ZOO_DIR [--out docs/results/task_vectors]

Streams the base's and experts' tensors one name at a time (divmerge_cli.checkpoint) and writes
OUT.md / OUT.json: per expert ‖τ_i‖ / ‖θ_0‖ over all weights, and the cosine similarity of every
pair of task vectors. Small, near-orthogonal task vectors interfere little when added, which is
why pairwise merges of such experts all land near their experts' scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def task_vector_stats(base, experts: dict) -> dict:
    """base: Checkpoint; experts: name -> Checkpoint. Relative norms and pairwise cosines."""
    names = list(experts)
    base_sq = 0.0
    dots = {(a, b): 0.0 for i, a in enumerate(names) for b in names[i:]}
    for tensor in base.names:
        theta0 = base.get(tensor).double()
        base_sq += float(theta0.pow(2).sum())
        taus = {n: experts[n].get(tensor).double() - theta0 for n in names}
        for a, b in dots:
            dots[a, b] += float((taus[a] * taus[b]).sum())
    norm = {n: math.sqrt(dots[n, n]) for n in names}
    return {
        "relative_norm": {n: norm[n] / math.sqrt(base_sq) for n in names},
        "cosine": {
            f"{a}|{b}": dots[a, b] / (norm[a] * norm[b])
            for a, b in dots
            if a != b and norm[a] * norm[b]
        },
    }


def to_markdown(s: dict, names: list[str]) -> str:
    out = ["| expert | ‖τ‖ / ‖θ_0‖ | " + " | ".join(f"cos with {n}" for n in names) + " |"]
    out.append("|---|---|" + "---|" * len(names))
    for a in names:
        cells = []
        for b in names:
            c = s["cosine"].get(f"{a}|{b}", s["cosine"].get(f"{b}|{a}"))
            cells.append("1" if a == b else "-" if c is None else f"{c:.3f}")
        out.append(f"| {a} | {s['relative_norm'][a]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/task_vectors"))
    a = ap.parse_args(argv)

    from divmerge_cli.models import open_model

    zoo = a.zoo_dir.resolve()
    experts = {
        p.name: open_model(str(p), f"experts.{p.name}")
        for p in sorted((zoo / "experts").iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }
    stats = task_vector_stats(open_model(str(zoo / "base"), "base_model"), experts)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
    md = to_markdown(stats, list(experts))
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
