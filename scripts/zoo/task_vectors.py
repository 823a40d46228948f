"""How far each expert moved from the base, and how the moves overlap: the task vectors τ_i = θ_i - θ_0.

    python scripts/zoo/task_vectors.py ZOO_DIR [--out docs/results/task_vectors]
    python scripts/zoo/task_vectors.py ZOO_DIR --lora [lora_distinct] --overlap [--out ...]

Streams the base's and experts' tensors one name at a time (divmerge_cli.checkpoint) and writes
OUT.md / OUT.json: per expert ‖τ_i‖ / ‖θ_0‖ over all weights, and the cosine similarity of every
pair of task vectors. Small, near-orthogonal task vectors interfere little when added, which is
why pairwise merges of such experts all land near their experts' scores. --lora reads the LoRA
zoo (ZOO_DIR/lora/, or the folder it names, e.g. lora_distinct) instead of the full fine-tunes.
--overlap adds, for every pair of experts, how much their matrices' top-16 singular subspaces
share (the mean squared cosine of the principal angles, ‖U_aᵀU_b‖²_F / 16, on the output side U
and the input side V; two random 16-dimensional subspaces of R^576 give 0.028), over the 2-D
tensors of layers OVERLAP_LAYERS: TSV-M and Iso-CTS orthogonalise these singular vectors across
tasks, which distorts subspaces that coincide; it also gives the smallest singular value of
TSV-M's stacks of singular vectors (stack_conditioning).
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


OVERLAP_LAYERS = (3, 15, 27)  # SmolLM2's 30 layers: early, middle, late
OVERLAP_RANK = 16


def task_svds(base, experts: dict, tensors: list[str]) -> dict[str, dict]:
    """{tensor: {expert: (U, S, Vh)}}: the thin SVD of each expert's task matrix, in float64,
    computed once for subspace_overlap and stack_conditioning."""
    import torch

    out = {}
    for tensor in tensors:
        theta0 = base.get(tensor).double()
        out[tensor] = {
            n: torch.linalg.svd(e.get(tensor).double() - theta0, full_matrices=False)
            for n, e in experts.items()
        }
    return out


def subspace_overlap(svds: dict[str, dict], rank: int = OVERLAP_RANK) -> dict:
    """Per pair of experts, the mean over the tensors of `svds` (task_svds) of ‖U_aᵀU_b‖²_F / rank
    for the top-`rank` left ("output") and right ("input") singular vectors of their task
    matrices."""
    names = list(next(iter(svds.values())))
    sums = {f"{a}|{b}": [0.0, 0.0] for i, a in enumerate(names) for b in names[i + 1 :]}
    for by_expert in svds.values():
        sub = {n: (u[:, :rank], vh[:rank].T) for n, (u, _, vh) in by_expert.items()}
        for key, acc in sums.items():
            a, b = key.split("|")
            for side in (0, 1):
                acc[side] += float((sub[a][side].T @ sub[b][side]).square().sum()) / rank
    return {k: {"output": o / len(svds), "input": i / len(svds)} for k, (o, i) in sums.items()}


def stack_conditioning(svds: dict[str, dict]) -> dict:
    """The smallest singular value of the stacks TSV-M orthogonalises on each tensor of `svds`
    (task_svds): every expert's top ⌊min(R, C)/n⌋ left ("output", side by side) and right
    ("input", stacked) singular vectors, those above the rank tolerance (svd_methods._tol). 1 when
    the experts' directions are orthogonal, near 0 when some coincide (the nearest orthogonal
    matrix then moves them far and is sensitive to rounding); compare stacks of one shape only (a
    nearly square stack is small even for random directions). Min and median over the tensors."""
    import statistics

    import torch

    from divmerge_cli.svd_methods import _tol

    sides = {"output": [], "input": []}
    for by_expert in svds.values():
        triples = list(by_expert.values())
        shape = (triples[0][0].shape[0], triples[0][2].shape[1])
        k = min(shape) // len(triples)
        tol = _tol(max(float(s[0]) for _, s, _ in triples), shape)
        keep = [min(k, int((s > tol).sum())) for _, s, _ in triples]
        u = torch.cat([u[:, :n] for (u, _, _), n in zip(triples, keep)], 1)
        v = torch.cat([vh[:n] for (_, _, vh), n in zip(triples, keep)], 0)
        sides["output"].append(float(torch.linalg.svdvals(u)[-1]))
        sides["input"].append(float(torch.linalg.svdvals(v)[-1]))
    return {side: {"min": min(xs), "median": statistics.median(xs)} for side, xs in sides.items()}


def overlap_markdown(overlap: dict) -> str:
    out = ["| pair | output-side overlap | input-side overlap |", "|---|---:|---:|"]
    out += [
        f"| {k.replace('|', ' + ')} | {v['output']:.3f} | {v['input']:.3f} |"
        for k, v in overlap.items()
    ]
    mean = {
        side: sum(v[side] for v in overlap.values()) / len(overlap) for side in ("output", "input")
    }
    out.append(f"| mean | {mean['output']:.3f} | {mean['input']:.3f} |")
    return "\n".join(out) + "\n"


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
    ap.add_argument(
        "--lora", nargs="?", const="lora", default=None, metavar="FOLDER",
        help="a LoRA zoo: ZOO_DIR/lora/, or ZOO_DIR/FOLDER/",
    )  # fmt: skip
    ap.add_argument("--overlap", action="store_true", help="also the singular subspaces' overlap")
    a = ap.parse_args(argv)

    from divmerge_cli.models import open_model

    zoo = a.zoo_dir.resolve()
    base = open_model(str(zoo / "base"), "base_model")
    kind = a.lora or "experts"
    experts = {
        p.name: open_model(str(p), f"{kind}.{p.name}", base=base)
        for p in sorted((zoo / kind).iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }
    stats = task_vector_stats(base, experts)
    md = to_markdown(stats, list(experts))
    if a.overlap:
        layers = [f"layers.{i}." for i in OVERLAP_LAYERS]
        tensors = [n for n in base.names if len(base.shape(n)) == 2 and any(x in n for x in layers)]
        svds = task_svds(base, experts, tensors)
        stats["overlap"] = subspace_overlap(svds)
        stats["overlap_tensors"] = tensors
        md += "\n" + overlap_markdown(stats["overlap"])
        c = stats["tsv_stacks"] = stack_conditioning(svds)
        md += (
            "\nSmallest singular value of the stacks TSV-M orthogonalises (min / median over the "
            f"same tensors): output side {c['output']['min']:.3g} / {c['output']['median']:.3g}, "
            f"input side {c['input']['min']:.3g} / {c['input']['median']:.3g}\n"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
