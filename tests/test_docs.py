"""Docs say what is true for any reader: no folder of the machine the results ran on, and an
install line that gives a CPU-only user a CPU-only torch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# an absolute path into a machine's own folders (what the committed results used to name)
MACHINE_PATH = re.compile(r"(?<![\w$.])/(?:work|home|root|tmp|Users|mnt|data)/\w")


def test_results_name_no_machine_folder():
    files = [ROOT / "docs" / "RESULTS.md", *sorted((ROOT / "docs" / "results").iterdir())]
    texts = {f.name: f.read_text() for f in files if f.suffix in (".md", ".jsonl", ".json", ".csv")}
    assert len(texts) > 10
    hits = {n: m.group(0) for n, t in texts.items() if (m := MACHINE_PATH.search(t))}
    assert not hits
    assert "$ZOO/experts/" in texts["per_k5.jsonl"]  # the placeholder, not a dropped path
    commands = texts["RESULTS.md"].split("## Commands", 1)[1]
    assert "export ZOO=" in commands  # the commands define the placeholder they use


def test_report_writes_the_zoo_folder_as_a_placeholder():
    path = ROOT / "scripts" / "zoo" / "report.py"
    spec = importlib.util.spec_from_file_location("zoo_report_docs", path)
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    text = '{"expert": "/srv/zoo/experts/a", "base": "/srv/zoo", "other": "/srv/zoo2/x"}'
    assert rep.placeholder(text, "/srv/zoo") == (
        '{"expert": "$ZOO/experts/a", "base": "$ZOO", "other": "/srv/zoo2/x"}'
    )


def test_readme_installs_the_cpu_torch_for_cpu_users():
    readme = (ROOT / "README.md").read_text()
    installs = [ln for ln in readme.splitlines() if ln.startswith("pip install torch")]
    assert installs
    assert all("--index-url https://download.pytorch.org/whl/cpu" in ln for ln in installs)
    assert "keeps pip from pulling" not in readme  # the old claim, false on the public index


def _row(readme: str, start: str) -> str:
    return next(line for line in readme.splitlines() if line.startswith(start))


def test_readme_lists_every_run_option_and_data_free_parameter():
    import typer

    from divmerge_cli.cli import app
    from divmerge_cli.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    run = typer.main.get_command(app).commands["run"]
    row = _row(readme, "| `divmerge run ")
    named = [p.opts for p in run.params if p.opts[0].startswith("-")]
    shown = [o for opts in named for o in opts if re.search(rf"(?<![\w-]){o}(?![\w-])", row)]
    assert [opts for opts in named if not set(opts) & set(shown)] == []
    for name, m in METHODS.items():
        if not m.optimized:
            params = _row(readme, f"| `{name}` |").split("|")[2]
            assert [p for p in {**m.model_params, **m.global_params} if p not in params] == []
