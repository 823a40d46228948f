"""scripts/measure.py (a child's wall time and peak RSS), the bench scripts that use it, and
tiny.perturbed_folder (their fake experts)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divmerge_cli import tiny
from divmerge_cli.checkpoint import Checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
measure = importlib.import_module("measure")
MiB = 1024  # KiB

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="peaks measured on Linux")


def test_peak_is_the_childs_not_this_processs():
    # this process holds 600 MiB while the child allocates 200 MiB: a child forked from here
    # would report >= 600 MiB (Linux carries the parent's peak into it)
    held = b"x" * (600 * 2**20)
    m = measure.measure(
        [sys.executable, "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(0.3)"]
    )
    assert len(held) and m.returncode == 0
    assert 200 * MiB <= m.peak_kib < 400 * MiB
    assert m.peak_bytes == m.peak_kib * 1024
    assert 0.3 <= m.wall_s < 30 and 0 < m.cpu_s < m.wall_s


def test_exit_code_and_output_pass_through():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    m = measure.measure(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert (m.returncode, m.stdout, m.stderr) == (3, "out\n", "err\n")
    missing = measure.measure(["no-such-command-x"], stderr=subprocess.PIPE)
    assert missing.returncode != 0 and "no-such-command-x" in missing.stderr


def test_own_peak_is_this_processs_high_water_mark():
    before = measure.own_peak_kib()
    held = b"x" * (before * 1024 + 100 * 2**20)  # above anything this process held so far
    assert measure.own_peak_kib() >= before + 100 * MiB and len(held)


@pytest.mark.parametrize(
    "name", ["bench_fsdp", "bench_lora", "bench_merge", "bench_optimize", "bench_scale"]
)
def test_bench_scripts_measure_with_the_helper(name):
    src = (SCRIPTS / f"{name}.py").read_text()
    assert "from measure import" in src
    for other in ("ru_maxrss *", "RUSAGE_SELF", "os.wait4", "os.fork", "psutil", "/usr/bin/time"):
        assert other not in src, f"{name} measures with {other}"
    mod = importlib.import_module(name)
    assert mod.measure is measure.measure


def test_perturbed_folder_adds_seeded_noise_relative_to_each_tensor(tmp_path, llama_zoo):
    base = llama_zoo["base"]
    a = tiny.perturbed_folder(base, tmp_path / "a", seed=1, scale=0.01)
    b = tiny.perturbed_folder(base, tmp_path / "b", seed=1, scale=0.01)
    c = tiny.perturbed_folder(base, tmp_path / "c", seed=2, scale=0.01, spread=torch.mean)
    cb, ca, cc = Checkpoint(base, "b"), Checkpoint(a, "a"), Checkpoint(c, "c")
    assert (
        ca.names == cb.names and (a / "tokenizer.json").is_file() and (a / "config.json").is_file()
    )
    for n in cb.names:
        w, x = cb.get(n), ca.get(n)
        assert x.dtype == w.dtype and torch.equal(x, Checkpoint(b, "b").get(n))
        if w.numel() > 100:
            ratio = float((x - w).std() / w.std())
            assert 0.008 < ratio < 0.012, n
    assert any(not torch.equal(ca.get(n), cc.get(n)) for n in cb.names)
    stamp = os.stat(a / "model.safetensors").st_mtime_ns
    tiny.perturbed_folder(base, a, seed=5, scale=1.0)  # an existing expert is kept
    assert os.stat(a / "model.safetensors").st_mtime_ns == stamp


def test_bench_scale_smallest_run(tmp_path, tok):
    """End to end: fake expert (tiny.perturbed_folder), two measured children, a result row."""
    base = tiny.save(tiny.tiny_llama(len(tok)), tok, tmp_path / "base")
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPTS / "bench_scale.py"), str(tmp_path / "w"), "--base"]
    cmd += [str(base), "--n", "1", "--modes", "stream", "--no-floor"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = [json.loads(x) for x in (tmp_path / "w/bench_scale.jsonl").read_text().splitlines()]
    # a child that imported torch and transformers: well above the launcher's ~10 MB
    assert 0.1 < row["peak_rss_gb"] < 4 and row["s_per_step"] > 0
    assert "n= 1 stream" in p.stdout
