"""TSV-M, Iso-C, Iso-CTS and WUDI (issue 27): each on small matrices worked out by hand, then
through `divmerge run` and `validate` on the fixture models, on LoRA experts (and --as-adapter),
and TSV-M's components as DivMerge's base_method."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_lora import ADAPTERS, lora_zoo  # noqa: F401 - the fixture, shared

from conftest import TASKS, write_recipe
from divmerge_cli import svd_methods as S
from divmerge_cli.methods import METHODS
from divmerge_cli.processed import process_tensor

SVD = ("tsv", "iso_c", "iso_cts", "wudi")
TASKS_LIST = list(TASKS)
G = torch.Generator()


def run(name, base, taus, **glob):
    """METHODS[name] on theta_t = base + tau_t, with its defaults."""
    m = METHODS[name]
    return m.fn(base, [base + t for t in taus], [{}] * len(taus), {**m.global_params, **glob}, G)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def diag(*v):
    return torch.diag(torch.tensor(v, dtype=torch.float32))


# --- Iso-C ------------------------------------------------------------------------------------


def test_iso_c_by_hand_flattens_the_summed_spectrum():
    base = rand(2, 2)
    # sum = diag(3, 1): singular values 3 and 1, mean 2, U V^T = I
    out = run("iso_c", base, [diag(3, 0), diag(0, 1)])
    assert torch.allclose(out - base, 2 * torch.eye(2), atol=1e-6)
    out = run("iso_c", base, [diag(3, 0), diag(0, 1)], scaling_factor=1.5)
    assert torch.allclose(out - base, 3 * torch.eye(2), atol=1e-6)


def test_iso_c_output_spectrum_is_flat_at_the_mean_singular_value_of_the_sum():
    base, taus = rand(7, 5), [rand(7, 5, seed=i + 1) * 0.1 for i in range(3)]
    out = run("iso_c", base, taus, scaling_factor=1.3) - base
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    got = torch.linalg.svdvals(out)
    assert torch.allclose(got, torch.full((5,), 1.3 * float(s.mean())), atol=1e-5)
    assert torch.allclose(out, 1.3 * s.mean() * (u @ vh), atol=1e-5)  # the sum's own directions


# --- TSV-M ------------------------------------------------------------------------------------


def test_tsv_keeps_each_tasks_top_singular_directions_by_hand():
    base = rand(4, 4)
    # min(4, 4) // 2 tasks = 2 directions each; tau1's third (1) is dropped, tau2 has only one;
    # their directions are already orthogonal, so nothing rotates
    out = run("tsv", base, [diag(3, 2, 1, 0), diag(0, 0, 0, 4)])
    assert torch.allclose(out - base, diag(3, 2, 0, 4), atol=1e-6)
    # one task keeps every direction: task arithmetic, times alpha
    tau, b = rand(5, 3, seed=4), rand(5, 3, seed=5)
    assert torch.allclose(run("tsv", b, [tau]), b + tau, atol=1e-6)
    assert torch.allclose(run("tsv", b, [tau], scaling_factor=0.5), b + 0.5 * tau, atol=1e-6)


def test_tsv_components_are_orthogonal_across_tasks_and_sum_to_the_merge():
    base, taus = rand(9, 6), [rand(9, 6, seed=i + 1) for i in range(3)]
    comps = S.tsv_components(torch.stack(taus))
    for i in range(3):
        for j in range(3):
            if i != j:  # left and right singular spaces orthogonal across tasks
                assert torch.allclose(comps[i].T @ comps[j], torch.zeros(6, 6), atol=1e-5)
                assert torch.allclose(comps[i] @ comps[j].T, torch.zeros(9, 9), atol=1e-5)
        assert int(torch.linalg.matrix_rank(comps[i])) == 6 // 3  # k = min(R, C) // n
    assert torch.allclose(run("tsv", base, taus) - base, comps.sum(0), atol=1e-5)
    for c, tau in zip(comps, taus):  # rotated, each keeps its task's top-2 singular values
        want = torch.linalg.svdvals(tau)[:2]
        assert torch.allclose(torch.linalg.svdvals(c)[:2], want, atol=1e-5)


def test_tsv_processed_vectors_are_the_components_and_tau_over_n_elsewhere():
    t = torch.stack([rand(6, 4, seed=i) for i in range(2)])
    got = process_tensor(t.clone(), "tsv", [{}, {}], {"scaling_factor": 1.0}, G)
    assert torch.allclose(got, S.tsv_components(t))
    v = torch.stack([torch.tensor([2.0, -4.0]), torch.tensor([6.0, 0.0])])
    got = process_tensor(v.clone(), "tsv", [{}, {}], {"scaling_factor": 1.0}, G)
    assert torch.equal(got, torch.tensor([[1.0, -2.0], [3.0, 0.0]]))


# --- Iso-CTS ----------------------------------------------------------------------------------


def test_iso_cts_split_follows_the_papers_rounding():
    assert S.iso_cts_split(8, 3, 0.8) == (5, 1)  # int(6.4) = 6, round(2/3) = 1 each: 8 - 3
    assert S.iso_cts_split(10, 2, 0.5) == (6, 2)
    assert S.iso_cts_split(4, 5, 0.8) == (4, 0)  # too few directions for the tasks: Iso-C
    assert S.iso_cts_split(5, 3, 0.0) == (2, 1)  # round(5/3) = 2 would overflow: lowered


def test_iso_cts_keeps_the_common_subspace_with_a_flat_spectrum():
    base, taus = rand(10, 8), [rand(10, 8, seed=i + 1) for i in range(2)]
    out = run("iso_cts", base, taus, common_space_fraction=0.5) - base
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s, s.mean().expand(8), rtol=1e-4)  # flat
    u = torch.linalg.svd(sum(taus), full_matrices=False)[0][:, :4]  # common: int(8 * 0.5)
    proj = out @ torch.linalg.pinv(out)  # onto the output's column space
    assert torch.allclose(proj @ u, u, atol=1e-4)  # the common directions are kept exactly
    # the task-specific directions add what Iso-C leaves out: other outputs than Iso-C's
    iso = run("iso_c", base, taus) - base
    assert not torch.allclose(out, iso, atol=1e-3)
    # a common subspace that is everything is Iso-C
    full = run("iso_cts", base, taus, common_space_fraction=1.0) - base
    assert torch.allclose(full, iso, atol=1e-5)


# --- WUDI -------------------------------------------------------------------------------------


def test_wudi_lowers_its_objective_from_task_arithmetic():
    base, taus = rand(12, 8), [0.01 * rand(12, 8, seed=i + 1) for i in range(3)]
    t = torch.stack(taus)
    start = S.wudi_objective(t.sum(0), t)
    out = run("wudi", base, taus, iterations=300, lr=1e-4) - base
    assert float(S.wudi_objective(out, t)) < 0.5 * float(start)
    assert torch.equal(run("wudi", base, taus, iterations=300, lr=1e-4) - base, out)  # determined
    none = run("wudi", base, taus, iterations=0) - base
    assert torch.allclose(none, t.sum(0), atol=1e-7)  # no step: task arithmetic


def test_wudi_first_step_moves_against_the_objectives_gradient():
    """Adam's first step is lr times minus the sign of the gradient: the closed-form gradient used
    by wudi equals autograd's on wudi_objective."""
    base, taus = rand(5, 7), [rand(5, 7, seed=i + 1) for i in range(2)]
    t = torch.stack(taus)
    merged = t.sum(0).requires_grad_()
    S.wudi_objective(merged, t).backward()
    step = run("wudi", base, taus, iterations=1, lr=1e-3) - base - t.sum(0)
    assert torch.allclose(step, -1e-3 * merged.grad.sign(), atol=1e-6)


def test_gram_factor_finds_a_low_rank_gram_and_gives_up_on_a_full_one():
    a = rand(6, 20)  # rank 6
    g = a.T @ a
    lf = S.gram_factor(g, 8)
    assert lf.shape == (20, 6)
    assert torch.allclose(lf @ lf.T, g, atol=1e-5 * float(g.abs().max()))
    assert S.gram_factor(g, 5) is None  # rank 6 > 5
    full = rand(30, 20)
    assert S.gram_factor(full.T @ full, 5) is None


def test_wudi_on_low_rank_updates_equals_its_dense_steps(monkeypatch):
    """LoRA-like task matrices (rank 2 each, G of rank 6 <= 40 // 4): the factored steps give
    the dense steps' merge; a matrix no task changes stays zero without a step."""
    base = rand(24, 40)
    taus = [rand(24, 2, seed=i) @ rand(2, 40, seed=i + 10) * 0.01 for i in range(3)]
    seen = []
    factor = S.gram_factor
    monkeypatch.setattr(S, "gram_factor", lambda g, r: seen.append(factor(g, r)) or seen[-1])
    low = run("wudi", base, taus, iterations=50, lr=1e-4) - base
    assert seen[0] is not None and seen[0].shape[1] == 6
    monkeypatch.setattr(S, "gram_factor", lambda g, r: None)
    dense = run("wudi", base, taus, iterations=50, lr=1e-4) - base
    assert not torch.allclose(dense, torch.stack(taus).sum(0), atol=1e-4)  # the steps moved it
    assert torch.allclose(low, dense, atol=1e-7, rtol=1e-4)
    zero = run("wudi", base, [torch.zeros_like(base)] * 3) - base
    assert not zero.any()


# --- every method: other tensors, the contract ------------------------------------------------


@pytest.mark.parametrize("name", SVD)
def test_other_tensors_get_the_task_arithmetic_mean(name):
    base = torch.tensor([1.0, 2.0, 3.0])
    taus = [torch.tensor([3.0, 0.0, -3.0]), torch.tensor([0.0, 6.0, 3.0])]
    assert torch.allclose(run(name, base, taus), base + torch.tensor([1.5, 3.0, 0.0]))
    got = run(name, base, taus, scaling_factor=2.0)
    assert torch.allclose(got, base + torch.tensor([3.0, 6.0, 0.0]))
    zero = torch.tensor(1.0)
    assert torch.allclose(run(name, zero, [torch.tensor(2.0), torch.tensor(4.0)]), zero + 3)


@pytest.mark.parametrize("name", SVD)
def test_on_low_rank_updates_the_merge_stays_in_their_span(name):
    """LoRA-like task matrices (rank 2 each): TSV and Iso keep the merged update inside the
    experts' span (the null space gets no rounding-noise directions); Iso-C's flat spectrum is
    over the sum's rank."""
    base = rand(16, 12)
    taus = [rand(16, 2, seed=i) @ rand(2, 12, seed=i + 10) * 0.1 for i in range(3)]
    out = run(name, base, taus) - base
    if name == "wudi":
        return  # Adam moves each entry: no rank to keep
    assert int(torch.linalg.matrix_rank(out)) <= 6
    span = torch.linalg.svd(torch.cat(taus, 1), full_matrices=False)[0][:, :6]
    assert torch.allclose(span @ (span.T @ out), out, atol=1e-5)
    if name == "iso_c":
        s = torch.linalg.svdvals(sum(taus))[:6]
        assert torch.allclose(torch.linalg.svdvals(out)[:6], s.mean().expand(6), rtol=1e-4)


@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_lora_factors_give_the_dense_merge_from_small_svds(name, monkeypatch):
    """fn.lowrank on LoRA updates (scale B A, ranks 2, 3 and a task that leaves the matrix
    alone) equals the merge of their dense task matrices, and decomposes nothing wider than the
    total rank 5 (the dense merge: the 24 x 40 task matrices themselves)."""
    from divmerge_cli.taskvectors import LowRank

    base = rand(24, 40)
    lows = [LowRank(rand(24, 4, seed=1), rand(4, 40, seed=2), 0.05), None]
    lows.append(LowRank(rand(24, 5, seed=3), rand(5, 40, seed=4), 0.02))
    lows.append(LowRank(rand(24, 4, seed=5), rand(4, 40, seed=6), -0.03))
    assert S.iso_cts_split(13, 4, 0.8) == (9, 1)  # Iso-CTS: each task adds a direction of its own
    dense = [torch.zeros_like(base) if t is None else t.dense() for t in lows]
    sides = []
    svd = S.thin_svd
    monkeypatch.setattr(S, "thin_svd", lambda a: sides.append(min(a.shape)) or svd(a))
    want = run(name, base, dense)
    assert max(sides) == 24
    sides.clear()
    m = METHODS[name]
    got = m.fn.lowrank(base.clone(), lows, dict(m.global_params))
    assert sides and max(sides) <= 13
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()  # updates ~0.1
    assert not torch.allclose(want, base + sum(dense) / 4, atol=1e-3)  # not the fallback mean
    zero = m.fn.lowrank(
        base.clone(), [None, LowRank(torch.zeros(24, 2), rand(2, 40), 1.0)], {**m.global_params}
    )
    assert torch.equal(zero, base)


@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_lora_factors_of_a_rank_above_the_matrix_or_tsvs_share_give_the_dense_merge(name):
    """Ranks 6 on a 5 x 8 matrix (above its rank) and three tasks (TSV keeps 5 // 3 = 1 of each
    task's directions): the factored merge is still the dense one."""
    from divmerge_cli.taskvectors import LowRank

    base = rand(5, 8)
    lows = [LowRank(rand(5, 6, seed=i), rand(6, 8, seed=i + 3), 0.1) for i in range(3)]
    m = METHODS[name]
    got = m.fn.lowrank(base.clone(), lows, dict(m.global_params))
    want = run(name, base, [t.dense() for t in lows])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# --- devices ----------------------------------------------------------------------------------


def test_only_the_svd_methods_run_on_the_device():
    assert {n for n, m in METHODS.items() if m.on_device} == set(SVD)


@pytest.mark.parametrize("name", SVD)
@pytest.mark.parametrize(
    "case",
    [
        ("random", lambda b: [rand(16, 12, seed=i) * 0.1 for i in range(3)]),
        ("zero", lambda b: [torch.zeros_like(b)] * 3),  # the zero-rank branches
        ("narrow", lambda b: [rand(16, 2, seed=i) * 0.1 for i in range(3)]),  # k = 2 // 3 = 0
    ],
    ids=lambda c: c[0],
)
def test_an_on_device_method_makes_every_tensor_on_its_inputs_device(name, case):
    """With the default device set to meta, a tensor made without `device=` lands there and the
    next operation with the (CPU) inputs fails: on a GPU, it would be a CPU tensor beside CUDA
    ones (wudi's Gram matrices were)."""
    base = rand(16, 12) if case[0] != "narrow" else rand(16, 2)
    taus = case[1](base)
    want = run(name, base, taus, iterations=5)
    with torch.device("meta"):
        got = run(name, base, taus, iterations=5)
    assert got.device.type == "cpu" and torch.equal(got, want)


@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_a_merge_from_lora_factors_makes_every_tensor_on_their_device(name):
    from divmerge_cli.taskvectors import LowRank

    base = rand(16, 12)
    lows = [LowRank(rand(16, 2, seed=i), rand(2, 12, seed=i + 5), 0.1) for i in range(2)] + [None]
    glob = dict(METHODS[name].global_params)
    want = METHODS[name].fn.lowrank(base.clone(), lows, glob)
    with torch.device("meta"):
        got = METHODS[name].fn.lowrank(base.clone(), lows, glob)
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_a_method_that_does_not_run_on_the_device_runs_on_the_cpu(llama_zoo, tmp_path):
    """The merge engine keeps the memory-bound methods on the CPU (their numpy selection would
    fail on a GPU's tensors): asked for another device, TIES gives the CPU's tensors."""
    from divmerge_cli.merge import merge_tensor, plan_merge, tensor_generator
    from divmerge_cli.recipe import load_recipe

    experts = [llama_zoo[e] for e in ("e0", "e1")]
    plan = plan_merge(load_recipe(_recipe(tmp_path, llama_zoo, "ties", experts, density=0.5)))
    for n in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        want = merge_tensor(plan, n, tensor_generator(0, n), "cpu")
        got = merge_tensor(plan, n, tensor_generator(0, n), "meta")
        assert got.device.type == "cpu" and torch.equal(got, want), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [*SVD, "ties", "della"])
def test_run_on_cuda_equals_run_on_the_cpu(name, llama_zoo, tmp_path, cli):
    experts = [llama_zoo[e] for e in ("e0", "e1", "e2")]
    params = {"iterations": 20} if name == "wudi" else {}
    params = {"density": 0.5} if name in ("ties", "della") else params
    r = _recipe(tmp_path, llama_zoo, name, experts, **params)
    for dev in ("cpu", "cuda"):
        code, _, err = cli("run", r, "-o", tmp_path / dev, "--device", dev)
        assert code == 0, err
    cpu, gpu = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    for n in cpu:  # GPU kernels round otherwise; the random draws are the CPU's on both
        assert torch.allclose(gpu[n], cpu[n], atol=1e-4), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_a_merge_of_lora_factors_on_cuda_equals_the_cpu_one(name, lora_zoo, tmp_path, cli):  # noqa: F811
    r = _recipe(tmp_path, lora_zoo, name, [lora_zoo[a] for a in ADAPTERS])
    for dev in ("cpu", "cuda"):
        code, _, err = cli("run", r, "-o", tmp_path / dev, "--device", dev)
        assert code == 0, err
    cpu, gpu = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    for n in cpu:
        assert torch.allclose(gpu[n], cpu[n], atol=1e-4), n


# --- end to end -------------------------------------------------------------------------------


def _recipe(tmp_path, zoo, name, models, **params):
    return write_recipe(
        tmp_path / f"{name}.yaml",
        {
            "merge_method": name,
            "base_model": str(zoo["base"]),
            "models": [{"model": str(m)} for m in models],
            "parameters": params,
            "dtype": "float32",
        },
    )


@pytest.mark.parametrize("name", SVD)
def test_each_method_runs_and_validate_says_what_the_svds_cost(name, llama_zoo, tmp_path, cli):
    experts = [llama_zoo[e] for e in ("e0", "e1", "e2")]
    params = {"iterations": 20} if name == "wudi" else {}
    r = _recipe(tmp_path, llama_zoo, name, experts, scaling_factor=0.9, **params)
    code, out, err = cli("validate", r, "--json", tmp_path / "v.json")
    assert code == 0, err
    est = json.loads((tmp_path / "v.json").read_text())["svd_estimate"]
    line = " ".join(next(ln for ln in out.splitlines() if ln.startswith("estimate:")).split())
    base = load_file(llama_zoo["base"] / "model.safetensors")
    mats = {n: w for n, w in base.items() if w.dim() == 2}
    assert est["matrices"] == len(mats)
    big = max(mats.values(), key=lambda w: w.numel())
    assert est["largest"] == list(big.shape)
    r_, c_ = big.shape
    if name == "wudi":
        assert f"20 Adam steps on each of {len(mats)} matrices up to {r_}x{c_} (no SVD)" in line
    else:
        per = {"tsv": 3 + 2, "iso_c": 1, "iso_cts": 1 + 3 + 2}[name]
        assert est["svds"] == per * len(mats)
        assert f"{per * len(mats)} SVDs of {len(mats)} matrices up to {r_}x{c_}" in line, line
    assert "on one core" in line and "peak about" in line
    code, _, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    xs = [load_file(e / "model.safetensors") for e in experts]
    m = METHODS[name]
    glob = {**m.global_params, "scaling_factor": 0.9, **params}
    for n in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        want = m.fn(base[n], [x[n] for x in xs], [{}] * 3, glob, G)
        assert torch.allclose(got[n], want, atol=1e-6), n
    n = "model.norm.weight"  # 1-D: the mean, scaled
    mean = sum(x[n] - base[n] for x in xs) / 3
    assert torch.allclose(got[n], base[n] + 0.9 * mean, atol=1e-6)


def _gesdd_fails(dtypes):
    """torch.linalg.svd raising as LAPACK's gesdd does when it does not converge, on `dtypes`."""
    svd = torch.linalg.svd

    def fake(a, *args, **kw):
        if a.dtype in dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kw)

    return fake


def test_an_svd_that_does_not_converge_in_float32_is_done_in_float64(monkeypatch):
    a = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    want = torch.linalg.svd(a.double(), full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", _gesdd_fails({torch.float32}))
    u, s, vh = S.thin_svd(a)
    assert (u.dtype, s.dtype, vh.dtype) == (torch.float32,) * 3
    for got, w in zip((u, s, vh), want):
        assert torch.equal(got, w.float())
    assert torch.allclose(u * s @ vh, a, atol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_cts"])
def test_a_merge_whose_svd_fails_in_float32_runs_and_one_failing_in_both_names_the_tensor(
    name, llama_zoo, tmp_path, cli, monkeypatch
):
    experts = [llama_zoo[e] for e in ("e0", "e1", "e2")]
    r = _recipe(tmp_path, llama_zoo, name, experts)
    code, _, err = cli("run", r, "-o", tmp_path / "ok")
    assert code == 0, err
    monkeypatch.setattr(torch.linalg, "svd", _gesdd_fails({torch.float32}))
    code, _, err = cli("run", r, "-o", tmp_path / "f64")
    assert code == 0, err
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("ok", "f64"))
    for n in a:  # the same merge, to float32 rounding of the decompositions
        assert torch.allclose(a[n], b[n], atol=1e-5), n
    monkeypatch.setattr(torch.linalg, "svd", _gesdd_fails({torch.float32, torch.float64}))
    code, _, err = cli("run", r, "-o", tmp_path / "bad")
    assert code == 2 and "Traceback" not in err
    assert re.search(r"tensor \S+: the SVD of a \(\d+, \d+\) matrix did not converge", err), err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_an_expert_holding_nan_is_named_not_an_svd_that_did_not_converge(
    name, llama_zoo, tmp_path, cli
):
    bad = tmp_path / "bad"
    shutil.copytree(llama_zoo["e1"], bad)
    w = load_file(bad / "model.safetensors")
    w["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    r = _recipe(tmp_path, llama_zoo, name, [llama_zoo["e0"], bad])
    code, _, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 2 and "Traceback" not in err, err
    assert "models[1].model: tensor model.layers.0.self_attn.q_proj.weight in " in err, err
    assert "holds NaN or Inf" in err and "converge" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("base_method", ["tsv", None])
def test_a_learned_merge_names_an_expert_holding_inf(base_method, toy, tmp_path, cli):
    """Not an SVD that fails, nor a loss at the initial Gamma that a smaller init would mend."""
    bad = tmp_path / "bad"
    shutil.copytree(toy / TASKS_LIST[1], bad)
    w = load_file(bad / "model.safetensors")
    w["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [
                {"model": str(toy / TASKS_LIST[0]), "task": TASKS_LIST[0]},
                {"model": str(bad), "task": TASKS_LIST[1]},
            ],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {
                "epochs": 1,
                "samples": 4,
                **({"base_method": base_method} if base_method else {}),
            },
        },
    )
    code, _, err = cli("run", r, "-o", tmp_path / "out", "--cache-dir", tmp_path / "c")
    assert code == 2 and "Traceback" not in err, err
    assert "models[1]" in err and "model.layers.1.mlp.up_proj.weight" in err, err
    assert "NaN or Inf" in err and "init" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SVD)
def test_gpt2_conv1d_weights_are_merged_as_the_linear_layers_they_are(name, tmp_path, cli):
    """GPT-2 stores its Conv1D weights [in, out]. Iso-CTS's projections and WUDI's Gram matrix
    depend on which side is the layer's input, so every method gets them as nn.Linear's
    [out, in] (TSV-M and Iso-C are the same either way); embeddings stay as stored."""
    from test_architectures import _build

    zoo = _build("gpt2", tmp_path / "zoo")
    params = {"iterations": 20, "lr": 1e-3} if name == "wudi" else {}
    r = _recipe(tmp_path, zoo, name, [zoo["a"], zoo["b"]], **params)
    code, out, err = cli("validate", r)
    assert code == 0, err
    if name == "wudi":  # c_fc [64, 256] as stored: its inputs are 64 wide
        assert "Gram matrix" in out and "256x256 Gram" not in out, out
    code, _, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    xs = [load_file(zoo[t] / "model.safetensors") for t in ("a", "b")]
    m = METHODS[name]
    glob = {**m.global_params, **params}
    conv = {n for n in got if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", n)}
    assert len(conv) == 8  # two blocks: c_attn, attn.c_proj, c_fc, mlp.c_proj
    for n, w in got.items():
        if w.dim() != 2:
            continue
        flip = (lambda t: t.T) if n in conv else (lambda t: t)
        want = flip(m.fn(flip(base[n]), [flip(x[n]) for x in xs], [{}] * 2, glob, G))
        assert torch.allclose(w, want, atol=1e-5), n  # float32 rounding of the SVDs
    if name in ("iso_cts", "wudi"):  # not the same merge as on the stored layout
        n = "transformer.h.0.mlp.c_fc.weight"
        stored = m.fn(base[n], [x[n] for x in xs], [{}] * 2, glob, G)
        assert not torch.allclose(got[n], stored, atol=1e-4)


def test_validate_estimates_a_sliced_svd_merge_with_more_layers_than_the_base(
    llama_zoo, tmp_path, cli
):
    """Output tensors a `slices:` recipe adds (a third layer) are estimated from their inputs."""
    base, e0, e1 = (str(llama_zoo[k]) for k in ("base", "e0", "e1"))
    n_layers = json.loads((llama_zoo["base"] / "config.json").read_text())["num_hidden_layers"]
    raw = {
        "merge_method": "tsv",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, n_layers]},
                    {"model": e0, "layer_range": [0, n_layers]},
                ]
            },
            {
                "sources": [
                    {"model": base, "layer_range": [n_layers - 1, n_layers]},
                    {"model": e1, "layer_range": [n_layers - 1, n_layers]},
                ]
            },
        ],
        "dtype": "float32",
    }
    r = write_recipe(tmp_path / "r.yaml", raw)
    code, out, err = cli("validate", r, "--json", tmp_path / "v.json")
    assert code == 0, err
    est = json.loads((tmp_path / "v.json").read_text())["svd_estimate"]
    code, _, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert f"model.layers.{n_layers}.mlp.up_proj.weight" in got
    assert est["matrices"] == sum(w.dim() == 2 for w in got.values())


def test_tsv_warns_when_adapters_share_lora_a(lora_zoo, tmp_path, cli):  # noqa: F811
    """Adapters trained with one frozen lora_A make TSV-M's orthogonalisation undefined: validate
    and run say which two; adapters with their own A do not get the warning."""
    twin = tmp_path / "twin"
    shutil.copytree(lora_zoo["a0"], twin)
    w = load_file(twin / "adapter_model.safetensors")
    w = {k: v * 2 if "lora_B" in k else v for k, v in w.items()}  # same A, other B
    save_file(w, twin / "adapter_model.safetensors", metadata={"format": "pt"})
    r = _recipe(tmp_path, lora_zoo, "tsv", [lora_zoo["a0"], twin])
    code, out, err = cli("validate", r)
    assert code == 0, err
    assert "models[0] and models[1] share lora_A on " in out + err, out + err
    code, out, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 0 and "share lora_A" in out + err, err
    code, out, err = cli(
        "validate", _recipe(tmp_path, lora_zoo, "tsv", [lora_zoo["a0"], lora_zoo["a1"]])
    )
    assert code == 0 and "share lora_A" not in out + err, out + err
    code, out, err = cli("validate", _recipe(tmp_path, lora_zoo, "iso_c", [lora_zoo["a0"], twin]))
    assert code == 0 and "share lora_A" not in out + err, out + err


def _adapted(name: str) -> bool:
    """A tensor some fixture adapter (ADAPTERS) adapts with factors."""
    targets = {t for cfg in ADAPTERS.values() for t in cfg["target_modules"]}
    return name.endswith(".weight") and any(f".{t}." in f".{name}" for t in targets)


@pytest.mark.parametrize("tokens", ["forced", "padded"])
def test_lora_vocabulary_rebuilt_merges_as_dense(tokens, lora_zoo, tmp_path, cli, tok):  # noqa: F811
    """A tokenizer block that forces a token's row or pads the vocabulary re-indexes the
    embedding's rows: it is merged densely (the adapters' factors keep the old rows)."""
    first = sorted(tok.get_vocab(), key=tok.get_vocab().get)[50]
    block = (
        {"source": "base", "tokens": {first: {"source": {"kind": "zero"}, "force": True}}}
        if tokens == "forced"
        else {"source": "base", "pad_to_multiple_of": 64}
    )
    for tag, models in (("lora", ["a0", "a2"]), ("dense", ["a0_full", "a2_full"])):
        r = _recipe(tmp_path, lora_zoo, "tsv", [lora_zoo[m] for m in models])
        recipe = yaml.safe_load(r.read_text()) | {"tokenizer": block}
        r.write_text(yaml.safe_dump(recipe))
        code, _, err = cli("run", r, "-o", tmp_path / tag)
        assert code == 0, err
    a, b = (load_file(tmp_path / t / "model.safetensors") for t in ("lora", "dense"))
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5), n


@pytest.mark.parametrize("name", SVD)
def test_lora_experts_merge_as_their_dense_models(name, lora_zoo, tmp_path, cli, monkeypatch):  # noqa: F811
    """The merge of adapters equals the one of their merge_and_unload() checkpoints: TSV and Iso
    merge the matrices every adapter adapts from the factors (fn.lowrank), the others (a2's saved
    lm_head) densely as WUDI does everything."""
    params = {"iterations": 10} if name == "wudi" else {}
    dense = [lora_zoo[f"{a}_full"] for a in ADAPTERS]
    fn = METHODS[name].fn
    factored = []
    if name != "wudi":
        low = fn.lowrank
        monkeypatch.setattr(fn, "lowrank", lambda b, t, g: factored.append(b.shape) or low(b, t, g))
    for tag, models in (("lora", [lora_zoo[a] for a in ADAPTERS]), ("dense", dense)):
        r = _recipe(tmp_path, lora_zoo, name, models, **params)
        code, _, err = cli("run", r, "-o", tmp_path / tag)
        assert code == 0, err
        if tag == "lora" and name != "wudi":  # a matrix adapted by a0, a1 or a2 (not lm_head)
            assert len(factored) == len(
                [n for n in load_file(lora_zoo["base"] / "model.safetensors") if _adapted(n)]
            ), factored
    a, b = (load_file(tmp_path / t / "model.safetensors") for t in ("lora", "dense"))
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5), n


def test_validate_counts_only_the_matrices_lora_experts_change(lora_zoo, tmp_path, cli):  # noqa: F811
    """From the adapters' headers: a matrix no adapter targets costs no SVD nor step, and WUDI's
    steps on targets use the factored Gram matrix (ranks 2 + 3 or 4 <= hidden 32 // 4), so the
    estimate is below the same merge's on the merge_and_unload() checkpoints."""
    targets = ("q_proj", "v_proj", "down_proj", "k_proj", "o_proj", "up_proj")  # a0's and a1's
    base = load_file(lora_zoo["base"] / "model.safetensors")
    mats = [n for n, w in base.items() if w.dim() == 2]
    est = {}
    for name in ("tsv", "wudi"):
        for tag, models in (("lora", ["a0", "a1"]), ("dense", ["a0_full", "a1_full"])):
            params = {"iterations": 20} if name == "wudi" else {}
            r = _recipe(tmp_path, lora_zoo, name, [lora_zoo[m] for m in models], **params)
            code, _, err = cli("validate", r, "--json", tmp_path / "v.json")
            assert code == 0, err
            est[name, tag] = json.loads((tmp_path / "v.json").read_text())["svd_estimate"]
        lora, dense = est[name, "lora"], est[name, "dense"]
        assert lora["matrices"] == sum(any(t in n for t in targets) for n in mats)
        assert dense["matrices"] == len(mats) > lora["matrices"]
    assert est["tsv", "lora"]["svds"] == (2 + 2) * est["tsv", "lora"]["matrices"]
    assert est["wudi", "lora"]["seconds"] < est["wudi", "dense"]["seconds"]
    # TSV from the factors: its SVDs are of rank-sized matrices, so the estimate is far lower
    assert est["tsv", "lora"]["seconds"] < est["tsv", "dense"]["seconds"] / 10
    assert est["tsv", "lora"]["peak_bytes"] < est["tsv", "dense"]["peak_bytes"]  # no dense inputs
    for method in ("tsv", "iso_c", "iso_cts"):
        svds = S.work(method, (4096, 11008), 4, {}, rank=64, factored=True)[0]
        assert max(min(s) for s in svds) == 64, method  # the dense ones: 4096
        assert (
            S.work(method, (4096, 11008), 4, {}, rank=64)[0]
            == S.work(method, (4096, 11008), 4, {})[0]
        )  # a base_method gets dense task vectors
    glob = {"iterations": 300}  # a step's flops: factored up to rank C // 4 = 8, dense above
    dense = S.work("wudi", (64, 32), 2, glob)[1]
    assert S.work("wudi", (64, 32), 2, glob, rank=9)[1] == dense
    assert S.work("wudi", (64, 32), 2, glob, rank=8)[1] < dense
    assert S.work("tsv", (64, 32), 2, glob, rank=0) == ([], 0.0, 0)


@pytest.mark.parametrize("name", ("tsv", "iso_c", "iso_cts"))
def test_as_adapter_writes_the_lora_merge_at_the_stated_rank(name, lora_zoo, tmp_path, cli):  # noqa: F811
    """On adapters TSV and Iso keep the merged update in the adapters' span (rank <= sum r_t):
    at --adapter-rank 8 (>= 2 + 4, below the hidden size 32) the adapter is the full merge;
    without a rank it is refused."""
    from test_lora import _merge_and_unload, weights

    r = _recipe(tmp_path, lora_zoo, name, [lora_zoo["a0"], lora_zoo["a1"]])
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter")
    assert code == 2 and f"{name} is not linear" in err and "--adapter-rank" in err, err
    code, _, err = cli("run", r, "-o", tmp_path / "full")
    assert code == 0, err
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--adapter-rank", "8")
    assert code == 0 and "warning" not in err, err
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] <= 8
    full, got = weights(tmp_path / "full"), _merge_and_unload(lora_zoo["base"], tmp_path / "ad")
    for n in full:
        assert torch.allclose(got[n], full[n], atol=1e-5), n
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "truncated by SVD to rank 8" in card
    errors = [float(e) for e in re.findall(r"\| `.+?` \| \d+ \| (\S+) \|", card)]
    assert errors and max(errors) < 1e-4  # nothing was cut


def test_divmerge_on_tsv_components_at_gamma_one_equals_tsv(toy, tmp_path, cli):
    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    free = _recipe(tmp_path, {"base": toy / "base"}, "tsv", [toy / n for n in TASKS])
    code, _, err = cli("run", free, "-o", tmp_path / "free")
    assert code == 0, err
    want = load_file(tmp_path / "free" / "model.safetensors")
    learned = write_recipe(
        tmp_path / "learned.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n), "task": n} for n in TASKS],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"epochs": 1, "samples": 8, "top_k": 16, "base_method": "tsv"},
            "dtype": "float32",
        },
    )
    code, out, err = cli("validate", learned)
    assert code == 0 and "estimate: tsv: " in out, err
    plan = plan_merge(load_recipe(learned))
    pb = optimize.prepare(plan, seed=0, cache_dir=tmp_path / "cache", work_dir=tmp_path / "w")
    ones = torch.ones(2, len(pb.groups))
    coeff = optimize.stored_coefficients(pb.plan, pb.stored_index, ones)
    for name, w in want.items():
        got = optimize.merged_tensor(pb.plan, pb.experts, coeff, name)
        assert torch.allclose(got, w, atol=1e-5), name
    a = pb.tv.experts[0].tau("model.layers.0.mlp.up_proj.weight", None)
    b = pb.tv.experts[1].tau("model.layers.0.mlp.up_proj.weight", None)
    assert torch.allclose(a.T @ b, torch.zeros(a.shape[1], a.shape[1]), atol=1e-5)  # orthogonal
    code, out, err = cli("run", learned, "-o", tmp_path / "m", "--cache-dir", tmp_path / "c2")
    assert code == 0, err
    assert "fitted on tsv-processed task vectors" in (tmp_path / "m" / "README.md").read_text()


def test_methods_lists_the_svd_methods_and_tsv_as_a_base_method(cli, monkeypatch):
    """(their parameters and papers in `divmerge methods` and README's table: the checks of
    test_mergekit_methods.py and test_docs.py cover every method of METHODS)"""
    from divmerge_cli import cli as cli_module

    monkeypatch.setattr(cli_module.out, "width", 400)  # one line per method
    code, out, _ = cli("methods")
    assert code == 0
    for name in SVD:
        assert name in out and METHODS[name].paper.split(" (")[0] in out
    assert "della, della_linear, sce, tsv" in " ".join(out.split())
