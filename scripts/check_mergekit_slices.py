"""Dev oracle check: `slices:`, passthrough and output vocabularies, divmerge against mergekit 0.1.5.

mergekit is never a runtime dependency of divmerge. In the shared venv it imports once two of its
dependencies are on the path, kept in a private folder for this script only:

    pip install --target /tmp/wth/mkdeps immutables protobuf
    PYTHONPATH=$PWD:/tmp/wth/mkdeps python scripts/check_mergekit_slices.py \
        --mergekit /work/venv/bin/mergekit-yaml [--workdir DIR] [--only SUBSTR]

Fixtures: check_mergekit.py's 4-block Llama family (base + 3 experts; its models have 512
embedding rows for a 300-token tokenizer), and a "vocab" family built here: a base whose
tokenizer fills its 300 rows, and experts with added tokens (their own rows, resized
embeddings and heads). Cases: slices covering every layer (equal to the `models:` merge) and
partial ones with gradients, per-slice parameters and filters; passthrough frankenmerges of one
and two models; union, base and model tokenizers, the tokenizer block (per-token sources, force,
zero, padding) and chat_template. Every tensor must agree to max abs diff <= 1e-6 (float32).
Vocabulary tensors are compared row by row per token: mergekit orders the tokens a union adds by
iterating a set, so their ids differ between its runs; the token sets, the config's vocab_size
and num_hidden_layers, and the chat template must be equal. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_mergekit import (  # noqa: E402
    TEXTS,
    build_fixtures,
    fixture_digest,
    load_dir,
    run_divmerge,
    run_mergekit,
)

SEED = 1234
TOL = 1e-6
ADDED = {"e1": ["<tool>", "<x1>"], "e2": ["<x1>", "<y>", "<z>"], "e3": []}
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def build_vocab_fixtures(root: Path) -> dict[str, str]:
    """base (300 tokens, 300 rows) + experts with added tokens and their own rows for them."""
    from divmerge_cli.tiny import build_tokenizer, perturbed, save, tiny_llama

    paths = {"base": root / "base", **{k: root / k for k in ADDED}}
    if all((p / "config.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tok = build_tokenizer(TEXTS, vocab_size=300)
    base = tiny_llama(len(tok), hidden=32, layers=4, seed=0)
    save(base, tok, paths["base"])
    for i, (name, added) in enumerate(ADDED.items()):
        t = copy.deepcopy(tok)
        t.add_tokens(added)
        m = perturbed(base, 0.02, seed=200 + i)
        if added:
            m.resize_token_embeddings(len(t))
            g = torch.Generator().manual_seed(300 + i)
            with torch.no_grad():
                m.model.embed_tokens.weight[len(tok) :] = torch.randn(len(added), 32, generator=g)
                m.lm_head.weight[len(tok) :] = torch.randn(len(added), 32, generator=g)
        save(m, t, paths[name])
    return {k: str(v) for k, v in paths.items()}


def src(fx: dict, key: str, lo: int, hi: int, **params) -> dict:
    return {"model": fx[key], "layer_range": [lo, hi], **({"parameters": params} if params else {})}


def cases(L: dict, V: dict) -> list[tuple[str, str, dict]]:
    """(name, fixture, recipe)."""
    grad = {"weight": [0.2, 1.0, 0.6]}
    full = [src(L, "base", 0, 4), src(L, "e1", 0, 4, **grad), src(L, "e2", 0, 4, weight=0.5)]
    ta = {"merge_method": "task_arithmetic", "base_model": L["base"]}
    ties = {"merge_method": "ties", "base_model": L["base"]}
    slerp_t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    vt = {"merge_method": "ties", "base_model": V["base"]}
    vmodels = [
        {"model": V["e1"], "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": V["e2"], "parameters": {"weight": 0.4, "density": 0.6}},
        {"model": V["e3"], "parameters": {"weight": 0.3, "density": 0.8}},
    ]
    return [
        ("slices_full_task_arith", "llama4", {**ta, "slices": [{"sources": full}]}),
        (
            "models_task_arith (same merge as slices_full)",
            "llama4",
            {
                **ta,
                "models": [
                    {"model": L["e1"], "parameters": grad},
                    {"model": L["e2"], "parameters": {"weight": 0.5}},
                ],
            },
        ),
        (
            "slices_full_slerp_gradient_filters",
            "llama4",
            {
                "merge_method": "slerp",
                "base_model": L["base"],
                "slices": [{"sources": [src(L, "base", 0, 4), src(L, "e1", 0, 4)]}],
                "parameters": {"t": slerp_t},
            },
        ),
        (
            "slices_partial_ties_per_slice",
            "llama4",
            {
                **ties,
                "slices": [
                    {
                        "sources": [
                            src(L, "base", 0, 2),
                            src(L, "e1", 0, 2, density=[0.2, 0.8], weight=1.0),
                            src(L, "e3", 0, 2, density=0.5),
                        ],
                        "parameters": {"lambda": 1.3},
                    },
                    {
                        "sources": [
                            src(L, "base", 2, 4),
                            src(L, "e2", 2, 4, density=0.4),
                            src(L, "e3", 2, 4, weight=[{"filter": "mlp", "value": 0.2}]),
                        ],
                        "parameters": {"density": 0.7},
                    },
                ],
                "parameters": {"weight": 0.8},  # mergekit has no default weight
            },
        ),
        (
            "slices_partial_shifted_linear",
            "llama4",
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [src(L, "e1", 0, 3, weight=[1, 3]), src(L, "e2", 1, 4)]},
                    {"sources": [src(L, "e3", 3, 4), src(L, "e1", 3, 4, weight=2)]},
                ],
                "parameters": {"weight": 1.0},
            },
        ),
        (
            "passthrough_two_models",
            "llama4",
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [src(L, "e1", 0, 3)]},
                    {"sources": [src(L, "e2", 1, 4, scale=[{"filter": "o_proj", "value": 0.5}])]},
                ],
            },
        ),
        (
            "passthrough_self_stack",
            "llama4",
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [src(L, "e1", 0, 4)]},
                    {"sources": [src(L, "e1", 1, 3)]},
                    {"sources": [src(L, "e1", 2, 4)]},
                ],
            },
        ),
        (
            "union_ties_added_tokens",
            "vocab",
            {**vt, "models": vmodels, "tokenizer_source": "union"},
        ),
        (
            "union_linear_added_tokens",
            "vocab",
            {
                "merge_method": "linear",
                "models": [{"model": V[k]} for k in ("base", "e1", "e2", "e3")],
                "parameters": {"weight": 1.0},
                "tokenizer_source": "union",
            },
        ),
        (
            "union_task_arith_padded_512_rows",
            "llama4",
            {
                **ta,
                "models": [{"model": L["e1"]}, {"model": L["e2"]}],
                "parameters": {"weight": 0.6},
                "tokenizer_source": "union",
            },
        ),
        (
            "union_ties_base_row_rule",  # <x1>: in the base (e1) and e2, not e3 -> the base's row
            "vocab",
            {
                "merge_method": "ties",
                "base_model": V["e1"],
                "models": [
                    {"model": V["e2"], "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": V["e3"], "parameters": {"weight": 0.9, "density": 0.7}},
                ],
                "tokenizer_source": "union",
            },
        ),
        ("base_tokenizer_ties", "vocab", {**vt, "models": vmodels, "tokenizer_source": "base"}),
        (
            "model_tokenizer_e2",
            "vocab",
            {
                "merge_method": "task_arithmetic",
                "base_model": V["base"],
                "models": [{"model": V["e1"]}, {"model": V["e2"]}],
                "parameters": {"weight": 0.5},
                "tokenizer_source": V["e2"],
            },
        ),
        (
            "tokenizer_block_tokens_pad",
            "vocab",
            {
                "merge_method": "task_arithmetic",
                "base_model": V["base"],
                "models": [{"model": V["e1"]}, {"model": V["e2"]}, {"model": V["e3"]}],
                "parameters": {"weight": 0.4},
                "tokenizer": {
                    "source": "union",
                    "pad_to_multiple_of": 16,
                    "tokens": {
                        "<x1>": {"source": V["e2"], "force": True},
                        "<y>": {"source": {"kind": "zero"}},
                        "<new>": {
                            "source": {"kind": "model_token", "model": V["e1"], "token": "<tool>"}
                        },
                        "the": {
                            "source": {"kind": "model_token", "model": V["e3"], "token_id": 5},
                            "force": True,
                        },
                    },
                },
                "chat_template": TEMPLATE,
            },
        ),
        (
            "slices_union_passthrough",
            "vocab",
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [src(V, "e1", 0, 2)]},
                    {"sources": [src(V, "e2", 2, 4)]},
                ],
                "tokenizer_source": "union",
            },
        ),
        (
            "slices_union_slerp",
            "vocab",
            {
                "merge_method": "slerp",
                "base_model": V["base"],
                "slices": [{"sources": [src(V, "base", 0, 4), src(V, "e2", 0, 4)]}],
                "parameters": {"t": [0.1, 0.9]},
                "tokenizer_source": "union",
            },
        ),
    ]


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def compare(dm_dir: Path, mk_dir: Path) -> tuple[bool, float, str]:
    """Every tensor, vocabulary rows aligned by token; the config's depth and vocabulary size;
    the token sets; the chat template."""
    dm, mk = load_dir(dm_dir), load_dir(mk_dir)
    cd, cm = (json.loads((d / "config.json").read_text()) for d in (dm_dir, mk_dir))
    problems = []
    for key in ("num_hidden_layers", "vocab_size"):
        if cd.get(key) != cm.get(key):
            problems.append(f"config {key} dm/mk={cd.get(key)}/{cm.get(key)}")
    vd, vm = _vocab(dm_dir), _vocab(mk_dir)
    if set(vd) != set(vm):
        problems.append(f"token sets differ: {sorted(set(vd) ^ set(vm))[:5]}")
    order = [vm[t] for t, _ in sorted(vd.items(), key=lambda kv: kv[1]) if t in vm]
    cat = [_template(d) for d in (dm_dir, mk_dir)]
    if cat[0] != cat[1]:
        problems.append("chat templates differ")
    if set(dm) != set(mk):
        problems.append(f"tensor names differ: {sorted(set(dm) ^ set(mk))[:3]}")
    worst, where = 0.0, ""
    for name in sorted(set(dm) & set(mk)):
        a, b = dm[name].double(), mk[name].double()
        rows = cd.get("vocab_size")
        if a.shape != b.shape:
            problems.append(f"{name} shape dm/mk={list(a.shape)}/{list(b.shape)}")
            continue
        if a.shape and a.shape[0] == rows and "layers." not in name:
            n = len(order)
            a, b = torch.cat([a[sorted(vd.values())], a[n:]]), torch.cat([b[order], b[n:]])
        d = float((a - b).abs().max()) if a.numel() else 0.0
        if d > worst:
            worst, where = d, name
    if worst > TOL:
        problems.append(f"worst tensor {where}")
    return not problems, worst, "; ".join(problems) or f"worst {where or '-'}"


def _template(folder: Path) -> str | None:
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text().strip()
    return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/divmerge-mkcheck-slices"))
    ap.add_argument("--mergekit", default="mergekit-yaml")
    ap.add_argument("--only", default="")
    a = ap.parse_args(argv)
    root = a.workdir
    L = build_fixtures(root / "fixtures")["llama4"]
    V = build_vocab_fixtures(root / "fixtures" / "vocab")
    digests = {"llama4": fixture_digest(L), "vocab": fixture_digest(V)}
    for d in ("recipes", "out_mk", "out_dm"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name, fixture, recipe in cases(L, V):
        if a.only and a.only not in name:
            continue
        slug = name.split(" ")[0]
        path = root / "recipes" / f"{slug}.yaml"
        text = yaml.safe_dump(recipe, sort_keys=False)
        path.write_text(text)
        key = hashlib.sha256((text + digests[fixture] + str(SEED)).encode()).hexdigest()
        out_mk, out_dm = root / "out_mk" / slug, root / "out_dm" / slug
        rc, msg = run_mergekit(a.mergekit, path, out_mk, key, SEED)
        if rc != 0:
            rows.append((name, "-", "-", "FAIL", f"mergekit failed: {msg}"))
            failed.append(name)
            continue
        rc, msg = run_divmerge(path, out_dm, SEED)
        if rc != 0:
            rows.append((name, "-", "-", "FAIL", f"divmerge failed: {msg}"))
            failed.append(name)
            continue
        ok, worst, detail = compare(out_dm, out_mk)
        cfg = json.loads((out_dm / "config.json").read_text())
        shape = f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}"
        rows.append((name, f"{worst:.2e}", shape, "PASS" if ok else "FAIL", detail))
        failed += [] if ok else [name]
    head = ("recipe", "max abs diff", "output", "verdict", "detail")
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * x for x in w) + ("------",), *rows]:
        print("  ".join(f"{str(v):{x}}" for v, x in zip(r, w)) + "  " + str(r[4]))
    print(f"\n{len(failed)} failing: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
