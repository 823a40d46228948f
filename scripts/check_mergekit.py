"""Dev oracle check: `divmerge run` against mergekit 0.1.5 (`mergekit-yaml`) on tiny fixture models.

mergekit is never a runtime dependency of divmerge; it lives in its own venv:

    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python scripts/check_mergekit.py [--workdir DIR] [--mergekit PATH] [--only SUBSTR] [--mk-only]

(a mergekit installed without its dependencies needs `pip install --target DIR immutables
protobuf` and DIR on PYTHONPATH; docs/mergekit_parity.md has the command and the last table).

Builds tiny models (divmerge_cli.tiny: a hidden-32 Llama base + 3 perturbed experts, a 4-block
one for gradients, a tied-embedding one, a gated T5, and a wider Llama for DARE and DELLA
statistics), writes one recipe per case, runs both tools and compares every tensor. Exact methods must agree to 1e-6 of
the tensor's scale in float32 (at most 2 units in the last place for bfloat16 outputs, since
mergekit does some of its arithmetic in bfloat16). DARE is random, so it is compared in
distribution: kept fraction vs density, the rescale factor, and the mean/std of the merged model
minus its expectation (task arithmetic for dare_linear), or divmerge vs mergekit (dare_ties, and
DELLA with several models). DELLA with one model: the share of entries kept, overall and in the
larger and smaller half of each row's magnitudes, against MagPrune's probabilities, the L1 norm of
the change (its rescale keeps it) and its L2 norm, divmerge vs mergekit.
mergekit outputs are cached by a hash of the recipe and the fixtures. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

SEED = 1234
TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a merged model should keep what each expert learned",
    "task vectors are differences between fine-tuned and base weights",
    "paris is the capital of france; rome is the capital of italy",
    "0123456789 hello world, goodbye moon!",
] * 4


# --- fixtures ------------------------------------------------------------------------------


FIXTURES = {
    # name: (builder(vocab) -> base model, number of experts, noise scale)
    "llama": (lambda v: _llama(v, hidden=32, layers=2), 3, 0.02),
    "llama4": (lambda v: _llama(v, hidden=32, layers=4), 3, 0.02),
    "tied": (lambda v: _llama(v, hidden=32, layers=2, tie_word_embeddings=True), 3, 0.02),
    # gated (T5 v1.1 / flan): mergekit's t5.json needs wi_0/wi_1
    "t5": (lambda v: _t5(v, feed_forward_proj="gated-gelu", tie_word_embeddings=False), 3, 0.02),
    "t5relu": (lambda v: _t5(v), 1, 0.02),
    "wide": (lambda v: _llama(v, hidden=128, layers=1), 3, 0.02),
}


def _llama(vocab: int, **kw):
    from divmerge_cli.tiny import tiny_llama

    return tiny_llama(vocab, seed=0, **kw)


def _t5(vocab: int, **kw):
    from divmerge_cli.tiny import tiny_t5

    return tiny_t5(vocab, seed=0, **kw)


def build_fixtures(root: Path) -> dict[str, dict[str, str]]:
    """{fixture: {"base": dir, "e1": dir, ...}}; built once, deterministic (seeded)."""
    from divmerge_cli.tiny import build_tokenizer, perturbed, save

    out = {}
    tok = None
    for name, (make, n_experts, scale) in FIXTURES.items():
        d = root / name
        paths = {"base": d / "base", **{f"e{i}": d / f"e{i}" for i in range(1, n_experts + 1)}}
        if not all((p / "config.json").exists() for p in paths.values()):
            tok = tok or build_tokenizer(TEXTS, vocab_size=300)
            base = make(512)
            save(base, tok, paths["base"])
            for i in range(1, n_experts + 1):
                save(perturbed(base, scale, seed=100 + i), tok, paths[f"e{i}"])
        out[name] = {k: str(v) for k, v in paths.items()}
    return out


def fixture_digest(paths: dict[str, str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths.values()):
        for f in sorted(Path(p).glob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --- recipes -------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    fixture: str
    recipe: dict
    # exact | expected_difference | mk_fails; random ones: dare_linear, della_1 (one model, vs
    # expectations), dare_ties / distribution (divmerge vs mergekit in distribution)
    kind: str = "exact"
    note: str = ""
    extra: dict = field(default_factory=dict)


def _models(fx: dict[str, str], params: dict[str, dict] | None = None, keys=None) -> list[dict]:
    keys = keys or [k for k in fx if k != "base"]
    params = params or {}
    return [{"model": fx[k], **({"parameters": params[k]} if k in params else {})} for k in keys]


def cases(fxs: dict[str, dict[str, str]]) -> list[Case]:
    L, L4, T, T5, W = fxs["llama"], fxs["llama4"], fxs["tied"], fxs["t5"], fxs["wide"]
    w = lambda *ws: {f"e{i + 1}": {"weight": x} for i, x in enumerate(ws)}  # noqa: E731
    wd = lambda ws, ds: {  # noqa: E731
        f"e{i + 1}": {"weight": x, "density": d} for i, (x, d) in enumerate(zip(ws, ds))
    }
    ta = lambda fx, ps, g=None, **top: {  # noqa: E731
        "merge_method": "task_arithmetic",
        "base_model": fx["base"],
        "models": _models(fx, ps),
        **({"parameters": g} if g else {}),
        **top,
    }
    c = [
        Case("linear_equal", "llama", {"merge_method": "linear", "models": _models(L, w(1, 1, 1))}),
        Case(
            "linear_unequal_norm",
            "llama",
            {"merge_method": "linear", "models": _models(L, w(2.0, 1.0, 0.5))},
        ),
        Case(
            "linear_nonorm",
            "llama",
            {
                "merge_method": "linear",
                "models": _models(L, w(0.5, 0.3, 0.2)),
                "parameters": {"normalize": False},
            },
        ),
        Case("task_arith", "llama", ta(L, w(1.0, 0.5, 0.3), {"lambda": 0.7})),
        Case("task_arith_norm", "llama", ta(L, w(1.0, 0.5, 0.3), {"normalize": True})),
        Case(
            "ties_d02",
            "llama",
            {
                "merge_method": "ties",
                "base_model": L["base"],
                "models": _models(L, wd([1, 1, 1], [0.2] * 3)),
            },
        ),
        Case(
            "ties_d05_w_lambda",
            "llama",
            {
                "merge_method": "ties",
                "base_model": L["base"],
                "models": _models(L, wd([1.0, 0.7, 0.4], [0.5, 0.5, 0.3])),
                "parameters": {"lambda": 1.2},
            },
        ),
        Case(
            "ties_nonorm",
            "llama",
            {
                "merge_method": "ties",
                "base_model": L["base"],
                "models": _models(L, wd([1.0, 0.7, 0.4], [0.5] * 3)),
                "parameters": {"normalize": False},
            },
        ),
        Case(
            "dare_ties_d1",
            "llama",
            {
                "merge_method": "dare_ties",
                "base_model": L["base"],
                "models": _models(L, wd([1.0, 0.7, 0.4], [1.0] * 3)),
            },
            note="density 1: no randomness; checks dare_ties' normalize default",
        ),
        Case(
            "dare_linear_d1",
            "llama",
            {
                "merge_method": "dare_linear",
                "base_model": L["base"],
                "models": _models(L, wd([1.0, 0.7, 0.4], [1.0] * 3)),
            },
        ),
        Case(
            "slerp_t03",
            "llama",
            {
                "merge_method": "slerp",
                "base_model": L["base"],
                "models": _models(L, keys=["base", "e1"]),
                "parameters": {"t": 0.3},
            },
        ),
        Case(
            "slerp_grad",
            "llama4",
            {
                "merge_method": "slerp",
                "base_model": L4["base"],
                "models": _models(L4, keys=["base", "e1"]),
                "parameters": {"t": [0.0, 0.5, 1.0]},
            },
            note="blocks get t=0,1/3,2/3,1; embed/norm/lm_head t=0 in mergekit 0.1.5",
        ),
        Case(
            "slerp_filter",
            "llama",
            {
                "merge_method": "slerp",
                "base_model": L["base"],
                "models": _models(L, keys=["base", "e1"]),
                "parameters": {
                    "t": [
                        {"filter": "self_attn", "value": [0.0, 1.0]},
                        {"filter": "mlp", "value": [1.0, 0.0]},
                        {"value": 0.5},
                    ]
                },
            },
        ),
        Case(
            "multislerp_base",
            "llama",
            {
                "merge_method": "multislerp",
                "base_model": L["base"],
                "models": _models(L, w(0.5, 0.3, 0.2)),
            },
        ),
        Case(
            "multislerp_nobase",
            "llama",
            {"merge_method": "multislerp", "models": _models(L, w(1, 1, 1))},
        ),
        Case(
            "ta_filter",
            "llama",
            ta(
                L,
                {
                    "e1": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 1.0}]},
                    "e2": {"weight": [{"filter": "mlp", "value": 0.0}]},  # no match -> global
                    "e3": {"weight": 0.3},
                },
                {"weight": 0.8},
            ),
            note="e2's filter list misses non-mlp tensors -> falls through to the global weight",
        ),
        Case(
            "ties_filter_density",
            "llama",
            {
                "merge_method": "ties",
                "base_model": L["base"],
                "models": _models(
                    L,
                    {
                        "e1": {
                            "weight": 1.0,
                            "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                        },
                        "e2": {"weight": 1.0, "density": 0.5},
                        "e3": {"weight": 0.5, "density": 0.5},
                    },
                ),
            },
        ),
        Case(
            "ta_gradient",
            "llama4",
            ta(
                L4,
                {
                    "e1": {"weight": [1.0, 0.0]},
                    "e2": {"weight": [0.0, 0.5, 1.0]},
                    "e3": {"weight": 0.3},
                },
                {"lambda": [0.5, 1.5]},
            ),
            note="per-model and global gradients; embed/norm/lm_head get the first value",
        ),
        Case(
            "linear_bf16",
            "llama",
            {"merge_method": "linear", "models": _models(L, w(1, 1, 1)), "dtype": "bfloat16"},
        ),
        Case("ta_bf16", "llama", ta(L, w(1.0, 0.5, 0.3), {"lambda": 0.7}, dtype="bfloat16")),
        Case(
            "ties_bf16",
            "llama",
            {
                "merge_method": "ties",
                "base_model": L["base"],
                "models": _models(L, wd([1, 1, 1], [0.5] * 3)),
                "dtype": "bfloat16",
            },
            kind="expected_difference",
            note="mergekit forms bf16 task vectors (x - base rounded to bf16) before trimming and "
            "electing signs, divmerge float32 ones, so near-threshold entries are selected differently",
        ),
        Case(
            "ta_out_bf16", "llama", ta(L, w(1.0, 0.5, 0.3), dtype="float32", out_dtype="bfloat16")
        ),
        Case("ta_tied", "tied", ta(T, w(1.0, 1.0, 1.0))),
        Case("t5_task_arith", "t5", ta(T5, w(1.0, 0.5, 0.3), {"lambda": 0.9})),
        Case(
            "t5_ties",
            "t5",
            {
                "merge_method": "ties",
                "base_model": T5["base"],
                "models": _models(T5, wd([1, 1, 1], [0.3] * 3)),
            },
        ),
        Case(
            "t5_slerp_grad",
            "t5",
            {
                "merge_method": "slerp",
                "base_model": T5["base"],
                "models": _models(T5, keys=["base", "e1"]),
                "parameters": {"t": [0.2, 0.8]},
            },
            note="encoder and decoder blocks each numbered from 0",
        ),
        Case(
            "t5relu_mergekit",
            "t5relu",
            ta(fxs["t5relu"], w(1.0)),
            kind="mk_fails",
            note="non-gated T5 (DenseReluDense.wi): mergekit's t5.json cannot merge it",
        ),
        Case(
            "dare_linear_1",
            "wide",
            {
                "merge_method": "dare_linear",
                "base_model": W["base"],
                "models": _models(W, wd([1.0], [0.3]), keys=["e1"]),
            },
            kind="dare_linear",
            extra={"weights": [1.0], "densities": [0.3], "keys": ["e1"]},
        ),
        Case(
            "dare_linear_3",
            "wide",
            {
                "merge_method": "dare_linear",
                "base_model": W["base"],
                "models": _models(W, wd([1.0, 0.5, 0.3], [0.5, 0.5, 0.2])),
            },
            kind="dare_linear",
            extra={
                "weights": [1.0, 0.5, 0.3],
                "densities": [0.5, 0.5, 0.2],
                "keys": ["e1", "e2", "e3"],
            },
        ),
        Case(
            "dare_ties_3",
            "wide",
            {
                "merge_method": "dare_ties",
                "base_model": W["base"],
                "models": _models(W, wd([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])),
            },
            kind="dare_ties",
        ),
    ]
    return c + mergekit_method_cases(fxs)


def mergekit_method_cases(fxs: dict[str, dict[str, str]]) -> list[Case]:
    """Issue 26: mergekit's other methods, with per-model weights, densities, filters and
    gradients; DELLA, random, compared in distribution."""
    L, L4, T5, W = fxs["llama"], fxs["llama4"], fxs["t5"], fxs["wide"]

    def r(method: str, fx: dict, per_model=None, glob=None, keys=None, base=True) -> dict:
        return {
            "merge_method": method,
            **({"base_model": fx["base"]} if base else {}),
            "models": _models(fx, per_model, keys),
            **({"parameters": glob} if glob else {}),
        }

    def pm(**lists) -> dict:  # per-model parameters from one list per name: pm(weight=[1, .5])
        n = len(next(iter(lists.values())))
        return {f"e{i + 1}": {k: v[i] for k, v in lists.items()} for i in range(n)}

    wdg = pm(weight=[1.0, 0.7, 0.4], density=[0.5, 0.5, 0.3], gamma=[0.01, 0.05, 0.1])
    grad = {  # gradients across the 4 blocks and filters by tensor name
        "e1": {
            "weight": 1.0,
            "density": [0.3, 0.9],
            "gamma": [{"filter": "mlp", "value": 0.1}, {"value": 0.02}],
        },
        "e2": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}], "density": 0.5},
        "e3": {"weight": [1.0, 0.2], "density": 0.6},
    }
    del_pm = pm(weight=[1.0, 0.7, 0.4], density=[0.5, 0.5, 0.3], epsilon=[0.1, 0.2, 0.1])
    one = pm(weight=[1.0], density=[0.4], epsilon=[0.2])
    two = ["e1", "e2"]
    return [
        Case("breadcrumbs_w_d_g", "llama", r("breadcrumbs", L, wdg, {"lambda": 1.2})),
        Case(
            "breadcrumbs_rescale_norm",
            "llama",
            r(
                "breadcrumbs",
                L,
                pm(weight=[1.0, 0.5, 0.3]),
                {"density": 0.4, "gamma": 0.05, "rescale": True, "normalize": True},
            ),
        ),
        Case(
            "breadcrumbs_d095_g01",
            "llama",
            r("breadcrumbs", L, pm(weight=[1.0, 1.0, 1.0]), {"density": 0.95, "gamma": 0.1}),
            note="density + gamma > 1: fewer outliers dropped",
        ),
        Case("breadcrumbs_grad_filter", "llama4", r("breadcrumbs", L4, grad)),
        Case("breadcrumbs_ties_w_d_g", "llama", r("breadcrumbs_ties", L, wdg)),
        Case(
            "breadcrumbs_ties_norm_grad",
            "llama4",
            r("breadcrumbs_ties", L4, grad, {"normalize": True, "lambda": [0.5, 1.5]}),
        ),
        Case("t5_breadcrumbs_ties", "t5", r("breadcrumbs_ties", T5, wdg)),
        Case(
            "della_d1",
            "llama",
            r("della", L, pm(weight=[1.0, 0.7, 0.4])),
            note="density 1: no randomness; checks della's defaults (normalize, election)",
        ),
        Case("della_linear_d1", "llama", r("della_linear", L, pm(weight=[1.0, 0.7, 0.4]))),
        Case(
            "della_linear_1",
            "wide",
            r("della_linear", W, one, keys=["e1"]),
            kind="della_1",
            extra={"weight": 1.0, "density": 0.4, "epsilon": 0.2},
        ),
        Case(
            "della_1",
            "wide",
            r("della", W, one, keys=["e1"]),
            kind="della_1",
            extra={"weight": 1.0, "density": 0.4, "epsilon": 0.2},
            note="one model: the sign election keeps every survivor",
        ),
        Case("della_3", "wide", r("della", W, del_pm), kind="distribution"),
        Case("della_linear_3", "wide", r("della_linear", W, del_pm), kind="distribution"),
        Case("sce_default", "llama", r("sce", L)),
        Case("sce_topk03", "llama", r("sce", L, glob={"select_topk": 0.3})),
        Case("sce_grad", "llama4", r("sce", L4, glob={"select_topk": [0.2, 0.8]})),
        Case("model_stock", "llama", r("model_stock", L)),
        Case("model_stock_filter_wise", "llama", r("model_stock", L, glob={"filter_wise": True})),
        Case("t5_model_stock", "t5", r("model_stock", T5)),
        Case("nuslerp_base", "llama", r("nuslerp", L, pm(weight=[1.0, 0.4]), keys=two)),
        Case(
            "nuslerp_rows",
            "llama",
            r("nuslerp", L, pm(weight=[1.0, 0.4]), {"nuslerp_flatten": False}, keys=two),
        ),
        Case(
            "nuslerp_columns",
            "llama",
            r(
                "nuslerp",
                L,
                pm(weight=[0.3, 1.0]),
                {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                keys=two,
            ),
        ),
        Case(
            "nuslerp_nobase",
            "llama",
            r("nuslerp", L, pm(weight=[1.0, 0.4]), keys=two, base=False),
        ),
        Case(
            "nuslerp_grad_filter",
            "llama4",
            r(
                "nuslerp",
                L4,
                {
                    "e1": {"weight": [1.0, 0.2]},
                    "e2": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": [0.3, 1.0]}]},
                },
                keys=two,
            ),
        ),
        Case("karcher_nobase", "llama", r("karcher", L, base=False)),
        Case(
            "karcher_base_joins",
            "llama",
            r("karcher", L, glob={"max_iter": 3, "tol": 1e-6}),
            note="mergekit adds a base_model not listed to the inputs",
        ),
        Case("arcee_fusion", "llama", r("arcee_fusion", L, keys=["e1"])),
        Case("t5_arcee_fusion", "t5", r("arcee_fusion", T5, keys=["e1"])),
        Case("nearswap_t001", "llama", r("nearswap", L, glob={"t": 0.01}, keys=["e1"])),
        Case(
            "nearswap_grad_filter",
            "llama4",
            r(
                "nearswap",
                L4,
                glob={"t": [{"filter": "mlp", "value": 0.05}, {"value": [0.001, 0.03]}]},
                keys=["e1"],
            ),
        ),
        Case("ram_default", "llama", r("ram", L)),
        Case("ram_eps", "llama", r("ram", L, glob={"epsilon": 0.015})),
        Case(
            "ramplus_tl",
            "llama",
            r("ramplus_tl", L, glob={"epsilon": 0.015, "r": 0.5, "alpha": 0.5}),
        ),
        Case("ramplus_tl_default", "llama", r("ramplus_tl", L)),
        Case(
            "passthrough_scale",
            "llama",
            r(
                "passthrough",
                L,
                {"e1": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
                keys=["e1"],
                base=False,
            ),
        ),
    ]


# --- running -------------------------------------------------------------------------------


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def last_error(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errs = [x for x in lines if "Error" in x or "error" in x]
    return (errs[-1] if errs else (lines[-1] if lines else "")).strip()[:160]


def run_mergekit(mk: str, recipe: Path, out: Path, key: str, seed: int) -> tuple[int, str]:
    """mergekit-yaml, cached: rerun only when the recipe or fixtures changed."""
    stamp = out / ".check_key"
    if stamp.exists() and stamp.read_text() == key:
        return 0, "cached"
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_suffix(".log")
    rc, dt = run(
        [mk, str(recipe), str(out), "--copy-tokenizer", "--random-seed", str(seed), "--quiet"], log
    )
    if rc == 0:
        stamp.write_text(key)
        return 0, f"{dt:.1f}s"
    return rc, last_error(log)


def run_divmerge(recipe: Path, out: Path, seed: int) -> tuple[int, str]:
    log = out.with_suffix(".log")
    rc, dt = run(
        ["divmerge", "run", str(recipe), "-o", str(out), "--force", "--seed", str(seed)], log
    )
    return rc, (f"{dt:.1f}s" if rc == 0 else last_error(log))


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- comparing -----------------------------------------------------------------------------


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of each |x| in `dtype` (bf16: 7 mantissa bits, fp32: 23)."""
    bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = torch.finfo(dtype).tiny
    e = torch.floor(torch.log2(x.abs().clamp_min(tiny)))
    return torch.exp2(e - bits)


def compare_exact(dm: dict, mk: dict) -> dict:
    """Per tensor: max|dm-mk|, that over max|mk| (scale-relative), and ulps for low-precision outputs."""
    res = {"keys_only_dm": sorted(set(dm) - set(mk)), "keys_only_mk": sorted(set(mk) - set(dm))}
    worst = (0.0, 0.0, 0.0, "", None)  # abs, rel, ulps, name, dtype
    dtypes = set()
    for name in sorted(set(dm) & set(mk)):
        a, b = dm[name], mk[name]
        dtypes.add((str(a.dtype).replace("torch.", ""), str(b.dtype).replace("torch.", "")))
        if a.shape != b.shape:
            res.setdefault("shape_mismatch", []).append(name)
            continue
        if not b.is_floating_point():
            if not torch.equal(a, b):
                res.setdefault("int_mismatch", []).append(name)
            continue
        d = (a.double() - b.double()).abs()
        mabs = float(d.max()) if d.numel() else 0.0
        rel = mabs / max(float(b.double().abs().max()), 1e-30)
        ulps = float((d / ulp(b.double(), b.dtype)).max()) if d.numel() else 0.0
        res["max_abs_all"] = max(res.get("max_abs_all", 0.0), mabs)
        if rel > worst[1] or (rel == worst[1] and mabs > worst[0]):
            worst = (mabs, rel, ulps, name, b.dtype)
        worst_ulps = max(res.get("max_ulps", 0.0), ulps)
        res["max_ulps"] = worst_ulps
    res["max_abs"], res["max_rel"], _, res["worst"], _ = worst
    res["dtypes"] = sorted(dtypes)
    return res


def exact_verdict(res: dict, out_dtype: torch.dtype) -> tuple[bool, str]:
    problems = []
    for k in ("keys_only_dm", "keys_only_mk", "shape_mismatch", "int_mismatch"):
        if res.get(k):
            problems.append(f"{k}={res[k][:3]}")
    if any(a != b for a, b in res["dtypes"]):
        problems.append(f"dtype dm/mk={res['dtypes']}")
    if out_dtype == torch.float32:  # issue 26: at most 1e-6 per tensor, absolute and relative
        ok_num = res["max_rel"] <= 1e-6 and res.get("max_abs_all", 0.0) <= 1e-6
    else:
        # mergekit computes in bf16, divmerge in float32 (README: a deliberate difference): allow
        # two bf16 units in the last place at the tensor's scale (2 * 2^-7 relative to max |x|)
        ok_num = res["max_rel"] <= 2 * 2**-7
    if not ok_num:
        problems.append(f"worst tensor {res['worst']}")
    return (not problems), "; ".join(problems)


def deltas(models: dict[str, dict[str, torch.Tensor]], keys: list[str]) -> dict[str, list]:
    base = models["base"]
    return {n: [models[k][n].double() - base[n].double() for k in keys] for n in base}


def dare_linear_stats(out: dict, fx_t: dict, weights, densities, keys) -> dict:
    """Kept fraction, rescale factor, and (out - E[out]) in units of its predicted std."""
    base = fx_t["base"]
    taus = deltas(fx_t, keys)
    kept, total, scale_num, scale_den = 0, 0, 0.0, 0.0
    resid, var = [], []
    for n, ts in taus.items():
        if ts[0].numel() < 4096:
            continue  # statistics only on big tensors
        merged = out[n].double() - base[n].double()
        expect = sum(w * t for w, t in zip(weights, ts))
        resid.append((merged - expect).reshape(-1))
        var.append(
            sum((w * t) ** 2 * (1 - d) / d for w, t, d in zip(weights, ts, densities)).reshape(-1)
        )
        if len(ts) == 1:
            k = merged != 0
            kept += int(k.sum())
            total += k.numel()
            scale_num += float((merged[k] / ts[0][k]).sum())
            scale_den += int(k.sum())
    r, v = torch.cat(resid), torch.cat(var)
    n = r.numel()
    st = {
        "n": n,
        "z_mean": float(r.sum() / v.sum().sqrt()),  # sum of residuals / its predicted std: ~N(0,1)
        "std_ratio": float(r.pow(2).mean().sqrt() / v.mean().sqrt()),  # ~1
    }
    if total:
        st["kept"] = kept / total
        st["kept_z"] = (kept / total - densities[0]) / math.sqrt(
            densities[0] * (1 - densities[0]) / total
        )
        st["scale"] = scale_num / scale_den
        st["scale_expected"] = 1 / densities[0]
    return st


def della_stats(out: dict, fx_t: dict) -> dict:
    """One model merged by DELLA at weight 1: the share of entries kept, overall and among the
    larger and smaller half of each row's magnitudes (MagPrune's ranks run along dimension 1), the
    worst per-tensor L1 norm of the change over the task vector's (the rescale keeps it), and the
    L2 norm of the change."""
    base, x = fx_t["base"], fx_t["e1"]
    kept = total = top = n_top = bottom = n_bottom = 0
    l1_worst, l2 = 0.0, 0.0
    for n, b in base.items():
        if b.numel() < 4096 or b.dim() != 2:
            continue
        tau, merged = x[n].double() - b.double(), out[n].double() - b.double()
        k = merged != 0
        upper = tau.abs().argsort(1).argsort(1) >= tau.shape[1] / 2
        kept, total = kept + int(k.sum()), total + k.numel()
        top, n_top = top + int((k & upper).sum()), n_top + int(upper.sum())
        bottom, n_bottom = bottom + int((k & ~upper).sum()), n_bottom + int((~upper).sum())
        l1_worst = max(l1_worst, abs(float(merged.abs().sum() / tau.abs().sum()) - 1))
        l2 += float(merged.pow(2).sum())
    return {
        "kept": (kept, total),
        "top": (top, n_top),
        "bottom": (bottom, n_bottom),
        "l1_worst": l1_worst,
        "l2": math.sqrt(l2),
    }


def _z(hits_total: tuple[int, int], p: float) -> float:
    hits, total = hits_total
    return (hits / total - p) / math.sqrt(p * (1 - p) / total)


def della_verdict(case: Case, dm: dict, mk: dict, fx_t: dict) -> tuple[bool, str]:
    d, eps = case.extra["density"], case.extra["epsilon"]
    want = {"kept": d, "top": d + eps / 2, "bottom": d - eps / 2}  # mean keep probabilities
    sd, sm = della_stats(dm, fx_t), della_stats(mk, fx_t)
    ok = all(abs(_z(s[k], p)) < 4 for s in (sd, sm) for k, p in want.items())
    ok &= all(s["l1_worst"] < 1e-3 for s in (sd, sm)) and abs(sd["l2"] / sm["l2"] - 1) < 0.02
    share = lambda s, k: s[k][0] / s[k][1]  # noqa: E731
    return ok, "; ".join(
        [
            *(
                f"{'kept' if k == 'kept' else f'kept in {k} half'} dm/mk="
                f"{share(sd, k):.4f}/{share(sm, k):.4f} (p {p:.2f})"
                for k, p in want.items()
            ),
            f"|L1 ratio - 1| dm/mk={sd['l1_worst']:.1e}/{sm['l1_worst']:.1e}",
            f"L2 of the change dm/mk={sd['l2']:.4f}/{sm['l2']:.4f}",
        ]
    )


def dare_ties_stats(out: dict, base: dict) -> dict:
    parts = [out[n].double() - base[n].double() for n in base if base[n].numel() >= 4096]
    d = torch.cat([p.reshape(-1) for p in parts])
    return {
        "n": d.numel(),
        "zero_frac": float((d == 0).double().mean()),
        "mean": float(d.mean()),
        "std": float(d.std()),
        "mean_abs": float(d.abs().mean()),
    }


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-mkcheck"))
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--mk-only", action="store_true", help="run mergekit only (no divmerge)")
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)

    root = a.workdir
    fxs = build_fixtures(root / "fixtures")
    digests = {k: fixture_digest(v) for k, v in fxs.items()}
    for d in ("recipes", "out_mk", "out_dm"):
        (root / d).mkdir(parents=True, exist_ok=True)

    rows, failed = [], []
    for case in cases(fxs):
        if a.only and a.only not in case.name:
            continue
        recipe = root / "recipes" / f"{case.name}.yaml"
        text = yaml.safe_dump(case.recipe, sort_keys=False)
        recipe.write_text(text)
        key = hashlib.sha256((text + digests[case.fixture] + str(a.seed)).encode()).hexdigest()
        out_mk, out_dm = root / "out_mk" / case.name, root / "out_dm" / case.name
        rc_mk, msg_mk = run_mergekit(a.mergekit, recipe, out_mk, key, a.seed)
        if case.kind == "mk_fails":
            ok = rc_mk != 0
            rows.append(
                (
                    case.name,
                    "-",
                    "-",
                    "PASS" if ok else "FAIL",
                    f"mergekit fails as expected: {msg_mk}"
                    if ok
                    else "mergekit unexpectedly succeeded",
                )
            )
            if a.mk_only:
                continue
            rc_dm, msg_dm = run_divmerge(recipe, out_dm, a.seed)
            rows.append(
                (case.name + " (divmerge)", "-", "-", "INFO", f"divmerge rc={rc_dm} {msg_dm}")
            )
            failed += [] if ok else [case.name]
            continue
        if rc_mk != 0:
            rows.append((case.name, "-", "-", "FAIL", f"mergekit failed: {msg_mk}"))
            failed.append(case.name)
            continue
        if a.mk_only:
            rows.append((case.name, "-", "-", "MK-OK", msg_mk))
            continue
        rc_dm, msg_dm = run_divmerge(recipe, out_dm, a.seed)
        if rc_dm != 0:
            rows.append((case.name, "-", "-", "FAIL", f"divmerge failed: {msg_dm}"))
            failed.append(case.name)
            continue
        dm, mk = load_dir(out_dm), load_dir(out_mk)
        if case.kind in ("exact", "expected_difference"):
            res = compare_exact(dm, mk)
            out_dtype = next(iter(mk.values())).dtype
            ok, why = exact_verdict(res, out_dtype)
            detail = why or f"worst {res['worst']}"
            if case.kind == "expected_difference" and not ok:
                ok, detail = None, f"documented difference: {case.note}; {detail}"
            rows.append(
                (
                    case.name,
                    f"{res.get('max_abs_all', 0.0):.2e}",
                    f"{res['max_rel']:.2e}",
                    {True: "PASS", False: "FAIL", None: "DIFF"}[ok],
                    detail,
                )
            )
        else:
            fx_t = {k: load_dir(Path(p)) for k, p in fxs[case.fixture].items()}
            ok, detail = dare_verdict(case, dm, mk, fx_t)
            rows.append((case.name, "-", "-", "PASS" if ok else "FAIL", detail))
        if ok is False:  # None = a documented difference, reported but not a failure
            failed.append(case.name)
        if case.note and ok is not None:  # a DIFF row already carries its note
            rows[-1] = rows[-1][:4] + (rows[-1][4] + f"  [{case.note}]",)

    print_table(rows)
    print(f"\n{len(failed)} failing: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0


def dare_verdict(case: Case, dm: dict, mk: dict, fx_t: dict) -> tuple[bool, str]:
    if case.kind == "della_1":
        return della_verdict(case, dm, mk, fx_t)
    if case.kind == "dare_linear":
        e = case.extra
        sd = dare_linear_stats(dm, fx_t, e["weights"], e["densities"], e["keys"])
        sm = dare_linear_stats(mk, fx_t, e["weights"], e["densities"], e["keys"])
        ok = all(abs(s["z_mean"]) < 4 and abs(s["std_ratio"] - 1) < 0.05 for s in (sd, sm))
        parts = [
            f"dm z_mean={sd['z_mean']:+.2f} std_ratio={sd['std_ratio']:.3f}",
            f"mk z_mean={sm['z_mean']:+.2f} std_ratio={sm['std_ratio']:.3f}",
        ]
        if "kept" in sd:
            ok &= all(
                abs(s["kept_z"]) < 4 and abs(s["scale"] / s["scale_expected"] - 1) < 0.02
                for s in (sd, sm)
            )
            parts.append(
                f"kept dm/mk={sd['kept']:.4f}/{sm['kept']:.4f} (density {e['densities'][0]})"
            )
            parts.append(
                f"rescale dm/mk={sd['scale']:.4f}/{sm['scale']:.4f} (1/d={sd['scale_expected']:.4f})"
            )
        return ok, "; ".join(parts)
    sd, sm = dare_ties_stats(dm, fx_t["base"]), dare_ties_stats(mk, fx_t["base"])
    n = sd["n"]
    se_zero = math.sqrt(sm["zero_frac"] * (1 - sm["zero_frac"]) / n) * math.sqrt(2)
    se_mean = math.sqrt((sd["std"] ** 2 + sm["std"] ** 2) / n)
    ok = (
        abs(sd["zero_frac"] - sm["zero_frac"]) < 4 * se_zero + 1e-12
        and abs(sd["mean"] - sm["mean"]) < 4 * se_mean
        and abs(sd["std"] / sm["std"] - 1) < 0.03
        and abs(sd["mean_abs"] / sm["mean_abs"] - 1) < 0.03
    )
    return ok, (
        f"zero_frac dm/mk={sd['zero_frac']:.4f}/{sm['zero_frac']:.4f}; "
        f"std dm/mk={sd['std']:.3e}/{sm['std']:.3e}; mean|d| dm/mk={sd['mean_abs']:.3e}/{sm['mean_abs']:.3e}; "
        f"mean diff={(sd['mean'] - sm['mean']) / se_mean:+.1f} SE"
    )


def print_table(rows: list[tuple]) -> None:
    head = ("recipe", "max abs diff", "max rel diff", "verdict", "detail")
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:{x}}}" for x in w) + "  {}"
    print(fmt.format(*head))
    print(fmt.format(*("-" * x for x in w), "-" * 6))
    for r in rows:
        print(fmt.format(*r))
    print(
        "\nmax abs diff = max|divmerge - mergekit| over every entry of every tensor; max rel diff ="
        "\nmax|divmerge - mergekit| / max|mergekit| over each tensor (worst tensor shown)"
    )


if __name__ == "__main__":
    sys.exit(main())
