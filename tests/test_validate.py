"""`validate` refuses what `run` refuses, from headers and configs (issue 11, item 5), and a
parameter that another method takes is a warning, not an error (item 14)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from divmerge_cli.recipe import load_recipe


def ta(zoo, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["e0"])}, {"model": str(zoo["e1"])}],
        **extra,
    }


def dm(zoo, tmp: Path, **params) -> dict:
    data = tmp / "val.jsonl"
    data.write_text('{"text": "the film was great"}\n')
    task = {"validation": str(data), "prompt": "Review: {text}\nSentiment:"}
    return {
        "merge_method": "divmerge",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["e0"]), "task": "a"}, {"model": str(zoo["e1"]), "task": "b"}],
        "tasks": {"a": task, "b": task},
        "parameters": params,
    }


def copy_model(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def rewrite_header(folder: Path, edit) -> None:
    """Apply `edit` to the JSON header of folder/model.safetensors, keeping the body."""
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _first_matrix(h: dict) -> str:
    return next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2)


def _bad_shape(h: dict) -> dict:
    h[_first_matrix(h)]["shape"][1] -= 1
    return h


def _bad_dtype(h: dict) -> dict:
    h[_first_matrix(h)]["dtype"] = "F16"
    return h


def _cases(zoo: dict, tmp: Path) -> dict[str, tuple[dict, str]]:
    truncated = copy_model(zoo["e1"], tmp / "truncated")
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    shape = copy_model(zoo["e1"], tmp / "shape")
    dtype = copy_model(zoo["e1"], tmp / "dtype")
    if not (tmp / "shape.done").exists():
        rewrite_header(shape, _bad_shape)
        rewrite_header(dtype, _bad_dtype)
        (tmp / "shape.done").touch()
    listed = copy_model(zoo["e1"], tmp / "listed")
    (listed / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": f"../{zoo['e2'].name}/model.safetensors"}})
    )
    outside = copy_model(zoo["e1"], tmp / "outside")
    (outside / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": str(zoo["e2"] / "model.safetensors")}})
    )
    no_tok = tmp / "no_tokenizer"
    if not no_tok.exists():
        no_tok.mkdir()
        for n in ("config.json", "model.safetensors"):
            shutil.copy(zoo["base"] / n, no_tok / n)
    one = lambda p: [{"model": str(zoo["e0"])}, {"model": str(p)}]  # noqa: E731
    return {
        "truncated body": (ta(zoo, models=one(truncated)), "is truncated"),
        "shape vs offsets": (ta(zoo, models=one(shape)), "the header is inconsistent"),
        "dtype vs offsets": (ta(zoo, models=one(dtype)), "the header is inconsistent"),
        "index with ..": (ta(zoo, models=one(listed)), "only name files inside its model folder"),
        "index absolute": (ta(zoo, models=one(outside)), "only name files inside its model"),
        "tokenizer twice": (
            ta(zoo, tokenizer_source="union", tokenizer={"source": "union"}),
            "tokenizer: give either tokenizer_source or a tokenizer block",
        ),
        "tokenizer folder without one": (
            ta(zoo, tokenizer_source=str(zoo["e2"] / "..")),
            "tokenizer_source: ",
        ),
        "base without tokenizer": (ta(zoo, base_model=str(no_tok)), "base_model: "),
        "init nan": (dm(zoo, tmp, init=float("nan")), "init is 'uniform' (1/n) or a number in"),
        "init 1e30": (dm(zoo, tmp, init=1e30), "[-10, 10]"),
        "lr inf": (dm(zoo, tmp, lr=float("inf")), "lr must be in (0, 1]"),
        "lr 0": (dm(zoo, tmp, lr=0), "lr must be in (0, 1]"),
        "epochs huge": (dm(zoo, tmp, epochs=10**9), "parameters.epochs"),
        "duplicate model": (ta(zoo, models=one(zoo["e0"])), "models[1].model: "),
        "base as expert": (
            {**dm(zoo, tmp), "models": [{"model": str(zoo["base"]), "task": "a"}]},
            "is the base_model",
        ),
    }


@pytest.fixture(scope="module")
def cases(llama_zoo, tmp_path_factory):
    return _cases(llama_zoo, tmp_path_factory.mktemp("validate"))


@pytest.mark.parametrize(
    "case",
    [
        "truncated body",
        "shape vs offsets",
        "dtype vs offsets",
        "index with ..",
        "index absolute",
        "tokenizer twice",
        "tokenizer folder without one",
        "base without tokenizer",
        "init nan",
        "init 1e30",
        "lr inf",
        "lr 0",
        "epochs huge",
        "duplicate model",
        "base as expert",
    ],
)
def test_validate_refuses_what_run_refuses(case, cases, tmp_path, cli):
    recipe, expected = cases[case]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for args in (["validate", path], ["run", path, "-o", tmp_path / "out"]):
        code, _, err = cli(*args)
        assert code == 2, (args[0], err)
        assert expected in err, (args[0], err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_duplicate_and_base_messages_name_both_entries(cases, tmp_path, cli):
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", cases["duplicate model"][0]))
    assert code == 2 and "listed twice (also models[0])" in err, err


def test_header_that_is_not_an_object_is_refused(llama_zoo, tmp_path, cli):
    bad = copy_model(llama_zoo["e1"], tmp_path / "bad")
    rewrite_header(bad, lambda h: list(h))
    r = write_recipe(tmp_path / "r.yaml", ta(llama_zoo, models=[{"model": str(bad)}]))
    code, _, err = cli("validate", r)
    assert code == 2 and "its header is not a JSON object" in err, err


def test_an_index_naming_files_inside_the_folder_still_loads(llama_zoo, tmp_path, cli):
    good = copy_model(llama_zoo["e1"], tmp_path / "sharded")
    names = load_file(good / "model.safetensors")
    (good / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "./model.safetensors" for n in names}})
    )
    r = write_recipe(tmp_path / "r.yaml", ta(llama_zoo, models=[{"model": str(good)}]))
    code, _, err = cli("validate", r)
    assert code == 0, err


# --- item 14: a parameter another method takes is a warning --------------------------------


def test_density_on_task_arithmetic_is_a_warning_and_changes_nothing(llama_zoo, tmp_path, cli):
    plain = ta(llama_zoo, parameters={"lambda": 0.5})
    mk = ta(llama_zoo, parameters={"lambda": 0.5})
    mk["models"] = [{**m, "parameters": {"weight": 1.0, "density": 0.3}} for m in mk["models"]]
    r = write_recipe(tmp_path / "mk.yaml", mk)
    assert load_recipe(r).warnings == [
        f"{r}: models[{i}].parameters.density: ignored; task_arithmetic takes no density "
        "(a parameter of ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
        "della_linear)"
        for i in range(2)
    ]
    code, _, err = cli("validate", r)
    assert code == 0 and err.count("warning:") == 2 and "density" in err, err
    code, _, err = cli("run", r, "-o", tmp_path / "a")
    assert code == 0 and "warning:" in err, err
    code, _, err = cli("run", write_recipe(tmp_path / "p.yaml", plain), "-o", tmp_path / "b")
    assert code == 0 and "warning" not in err, err
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert "density" not in (tmp_path / "a" / "divmerge_recipe.yaml").read_text()


@pytest.mark.parametrize(
    "method, params, key",
    [
        ("divmerge", {"lambda": 1.0}, "parameters.lambda"),
        ("adamerging", {"divergence": "kl"}, "parameters.divergence"),
        ("linear", {"density": 0.5}, "parameters.density"),
        ("slerp", {"lr": 0.1}, "parameters.lr"),
    ],
)
def test_a_parameter_of_another_method_is_a_warning(method, params, key, llama_zoo, tmp_path):
    recipe = (
        dm(llama_zoo, tmp_path, **params)
        if method in ("divmerge", "adamerging")
        else ta(llama_zoo, parameters=params)
    )
    recipe["merge_method"] = method
    if method == "slerp":
        recipe["models"] = recipe["models"][:1]
    r = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert len(r.warnings) == 1 and f"{key}: ignored; {method} takes no" in r.warnings[0]
    assert key.split(".")[1] not in r.parameters


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"densty": 0.5}, "did you mean 'density'"),  # a typo: no method takes it
        ({"lambdaa": 1.0}, "did you mean 'lambda'"),
    ],
)
def test_a_parameter_no_method_takes_stays_an_error(params, expected, llama_zoo, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", ta(llama_zoo, parameters=params))
    code, _, err = cli("validate", r)
    assert code == 2 and expected in err and "warning" not in err, err


def test_per_model_weight_on_divmerge_is_a_warning_a_typo_is_not(llama_zoo, tmp_path, cli):
    recipe = dm(llama_zoo, tmp_path)
    recipe["models"][0]["parameters"] = {"weight": 0.5}
    r = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert "models[0].parameters.weight: ignored; divmerge takes no weight" in r.warnings[0]
    recipe["models"][0]["parameters"] = {"wieght": 0.5}
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "models[0].parameters.wieght: divmerge learns the coefficients" in err, err


@pytest.mark.parametrize("key", ["[/x]", "a\nb", "list[float]"])
def test_an_odd_key_is_quoted_on_one_line(key, tmp_path, cli):
    """Found by the fuzz test: a key closing a rich tag crashed the error printer (exit 1), a
    key holding '[' crashed the message builder, a line break split the message."""
    r = write_recipe(
        tmp_path / "r.yaml", {"merge_method": "ties", "models": [{"model": "x"}], key: 1}
    )
    code, _, err = cli("validate", r)
    assert code == 2 and f"[{key!r}]: unknown key" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_density_is_a_learned_merges_own_with_a_ties_base_method(llama_zoo, tmp_path):
    recipe = dm(llama_zoo, tmp_path, base_method="ties", density=0.3)
    recipe["models"][0]["parameters"] = {"density": 0.5}
    r = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert not r.warnings and r.parameters["density"] == 0.3
    assert r.models[0].parameters == {"density": 0.5}
    r = load_recipe(write_recipe(tmp_path / "r.yaml", dm(llama_zoo, tmp_path, density=0.3)))
    assert "parameters.density: ignored; divmerge takes no density" in r.warnings[0]


def test_validate_json_reports_a_refused_recipe(llama_zoo, tmp_path, cli):
    recipe = {"merge_method": "ties", "base_model": str(llama_zoo["base"]), "models": []}
    recipe["models"] = [{"model": str(tmp_path / "missing")}]
    r = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("validate", r, "--json", tmp_path / "v.json")
    assert code == 2, err
    report = json.loads((tmp_path / "v.json").read_text())
    message = err.strip().removeprefix("error: ")
    assert report == {"recipe": str(r), "ok": False, "error": message}
    assert "models[0].model" in report["error"]
    ok = write_recipe(tmp_path / "ok.yaml", {**recipe, "models": [{"model": str(llama_zoo["e0"])}]})
    code, _, err = cli("validate", ok, "--json", tmp_path / "v.json")  # replaced by the pass
    assert code == 0 and json.loads((tmp_path / "v.json").read_text())["ok"] is True, err
