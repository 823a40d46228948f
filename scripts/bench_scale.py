"""Learned-merge memory and speed against the number of experts: `memory` vs `stream` task vectors.

For each configuration a fresh process runs two Adam steps of DivMerge (layer granularity) after
the teacher cache is warm, and reports its peak RSS (scripts/measure.py), seconds per step and
the `validate` estimate; the floor is one plain forward+backward of the base on the same batch.

    python scripts/bench_scale.py WORKDIR --base /work/models/smollm2-135m-f32 [--n 2 4 8 16]
    python scripts/bench_scale.py WORKDIR --synthetic-1p7b [--n 4]   # SmolLM2-1.7B config, bf16
        [--dtype float32]   # the compute dtype (default: float32, bfloat16 for --synthetic-1p7b)

Experts are the base plus seeded Gaussian noise (0.1% of each tensor's std, tiny.perturbed_folder).
Results are appended to WORKDIR/bench_scale.jsonl (a rerun skips finished rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import measure

from divmerge_cli.tiny import perturbed_folder

WORDS = "the a of merge model task vector expert base layer token stream memory".split()


def make_synthetic_1p7b(out: Path, tokenizer_from: Path) -> Path:
    """Random weights with SmolLM2-1.7B's configuration, bf16 safetensors, written tensor by tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from divmerge_cli.checkpoint import ShardWriter, atomic_folder, copy_side_files

    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=130000,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.device("meta"):
        skel = LlamaForCausalLM(cfg)
    names = [n for n in skel.state_dict() if n != "lm_head.weight"]
    specs = {n: (tuple(skel.state_dict()[n].shape), torch.bfloat16) for n in names}
    g = torch.Generator().manual_seed(0)
    with atomic_folder(out) as tmp:
        w = ShardWriter(tmp, specs, 2 * 10**9)
        for n in names:
            shape = specs[n][0]
            t = (
                torch.ones(shape)
                if n.endswith("norm.weight")
                else torch.randn(shape, generator=g) * 0.02
            )
            w.write(n, t.to(torch.bfloat16))
        w.close()
        cfg.torch_dtype = "bfloat16"
        cfg.save_pretrained(tmp)
        copy_side_files(
            tokenizer_from,
            tmp,
            (
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.json",
                "merges.txt",
            ),
        )
    return out


def write_tasks(work: Path, n: int) -> Path:
    rng = random.Random(0)
    tasks = {}
    for t in range(n):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(24))} for _ in range(32)]
        (work / f"t{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks[f"t{t}"] = {
            "validation": f"t{t}.jsonl",
            "prompt": "Text: {text}\nSummary:",
            "max_new_tokens": 16,
        }
    import yaml

    (work / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    return work / "tasks.yaml"


def recipe(work: Path, base: Path, experts: list[Path], mode: str, dtype: str) -> Path:
    import yaml

    n = len(experts)
    write_tasks(work, n)
    raw = {
        "merge_method": "divmerge",
        "base_model": str(base),
        "models": [{"model": str(e), "task": f"t{i}"} for i, e in enumerate(experts)],
        "tasks": str(work / "tasks.yaml"),
        # 16 samples in all, batch 8: two Adam steps whatever n is
        "parameters": {
            "granularity": "layer",
            "batch_size": 8,
            "epochs": 1,
            "samples": max(1, 16 // n),
            "task_vectors": mode,
            "gen_batch_size": 4,
        },
        "dtype": dtype,
    }
    path = work / f"recipe_{n}_{mode}_{dtype}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def child(args) -> None:
    """One configuration, in its own process: prepare (teacher cache warm), two steps, report."""
    from accelerate import Accelerator

    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    torch.set_num_threads(args.threads)
    plan = plan_merge(load_recipe(args.recipe))
    est = optimize.preflight(plan)
    if args.warm:
        optimize.prepare(plan, cache_dir=args.cache, available=1)  # builds the teacher cache
        return
    t0 = time.perf_counter()
    pb = optimize.prepare(plan, cache_dir=args.cache)
    prep = time.perf_counter() - t0
    print(f"prepared in {prep:.1f} s", file=sys.stderr, flush=True)
    acc = Accelerator(cpu=True)
    steps = []
    if args.floor:  # a fresh model: no task vectors, no merged weights, the same batch
        from divmerge_cli import hf

        batch, objective, pad_id = pb.samples[:8], pb.objective, pb.pad_id
        del pb
        gc.collect()
        model = hf.load_model(plan.base.path, optimize.compute_dtype(plan.recipe))
        for p in model.parameters():
            p.requires_grad_(True)
        for _ in range(2):
            t = time.perf_counter()
            loss = optimize.objective_per_sample(
                lambda kw: model(**kw, use_cache=False).logits,
                batch,
                objective,
                pad_id,
                False,
                None,
                "cpu",
            ).mean()
            loss.backward()
            steps.append(time.perf_counter() - t)
    else:
        run = optimize._restore(pb, 0, args.cache / "state", False, acc)
        for step in range(len(run.schedule)):
            t = time.perf_counter()
            optimize._step(pb, run, step, acc)
            steps.append(time.perf_counter() - t)
            # a step of the 1.7B row takes many minutes: its figure survives a stopped run
            print(f"step {step + 1}: {steps[-1]:.1f} s", file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "mode": "floor" if args.floor else pb.tv.mode,
                "prepare_s": prep,
                "steps_s": steps,
                "estimate_memory": est.memory_bytes,
                "estimate_stream": est.stream_bytes,
            }
        )
    )


def run_child(args, rec: Path, *extra: str) -> dict:
    """Run one child (scripts/measure.py: its own peak RSS, not this process's)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--recipe",
        str(rec),
        "--cache",
        str(args.work / "cache"),
        "--threads",
        str(args.threads),
        *extra,
    ]
    with open(args.work / "child.err", "w") as errf:
        m = measure(cmd, stdout=subprocess.PIPE, stderr=errf)
    if m.returncode != 0:
        raise SystemExit(
            f"child failed: {' '.join(cmd)}\n{(args.work / 'child.err').read_text()[-3000:]}"
        )
    out = m.stdout.strip()
    res = json.loads(out.splitlines()[-1]) if out else {}
    res["peak_rss"] = m.peak_bytes
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--modes", nargs="+", default=["memory", "stream"])
    ap.add_argument("--synthetic-1p7b", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip the plain forward+backward row")
    ap.add_argument("--tokenizer-from", type=Path, default=Path("/work/models/smollm2-135m-f32"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype of the merge")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype or ("bfloat16" if args.synthetic_1p7b else "float32")
    base = args.base
    if args.synthetic_1p7b:
        base = make_synthetic_1p7b(args.work / "base-1p7b", args.tokenizer_from)
    results = args.work / "bench_scale.jsonl"
    done = (
        {
            (r["n"], r["mode"], r.get("dtype", "float32"))
            for r in map(json.loads, results.read_text().splitlines())
        }
        if results.exists()
        else set()
    )
    for n in args.n:
        experts = [
            perturbed_folder(base, args.work / f"{base.name}-e{i}", i + 1, 1e-3) for i in range(n)
        ]
        for mode in ([] if args.no_floor else ["floor"]) + args.modes:
            if (n, mode, dtype) in done:
                continue
            rec = recipe(args.work, base, experts, "stream" if mode == "floor" else mode, dtype)
            run_child(args, rec, "--warm")
            res = run_child(args, rec, *(["--floor"] if mode == "floor" else []))
            row = {
                "base": str(base),
                "n": n,
                "mode": mode,
                "dtype": dtype,
                "threads": args.threads,
                "peak_rss_gb": res["peak_rss"] / 1e9,
                "s_per_step": sum(res["steps_s"]) / len(res["steps_s"]),
                "estimate_gb": (
                    res["estimate_memory"] if mode == "memory" else res["estimate_stream"]
                )
                / 1e9,
                "load": os.getloadavg()[0],
            }
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"n={n:2d} {mode:6s} {dtype} peak {row['peak_rss_gb']:6.2f} GB  {row['s_per_step']:7.2f} s/step  "
                f"estimate {row['estimate_gb']:6.2f} GB  (load {row['load']:.1f})",
                flush=True,
            )
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    by = {
        (r["n"], r["mode"]): r
        for r in rows
        if r["base"] == str(base) and r.get("dtype", "float32") == dtype
    }
    ns = sorted({r["n"] for r in by.values()})
    if ns and all((n, "stream") in by for n in (ns[0], ns[-1])):
        a, b = by[(ns[0], "stream")], by[(ns[-1], "stream")]
        print(
            f"stream peak n={ns[-1]} / n={ns[0]}: {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x (target <= 1.2)"
        )
    for n in ns:
        if (n, "stream") in by and (n, "floor") in by:
            print(
                f"n={n}: stream peak / floor peak {by[(n, 'stream')]['peak_rss_gb'] / by[(n, 'floor')]['peak_rss_gb']:.2f}x (target <= 2)"
            )
        if (n, "stream") in by and (n, "memory") in by:
            print(
                f"n={n}: stream step / memory step {by[(n, 'stream')]['s_per_step'] / by[(n, 'memory')]['s_per_step']:.2f}x (target <= 1.5 at n=4)"
            )
        for m in ("memory", "stream"):
            if (n, m) in by:
                r = by[(n, m)]
                print(
                    f"n={n} {m}: estimate / measured {r['estimate_gb'] / r['peak_rss_gb']:.2f} (target 0.75..1.25)"
                )


if __name__ == "__main__":
    main()
