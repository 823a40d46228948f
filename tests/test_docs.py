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
