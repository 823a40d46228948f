"""Every shipped recipe in recipes/ loads, validates against fixture models, and (data-free) runs;
recipe.py's own logic: paths, per-method defaults, the written recipe, parameter errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from divmerge_cli.errors import UserError
from divmerge_cli.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(
    p.name
    for p in RECIPES.glob("*.yaml")
    if p.name != "tasks.yaml" and not p.name.startswith("sweep")
)


@pytest.fixture
def workdir(tmp_path, llama_zoo) -> Path:
    """recipes/ copied beside links named as the recipes expect, and small task data files."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    for link, key in {"base": "base", "expert-a": "e0", "expert-b": "e1", "expert-c": "e2"}.items():
        (tmp_path / "recipes" / link).symlink_to(llama_zoo[key])
    data = tmp_path / "recipes" / "data"
    data.mkdir()
    rows = {
        "a": {"text": "the film was great", "label": "positive"},
        "b": {"text": "stocks rose", "headline": "markets up"},
    }
    for task, row in rows.items():
        for split in ("val", "test"):
            (data / f"{task}.{split}.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path / "recipes"


def test_every_method_has_a_shipped_recipe():
    from divmerge_cli.methods import METHODS

    assert {f"{m}.yaml" for m in METHODS} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_data_free_ones_run(name, workdir, cli):
    recipe = load_recipe(workdir / name)
    code, out, err = cli("validate", workdir / name)
    assert code == 0, err
    if recipe.merge_method in ("divmerge", "adamerging"):
        return  # exercised end to end in test_optimize.py
    code, out, err = cli("run", workdir / name, "-o", workdir / "out")
    assert code == 0, err
    assert (workdir / "out" / "model.safetensors").is_file()


def test_optimized_schema_and_objectives_agree():
    """One table of facts: the recipe's divergences and each method's objective exist in
    OBJECTIVES, every objective is reachable, and the schema's defaults are the methods'."""
    from typing import get_args

    from divmerge_cli.methods import METHODS, OPTIMIZE_DEFAULTS
    from divmerge_cli.objectives import DIVERGENCES, OBJECTIVES
    from divmerge_cli.recipe import OptimizeParams

    schema = set(get_args(OptimizeParams.model_fields["divergence"].annotation))
    assert schema == set(DIVERGENCES)
    fixed = {m.objective for m in METHODS.values() if m.optimized and m.objective}
    assert fixed <= set(OBJECTIVES) and schema <= set(OBJECTIVES)
    assert schema | fixed == set(OBJECTIVES)  # no objective without a method that minimizes it
    assert all(m.objective is None for m in METHODS.values() if not m.optimized)
    defaults = {k: f.default for k, f in OptimizeParams.model_fields.items()}
    assert defaults == OPTIMIZE_DEFAULTS
    for name, m in METHODS.items():
        if m.optimized:  # a method overrides only parameters that exist
            assert set(m.global_params) <= set(OPTIMIZE_DEFAULTS), name


# --- recipe.py directly -----------------------------------------------------------------------


def _recipe(method="ties", tmp=Path("r.yaml"), **params):
    from divmerge_cli.recipe import recipe_from_dict

    raw = {"merge_method": method, "base_model": "base", "models": [{"model": "x", "task": "t"}]}
    if method in ("divmerge", "adamerging"):
        raw["tasks"] = {"t": {"validation": "v.jsonl", "prompt": "{text}"}}
    return recipe_from_dict({**raw, "parameters": params}, tmp)


def test_relative_paths_resolve_beside_the_recipe_first(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "expert").mkdir(parents=True)
    (tmp_path / "cwd" / "expert").mkdir(parents=True)
    (tmp_path / "cwd" / "other").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = _recipe(tmp=tmp_path / "recipes" / "r.yaml")
    assert r.resolve_path("expert") == str(tmp_path / "recipes" / "expert")  # both exist
    assert r.resolve_path("other") == str(tmp_path / "cwd" / "other")  # only beside the cwd
    assert r.resolve_path("org/model") == "org/model"  # neither: a hub id, untouched
    assert r.resolve_path(str(tmp_path / "abs")) == str(tmp_path / "abs")


def test_each_optimized_method_fills_in_its_own_defaults():
    from divmerge_cli.recipe import optimize_params

    dm, ada = optimize_params(_recipe("divmerge")), optimize_params(_recipe("adamerging"))
    assert (dm.lr, dm.epochs, dm.divergence) == (0.01, 4, "js")  # Table 9
    assert (ada.lr, ada.epochs) == (0.001, 5)
    assert optimize_params(_recipe("adamerging", lr=0.1, samples=8)).lr == 0.1
    with pytest.raises(UserError, match="parameters.divergence: adamerging minimizes entropy"):
        _recipe("adamerging", divergence="kl")
    with pytest.raises(UserError, match="parameters.divergence: Input should be 'js' or 'kl'"):
        _recipe("divmerge", divergence="tv")


def test_the_written_recipe_makes_every_default_explicit():
    import yaml

    from divmerge_cli.recipe import dump_recipe

    ties = yaml.safe_load(dump_recipe(_recipe("ties", density=0.2)))
    assert ties["parameters"] == {
        "normalize": True,
        "lambda": 1.0,
        "int8_mask": False,
        "density": 0.2,
    }
    ada = yaml.safe_load(dump_recipe(_recipe("adamerging")))
    assert "divergence" not in ada["parameters"] and ada["parameters"]["lr"] == 0.001
    assert yaml.safe_load(dump_recipe(_recipe("divmerge")))["parameters"]["top_k"] == 256


@pytest.mark.parametrize(
    "params, message",
    [
        ({"densty": 0.2}, "parameters.densty: not a parameter of ties (did you mean 'density'?)"),
        ({"density": 1.5}, "parameters.density: 1.5 is out of range; density must be in (0, 1]"),
        ({"density": []}, "parameters.density: an empty list"),
        ({"lambda": "big"}, "parameters.lambda: 'big' is not a number"),
    ],
)
def test_bad_parameters_name_the_field_and_what_is_valid(params, message):
    with pytest.raises(UserError) as e:
        _recipe("ties", **params)
    assert str(e.value).startswith(f"r.yaml: {message}")
