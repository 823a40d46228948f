"""docs/ci.md's workflow, run step by step on the demo's tiny models: the gate passes, then fails
with exit 3 and one line per failed gate, and the merged folder is there for the artifact step."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from conftest import write_recipe

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ci.md"


def _workflow() -> dict:
    text = DOC.read_text()
    block = re.search(r"<!-- the workflow:.*?-->\n```yaml\n(.*?)```", text, re.S)
    assert block, "docs/ci.md: the workflow block is missing"
    return yaml.safe_load(block.group(1))


def _run(step: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-c", step["run"]], env=env, cwd=cwd, capture_output=True, text=True
    )


def test_ci_workflow_gate_passes_then_fails(demo_small, tmp_path):
    wf = _workflow()
    steps = wf["jobs"]["merge"]["steps"]
    names = [s.get("name") for s in steps]
    assert names[-4:] == ["validate", "merge and evaluate", "gate", "keep the merged model"]
    recipe = write_recipe(
        tmp_path / "merge.yaml",
        {
            "merge_method": "ties",  # the demo's TIES: ANP about 10 % on the small zoo, not 0
            "base_model": str(demo_small.base),
            "models": [{"model": str(p), "task": t} for t, p in demo_small.experts.items()],
            "tasks": str(demo_small.tasks_yaml),
            "parameters": {"density": 0.2, "lambda": 1.0},
        },
    )
    env = {
        **os.environ,
        **{k: str(v) for k, v in wf["env"].items()},
        "RECIPE": str(recipe),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / env["OUT"]
    env["MIN_ANP"], env["MIN_TASK"] = "0", "0"
    for step in steps[-4:-1]:  # validate, merge and evaluate, gate (install and checkout: CI's)
        res = _run(step, env, tmp_path)
        assert res.returncode == 0, (step["name"], res.stderr)
    report = json.loads((out / "eval.json").read_text())
    entry = report["models"][str(out.name)]
    gate = json.loads((out / "gate.json").read_text())
    assert [g["passed"] for g in gate["gates"]] == [True, True]
    assert gate["models"][str(out.name)]["anp"] == entry["anp"]  # same scores, from the cache
    assert entry["anp"] > 0

    # thresholds just above what this merge reached: both gates fail, exit 3, outputs kept
    env["MIN_ANP"] = f"{100 * entry['anp'] + 0.5:.2f}"
    env["MIN_TASK"] = f"{entry['tasks'][env['GATE_TASK']]['score'] + 0.01:.4f}"
    res = _run(steps[-2], env, tmp_path)
    assert res.returncode == 3, res.stderr
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("gate failed:")]
    assert len(failed) == 2 and f"is under {float(env['MIN_ANP']):g} %" in failed[0]
    gate = json.loads((out / "gate.json").read_text())
    assert [g["passed"] for g in gate["gates"]] == [False, False]
    keep = steps[-1]
    assert keep["if"] == "always()" and keep["with"]["path"] == "${{ env.OUT }}"
    assert (out / "config.json").is_file() and (out / "eval.json").is_file()
