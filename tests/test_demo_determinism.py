"""`divmerge demo` prints the same numbers on a rerun on the same machine: the zoo is rebuilt to
the same bytes, and the merges, teachers and scores repeat exactly (seeded, one thread)."""

from __future__ import annotations

import json
import shutil

from divmerge_cli.demo_zoo import build_zoo
from divmerge_cli.hashing import hash_model_dir


def _models(zoo):
    return [zoo.base, *zoo.experts.values()]


def _numbers(rows: list[dict]) -> list:
    """What a run computed, without paths and wall times."""
    keep = ("type", "label", "k", "tasks", "task", "score", "scores", "anp", "gamma", "n")
    return [{k: r[k] for k in keep if k in r} for r in rows]


def test_demo_small_rerun_gives_the_same_numbers(demo_small, tmp_path, cli):
    fresh = build_zoo(tmp_path / "fresh" / "zoo", size="small")
    assert [hash_model_dir(p) for p in _models(fresh)] == [
        hash_model_dir(p) for p in _models(demo_small)
    ]
    tables, numbers = [], []
    for run in ("r1", "r2"):  # each run: its own teacher and score caches, the same zoo
        shutil.copytree(demo_small.root, tmp_path / run / "zoo")
        code, out, err = cli("demo", "--size", "small", "--root", tmp_path / run)
        assert code == 0, err
        tables.append(out[out.index("demo: score") : out.rindex("zoo:")])  # no paths
        rows = (tmp_path / run / "results.jsonl").read_text().splitlines()
        numbers.append(_numbers([json.loads(x) for x in rows]))
    assert tables[0] == tables[1] and "ANP" in tables[0]
    assert numbers[0] == numbers[1]
    assert any("gamma" in r for r in numbers[0])  # the learned merges' coefficients compared too
