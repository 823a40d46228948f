"""The output's divmerge_recipe.yaml reproduces the merge from any folder and pins every input by
its content hash, which `run` and `validate` check (issue 11, item 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import write_recipe
from divmerge_cli import cli as cli_module
from divmerge_cli.hashing import hash_file, hash_model_dir
from divmerge_cli.merge import plan_merge, reproducible_recipe
from divmerge_cli.recipe import load_recipe


def _project(tmp: Path, zoo: dict, **links: str) -> Path:
    """A folder holding a recipe with relative paths and the models it names (copies)."""
    proj = tmp / "proj"
    proj.mkdir()
    for name, key in links.items():
        shutil.copytree(zoo[key], proj / name)
    write_recipe(
        proj / "r.yaml",
        {
            "merge_method": "ties",
            "base_model": "./base",
            "models": [
                {"model": "./a", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": "b"},
            ],
            "parameters": {"lambda": 0.9},
        },
    )
    return proj


def test_output_recipe_reproduces_the_merge_from_any_folder(tmp_path, llama_zoo, cli, monkeypatch):
    proj = _project(tmp_path, llama_zoo, base="base", a="e0", b="e1")
    monkeypatch.chdir(proj)
    code, _, err = cli("run", "r.yaml", "-o", "out", "--threads", "2")  # hashed while importing
    assert code == 0, err
    saved = yaml.safe_load((proj / "out" / "divmerge_recipe.yaml").read_text())
    assert saved["base_model"] == str((proj / "base").resolve())
    assert saved["base_model_sha256"] == hash_model_dir(proj / "base")
    assert [m["model"] for m in saved["models"]] == [str(proj / "a"), str(proj / "b")]
    assert [m["sha256"] for m in saved["models"]] == [
        hash_model_dir(proj / "a"),
        hash_model_dir(proj / "b"),
    ]
    assert saved["models"][0]["parameters"] == {"weight": 0.7, "density": 0.5}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(proj / "out" / "divmerge_recipe.yaml", elsewhere / "again.yaml")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", elsewhere / "again.yaml", "-o", elsewhere / "out")
    assert code == 0, err
    a, b = (
        load_file(proj / "out" / "model.safetensors"),
        load_file(elsewhere / "out" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_input_is_named_by_validate_and_run(tmp_path, llama_zoo, cli, monkeypatch):
    proj = _project(tmp_path, llama_zoo, base="base", a="e0", b="e1")
    monkeypatch.chdir(proj)
    assert cli("run", "r.yaml", "-o", "out")[0] == 0
    pinned = proj / "out" / "divmerge_recipe.yaml"
    config = json.loads((proj / "b" / "config.json").read_text())
    (proj / "b" / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    for args in (["validate", pinned], ["run", pinned, "-o", tmp_path / "o2", "--threads", "2"]):
        code, _, err = cli(*args)
        assert code == 2 and "models[1].sha256: " in err and "changed since" in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    shutil.rmtree(proj / "base")
    shutil.copytree(llama_zoo["e2"], proj / "base")  # another model under the same name
    code, _, err = cli("validate", pinned)
    assert code == 2 and "base_model_sha256: " in err, err


def test_the_early_hash_starts_on_every_folder_the_recipe_names(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "base_model": "base",
                "models": [{"model": "/abs/a"}, "b", {"model": 3}],
                "slices": [{"sources": [{"model": "c", "layer_range": [0, 2]}], "base_model": "d"}],
            }
        )
    )
    want = [tmp_path / "base", Path("/abs/a"), tmp_path / "d", tmp_path / "c"]
    assert sorted(cli_module._recipe_folders(r)) == sorted(want)
    for text in ("- a list", "models: 3", "{{{ not yaml"):
        r.write_text(text)
        assert cli_module._recipe_folders(r) == []  # load_recipe reports these
    assert cli_module._recipe_folders(tmp_path / "missing.yaml") == []


def test_a_hash_that_is_not_a_digest_is_refused(tmp_path, llama_zoo, cli):
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_zoo["base"]),
            "models": [{"model": str(llama_zoo["e0"]), "sha256": "abc"}],
        },
    )
    code, _, err = cli("validate", r)
    assert code == 2 and "models[0].sha256" in err, err


def test_pinned_task_data_is_checked(tmp_path, llama_zoo, cli):
    data = tmp_path / "data"
    data.mkdir()
    for t in ("a", "b"):
        (data / f"{t}.jsonl").write_text('{"text": "the film was great", "label": "positive"}\n')
    (tmp_path / "tasks.yaml").write_text(
        yaml.safe_dump(
            {t: {"validation": f"data/{t}.jsonl", "prompt": "Review: {text}"} for t in ("a", "b")}
        )
    )
    recipe = {
        "merge_method": "adamerging",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo[e]), "task": t} for e, t in (("e0", "a"), ("e1", "b"))],
        "tasks": "tasks.yaml",
    }
    plan = plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    pinned = yaml.safe_load(reproducible_recipe(plan))
    assert pinned["tasks"]["a"]["validation"] == str(data / "a.jsonl")
    assert pinned["tasks"]["a"]["sha256"] == {"validation": hash_file(data / "a.jsonl")}
    out = tmp_path / "out"
    out.mkdir()
    write_recipe(out / "pinned.yaml", pinned)
    code, _, err = cli("validate", out / "pinned.yaml")
    assert code == 0, err
    with open(data / "b.jsonl", "a") as f:
        f.write('{"text": "dull", "label": "negative"}\n')
    code, _, err = cli("validate", out / "pinned.yaml")
    assert code == 2 and "tasks.b.sha256.validation expects" in err, err
