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
