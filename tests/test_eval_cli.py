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
