"""The results file: one JSON line per event, appended as a sweep goes, so that an interrupted
sweep resumes where it stopped and every table is a pure function of the lines.

Line types:
  {"type": "sweep", "eval": {...}, "seed": 0, "base_model": "..."}        written once, first
  {"type": "reference", "task": t, "expert": path, "score": s, ...}       each expert on its task
  {"type": "cell", "label": ..., "key": ..., "subset": [...], "anp": ...} one per finished cell
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..checkpoint import standard_json
from ..errors import UserError
from ..evaluate import anp
from ..hashing import hash_json
from ..tasks import TaskSpec
from .config import SweepConfig, build_recipe, method_key


def read_results(path: str | Path) -> list[dict]:
    """Every line of a results file. A torn last line (a crash while writing) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the write never finished
                break
            raise UserError(f"{path}:{i}: not a JSON line ({e.msg}); fix or remove it") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object per line")
        rows.append(row)
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last line so the next append starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_row(path: Path, row: dict) -> None:
    """One complete line per call, on disk before returning (a crash leaves whole lines only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(standard_json(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cell_row(
    label: str,
    key: str,
    merge_method: str,
    parameters: dict,
    subset: tuple[str, ...],
    scores: dict,
    refs: dict[str, float],
    seconds: float,
) -> dict:
    """One cell's line: its scores (evaluate.TaskScore per task) and ANP against `refs`."""
    plain = {t: s.score for t, s in scores.items()}
    return {
        "type": "cell",
        "label": label,
        "key": key,
        "merge_method": merge_method,
        "parameters": parameters,
        "subset": list(subset),
        "k": len(subset),
        "scores": plain,
        "metrics": {t: s.metric for t, s in scores.items()},
        "anp": anp(plain, {t: refs[t] for t in subset}),
        "seconds": round(seconds, 3),
    }


def cell_id(row: dict) -> tuple[str, str, tuple[str, ...]]:
    return row["label"], row["key"], tuple(row["subset"])


def cell_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("type", "cell") == "cell"]


def header_row(cfg: SweepConfig) -> dict:
    return {
        "type": "sweep",
        "eval": cfg.eval.model_dump(),
        "seed": cfg.seed,
        "base_model": str(cfg.base_model),
    }


def check_results_file(cfg: SweepConfig, rows: list[dict]) -> None:
    """A results file belongs to one base, eval setting and seed; tasks may be added to it."""
    where = f"{cfg.results} (from {cfg.source})"
    head = header_row(cfg)
    for row in rows:
        if row.get("type") == "sweep":
            for field in ("eval", "seed", "base_model"):
                if row.get(field) != head[field]:
                    raise UserError(
                        f"{where}: written with {field} = {row.get(field)!r}, the sweep file now "
                        f"says {head[field]!r}; use another `results:` file or delete this one"
                    )
        if row.get("type") == "reference" and row["task"] in cfg.tasks:
            t = row["task"]
            same_spec = row["spec"] in (
                spec_hash(cfg.tasks[t]),
                _spec_hash_with_nulls(cfg.tasks[t]),
            )
            if row["expert"] != str(cfg.experts[t]) or not same_spec:
                raise UserError(
                    f"{where}: task '{t}' was scored with another expert or task definition "
                    f"(experts.{t} / tasks.{t} changed); use another `results:` file"
                )


def spec_hash(spec: TaskSpec) -> str:
    """A task definition's hash. Unset fields are left out, so a field added later (`sha256`)
    does not make older results files look like another task's."""
    return hash_json(spec.model_dump(mode="json", exclude_none=True))[:16]


def _spec_hash_with_nulls(spec: TaskSpec) -> str:
    """The hash results files were written with while unset fields counted (as null)."""
    return hash_json(spec.model_dump(mode="json"))[:16]


def sweep_rows(cfg: SweepConfig, rows: list[dict] | None = None) -> list[dict]:
    """The results-file lines that belong to this sweep: its tasks' references, then its cells in
    cfg.cells() order (cells not run yet are absent; cells of other methods or parameters that
    share the file are left out, so tables never mix two settings under one label)."""
    rows = read_results(cfg.results) if rows is None else rows
    refs = [r for r in rows if r.get("type") == "reference" and r["task"] in cfg.tasks]
    done = {cell_id(r): r for r in rows if r.get("type") == "cell"}
    keys = [(lb, method_key(build_recipe(cfg, lb, s)), s) for lb, s in cfg.cells()]
    return refs + [done[k] for k in keys if k in done]
