"""Data-free merges on worker threads (bit-identical to one thread) and the TIES threshold by a
sampled bracket (exactly the k-th magnitude torch.kthvalue finds)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from test_lora import ADAPTERS, lora_zoo  # noqa: F401 - the adapter fixture

from conftest import write_recipe
from divmerge_cli import cli as cli_mod
from divmerge_cli import merge
from divmerge_cli import methods as M
from divmerge_cli.recipe import load_recipe

N_ROWS, N_COLS = 600, 500  # 300K entries: above EXACT_BELOW, so the bracket path runs


def _kth_largest(a: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(a.flatten(), a.numel() - k + 1).values)


def _cases():
    g = torch.Generator().manual_seed(0)
    shape = (N_ROWS, N_COLS)
    n = N_ROWS * N_COLS
    noise = torch.randn(shape, generator=g)
    rows_apart = noise * 10.0 ** torch.randint(-3, 2, (N_ROWS, 1), generator=g)
    return {
        "random": (noise, 0.2),
        "bf16 ties": (noise.bfloat16().float() * 1e-2, 0.2),
        "five values": (torch.randint(-2, 3, shape, generator=g).float(), 0.3),
        "all equal": (torch.full(shape, -0.5), 0.2),
        "all zero": (torch.zeros(shape), 0.5),
        "rows of different scale": (rows_apart, 0.1),
        "k = 1": (noise, 1 / n),
        "k = n - 1": (noise, (n - 0.5) / n),
        "half a tie": (torch.cat([torch.ones(n // 2), torch.randn(n - n // 2, generator=g)]), 0.5),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_bracketed_threshold_is_exactly_the_kth_magnitude(case, monkeypatch):
    delta, density = _cases()[case]
    base = torch.randn(delta.shape, generator=torch.Generator().manual_seed(1))
    x = base + delta
    n = x.numel()
    k = max(1, int(density * n))
    assert 1 <= k < n
    exact_calls = []
    real_exact = M._kth_exact
    monkeypatch.setattr(
        M, "_kth_exact", lambda *a: exact_calls.append(1) or real_exact(*a)
    )  # the fallback: must not be needed for these
    thr = M.magnitude_threshold(x, base, density)
    assert thr == _kth_largest((x - base).abs(), k)
    assert not exact_calls, "the bracket missed"


def test_a_missed_bracket_falls_back_to_the_exact_select(monkeypatch):
    delta, density = _cases()["random"]
    base = torch.zeros(delta.shape)
    k = int(density * delta.numel())
    expected = _kth_largest(delta.abs(), k)
    for wrong in [(0.0, 1e-6), (50.0, 60.0), (expected + 1e-3, expected + 1e-3)]:
        monkeypatch.setattr(
            M, "_brackets", lambda xs, b, ks, w=wrong: [tuple(map(M.np.float32, w))]
        )
        assert M.magnitude_threshold(delta, base, density) == expected


def _recipe(zoo, method: str) -> dict:
    params = {"density": 0.3} if method in ("ties", "dare_ties") else {}
    return {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo[e]), "parameters": {"weight": w, **params}}
            for e, w in (("e0", 1.0), ("e1", 0.5), ("e2", 2.0))
        ],
        "parameters": {} if method == "linear" else {"lambda": 0.9},
    }


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "linear"])
def test_threads_write_bit_identical_checkpoints(tmp_path, llama_zoo, monkeypatch, method):
    plan = merge.plan_merge(
        load_recipe(write_recipe(tmp_path / "r.yaml", _recipe(llama_zoo, method)))
    )
    unchunked = merge.run_merge(plan, tmp_path / "whole", seed=3)
    # tiny row chunks and a tiny exact-select limit: the fixture's tensors take every path
    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", 200)
    monkeypatch.setattr(M, "EXACT_BELOW", 500)
    monkeypatch.setattr(M, "SAMPLE", 64)
    outs = [merge.run_merge(plan, tmp_path / f"t{n}", seed=3, threads=n) for n in (1, 2, 5)]
    ref = (outs[0] / "model.safetensors").read_bytes()
    for o in outs[1:]:
        assert (o / "model.safetensors").read_bytes() == ref
    # and row chunks with bracketed thresholds give what whole tensors give
    assert (unchunked / "model.safetensors").read_bytes() == ref


def test_pipeline_yields_each_tensor_with_its_index_and_bounds_the_tensors_in_flight():
    started, live, most = [], [0], [0]

    def work(i: int):
        started.append(i)
        live[0] += 1
        most[0] = max(most[0], live[0])
        parts = yield [lambda j=j: (i, j) for j in range(3)]
        assert parts == [(i, 0), (i, 1), (i, 2)]
        (total,) = yield [lambda: sum(j for _, j in parts)]
        live[0] -= 1
        return (i, total)

    out = list(merge.pipeline((work(i) for i in range(20)), threads=3))
    assert sorted(out) == [(i, (i, 3)) for i in range(20)]
    assert most[0] <= merge.WINDOW_PER_THREAD * 3
    assert list(merge.pipeline((work(i) for i in range(5)), threads=1)) == [
        (i, (i, 3)) for i in range(5)
    ]


def test_a_slow_tensor_does_not_hold_up_the_tensors_behind_it():
    # tensor 0 finishes only once a tensor beyond the window has run: the tensors behind it were
    # handed out (and their places freed) while it was still working
    late = threading.Event()
    window = merge.WINDOW_PER_THREAD * 2

    def work(i: int):
        if i == 0:
            (ok,) = yield [lambda: late.wait(timeout=30)]
            return ok
        (x,) = yield [lambda: late.set() if i == window + 1 else None]
        return x

    out = list(merge.pipeline((work(i) for i in range(window + 3)), threads=2))
    # True: tensor window + 1 ran while tensor 0 was still working (in order, it never could)
    assert sorted(i for i, _ in out) == list(range(window + 3)) and dict(out)[0] is True


def test_threads_option_env_and_affinity(monkeypatch, tmp_path, llama_zoo, cli):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli_mod._threads(None) == 3
    assert cli_mod._threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli_mod._threads(None) == len(os.sched_getaffinity(0))
    r = write_recipe(tmp_path / "r.yaml", _recipe(llama_zoo, "ties"))
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--threads", "0")
    assert code == 2 and "--threads" in err and not (tmp_path / "m").exists()
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--threads", "2")
    assert code == 0, err


def test_lora_adapters_merge_on_worker_threads_bit_identical_to_one(
    lora_zoo,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # LoraExpert caches one tensor's factors; worker threads share the expert
    models = [{"model": str(lora_zoo[a]), "parameters": {"density": 0.5}} for a in ADAPTERS]
    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]), "models": models}
    plan = merge.plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", 200)
    seen = []
    real = merge.pipeline
    monkeypatch.setattr(
        merge, "pipeline", lambda w, threads: seen.append(threads) or real(w, threads)
    )
    one = merge.run_merge(plan, tmp_path / "one", threads=1)
    many = merge.run_merge(plan, tmp_path / "many", threads=4)
    assert seen == [1, 4]
    assert (one / "model.safetensors").read_bytes() == (many / "model.safetensors").read_bytes()
