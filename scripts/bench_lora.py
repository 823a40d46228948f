"""LoRA adapters against their dense equivalents: data-free merges, --as-adapter, a learned step.

    python scripts/bench_lora.py WORKDIR --base /work/models/smollm2-135m-f32 [--n 4] [--rank 16]

Builds n random LoRA adapters (all linear layers, r = --rank, alpha = 2r, B ~ N(0, 0.02²) so
τ ≠ 0) on the base with peft, and each one's merge_and_unload() as a full checkpoint (WORKDIR is
reused on a rerun). Then, each in a fresh process (its wall seconds and peak RSS by
scripts/measure.py; seconds of the whole process, its start-up included):
- `divmerge run` of each of --methods (task_arithmetic and ties by default; any data-free method,
  at its defaults) on the adapters, and on the dense experts;
- `divmerge run --as-adapter` (exact) for task_arithmetic;
- one DivMerge-style step (forward + backward to Γ through taskvectors.MergedModel, 8 x 64 tokens,
  layer granularity) on the adapters (low rank, never densified) and on the dense experts, each
  in memory and stream modes; median seconds per step over --steps steps after one warm-up.
Prints a table, the largest difference between the adapter and dense outputs, and appends rows to
WORKDIR/bench_lora.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import measure

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def make_experts(base: Path, work: Path, n: int, rank: int) -> tuple[list[Path], list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters, dense = [], []
    for i in range(n):
        ad, full = work / f"lora{i}", work / f"dense{i}"
        adapters.append(ad)
        dense.append(full)
        if (full / "config.json").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
        model = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "lora_B" in name:
                    w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        model.save_pretrained(ad)
        model.merge_and_unload().save_pretrained(full)
        for f in base.iterdir():
            if f.suffix != ".safetensors" and not (full / f.name).exists():
                shutil.copy(f, full / f.name)
    return adapters, dense


def recipe(work: Path, name: str, method: str, base: Path, models: list[Path]) -> Path:
    import yaml

    params = {"density": 0.2} if method == "ties" else {}
    r = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, **params}} for m in models],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


CLI = [sys.executable, "-c", "from divmerge_cli.cli import main; main()"]


def measured(cmd: list[str], what: str):
    m = measure(cmd, ENV, subprocess.PIPE, subprocess.PIPE)
    if m.returncode != 0:
        raise SystemExit(f"{what} failed:\n{m.stderr[-2000:]}")
    return m


def run_cli(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of the process `divmerge ARGS`."""
    m = measured([*CLI, *args], f"divmerge {' '.join(args)}")
    return m.wall_s, m.peak_kib / 1024


def child_step(base: str, experts: list[str], mode: str, steps: int) -> None:
    """One process: MergedModel over the experts, `steps` forward+backward passes to Γ."""
    import statistics

    from divmerge_cli import hf
    from divmerge_cli.coefficients import groups_for
    from divmerge_cli.models import open_model
    from divmerge_cli.taskvectors import MergedModel, TaskVectors

    torch.set_num_threads(1)
    b = open_model(base, "base_model")
    xs = [open_model(e, f"expert{i}", base=b) for i, e in enumerate(experts)]
    model = hf.load_model(base, torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    state = dict(model.state_dict(keep_vars=True))
    names = [n for n in b.names if b.dtype(n).is_floating_point and n in state]
    groups, gidx = groups_for(names, "layer")
    tv = TaskVectors.load(xs, {n: state[n] for n in names}, b, names, gidx, mode)
    student = MergedModel(model, tv)
    gamma = torch.full((len(xs), len(groups)), 0.5, requires_grad=True)
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = student.logits(gamma, {"input_ids": ids})
        logits.float().logsumexp(-1).mean().backward()
        gamma.grad = None
        times.append(time.perf_counter() - t)
    print("BENCH", statistics.median(times[1:]), tv.nbytes, file=sys.stderr)


def run_step(base: Path, experts: list[Path], mode: str, steps: int) -> tuple[float, float, int]:
    """(median seconds per step, peak RSS of the process in MiB, task-vector bytes held)."""
    args = ["--child-step", str(base), mode, str(steps), *map(str, experts)]
    m = measured([sys.executable, __file__, "x", *args], f"step {mode}")
    _, sec, held = [x for x in m.stderr.splitlines() if x.startswith("BENCH")][-1].split()
    return float(sec), m.peak_kib / 1024, int(held)


def max_diff(a: Path, b: Path) -> float:
    from divmerge_cli.checkpoint import Checkpoint

    x, y = Checkpoint(a, "a"), Checkpoint(b, "b")
    return max(float((x.get(n).float() - y.get(n).float()).abs().max()) for n in x.names)


def adapter_diff(base: Path, adapter: Path, full: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()
    from divmerge_cli.checkpoint import Checkpoint

    ref = Checkpoint(full, "full")
    return max(float((merged[n].float() - ref.get(n).float()).abs().max()) for n in ref.names)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--child-step":
        base, mode, steps, *experts = sys.argv[3:]
        return child_step(base, experts, mode, int(steps))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--parts", default="run,adapter,step", help="a subset of run,adapter,step")
    ap.add_argument(
        "--methods",
        default="task_arithmetic,ties",
        help="data-free methods `run` times (tsv, wudi...)",
    )
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    adapters, dense = make_experts(a.base, a.work, a.n, a.rank)
    rows = []

    def row(what: str, inputs: str, sec: float, rss: float, **extra) -> None:
        r = {"what": what, "inputs": inputs, "n": a.n, "rank": a.rank, "seconds": round(sec, 2)}
        rows.append({**r, "peak_rss_mb": round(rss), **extra})
        print(json.dumps(rows[-1]), flush=True)

    parts = a.parts.split(",")
    for method in a.methods.split(",") if "run" in parts else ():
        for kind, models in (("lora", adapters), ("dense", dense)):
            out = a.work / f"out_{method}_{kind}"
            r = recipe(a.work, f"{method}_{kind}", method, a.base, models)
            row(f"run {method}", kind, *run_cli(["run", str(r), "-o", str(out), "--force"]))
        d = max_diff(a.work / f"out_{method}_lora", a.work / f"out_{method}_dense")
        rows[-1]["max_abs_diff_lora_vs_dense"] = d
        print(f"{method}: max |lora - dense| = {d:.2e}", flush=True)
    if "adapter" in parts:
        r = recipe(a.work, "task_arithmetic_lora", "task_arithmetic", a.base, adapters)
        out = a.work / "out_adapter"
        sec, rss = run_cli(["run", str(r), "-o", str(out), "--force", "--as-adapter"])
        size = (out / "adapter_model.safetensors").stat().st_size
        diff = adapter_diff(a.base, out, a.work / "out_task_arithmetic_dense")
        row("run task_arithmetic --as-adapter", "lora", sec, rss, adapter_mb=round(size / 1e6, 1))
        rows[-1]["max_abs_diff_vs_full"] = diff
    for kind, models, mode in (
        (
            ("lora", adapters, "memory"),
            ("lora", adapters, "stream"),
            ("dense", dense, "memory"),
            ("dense", dense, "stream"),
        )
        if "step" in parts
        else ()
    ):
        sec, rss, held = run_step(a.base, models, mode, a.steps)
        row(f"learned step ({mode})", kind, sec, rss, task_vector_mb=round(held / 1e6, 1))
    with open(a.work / "bench_lora.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
