"""mergekit's other methods (issue 26): each against values worked out by hand on small tensors,
the chunking contract for every data-free method, and what is refused and how."""

import math
import re

import pytest
import torch
import yaml

from divmerge_cli import methods as M
from divmerge_cli.errors import UserError
from divmerge_cli.recipe import MERGEKIT_METHODS, recipe_from_dict

G = torch.Generator()


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def run(name, base, xs, per_model=None, **glob):
    """METHODS[name] with its defaults, as merge.tensor_params would resolve them."""
    m = M.METHODS[name]
    p = [{**m.model_params, **pm} for pm in per_model or [{}] * len(xs)]
    return m.fn(base, xs, p, {**m.global_params, **glob}, G)


# --- breadcrumbs ------------------------------------------------------------------------------


def test_breadcrumbs_drops_the_outliers_and_the_smallest_then_adds_up():
    tau = t(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0)
    # keep = 5, n_top = 2, n_bot = 10 - 5 - 2 = 3: ascending ranks 4..8 (0.4 .. 0.8) survive
    out = run("breadcrumbs", torch.zeros(10), [tau], [{"density": 0.5, "gamma": 0.2}])
    assert torch.equal(out, t(0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0, 0))
    # density + gamma > 1: fewer outliers go (keep 5 of 10 leaves room to drop only 5 at the top)
    out = run("breadcrumbs", torch.zeros(10), [tau], [{"density": 0.5, "gamma": 0.7}])
    assert torch.equal(out, t(0.1, -0.2, 0.3, -0.4, 0.5, 0, 0, 0, 0, 0))
    # rescale keeps the L1 norm (5.5), lambda and weights scale task arithmetic as usual
    out = run(
        "breadcrumbs", torch.ones(10), [tau + 1], [{"density": 0.5, "gamma": 0.2, "weight": 2.0}],
        rescale=True, **{"lambda": 0.5},
    )  # fmt: skip
    want = t(0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0, 0) * (5.5 / 3.0)
    assert torch.allclose(out, 1 + want, atol=1e-6)
    # density 1 keeps everything, gamma included (as mergekit)
    assert torch.equal(run("breadcrumbs", torch.zeros(10), [tau], [{"gamma": 0.5}]), tau)


def test_breadcrumbs_ties_elects_signs_after_the_cut():
    base = torch.zeros(4)
    a = t(4, -1, 2, 3)  # keep 2, drop the largest 1 and the smallest 1: (0, 0, 2, 3)
    p = [{"density": 0.5, "gamma": 0.25}] * 2
    # b -> (0, 0, -3, 2); sum (0, 0, -1, 5): entry 2 elects -, so only b's -3 is kept there
    assert torch.equal(run("breadcrumbs_ties", base, [a, t(-5, 1, -3, 2)], p), t(0, 0, -3, 5))
    # b -> (0, 0, 3, 2): both agree on entries 2 and 3; normalize takes their mean
    out = run("breadcrumbs_ties", base, [a, t(-5, 1, 3, 2)], p, normalize=True)
    assert torch.equal(out, t(0, 0, 2.5, 2.5))


# --- della ------------------------------------------------------------------------------------


def test_della_keeps_larger_entries_more_often_and_is_seeded():
    n, cols = 400, 500
    tau = torch.arange(1, cols + 1, dtype=torch.float32).repeat(n, 1)  # rank = column
    p = [{"density": 0.5, "epsilon": 0.2}]
    out = run("della_linear", torch.zeros(n, cols), [tau], p, rescale=False)
    kept = (out != 0).float().mean(0)  # per column: ~0.3 at the smallest, ~0.7 at the largest
    assert abs(float(kept.mean()) - 0.5) < 0.01
    assert (
        abs(float(kept[:50].mean()) - 0.32) < 0.02 and abs(float(kept[-50:].mean()) - 0.68) < 0.02
    )
    assert torch.equal(out[out != 0], tau[out != 0])  # no rescale: survivors unchanged
    seeded = [
        M.METHODS["della_linear"].fn(
            torch.zeros(n, cols), [tau], [{"weight": 1.0, **p[0]}],
            {"normalize": False, "rescale": True, "lambda": 1.0}, torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]  # fmt: skip
    assert torch.equal(*seeded)
    assert torch.allclose(seeded[0].abs().sum(), tau.abs().sum())  # rescale keeps the L1 norm
    # density 1 leaves task arithmetic (della: with TIES's election and normalize)
    xs = [t(1, -2), t(3, 1)]  # signs (+, -): both agree on entry 0 (mean 2), only -2 on entry 1
    assert torch.equal(run("della", torch.zeros(2), xs), t(2, -2))


def test_della_bounds_name_the_model_whose_probabilities_leave_0_1():
    ok = {"density": 0.5, "epsilon": 0.15}
    assert M.della_bounds([ok, {"density": 1.0, "epsilon": 0.5}], {}) == []  # density 1: no drop
    (bad,) = M.della_bounds([ok, {"density": 0.9, "epsilon": 0.15}], {})
    assert bad[0] == 1 and "0.75 .. 1.05" in bad[1]


# --- sce --------------------------------------------------------------------------------------


def test_sce_select_calculate_erase_by_hand():
    base = torch.zeros(4)
    a, b = t(1, 2, -1, 0), t(3, -2, -1, 5)
    # weights: mean squares 6/4 and 39/4 -> 2/15 and 13/15; elected signs (+, + (sum 0), -, +)
    out = run("sce", base, [a, b])
    assert torch.allclose(out, t((2 + 39) / 15, 2, -1, 5))
    # select_topk 0.5: variances (1, 4, 0, 6.25), 3 nonzero -> keep int(1.5) = 1 entry, the last
    assert torch.allclose(run("sce", base, [a, b], select_topk=0.5), t(0, 0, 0, 5))


# --- model_stock ------------------------------------------------------------------------------


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0, t 0, the base
    assert torch.equal(run("model_stock", base, [t(1, 0), t(0, 1)]), base)
    # 45 degrees: t = 2c / (1 + c), c = 1/sqrt 2, toward the average (1, 0.5)
    c = 1 / math.sqrt(2)
    want = 2 * c / (1 + c) * t(1, 0.5)
    assert torch.allclose(run("model_stock", base, [t(1, 0), t(1, 1)]), want)
    # filter_wise: one angle per row
    base2 = torch.zeros(2, 2)
    xs = [t(1, 0, 1, 0).view(2, 2), t(0, 1, 1, 1).view(2, 2)]
    out = run("model_stock", base2, xs, filter_wise=True)
    assert torch.allclose(out[0], torch.zeros(2)) and torch.allclose(out[1], want)


# --- nuslerp ----------------------------------------------------------------------------------


def test_nuslerp_whole_tensor_rows_and_columns_with_and_without_base():
    h = math.sqrt(0.5)
    w = [{"weight": 1.0}, {"weight": 1.0}]
    out = run("nuslerp", torch.ones(2), [t(2, 1), t(1, 2)], w)  # task vectors (1,0), (0,1)
    assert torch.allclose(out, 1 + t(h, h))
    # weights 1 and 3: t = 0.75 of the way, on the circle
    out = run("nuslerp", None, [t(1, 0), t(0, 1)], [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, t(math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)))
    # per row (flatten false): row 0 interpolates (1,0)->(0,1), row 1 is colinear -> lerp
    x0, x1 = t(1, 0, 1, 1).view(2, 2), t(0, 1, 3, 3).view(2, 2)
    out = run("nuslerp", None, [x0, x1], w, nuslerp_flatten=False)
    assert torch.allclose(out, t(h, h, 2, 2).view(2, 2))
    # per column (row_wise): the transpose of the same
    out = run("nuslerp", None, [x0.T, x1.T], w, nuslerp_flatten=False, nuslerp_row_wise=True)
    assert torch.allclose(out, t(h, h, 2, 2).view(2, 2).T)


# --- karcher ----------------------------------------------------------------------------------


def test_karcher_mean_of_directions_scaled_to_the_mean_norm():
    h = math.sqrt(0.5)
    assert torch.allclose(run("karcher", None, [t(2, 0), t(0, 4)]), 3 * t(h, h), atol=1e-6)
    # three directions symmetric about (1,1,1)/sqrt 3
    xs = [t(1, 0, 0), t(0, 1, 0), t(0, 0, 1)]
    assert torch.allclose(run("karcher", None, xs), torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    # not the Euclidean mean direction when the weights of the angles differ: (1,0),(1,0),(0,1)
    # -> the point at a third of the 90 degrees (the Karcher mean on the circle)
    out = run("karcher", None, [t(1, 0), t(1, 0), t(0, 1)], max_iter=50, tol=1e-9)
    assert torch.allclose(out, t(math.cos(math.pi / 6), math.sin(math.pi / 6)), atol=1e-5)


# --- arcee_fusion, nearswap, ram, passthrough ----------------------------------------------


def test_arcee_fusion_takes_entries_above_median_plus_1_5_iqr():
    base = torch.zeros(8)
    x = t(0.1, -0.2, 0.3, 0.35, -0.4, 0.45, 0.75, -5.0)
    # on a vector the KL factor is one number, so the cut is on |x - base|: the quantiles are the
    # sorted values at floor(q * 7) = 1, 3, 5: 0.2, 0.35, 0.45; 0.35 + 1.5 * 0.25 = 0.725
    assert torch.equal(run("arcee_fusion", base, [x]), t(0, 0, 0, 0, 0, 0, 0.75, -5))
    x = t(0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.75, -5.0)  # 0.4 + 1.5 * 0.4 = 1: only -5
    assert torch.equal(run("arcee_fusion", base, [x]), t(0, 0, 0, 0, 0, 0, 0, -5))


def test_nearswap_swaps_near_entries_whole_and_moves_far_ones_by_t():
    out = run("nearswap", torch.zeros(3), [t(0.5, 0.05, -2)], t=0.1)
    assert torch.allclose(out, t(0.1, 0.05, -0.1))  # weights min(1, 0.1/|d|): 0.2, 1, 0.05


def test_ram_and_ramplus_average_over_the_models_that_changed_an_entry():
    base = torch.zeros(4)
    a, b = t(1, 0, 2, 1e-6), t(3, 0, 0, 0)  # 1e-6: below epsilon 1e-5, not a change
    assert torch.equal(run("ram", base, [a, b]), t(2, 0, 2, 0))
    # ramplus: a has one shared and one own entry (rho 1 -> clamped to alpha 0.2): lambda 1.1
    assert torch.allclose(run("ramplus_tl", base, [a, b], r=0.5), t(2, 0, 2.2, 0))


def test_passthrough_scales_one_model():
    x = t(1, -2, 3)
    assert torch.equal(run("passthrough", None, [x], [{"scale": 0.5}]), x * 0.5)
    assert torch.equal(run("passthrough", None, [x]), x)


# --- the contract, for every method ---------------------------------------------------------


def _inputs_for(name: str):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 12, generator=g)
    n = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}.get(name, 3)
    xs = [base + 0.02 * torch.randn(40, 12, generator=g) for _ in range(n)]
    m = M.METHODS[name]
    p = [
        {**m.model_params, "density": 0.5} if "density" in m.model_params else dict(m.model_params)
    ] * n
    glob = {**m.global_params, **({"t": 0.01} if name == "nearswap" else {})}
    return (base if m.uses_base else None), xs, p, glob


@pytest.mark.parametrize("name", [n for n, m in M.METHODS.items() if not m.optimized])
def test_every_method_returns_a_new_float32_tensor_and_chunks_as_it_declares(name):
    m = M.METHODS[name]
    base, xs, p, glob = _inputs_for(name)
    copies = [x.clone() for x in xs]
    whole = m.fn(base, xs, p, glob, torch.Generator().manual_seed(0))
    assert whole.dtype == torch.float32 and whole.shape == xs[0].shape
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))  # inputs never written to
    assert all(whole.data_ptr() != x.data_ptr() for x in xs)
    again = m.fn(base, xs, p, glob, torch.Generator().manual_seed(0))
    assert torch.equal(whole, again)  # the same seed, the same tensor
    if m.elementwise:  # row chunks, with the whole tensor's statistics, stack to the whole
        prep = M.run_stages(m.prepare(base, xs, p, 7)) if m.prepare else None
        parts = [
            m.fn(
                base[i : i + 7] if base is not None else None,
                [x[i : i + 7] for x in xs],
                p, glob, torch.Generator().manual_seed(0), prep,
            )
            for i in range(0, 40, 7)
        ]  # fmt: skip
        assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("name", [n for n, m in M.METHODS.items() if m.upcasts])
def test_a_method_that_upcasts_gives_on_16_bit_models_what_it_gives_on_their_float32(name):
    m = M.METHODS[name]
    base, xs, p, glob = _inputs_for(name)
    for dtype in (torch.bfloat16, torch.float16):
        half = [x.to(dtype) for x in xs]
        got = m.fn(base, half, p, glob, torch.Generator().manual_seed(0))
        want = m.fn(base, [h.float() for h in half], p, glob, torch.Generator().manual_seed(0))
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_every_mergekit_method_is_a_divmerge_method():
    assert set(MERGEKIT_METHODS[:20]) <= set(M.METHODS)


# --- what is refused, and how -----------------------------------------------------------------


def _recipe(method, models=("x", "y"), base="base", **params):
    raw = {"merge_method": method, "models": [{"model": m} for m in models], "parameters": params}
    return recipe_from_dict({**raw, **({"base_model": base} if base else {})}, "r.yaml")


@pytest.mark.parametrize(
    "method, models, base, params, message",
    [
        ("model_stock", ["x"], "base", {}, "model_stock merges at least 2 models besides"),
        ("nuslerp", ["x", "y", "z"], None, {}, "nuslerp merges exactly 2 models besides"),
        ("arcee_fusion", ["x", "y"], "base", {}, "arcee_fusion merges exactly 1 model besides"),
        ("nearswap", ["x"], "base", {}, "parameters.t: nearswap needs t"),
        ("nearswap", ["x"], "base", {"t": -1}, "t must be in [0, inf)"),
        ("sce", ["x"], None, {}, "base_model: sce needs a base model"),
        ("passthrough", ["x", "y"], None, {}, "passthrough copies one model"),
        ("passthrough", ["x"], "base", {}, "passthrough copies one model"),
        ("karcher", ["x", "y"], None, {"max_iter": 2.5}, "max_iter must be in whole numbers"),
        ("della", ["x"], "base", {"epsilon": 1.0}, "epsilon must be in [0, 1)"),
        ("breadcrumbs", ["x"], "base", {"gamma": 1.5}, "gamma must be in [0, 1]"),
    ],
)
def test_each_method_refuses_inputs_it_cannot_merge(method, models, base, params, message):
    with pytest.raises(UserError, match=re.escape(message)):
        _recipe(method, models, base, **params)


def test_passthrough_of_the_base_itself_and_karcher_without_base_are_accepted():
    _recipe("passthrough", ["base"], "base")
    _recipe("karcher", ["x", "y"], None)
    _recipe("nuslerp", ["x", "y"], None, weight=0.5)


def test_a_mergekit_method_divmerge_lacks_is_said_unsupported_not_a_look_alike(monkeypatch):
    with pytest.raises(UserError) as e:
        _recipe("lrp")
    msg = str(e.value)
    assert "r.yaml: merge_method: mergekit method 'lrp' is not supported by divmerge" in msg
    assert "(supported: linear, task_arithmetic, ties," in msg and "did you mean" not in msg
    # were della_linear or nuslerp missing, neither would be answered with dare_linear or slerp
    for gone in ("della_linear", "nuslerp"):
        monkeypatch.delitem(M.METHODS, gone)
        with pytest.raises(UserError) as e:
            _recipe(gone)
        assert f"mergekit method '{gone}' is not supported" in str(e.value)
        assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    "typed, meant",
    [("dela_linear", "della_linear"), ("Model-Stock", "model_stock"), ("breadcrumb", "breadcrumbs"),
     ("nuslrep", "nuslerp"), ("tie", "ties")],
)  # fmt: skip
def test_near_miss_spellings_get_a_suggestion(typed, meant):
    with pytest.raises(
        UserError, match=f"unknown method '{typed}' \\(did you mean '{meant}'\\?\\)"
    ):
        _recipe(typed)


@pytest.mark.parametrize("typed", ["fisher", "regmean", "dare", "slerp_ties", "karcher_mean"])
def test_other_names_get_no_suggestion(typed):
    with pytest.raises(UserError) as e:
        _recipe(typed)
    assert f"unknown method '{typed}'; valid: linear," in str(e.value)


def test_multi_document_recipe_says_multi_stage_merges_are_not_supported(tmp_path, cli):
    from divmerge_cli.recipe import load_recipe

    path = tmp_path / "multi.yaml"
    path.write_text(
        "name: stage1\nmerge_method: linear\nmodels:\n  - model: a\n---\n"
        "name: final\nmerge_method: linear\nmodels:\n  - model: stage1\n"
    )
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: a recipe file is one YAML document, this one holds several")
    assert "line 5" in msg and "multi-stage merges (mergekit-multi) are not supported" in msg
    code, _, err = cli("validate", path)
    assert code == 2 and "mergekit-multi" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "key, value, message",
    [  # slices, tokenizer and union are supported (tests/test_slices.py)
        ("modules", {}, "modules: not supported by divmerge yet (mergekit's per-module recipes"),
    ],
)  # fmt: skip
def test_mergekit_keys_not_supported_yet_are_named(key, value, message):
    raw = {"merge_method": "linear", "models": [{"model": "x"}], key: value}
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_from_dict(raw, "r.yaml")


def test_della_density_and_epsilon_are_checked_per_tensor_before_merging(llama_zoo, tmp_path, cli):
    """density +/- epsilon must stay in (0, 1) wherever a filter or gradient puts them."""
    z = {k: str(v) for k, v in llama_zoo.items()}
    density = [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    recipe = {
        "merge_method": "della",
        "base_model": z["base"],
        "models": [{"model": z["e0"]}, {"model": z["e1"], "parameters": {"density": density}}],
        "parameters": {"density": 0.5, "epsilon": 0.15},
    }
    path = tmp_path / "della.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli("run", path, "-o", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists(), err
    assert f"{path}: models[1].parameters: della keeps entries with probabilities" in err
    assert "give 0.75 .. 1.05, at tensor model.layers.0.mlp." in err
    recipe["parameters"]["epsilon"] = 0.05  # 0.85 .. 0.95: fine
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli("run", path, "-o", tmp_path / "out")
    assert code == 0, err


# --- against mergekit itself, where it is installed (not a dependency: skipped without it) -----

W3 = {"weight": [1.0, 0.7, 0.4]}
PARITY = [  # (method, models, with base, per-model lists, global parameters)
    ("breadcrumbs", 3, True, {**W3, "density": [0.5, 0.5, 0.3], "gamma": [0.01, 0.05, 0.1]}, {}),
    ("breadcrumbs", 3, True, {**W3, "density": [0.95] * 3, "gamma": [0.1] * 3}, {"rescale": True}),
    ("breadcrumbs_ties", 3, True, {**W3, "density": [0.5] * 3, "gamma": [0.05] * 3},
     {"normalize": True, "lambda": 1.2}),
    ("della", 3, True, W3, {}),  # density 1: deterministic
    ("della_linear", 3, True, W3, {}),
    ("sce", 3, True, {}, {}),
    ("sce", 3, True, {}, {"select_topk": 0.3}),
    ("model_stock", 3, True, {}, {}),
    ("model_stock", 3, True, {}, {"filter_wise": True}),
    ("nuslerp", 2, True, {"weight": [1.0, 0.4]}, {}),
    ("nuslerp", 2, False, {"weight": [1.0, 0.4]}, {"nuslerp_flatten": False}),
    ("nuslerp", 2, True, {"weight": [0.3, 1.0]},
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("karcher", 3, False, {}, {}),
    ("karcher", 3, False, {}, {"max_iter": 3, "tol": 1e-7}),
    ("arcee_fusion", 1, True, {}, {}),
    ("nearswap", 1, True, {}, {"t": 0.01}),
    ("ram", 3, True, {}, {"epsilon": 0.015}),
    ("ramplus_tl", 3, True, {}, {"epsilon": 0.015, "r": 0.5, "alpha": 0.5}),
    ("passthrough", 1, False, {"scale": [0.5]}, {}),
]  # fmt: skip


@pytest.mark.parametrize("shape", [(48, 40), (40,)])
@pytest.mark.parametrize("case", PARITY, ids=lambda c: c[0])
def test_equal_to_mergekit_in_process(case, shape):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    name, n, with_base, lists, glob = case
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.02 * torch.randn(shape, generator=g) for _ in range(n)]
    group = TensorGroup.from_tensors(
        [base, *xs] if with_base else xs, base_index=0 if with_base else None
    )
    want = registry.get(name)([group], parameters={**lists, **glob})[0]
    per_model = [{k: v[i] for k, v in lists.items()} for i in range(n)]
    got = run(name, base if with_base else None, xs, per_model, **glob)
    assert (got - want).abs().max() <= 1e-6


# --- beyond mergekit: the sparsified methods as a learned merge's base_method (Remark 3) ------


def _learned(toy, tmp, **params):
    from conftest import TASKS, write_recipe

    return write_recipe(
        tmp / "learned.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n), "task": n} for n in TASKS],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"epochs": 1, "samples": 8, "top_k": 16, **params},
            "dtype": "float32",
        },
    )


def test_sce_processed_vectors_are_selected_and_sign_elected():
    from divmerge_cli.processed import process_tensor

    a, b = t(1, 2, -1, 0), t(3, -2, -1, 5)
    out = process_tensor(torch.stack([a, b]), "sce", [{}, {}], {"select_topk": 1.0}, G)
    # signs of the sum (+, +, -, +): b's -2 and a's 0 disagree; no SCE weights (Gamma learns them)
    assert torch.equal(out, torch.stack([t(1, 2, -1, 0), t(3, 0, -1, 5)]))
    out = process_tensor(torch.stack([a, b]), "sce", [{}, {}], {"select_topk": 0.5}, G)
    assert torch.equal(out, torch.stack([t(0, 0, 0, 0), t(0, 0, 0, 5)]))  # the largest variance


def test_learned_base_method_parameters_are_its_own_and_checked_before_the_teacher(
    toy, tmp_path, cli
):
    r = _learned(toy, tmp_path, base_method="sce", select_topk=0.3)
    code, _, err = cli("validate", r)
    assert code == 0, err
    raw = yaml.safe_load(r.read_text())
    raw["models"][0]["parameters"] = {"select_topk": 0.3}  # global only, as in data-free sce
    r.write_text(yaml.safe_dump(raw))
    code, _, err = cli("validate", r)
    assert code == 2 and "models[0].parameters.select_topk" in err and "takes none" in err, err
    raw["parameters"].update(base_method="della", density=0.9, epsilon=0.15)
    raw["models"][0]["parameters"] = {"epsilon": 0.05}  # per model: 0.85 .. 0.95, fine
    r.write_text(yaml.safe_dump(raw))
    code, _, err = cli("run", r, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "models[1].parameters: della keeps entries" in err, err
    assert not (tmp_path / "cache").exists()  # refused before any teacher generation


def test_methods_lists_every_method_with_its_parameters_and_paper(cli, monkeypatch):
    from divmerge_cli import cli as cli_module

    monkeypatch.setattr(cli_module.out, "width", 400)  # one line per method
    code, out, _ = cli("methods")
    assert code == 0
    rows = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") >= 4}
    for name, m in M.METHODS.items():
        assert m.paper in rows[name], name
        for key in (*m.model_params, *m.global_params):
            assert key in rows[name], (name, key)
    assert "t (required)" in rows["nearswap"]
    assert "base_method (learned merges): task_arithmetic, ties" in out and "sce" in out
    monkeypatch.setattr(cli_module.out, "width", 80)  # a narrow terminal folds, never cuts
    code, out, _ = cli("methods")
    assert code == 0 and "…" not in out


def test_readme_methods_table_has_every_method_and_its_parameters():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n\n", 2)[1]
    cells = {ln.split("|")[1].strip(" `"): ln.split("|")[2] for ln in table.splitlines()[2:]}
    assert set(cells) == set(M.METHODS)
    for name, m in M.METHODS.items():
        cell = cells[name]
        if cell.strip().startswith("as "):  # "as della / normalize=false"
            cell += cells[cell.split()[1]]
        if not m.optimized:  # the learned ones list theirs in `divmerge methods`
            for key in (*m.model_params, *m.global_params):
                if key != "int8_mask":  # changes only mergekit's mask dtype
                    assert key in cell, (name, key)
