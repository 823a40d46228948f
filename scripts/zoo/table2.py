"""The paper's Table 2 on the zoo: does a low divergence from expert i predict performance on task i?

    python scripts/zoo/table2.py ZOO_DIR [--samples 32] [--limit 50] [--seed 0] [--top-k 256]
                                 [--out docs/results/table2]

For every task i and every expert j (and the base, reported but not in the correlation, as in the
paper where j ranges over the task set): D_{X_i}(theta_i || theta_j) for D = JS and KL on
--samples validation inputs of task i (expert i's greedy continuations and top-k distributions,
the DivMerge teacher targets, from the same cache `divmerge sweep --cache-dir ZOO_DIR/cache`
uses), and PERF(theta_j, i) on --limit test rows of task i. Then, per task i, Spearman's
correlation between {-D_{X_i}(theta_i || theta_j)} and {PERF(theta_j, i)} over the five experts.

Writes OUT.jsonl (one line per (task, model)), OUT.csv (the correlations) and OUT.md (the table
with the paper's Avg. row beside it). Scores are cached under ZOO_DIR/cache/eval, so a rerun
only recomputes the divergences (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PAPER_AVG = {"kl": 0.773, "js": 0.818}  # Table 2, Avg. row (GLUE classification, 7 experts)


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks; NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"need two equally long lists of at least 2 values, got {len(x)}, {len(y)}"
        )
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def correlations(rows: list[dict], experts: list[str]) -> dict[str, dict[str, float]]:
    """task i -> {js, kl}: Spearman over j in `experts` of -D_{X_i}(theta_i || theta_j) and PERF."""
    out = {}
    for task in experts:
        got = {r["model"]: r for r in rows if r["task"] == task and r["model"] in experts}
        perf = [got[j]["perf"] for j in experts]
        out[task] = {d: spearman([-got[j][d] for j in experts], perf) for d in ("kl", "js")}
    return out


def to_markdown(corr: dict[str, dict[str, float]]) -> str:
    def f(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    lines = ["| Task(θ_i) | KL | JS |", "|---|---|---|"]
    lines += [f"| {t} | {f(c['kl'])} | {f(c['js'])} |" for t, c in corr.items()]
    avg = {d: _nanmean([c[d] for c in corr.values()]) for d in ("kl", "js")}
    lines.append(f"| **Avg.** | **{f(avg['kl'])}** | **{f(avg['js'])}** |")
    lines.append(f"| paper Avg. (GLUE) | {PAPER_AVG['kl']:.3f} | {PAPER_AVG['js']:.3f} |")
    return "\n".join(lines) + "\n"


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo_dir", type=Path)
    ap.add_argument("--samples", type=int, default=32, help="validation inputs per task")
    ap.add_argument("--limit", type=int, default=50, help="test rows per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("docs/results/table2"))
    a = ap.parse_args(argv)

    from divmerge_cli.evaluate import evaluate_model
    from divmerge_cli.optimize import model_divergences
    from divmerge_cli.tasks import load_tasks
    from divmerge_cli.teacher import teacher_samples

    zoo = a.zoo_dir.resolve()
    specs = load_tasks(str(zoo / "tasks.yaml"), zoo, str(zoo / "tasks.yaml"))
    experts = list(specs)
    models = {t: zoo / "experts" / t for t in experts} | {"base": zoo / "base"}
    rows = []
    for task, spec in specs.items():
        samples = teacher_samples(
            models[task],
            task,
            spec,
            samples=a.samples,
            top_k=a.top_k,
            seed=a.seed,
            cache_dir=zoo / "cache" / "teacher",
            batch_size=a.batch_size,
        )
        for name, path in models.items():
            s = evaluate_model(
                path, {task: spec}, "test", a.limit, a.batch_size, a.seed, zoo / "cache" / "eval"
            )[task]
            d = model_divergences(path, samples, a.batch_size)
            rows.append({"task": task, "model": name, "perf": s.score, "n": s.n, **d})
            print(f"{task} <- {name}: perf {s.score:.4f} js {d['js']:.4f} kl {d['kl']:.4f}")
    corr = correlations(rows, experts)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = ["task,spearman_kl,spearman_js"] + [f"{t},{c['kl']},{c['js']}" for t, c in corr.items()]
    a.out.with_suffix(".csv").write_text("\n".join(csv) + "\n")
    a.out.with_suffix(".md").write_text(to_markdown(corr))
    print(to_markdown(corr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
