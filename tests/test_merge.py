"""merge.py directly: parameter resolution per tensor, the chunked path against the whole-tensor
path, per-tensor seeding, and what plan_merge decides about the base."""

from __future__ import annotations

import pytest
import torch

from conftest import write_recipe
from divmerge_cli import merge
from divmerge_cli.errors import UserError
from divmerge_cli.recipe import load_recipe

Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def plan(tmp_path, zoo, method="ties", params=None, models=("e0", "e1"), model_params=None):
    r = {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo[m]), **({"parameters": model_params} if model_params else {})}
            for m in models
        ],
        "parameters": params or {},
    }
    return merge.plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", r)))


@pytest.mark.parametrize(
    "given, want", [(None, True), (True, True), (1, True), (1.0, True), (False, False), (0, False)]
)
def test_switches_reach_the_method_as_booleans(tmp_path, llama_zoo, given, want):
    params = {} if given is None else {"normalize": given}
    _, glob = merge.tensor_params(plan(tmp_path, llama_zoo, "ties", params), Q0)
    assert glob["normalize"] is want and glob["int8_mask"] is False
    assert isinstance(glob["lambda"], float)


def test_dare_rescale_and_the_written_recipe_keep_the_spelling(tmp_path, llama_zoo):
    p = plan(tmp_path, llama_zoo, "dare_linear", {"rescale": False, "normalize": 1})
    _, glob = merge.tensor_params(p, Q0)
    assert glob["rescale"] is False and glob["normalize"] is True
    dumped = merge.dump_recipe(p.recipe)
    assert "rescale: false" in dumped and "normalize: 1.0" in dumped


def test_lists_interpolate_across_blocks_and_filters_match_names(tmp_path, llama_zoo):
    p = plan(
        tmp_path,
        llama_zoo,
        "ties",
        {"density": [0.2, 0.8], "lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 2.0}]},
        model_params={"weight": [{"filter": "layers.1", "value": 3.0}]},
    )
    (m0, _), g0 = merge.tensor_params(p, Q0)
    (m1, _), g1 = merge.tensor_params(p, Q1)
    assert (m0["density"], m1["density"]) == (0.2, 0.8)  # block 0 of 2 -> 0, block 1 -> 1
    assert (m0["weight"], m1["weight"]) == (1.0, 3.0)  # no filter matched: the default
    assert g0["lambda"] == g1["lambda"] == 0.5
    (me, _), ge = merge.tensor_params(p, "model.embed_tokens.weight")
    assert me["density"] == 0.2 and ge["lambda"] == 2.0  # outside blocks: position 0


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_row_chunks_merge_to_the_whole_tensor(tmp_path, llama_zoo, monkeypatch, method):
    p = plan(tmp_path, llama_zoo, method, {"density": 0.3} if method == "ties" else {})
    name = "model.embed_tokens.weight"  # 300 x 32
    gen = lambda: merge.tensor_generator(0, name)  # noqa: E731
    whole = merge.merge_tensor(p, name, gen(), "cpu")
    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", 32 * 7)  # 7 rows per chunk, a ragged last one
    chunked = merge.merge_tensor(p, name, gen(), "cpu")
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)
    assert not torch.equal(whole, p.models[0].get(name))  # the merge did something


def test_random_masks_depend_on_the_tensor_not_the_order(tmp_path, llama_zoo):
    p = plan(tmp_path, llama_zoo, "dare_linear", {"density": 0.5})
    first = merge.merge_tensor(p, Q0, merge.tensor_generator(7, Q0), "cpu")
    merge.merge_tensor(p, Q1, merge.tensor_generator(7, Q1), "cpu")  # another tensor in between
    assert torch.equal(merge.merge_tensor(p, Q0, merge.tensor_generator(7, Q0), "cpu"), first)
    assert not torch.equal(merge.merge_tensor(p, Q0, merge.tensor_generator(8, Q0), "cpu"), first)


def test_the_base_joins_linear_and_is_dropped_from_task_vector_methods(tmp_path, llama_zoo):
    ta = plan(tmp_path, llama_zoo, "task_arithmetic", models=("base", "e0", "e1"))
    assert [c.path for c in ta.models] == [llama_zoo["e0"], llama_zoo["e1"]]  # tau_base = 0
    lin = plan(tmp_path, llama_zoo, "linear", models=("e0", "e1"))
    assert lin.base is None and [c.path for c in lin.models][-1] == llama_zoo["base"]
    assert [e.model for e in lin.entries][-1] == str(llama_zoo["base"])


def test_check_compatible_names_the_tensor_at_fault(tmp_path, llama_zoo, t5_zoo):
    from divmerge_cli.models import open_model

    base = open_model(str(llama_zoo["base"]), "base_model")
    t5 = open_model(str(t5_zoo["e0"]), "models[0].model")
    with pytest.raises(UserError, match=r"models\[0\]\.model: model_type is 't5' but base_model"):
        merge.check_compatible(base, [t5])


@pytest.mark.parametrize(
    ("method", "want"),
    [
        ("linear", 1.1),  # (1.0 + 1.1 + 1.2) / 3: the base joins the average
        ("task_arithmetic", 1.3),
        ("ties", 1.15),  # both kept (k = 1), signs agree, normalized
        ("dare_linear", None),
        ("dare_ties", None),
        ("slerp", 1.05),
        ("multislerp", 1.15),
    ],
)
def test_a_0_dim_tensor_merges_with_every_method(tmp_path, llama_zoo, cli, method, want):
    import shutil

    from safetensors.torch import load_file, save_file

    zoo = {}
    for i, name in enumerate(("base", "e0", "e1")):
        shutil.copytree(llama_zoo[name], tmp_path / name)
        w = load_file(tmp_path / name / "model.safetensors")
        w["model.logit_scale"] = torch.tensor(1.0 + 0.1 * i)
        save_file(w, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        zoo[name] = tmp_path / name
    models = ("e0",) if method == "slerp" else ("e0", "e1")
    params = {"t": 0.5} if method == "slerp" else {}
    p = plan(tmp_path, zoo, method, params, models, {"density": 0.5})
    out = merge.run_merge(p, tmp_path / "out")
    got = load_file(out / "model.safetensors")["model.logit_scale"]
    assert got.shape == () and (want is None or abs(float(got) - want) < 1e-6), float(got)


def test_passthrough_at_scale_1_copies_the_stored_tensors_and_still_refuses_nan(
    tmp_path, llama_zoo
):
    from safetensors.torch import load_file, save_file

    src = llama_zoo["e0"]
    half = tmp_path / "half"
    half.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (half / f.name).write_bytes(f.read_bytes())
    stored = {k: v.bfloat16() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(stored, str(half / "model.safetensors"))
    for scale, dtype, want in [
        (1.0, None, lambda v: v),
        (1.0, "float16", lambda v: v.float().half()),
        (0.5, None, lambda v: (v.float() * 0.5).bfloat16()),
    ]:
        r = {"merge_method": "passthrough", "models": [{"model": str(half)}]}
        r["models"][0]["parameters"] = {"scale": scale}
        r |= {"dtype": dtype} if dtype else {}
        p = merge.plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", r)))
        out = merge.run_merge(p, tmp_path / "out", force=True, threads=2)
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == stored.keys()
        assert all(torch.equal(got[k], want(v)) for k, v in stored.items()), (scale, dtype)
    name = next(k for k, v in stored.items() if v.dim() == 2)
    stored[name][1, 2] = float("nan")
    save_file(stored, str(half / "model.safetensors"))
    r = {"merge_method": "passthrough", "models": [{"model": str(half)}]}
    p = merge.plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", r)))
    with pytest.raises(UserError, match=f"tensor {name} in .* holds NaN or Inf"):
        merge.run_merge(p, tmp_path / "nan")
