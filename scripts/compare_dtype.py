"""The effect of `dtype: bfloat16` on a learned merge: the same DivMerge run in float32 and bfloat16,
both learned Gammas then scored by the float32 objective on the same teacher samples.

    python scripts/compare_dtype.py WORKDIR [--size small|default] [--granularity layer]

Uses the demo zoo (a tiny Llama and four experts fine-tuned on toy tasks, built offline in
WORKDIR/zoo). Prints the objective per task at init, after float32 learning and after bfloat16
learning, all evaluated in float32, and the largest |Gamma_fp32 - Gamma_bf16|.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("work", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from divmerge_cli import optimize
    from divmerge_cli.coefficients import initial_gamma
    from divmerge_cli.demo_zoo import build_zoo
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    zoo = build_zoo(args.work / "zoo", size=args.size)
    gammas, recipes = {}, {}
    for dtype in ("float32", "bfloat16"):
        raw = {
            "merge_method": "divmerge",
            "base_model": str(zoo.base),
            "models": [{"model": str(p), "task": t} for t, p in zoo.experts.items()],
            "tasks": str(zoo.tasks_yaml),
            "parameters": {"granularity": args.granularity, "samples": args.samples},
            "dtype": dtype,
            "out_dtype": "float32",
        }
        path = args.work / f"{dtype}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        recipes[dtype] = plan_merge(load_recipe(path))
        s = optimize.run_optimized(
            recipes[dtype], args.work / f"out-{dtype}", force=True, cache_dir=args.work / "cache"
        )
        gammas[dtype] = torch.tensor(s["gamma"])
    pb = optimize.prepare(recipes["float32"], cache_dir=args.work / "cache")
    init = initial_gamma(pb.params.init, len(pb.tasks), len(pb.groups))
    rows = {
        "init": optimize.task_objectives(pb, init, "cpu"),
        "float32": optimize.task_objectives(pb, gammas["float32"], "cpu"),
        "bfloat16": optimize.task_objectives(pb, gammas["bfloat16"], "cpu"),
    }
    print(f"{'task':14s} {'init':>9s} {'fp32':>9s} {'bf16':>9s}   (JS, evaluated in float32)")
    for t in rows["init"]:
        print(f"{t:14s} " + " ".join(f"{rows[k][t]:9.5f}" for k in rows))
    mean = {k: sum(v.values()) / len(v) for k, v in rows.items()}
    print(f"{'mean':14s} " + " ".join(f"{mean[k]:9.5f}" for k in rows))
    diff = float((gammas["float32"] - gammas["bfloat16"]).abs().max())
    print(f"max |Gamma_fp32 - Gamma_bf16| = {diff:.5f}")
    (args.work / "compare_dtype.json").write_text(
        json.dumps({"objective": rows, "max_gamma_diff": diff}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
