"""`slices:` (layer ranges, per-slice parameters, passthrough frankenmerges) and output vocabularies
(`tokenizer_source: union/base/model`, the tokenizer block, chat_template), checked by hand on tiny
models; scripts/check_mergekit_slices.py compares the same features with mergekit 0.1.5."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXTS, write_recipe
from divmerge_cli import tiny
from divmerge_cli.checkpoint import Checkpoint

ADDED = {"a1": ["<tool>", "<x1>"], "a2": ["<x1>", "<y>"]}


def src(path, lo: int, hi: int, **params) -> dict:
    return {
        "model": str(path),
        "layer_range": [lo, hi],
        **({"parameters": params} if params else {}),
    }


def run(cli, tmp_path: Path, recipe: dict, name: str = "out", *extra) -> tuple[Path, str]:
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    code, out, err = cli("run", path, "-o", tmp_path / name, *extra)
    assert code == 0, err
    return tmp_path / name, out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def vocab_zoo(tmp_path_factory) -> dict[str, Path]:
    """base (300 tokens) + a1, a2: the base's tokenizer plus added tokens, with their own rows."""
    root = tmp_path_factory.mktemp("vocab")
    tok = tiny.build_tokenizer(TEXTS, vocab_size=300)
    base = tiny.tiny_llama(len(tok))
    zoo = {"base": tiny.save(base, tok, root / "base")}
    for i, (name, added) in enumerate(ADDED.items()):
        t = copy.deepcopy(tok)
        t.add_tokens(added)
        m = tiny.perturbed(base, 0.02, seed=i + 1)
        m.resize_token_embeddings(len(t), mean_resizing=False)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            m.model.embed_tokens.weight[len(tok) :] = torch.randn(len(added), 32, generator=g)
            m.lm_head.weight[len(tok) :] = torch.randn(len(added), 32, generator=g)
        zoo[name] = tiny.save(m, t, root / name)
    return zoo


# --- slices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_slice_over_every_layer_is_the_whole_model_merge(method, llama_zoo, tmp_path, cli):
    z = llama_zoo
    p0 = {"weight": [0.3, 1.0], "density": 0.5}
    head = {"merge_method": method, "base_model": str(z["base"]), "parameters": {"lambda": 0.8}}
    whole = {**head, "models": [{"model": str(z["e0"]), "parameters": p0}, {"model": str(z["e1"])}]}
    sliced = {
        **head,
        "slices": [
            {"sources": [src(z["base"], 0, 2), src(z["e0"], 0, 2, **p0), src(z["e1"], 0, 2)]}
        ],
    }
    a, _ = run(cli, tmp_path, whole, "whole")
    b, _ = run(cli, tmp_path, sliced, "sliced")
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_gradient_runs_over_its_slice_and_a_one_layer_slice_takes_its_end(
    llama_zoo, tmp_path, cli
):
    """mergekit: layer i of an n-layer slice sits at t = i / (n - 1), and at t = 1 when n = 1,
    so two one-layer slices both take the gradient's last value (a whole-model merge would give
    block 0 the first)."""
    z = llama_zoo
    sources = lambda i: [src(z["e0"], i, i + 1, weight=[1.0, 3.0]), src(z["e1"], i, i + 1)]  # noqa: E731
    recipe = {
        "merge_method": "linear",
        "slices": [{"sources": sources(0)}, {"sources": sources(1)}],
    }
    out, _ = run(cli, tmp_path, recipe)
    got, e0, e1 = tensors(out), tensors(z["e0"]), tensors(z["e1"])
    for n in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.allclose(got[n], (3 * e0[n] + e1[n]) / 4, atol=1e-7)
    # embeddings sit outside the blocks: t = 0, weight 1
    n = "model.embed_tokens.weight"
    assert torch.allclose(got[n], (e0[n] + e1[n]) / 2, atol=1e-7)


def test_slice_parameters_sit_between_a_sources_and_the_recipes(llama_zoo, tmp_path, cli):
    z = llama_zoo
    recipe = {
        "merge_method": "linear",
        "parameters": {"weight": 5.0},
        "slices": [
            {"sources": [src(z["e0"], 0, 1), src(z["e1"], 0, 1)], "parameters": {"weight": 2.0}},
            {"sources": [src(z["e0"], 1, 2, weight=1.0), src(z["e1"], 1, 2)]},
        ],
    }
    got, e0, e1 = tensors(run(cli, tmp_path, recipe)[0]), tensors(z["e0"]), tensors(z["e1"])
    n0, n1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(got[n0], (e0[n0] + e1[n0]) / 2, atol=1e-7)  # 2 and 2
    assert torch.allclose(got[n1], (e0[n1] + 5 * e1[n1]) / 6, atol=1e-7)  # 1 and 5


def test_passthrough_stacks_layer_ranges_renumbered_and_the_output_loads_and_generates(
    llama_zoo, tmp_path, cli
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    z = llama_zoo
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(z["e0"], 0, 2)]},
            {"sources": [src(z["e1"], 1, 2, scale=[{"filter": "o_proj", "value": 0.5}])]},
            {"sources": [src(z["e0"], 0, 1)]},
        ],
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, out, _ = cli("validate", path)
    assert code == 0 and "output: 4 layers, vocabulary of 300 tokens" in out
    out, _ = run(cli, tmp_path, recipe)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    got, e0, e1 = tensors(out), tensors(z["e0"]), tensors(z["e1"])
    layer = lambda i, s="mlp.down_proj.weight": f"model.layers.{i}.{s}"  # noqa: E731
    assert {k for k in got if k.startswith("model.layers.")} == {
        layer(i, k.split(".", 3)[3])
        for i in range(4)
        for k in e0
        if k.startswith("model.layers.0.")
    }
    assert torch.equal(got[layer(1)], e0[layer(1)]) and torch.equal(got[layer(3)], e0[layer(0)])
    assert torch.equal(got[layer(2)], e1[layer(1)])
    o = "self_attn.o_proj.weight"
    assert torch.equal(got[layer(2, o)], 0.5 * e1[layer(1, o)])
    # embeddings from the first slice's model, the final norm and head from the last slice's
    assert torch.equal(got["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], e0["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(**tok("the movie", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > 2


def test_a_passthrough_merge_holds_one_input_tensor_at_a_time_whatever_its_depth(
    llama_zoo, tmp_path, cli, monkeypatch
):
    """Every tensor read from an input is released before the next is read, for a 2-layer and a
    10-layer output alike: memory does not grow with the depth."""
    live, peak = [0], []
    get = Checkpoint.get

    def counted(self, *a, **k):
        t = get(self, *a, **k)
        live[0] += 1
        peak.append(live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(Checkpoint, "get", counted)
    z = llama_zoo
    for depth in (1, 5):
        peak.clear()
        slices = [{"sources": [src(z["e0"], 0, 2)]} for _ in range(depth)]
        recipe = {"merge_method": "passthrough", "slices": slices}
        run(cli, tmp_path, recipe, f"d{depth}", "--threads", "1")
        assert max(peak) == 1, (depth, max(peak))
        assert (
            json.loads((tmp_path / f"d{depth}" / "config.json").read_text())["num_hidden_layers"]
            == 2 * depth
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z: {"slices": [{"sources": [src(z["e0"], 0, 3)]}]}, "has 2 layers"),
        (
            lambda z: {"slices": [{"sources": [src(z["e0"], 0, 2), src(z["e1"], 0, 1)]}]},
            "spans 1 layers but sources[0]'s spans 2",
        ),
        (lambda z: {"slices": [{"sources": [src(z["e0"], 1, 1)]}]}, "holds no layer"),
        (
            lambda z: {
                "merge_method": "task_arithmetic",
                "base_model": str(z["base"]),
                "slices": [{"sources": [src(z["e0"], 0, 2)]}],
            },
            "each slice lists it among its sources",
        ),
        (
            lambda z: {"slices": [{"sources": [src(z["e0"], 0, 1), src(z["e1"], 0, 1)]}]},
            "slices[0].sources: passthrough copies one model",
        ),
        (
            lambda z: {
                "models": [{"model": str(z["e0"])}],
                "slices": [{"sources": [src(z["e0"], 0, 2)]}],
            },
            "not both",
        ),
    ],
)
def test_bad_slices_exit_2_naming_the_field(change, message, llama_zoo, tmp_path, cli):
    recipe = {"merge_method": "passthrough", **change(llama_zoo)}
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_learned_merges_refuse_slices_at_load(llama_zoo, tmp_path, cli):
    z = llama_zoo
    recipe = {
        "merge_method": "divmerge",
        "base_model": str(z["base"]),
        "slices": [{"sources": [src(z["base"], 0, 2), src(z["e0"], 0, 2)]}],
    }
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "slices: divmerge learns coefficients of whole experts" in err, err


def test_a_sliced_merges_written_recipe_reruns_it(llama_zoo, tmp_path, cli):
    z = llama_zoo
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(z["e0"], 0, 2)]}, {"sources": [src(z["e1"], 1, 2)]}],
    }
    out, _ = run(cli, tmp_path, recipe)
    written = (out / "divmerge_recipe.yaml").read_text()
    assert "models:" not in written and "sha256:" in written
    code, _, err = cli("run", out / "divmerge_recipe.yaml", "-o", tmp_path / "again")
    assert code == 0, err
    a, b = tensors(out), tensors(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- vocabularies -----------------------------------------------------------------------------


def _rows(folder: Path, name: str = "model.embed_tokens.weight") -> tuple[torch.Tensor, dict]:
    from transformers import AutoTokenizer

    return tensors(folder)[name], AutoTokenizer.from_pretrained(folder).get_vocab()


def test_union_vocabulary_rows_follow_mergekits_rule(vocab_zoo, tmp_path, cli):
    """linear over base, a1, a2: a token one model has takes its row in all three; one two of
    them have (not the base) takes their mean in the third; then the weighted average."""
    z = vocab_zoo
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(z[k]), "parameters": {"weight": w}} for k, w in
                   (("base", 1.0), ("a1", 2.0), ("a2", 1.0))],
        "tokenizer_source": "union",
    }  # fmt: skip
    code, out, _ = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 0 and "vocabulary of 303 tokens" in out
    folder, _ = run(cli, tmp_path, recipe)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 303
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got, vocab = _rows(folder, name)
        (b, vb), (a1, v1), (a2, v2) = (_rows(z[k], name) for k in ("base", "a1", "a2"))
        assert got.shape[0] == 303 and {"<tool>", "<x1>", "<y>"} <= set(vocab)
        assert torch.allclose(got[vocab["<tool>"]], a1[v1["<tool>"]], atol=1e-7)
        assert torch.allclose(got[vocab["<y>"]], a2[v2["<y>"]], atol=1e-7)
        x1, x2 = a1[v1["<x1>"]], a2[v2["<x1>"]]  # the base lacks <x1>: it takes their mean
        assert torch.allclose(got[vocab["<x1>"]], ((x1 + x2) / 2 + 2 * x1 + x2) / 4, atol=1e-7)
        i = vocab["the"]
        assert torch.allclose(got[i], (b[vb["the"]] + 2 * a1[i] + a2[i]) / 4, atol=1e-7)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok("the <tool> movie <y>", return_tensors="pt")
    assert vocab["<tool>"] in ids["input_ids"][0].tolist()
    model.generate(**ids, max_new_tokens=3, do_sample=False)


def test_a_token_the_base_has_takes_the_bases_row_in_the_models_that_lack_it(
    vocab_zoo, tmp_path, cli
):
    """tokenizer_source: a2 (base + <x1>, <y>) with task arithmetic over a1 and a2: <y>, which only
    a2 has, gets a2's row everywhere, so the merge keeps it; <x1> (a1 and a2, not the base) takes
    their mean in the base, so theta0 + (tau1 + tau2) = a1 + a2 - mean."""
    z = vocab_zoo
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(z["base"]),
        "models": [{"model": str(z["a1"])}, {"model": str(z["a2"])}],
        "tokenizer_source": str(z["a2"]),
    }
    got, vocab = _rows(run(cli, tmp_path, recipe)[0])
    (a1, v1), (a2, v2) = _rows(z["a1"]), _rows(z["a2"])
    assert "<tool>" not in vocab and got.shape[0] == 302
    assert torch.allclose(got[vocab["<y>"]], a2[v2["<y>"]], atol=1e-6)
    x1, x2 = a1[v1["<x1>"]], a2[v2["<x1>"]]
    assert torch.allclose(got[vocab["<x1>"]], x1 + x2 - (x1 + x2) / 2, atol=1e-6)


def test_the_tokenizer_block_sources_force_zero_and_padding(vocab_zoo, tmp_path, cli):
    z = vocab_zoo
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": str(z["a1"])}],
        "tokenizer": {
            "source": "base",
            "pad_to_multiple_of": 16,
            "tokens": {
                "<new>": {
                    "source": {"kind": "model_token", "model": str(z["a1"]), "token": "<x1>"}
                },
                "<unk>": {"source": {"kind": "zero"}, "force": True},
                "<tool>": {"source": str(z["a1"])},
            },
        },
        "chat_template": template,
    }
    folder, _ = run(cli, tmp_path, recipe)
    got, vocab = _rows(folder)
    a1, v1 = _rows(z["a1"])
    # no base_model: "base" is the first model's tokenizer (a1: 302 tokens) + <new>, padded to 16s
    assert len(vocab) == 303 and got.shape[0] == 304
    assert torch.equal(got[vocab["<new>"]], a1[v1["<x1>"]])
    assert torch.equal(got[vocab["<tool>"]], a1[v1["<tool>"]])
    assert not got[vocab["<unk>"]].any() and a1[v1["<unk>"]].any()
    assert torch.allclose(got[303], got[:303].mean(0), atol=1e-6)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template == template


def test_vocabulary_errors_are_named_before_any_work(vocab_zoo, tmp_path, cli):
    z = vocab_zoo
    head = {"merge_method": "linear", "models": [{"model": str(z["a1"])}, {"model": str(z["a2"])}]}
    bad = {
        "no such token": (
            {"tokenizer": {"tokens": {"<q>": {"source": {"kind": "model_token", "model": str(z["a1"]), "token": "<nope>"}}}}},
            "has no token '<nope>'",
        ),
        "model lacks it": (
            {"tokenizer": {"tokens": {"<y>": {"source": str(z["a1"])}}}},
            "has no token '<y>'",
        ),
        "unknown model": (
            {"tokenizer": {"tokens": {"<y>": {"source": str(z["base"])}}}},
            "is not a model the recipe merges",
        ),
        "bundled template": ({"chat_template": "chatml"}, "mergekit's bundled templates"),
    }  # fmt: skip
    for case, (extra, message) in bad.items():
        code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", {**head, **extra}))
        assert code == 2 and message in err, (case, err)


def test_learned_merges_refuse_experts_of_another_vocabulary(vocab_zoo, tmp_path, cli):
    z = vocab_zoo
    (tmp_path / "v.jsonl").write_text('{"text": "the film", "label": "good"}\n')
    task = {"validation": "v.jsonl", "prompt": "{text}", "target": "label", "metric": "accuracy"}
    recipe = {
        "merge_method": "divmerge",
        "base_model": str(z["base"]),
        "models": [{"model": str(z["a1"]), "task": "sent"}],
        "tasks": {"sent": task},
        "tokenizer_source": "union",
    }
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "must share one vocabulary" in err, err


def test_della_bounds_in_a_slice_name_the_slices_source(llama_zoo, tmp_path, cli):
    """A per-tensor value check on a sliced merge names the route's input, not the recipe's j-th
    model (the second source here is models[1], the first merged input of its route)."""
    z = llama_zoo
    recipe = {
        "merge_method": "della",
        "base_model": str(z["base"]),
        "parameters": {"density": 0.5, "epsilon": 0.15},
        "slices": [
            {"sources": [src(z["base"], 0, 2), src(z["e1"], 0, 2, density=0.9)]},
        ],
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("run", path, "-o", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists(), err
    assert "della keeps entries with probabilities" in err and "Traceback" not in err
    assert ": models[1].parameters: " in err, err
