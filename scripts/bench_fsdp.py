"""Per-process peak memory of a learned merge with theta0 whole in every process or sharded by FSDP.

Three launches of the same DivMerge run (layer granularity, `stream` task vectors, batch 8, two
Adam steps, teacher cache warm): one process; two processes data-parallel
(`accelerate launch --multi_gpu`); two processes with theta0 sharded (`accelerate launch --use_fsdp
--fsdp_version 2`). Each process reports its own peak RSS (VmHWM: not counting its parent's), the
share of theta0 it holds between steps, seconds per step and Gamma; each launch, its wall time and
its largest process's peak (scripts/measure.py).

    python scripts/bench_fsdp.py WORKDIR --base /work/models/smollm2-135m-f32 [--n 2]

Experts are the base plus seeded noise (tiny.perturbed_folder, as scripts/bench_scale.py). Prints one line per launch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_scale import recipe
from measure import measure, own_peak_kib

from divmerge_cli.tiny import perturbed_folder

LAUNCHES = {
    "1 process": None,
    # `--cpu --num_processes 2` starts ONE process (accelerate's simple launcher); `--multi_gpu`
    # starts two through torchrun, which run on CPU here (`Accelerator(cpu=True)`, gloo)
    "2 processes, theta0 whole in each": ["--multi_gpu"],
    "2 processes, theta0 sharded (FSDP)": ["--use_fsdp", "--fsdp_version", "2"],
}


def worker(args) -> None:
    """prepare (teacher cache warm) and the run's Adam steps; this process's figures as JSON."""
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    plan = plan_merge(load_recipe(args.recipe))
    pb = optimize.prepare(plan, cache_dir=args.cache, main_first=acc.main_process_first)
    run = optimize._restore(pb, 0, args.cache / f"state{acc.process_index}", False, acc)
    steps = []
    for step in range(len(run.schedule)):
        t = time.perf_counter()
        optimize._step(pb, run, step, acc)
        steps.append(time.perf_counter() - t)
    params = list(pb.student.model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    row = {
        "rank": acc.process_index,
        "peak_rss_gb": own_peak_kib() * 1024 / 1e9,
        "theta0_share": held / sum(p.numel() for p in params),
        "s_per_step": sum(steps) / len(steps),
        "gamma": run.gamma.detach().flatten().tolist(),
    }
    # one file per process: two processes printing to one pipe can interleave their lines
    (args.cache.parent / f"row{acc.process_index}.json").write_text(json.dumps(row))


def launch(args, rec: Path, flags: list[str] | None) -> tuple[list[dict], str]:
    me = [__file__, "--worker", "--recipe", str(rec), "--cache", str(args.work / "cache")]
    if flags is None:
        cmd = [sys.executable, *me]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", *flags]
        opts = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        cmd = [*head, *opts, "--dynamo_backend", "no", *me]
    for f in args.work.glob("row*.json"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    m = measure(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if m.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{m.stderr[-3000:]}")
    rows = [json.loads(f.read_text()) for f in sorted(args.work.glob("row*.json"))]
    for f in args.work.glob("row*.json"):
        f.unlink()
    return rows, f"launch {m.wall_s:.0f} s, largest process {m.peak_bytes / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--base", type=Path, default=Path("/work/models/smollm2-135m-f32"))
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.work.mkdir(parents=True, exist_ok=True)
    experts = [
        perturbed_folder(args.base, args.work / f"{args.base.name}-e{i}", i + 1, 1e-3)
        for i in range(args.n)
    ]
    rec = recipe(args.work, args.base, experts, "stream", "float32")
    launch(args, rec, None)  # builds the teacher cache: not part of any figure
    gammas = {}
    for label, flags in LAUNCHES.items():
        rows, whole = launch(args, rec, flags)
        gammas[label] = torch.tensor(rows[0]["gamma"])
        per = ", ".join(
            f"rank {r['rank']}: peak {r['peak_rss_gb']:.2f} GB, holds {r['theta0_share']:.0%} "
            f"of theta0, {r['s_per_step']:.1f} s/step"
            for r in rows
        )
        print(f"{label}: {per} ({whole})", flush=True)
    ref = gammas["1 process"]
    for label, g in gammas.items():
        print(f"{label}: max |Gamma - Gamma(1 process)| = {float((g - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
