"""Every file in recipes/ validates against the demo zoo they name ($DIVMERGE_ZOO), and the
data-free recipes run (issue 11, item 13); recipe.py's own logic: paths, per-method defaults, the
written recipe, parameter errors."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from divmerge_cli.errors import UserError
from divmerge_cli.recipe import load_recipe
from divmerge_cli.sweep import load_sweep
from divmerge_cli.tasks import check_task, load_tasks

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
EVERY = sorted(p.name for p in RECIPES.iterdir() if p.is_file())  # harness/: test_harness.py
SHIPPED = [n for n in EVERY if n != "tasks.yaml" and not n.startswith("sweep")]


@pytest.fixture
def zoo(demo_root, monkeypatch) -> Path:
    monkeypatch.setenv("DIVMERGE_ZOO", str(demo_root / "zoo"))
    return demo_root / "zoo"


def test_every_method_has_a_shipped_recipe():
    from divmerge_cli.methods import METHODS

    assert {f"{m}.yaml" for m in METHODS} <= set(SHIPPED)
    assert set(EVERY) == {*SHIPPED, "tasks.yaml", "sweep.example.yaml"}  # each one is tested


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_data_free_ones_run(name, zoo, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes do not depend on the working folder
    recipe = load_recipe(RECIPES / name)
    assert not recipe.warnings
    code, out, err = cli("validate", RECIPES / name)
    assert code == 0 and "ok" in out, err
    if recipe.merge_method in ("divmerge", "adamerging"):
        return  # exercised end to end in test_optimize.py
    code, out, err = cli("run", RECIPES / name, "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_shipped_tasks_and_sweep_validate(zoo):
    tasks = load_tasks("tasks.yaml", RECIPES, "recipes")
    assert tasks
    for name, spec in tasks.items():
        assert spec.validation.startswith(str(zoo))
        check_task(name, spec, "validation")
        check_task(name, spec, "test")
    cfg = load_sweep(RECIPES / "sweep.example.yaml")
    assert cfg.base_model == (zoo / "base").resolve()
    assert cfg.results.is_relative_to(zoo.resolve())  # results go beside the zoo, not into git


def test_without_the_zoo_variable_validate_names_it(cli, monkeypatch):
    monkeypatch.delenv("DIVMERGE_ZOO", raising=False)
    code, _, err = cli("validate", RECIPES / "ties.yaml")
    assert code == 2 and "DIVMERGE_ZOO is not set" in err and "--zoo-only" in err, err
    assert len(err.strip().splitlines()) == 1


def test_demo_zoo_only_prints_the_line_to_export(demo_root, cli, monkeypatch):
    code, out, err = cli("demo", "--size", "small", "--root", demo_root, "--zoo-only")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("export DIVMERGE_ZOO="))
    assert (
        Path(shlex.split(line.removeprefix("export DIVMERGE_ZOO="))[0])
        == (demo_root / "zoo").resolve()
    )
    assert not (demo_root / "results.jsonl").exists()  # --zoo-only merges nothing
    monkeypatch.setenv("DIVMERGE_ZOO", shlex.split(line.split("=", 1)[1])[0])
    code, _, err = cli("validate", RECIPES / "divmerge.yaml")
    assert code == 0, err


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
    ada = _recipe("adamerging", divergence="kl")  # another method's parameter: ignored, warned
    assert "parameters.divergence: ignored; adamerging takes no divergence" in ada.warnings[0]
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
