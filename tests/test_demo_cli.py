"""`divmerge demo` (small, and once at its default size against README), and `divmerge sweep`
resuming the demo's finished cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

from divmerge_cli import sweep
from divmerge_cli.demo_zoo import read_manifest


def test_demo_small_runs_every_method_and_a_rerun_resumes(tmp_path, cli, monkeypatch):
    code, out, err = cli("demo", "--size", "small", "--root", tmp_path)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    cells = [r for r in rows if r["type"] == "cell"]
    assert sorted(r["label"] for r in cells) == sorted(
        ["average", "task_arithmetic", "ties", "adamerging_layer", "divmerge_js_layer"]
    )
    refs = {r["task"]: r["score"] for r in rows if r["type"] == "reference"}
    for r in cells:
        assert (
            r["k"] == 4 and abs(r["anp"] - sum(r["scores"][t] / refs[t] for t in refs) / 4) < 1e-9
        )
    assert "ANP" in out and (tmp_path / "tables.md").is_file()
    # `divmerge sweep` on the demo's sweep file finds every cell done and merges nothing
    monkeypatch.setattr(
        sweep.run, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-ran"))
    )
    code, out, err = cli("sweep", tmp_path / "demo_sweep.yaml", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "divmerge_js_layer" in out or "divmerge_js_l" in out

    # Results of another build of the zoo (or from before the zoo's build was recorded beside
    # them) are not shown as this zoo's: the demo drops them and recomputes.
    monkeypatch.undo()
    results = tmp_path / "results.jsonl"
    stale = [json.loads(x) for x in results.read_text().splitlines()]
    for r in stale:
        if r["type"] == "reference":
            r["score"] = 0.123
    results.write_text("".join(json.dumps(r) + "\n" for r in stale))
    (tmp_path / "results.jsonl.zoo").unlink(missing_ok=True)  # as a demo root of 0.1 has
    code, out, err = cli("demo", "--size", "small", "--root", tmp_path)
    assert code == 0, err
    assert "0.123" not in out and "results.jsonl: computed on another build of the zoo" in err
    again = [json.loads(x) for x in results.read_text().splitlines()]
    assert _numbers(again) == _numbers(rows)  # the same zoo's numbers, computed again


def _numbers(rows: list[dict]) -> list[tuple]:
    return [(r["type"], r.get("label"), r.get("task"), r.get("score"), r.get("anp")) for r in rows]


def test_sweep_bad_file_exits_2(tmp_path, cli):
    (tmp_path / "s.yaml").write_text("base_model: ./nowhere\nexperts: {}\n")
    code, _, err = cli("sweep", tmp_path / "s.yaml")
    assert code == 2 and "s.yaml" in err


README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (\w+) \| (\d+\.\d)-(\d+\.\d) \| ([^|]+) \|$")


def readme_ranges() -> dict[str, tuple[float, float]]:
    """The ANP % range README states for each method of the default demo."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("<!-- demo ranges -->") :].split("\n\n")[0]
    return {m[1]: (float(m[2]), float(m[3])) for m in map(ROW.match, table.splitlines()) if m}


def test_demo_default_holds_readme_ranking_and_ranges(tmp_path, cli):
    """The default demo as README's first command runs it (about a minute of CPU): every expert
    reaches its validation target, DivMerge leads, TIES beats averaging and task arithmetic, and
    each ANP is within 5 points of README's range (seen over seeds and CPU kernel sets), not one
    machine's digits."""
    code, out, err = cli("demo", "--root", tmp_path)
    assert code == 0, err
    assert "warning" not in err
    assert all(f["reached"] for f in read_manifest(tmp_path / "zoo")["experts"].values())
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert min(r["score"] for r in rows if r["type"] == "reference") >= 0.9
    anp = {r["label"]: 100 * r["anp"] for r in rows if r["type"] == "cell"}
    ranges = readme_ranges()
    assert set(ranges) == set(anp)
    for label, (lo, hi) in ranges.items():
        assert lo - 5 <= anp[label] <= hi + 5, (label, anp[label])
    others = [v for label, v in anp.items() if label != "divmerge_js_layer"]
    assert anp["divmerge_js_layer"] >= max(others) + 5
    assert anp["ties"] > max(anp["average"], anp["task_arithmetic"])
    # the table printed has the labels README shows
    assert all(f"│ {label} " in out for label in anp)
