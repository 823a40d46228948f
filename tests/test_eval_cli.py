"""`divmerge eval`: scores per task, ANP against the experts from a recipe, JSON, divergences."""

from __future__ import annotations

import json
import math

from conftest import TASKS, write_recipe
from divmerge_cli.evaluate import evaluate_model
from divmerge_cli.tasks import load_tasks


def _recipe(toy, tmp_path):
    return write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n), "task": n} for n in TASKS],
            "tasks": str(toy / "tasks.yaml"),
        },
    )


def test_eval_scores_anp_and_json(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, out, err = cli(
        "eval",
        toy / "sent",
        toy / "base",
        "--tasks",
        r,
        "--json",
        tmp_path / "s.json",
        "--cache-dir",
        tmp_path / "cache",
        "--divergence",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    sent = report["models"][str(toy / "sent")]
    specs = load_tasks(str(toy / "tasks.yaml"), toy, "tasks.yaml")
    direct = evaluate_model(toy / "sent", specs)
    assert {t: s["score"] for t, s in sent["tasks"].items()} == {
        t: s.score for t, s in direct.items()
    }
    refs = {t: report["references"][t]["score"] for t in TASKS}
    expect = sum(sent["tasks"][t]["score"] / refs[t] for t in TASKS) / 2
    assert abs(sent["anp"] - expect) < 1e-12
    assert (
        sent["tasks"]["sent"]["score"] == refs["sent"]
    )  # the sentiment expert is its own reference
    # the expert diverges from itself by ~0 on its own task and from the base by more
    assert sent["divergence"]["sent"]["js"] < 1e-6
    assert sent["divergence"]["sent"]["kl"] < 1e-6
    base = report["models"][str(toy / "base")]["divergence"]["sent"]
    assert base["js"] > 1e-3 and base["kl"] > 1e-3
    assert base["js"] <= math.log(2) and base["kl"] != base["js"]  # two objectives, one pass
    assert "ANP" in out


def test_eval_errors(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, _, err = cli("eval", tmp_path / "nope", "--tasks", r)
    assert code == 2 and "not a Hugging Face model folder" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--reference", "zzz=/x")
    assert code == 2 and "TASK=PATH" in err
    code, _, err = cli("eval", toy / "base", "--tasks", tmp_path / "missing.yaml")
    assert code == 2 and "file not found" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--split", "train")
    assert code == 2 and "--split" in err


def _pickled(src, dst, zip_format: bool):
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    return dst


def test_eval_loads_pickled_models_only_with_allow_pickle(toy, tmp_path, cli):
    """As `run`: a .bin-only model needs --allow-pickle; an old non-zip .bin is refused clearly."""
    model = _pickled(toy / "sent", tmp_path / "bin", zip_format=True)
    args = ("eval", model, "--tasks", toy / "tasks.yaml", "--cache-dir", tmp_path / "c")
    code, _, err = cli(*args, "--json", tmp_path / "a.json")
    assert code == 2 and "--allow-pickle" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.json").exists()
    code, _, err = cli(*args, "--json", tmp_path / "a.json", "--allow-pickle")
    assert code == 0, err
    got = json.loads((tmp_path / "a.json").read_text())["models"][str(model)]["tasks"]
    direct = evaluate_model(toy / "sent", load_tasks(str(toy / "tasks.yaml"), toy, "t"))
    assert {t: s["score"] for t, s in got.items()} == {t: s.score for t, s in direct.items()}
    old = _pickled(toy / "sent", tmp_path / "old", zip_format=False)
    code, _, err = cli("eval", old, "--tasks", toy / "tasks.yaml", "--allow-pickle")
    assert code == 2 and "old (non-zip) format" in err and "Traceback" not in err, err


def test_run_refuses_an_old_format_bin_with_the_same_message(toy, tmp_path, cli):
    old = _pickled(toy / "sent", tmp_path / "old", zip_format=False)
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [{"model": str(old)}],
        },
    )
    code, _, err = cli("run", r, "-o", tmp_path / "out", "--allow-pickle")
    assert code == 2 and "old (non-zip) format" in err and "re-save it" in err, err
