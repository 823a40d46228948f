"""Every shipped recipe in recipes/ loads, validates against fixture models, and (data-free) runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
