"""Tables at 80 columns: names (methods, parameters, tasks, sweep labels) fold, never cut."""

from __future__ import annotations

import io
import re

import yaml
from rich.console import Console

from divmerge_cli import cli as cli_module
from divmerge_cli.demo import DEMO_METHODS
from divmerge_cli.sweep.tables import Table


def column(text: str, i: int) -> str:
    """Column i of a rendered rich table, its pieces on every line joined, whitespace dropped:
    a name folded over two lines reads whole again, one cut with an ellipsis does not."""
    parts = [re.split("[┃│]", line)[1:-1] for line in text.splitlines() if line[:1] in "┃│"]
    return "".join(re.sub(r"\s", "", p[i]) for p in parts if len(p) > i)


def test_methods_at_80_columns_shows_every_name_and_parameter_whole(cli, monkeypatch):
    from divmerge_cli.methods import METHODS

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("methods")
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert all(name in column(out, 0) for name in METHODS)
    params = column(out, 2)
    assert "normalize_weights=true" in params and "base_method=task_arithmetic" in params


def test_the_demo_per_k_table_at_80_columns_keeps_its_labels(monkeypatch):
    labels = list(DEMO_METHODS)
    t = Table("ANP (%) by number of merged tasks", ["k", *labels], [["Average", *[55.5] * 5]])
    buf = io.StringIO()
    Console(file=buf, width=80).print(cli_module._rich_table(t))
    text = buf.getvalue()
    assert "…" not in text
    assert [column(text, i + 1)[: len(label)] for i, label in enumerate(labels)] == labels


def test_eval_at_80_columns_keeps_a_long_task_name(toy, tmp_path, cli, monkeypatch):
    long = "sentiment_of_short_film_reviews_scored_by_accuracy"
    tasks = yaml.safe_load((toy / "tasks.yaml").read_text())
    spec = {k: str(toy / v) if k in ("validation", "test") else v for k, v in tasks["sent"].items()}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({long: spec}))
    monkeypatch.setenv("COLUMNS", "80")
    args = ("eval", toy / "sent", "--tasks", tmp_path / "t.yaml", "--cache-dir", tmp_path / "c")
    code, out, err = cli(*args, "--reference", f"{long}={toy / 'sent'}", "--divergence", "-q")
    assert code == 0, err
    assert "…" not in out and long in column(out, 0)
    assert f"JS/KL({long}expert)" in column(out, 0)
