"""Sweeps (paper Sec. 5.2-5.3): every k-subset of tasks x every method -> merge -> scores -> ANP.

A sweep file names one base, one expert per task, the tasks, the subset sizes k and the methods.
Each cell (method, subset) is merged into a temporary folder, scored on the subset's tasks and
normalized by the experts' own scores (ANP, Eq. 5). One JSON line per finished cell is appended
to the results file, so an interrupted sweep resumes where it stopped. Tables 3/6/7 and Figures
2/7 are pure functions of those lines.

Line types of the results file:
  {"type": "sweep", "eval": {...}, "seed": 0, "base_model": "..."}        written once, first
  {"type": "reference", "task": t, "expert": path, "score": s, ...}       each expert on its task
  {"type": "cell", "label": ..., "key": ..., "subset": [...], "anp": ...} one per finished cell
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .checkpoint import open_checkpoint
from .errors import UserError, pydantic_message, read_yaml, suggest
from .evaluate import anp, evaluate_model
from .hashing import hash_json
from .merge import check_compatible, plan_merge, run_merge
from .methods import METHODS
from .optimize import run_optimized, state_dir_for
from .recipe import Recipe, optimize_params, recipe_from_dict
from .tasks import TaskSpec, check_task, load_tasks

# progress(phase, done, total, info). Sweep phases: "reference" (an expert is about to be
# scored), "start" (a cell begins), "cell" (a cell finished; info ends with its ANP), "skip"
# (a cell found in the results file). Optimized methods' own phases ("teacher", "optimize",
# "write") are passed through unchanged with their own done/total.
SweepProgress = Callable[[str, int, int, str], None]

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used as a folder name under work_dir
Z95 = 1.96  # 95% CI half-width = Z95 * std / sqrt(n): normal approximation, not a t-interval


# ----------------------------------------------------------------------------- schema


class MethodEntry(BaseModel):
    """One column of the tables: the recipe fields every cell of this method shares."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["validation", "test"] = "test"
    limit: PositiveInt | None = None  # labelled rows per task (seeded sample); None = all
    batch_size: PositiveInt = 16


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: dict[str, str] = Field(min_length=1)  # task -> fine-tuned checkpoint folder
    tasks: Any  # inline mapping or a YAML file, as in recipes
    k: Any = Field(default_factory=lambda: [2])  # int, list of ints, or "a..b"
    subsets_per_k: PositiveInt | None = None  # a seeded sample of at most this many per k
    methods: dict[str, MethodEntry] = Field(min_length=1)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    results: str = "results.jsonl"
    seed: int = 0
    keep_merged: bool = False


def _fields_at(parent: tuple) -> list[str]:
    """The valid keys under a location (methods.<label> and eval have their own)."""
    if parent[:1] == ("methods",):
        return list(MethodEntry.model_fields)
    if parent[:1] == ("eval",):
        return list(EvalSettings.model_fields)
    return list(SweepFile.model_fields)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: absolute paths, tasks in file order, one recipe template per method."""

    source: Path
    base_model: Path
    experts: dict[str, Path]  # in the tasks' order
    tasks: dict[str, TaskSpec]
    ks: list[int]
    methods: dict[str, dict]  # label -> recipe fields (merge_method, parameters, dtype, ...)
    eval: EvalSettings
    results: Path
    seed: int = 0
    keep_merged: bool = False
    subsets_per_k: int | None = None

    def cells(self) -> list[tuple[str, tuple[str, ...]]]:
        """(label, subset) for every k, every subset (itertools.combinations order), every method."""
        return [(label, s) for s in self.subsets() for label in self.methods]

    def subsets(self) -> list[tuple[str, ...]]:
        """Every k-subset in itertools.combinations order, or a seeded sample of `subsets_per_k`
        of them (kept in that order; the same for a given seed, k and task list)."""
        names = list(self.tasks)
        out = []
        for k in self.ks:
            combos = list(itertools.combinations(names, k))
            n = self.subsets_per_k
            if n is not None and n < len(combos):
                keep = random.Random(f"{self.seed}:{k}:{','.join(names)}").sample(
                    range(len(combos)), n
                )
                combos = [combos[i] for i in sorted(keep)]
            out += combos
        return out


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file. Raises UserError naming the file and the field at fault."""
    path = Path(path)
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file must be a YAML mapping (base_model, experts, ...)")
    return sweep_from_dict(raw, path)


def sweep_from_dict(raw: dict, source: Path) -> SweepConfig:
    """Validate a sweep mapping; relative paths resolve against `source`'s folder."""
    source = Path(source)
    try:
        f = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {pydantic_message(e, _fields_at)}") from None
    folder = source.parent
    tasks = load_tasks(f.tasks, folder, str(source))
    if not tasks:
        raise UserError(f"{source}: tasks: no tasks defined")
    try:
        ks = parse_k(f.k, len(tasks))
    except ValueError as e:
        raise UserError(f"{source}: k: {e}") from None
    base = _existing(folder, f.base_model, source, "base_model")
    experts = _experts(f.experts, tasks, folder, source)
    for t, spec in tasks.items():
        check_task(t, spec, f.eval.split)  # labelled rows exist and render, before any merge
    cfg = SweepConfig(
        source=source,
        base_model=base,
        experts=experts,
        tasks=tasks,
        ks=ks,
        methods={label: m.model_dump(exclude_none=True) for label, m in f.methods.items()},
        eval=f.eval,
        results=(folder / f.results).resolve(),
        seed=f.seed,
        keep_merged=f.keep_merged,
        subsets_per_k=f.subsets_per_k,
    )
    for label, fields in cfg.methods.items():
        if not LABEL.match(label):
            raise UserError(
                f"{source}: methods.{label}: a label names a folder; use letters, digits, _ . -"
            )
        # Build the first subset's recipe for each k: a bad method, parameter or arity
        # (slerp takes two models) is reported now, not after hours of other cells.
        for k in ks:
            build_recipe(cfg, label, tuple(tasks)[:k])
        if METHODS[fields["merge_method"]].optimized:
            for t, spec in tasks.items():
                check_task(t, spec, "validation")  # the unlabelled inputs Gamma is learned on
    return cfg


def check_checkpoints(cfg: SweepConfig) -> None:
    """Base and experts fit together (architecture, tensor names, shapes); headers only."""
    base = open_checkpoint(str(cfg.base_model), f"{cfg.source}: base_model")
    experts = [
        open_checkpoint(str(p), f"{cfg.source}: experts.{t}") for t, p in cfg.experts.items()
    ]
    check_compatible(base, experts)


def parse_k(value: Any, n_tasks: int) -> list[int]:
    """`2`, `[2, 3]` or `"2..5"` -> sorted distinct subset sizes, each in [1, n_tasks]."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, a list of integers or 'a..b', got {value!r}")
    if isinstance(value, int):
        ks = [value]
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"'{value}' is not a range; write e.g. '2..5' (both ends included)")
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise ValueError(f"'{value}' is empty; the first end must be <= the second")
        ks = list(range(lo, hi + 1))
    elif isinstance(value, list) and value and all(type(x) is int for x in value):
        ks = value
    else:
        raise ValueError(f"expected an integer, a list of integers or 'a..b', got {value!r}")
    for k in ks:
        if not 1 <= k <= n_tasks:
            raise ValueError(
                f"{k} is out of range; there are {n_tasks} tasks, so k must be in [1, {n_tasks}]"
            )
    return sorted(set(ks))


def build_recipe(cfg: SweepConfig, label: str, subset: tuple[str, ...]) -> Recipe:
    """The recipe of one cell: the subset's experts (with `task:`) and tasks, the method's fields,
    the base for methods that read theta0. Errors name the sweep file and methods.<label>."""
    method = METHODS.get(cfg.methods[label]["merge_method"])  # unknown: recipe_from_dict says so
    raw = {
        **cfg.methods[label],
        # linear reads no theta0; given a base_model it would average the base in as one more
        # model (mergekit), but the paper's "model averaging" is the mean of the experts.
        **({"base_model": str(cfg.base_model)} if not method or method.uses_base else {}),
        "models": [{"model": str(cfg.experts[t]), "task": t} for t in subset],
        "tasks": {t: cfg.tasks[t].model_dump(mode="json", exclude_none=True) for t in subset},
    }
    try:
        return recipe_from_dict(raw, cfg.source)
    except UserError as e:
        msg = str(e).removeprefix(f"{cfg.source}: ")
        at = f" (subset {'+'.join(subset)})" if msg.startswith("models") else ""
        raise UserError(f"{cfg.source}: methods.{label}: {msg}{at}") from None


def method_key(recipe: Recipe) -> str:
    """A hash of what the method computes: its name, dtypes and parameters with defaults filled
    in, so `lambda: 1` and `lambda: 1.0` (or an explicit default) name the same cells."""
    spec = METHODS[recipe.merge_method]
    if spec.optimized:
        params = optimize_params(recipe).model_dump(mode="json")
    else:
        params = {**spec.global_params, **recipe.model_dump(mode="json")["parameters"]}
    fields = {
        "merge_method": recipe.merge_method,
        "parameters": params,
        "dtype": recipe.dtype,
        "out_dtype": recipe.out_dtype,
    }
    return hash_json(fields)[:16]


def _experts(
    given: dict[str, str], tasks: dict[str, TaskSpec], folder: Path, source: Path
) -> dict[str, Path]:
    """One existing expert folder per task, in the tasks' order; no expert without a task."""
    for t in given:
        if t not in tasks:
            raise UserError(
                f"{source}: experts.{t}: no task '{t}' under tasks{suggest(t, tasks)}; "
                f"tasks: {', '.join(tasks)}"
            )
    missing = [t for t in tasks if t not in given]
    if missing:
        raise UserError(
            f"{source}: experts: no expert for task '{missing[0]}'; each task needs the "
            "checkpoint fine-tuned on it (or remove the task)"
        )
    return {t: _existing(folder, given[t], source, f"experts.{t}") for t in tasks}


def _existing(folder: Path, ref: str, source: Path, field: str) -> Path:
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else folder / p
    if not p.is_dir():
        raise UserError(
            f"{source}: {field}: folder not found: {p} (sweeps need local checkpoint folders; "
            "paths are relative to the sweep file)"
        )
    return p.resolve()


# ----------------------------------------------------------------------------- results file


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


def _drop_torn_tail(path: Path) -> None:
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
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cell_id(row: dict) -> tuple[str, str, tuple[str, ...]]:
    return row["label"], row["key"], tuple(row["subset"])


def _header(cfg: SweepConfig) -> dict:
    return {
        "type": "sweep",
        "eval": cfg.eval.model_dump(),
        "seed": cfg.seed,
        "base_model": str(cfg.base_model),
    }


def _check_compatible(cfg: SweepConfig, rows: list[dict]) -> None:
    """A results file belongs to one base, eval setting and seed; tasks may be added to it."""
    where = f"{cfg.results} (from {cfg.source})"
    head = _header(cfg)
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
            if row["expert"] != str(cfg.experts[t]) or row["spec"] != _spec_hash(cfg.tasks[t]):
                raise UserError(
                    f"{where}: task '{t}' was scored with another expert or task definition "
                    f"(experts.{t} / tasks.{t} changed); use another `results:` file"
                )


def _spec_hash(spec: TaskSpec) -> str:
    return hash_json(spec.model_dump(mode="json"))[:16]


# ----------------------------------------------------------------------------- running


def reference_scores(
    cfg: SweepConfig,
    rows: list[dict],
    cache_dir: Path | None = None,
    progress: SweepProgress | None = None,
) -> dict[str, float]:
    """Each expert's score on its own task: read from the results file, else measured and appended."""
    known = {r["task"]: r for r in rows if r.get("type") == "reference"}
    refs = {}
    for i, (t, expert) in enumerate(cfg.experts.items()):
        if t not in known:
            if progress:
                progress("reference", i, len(cfg.experts), t)
            e = cfg.eval
            s = evaluate_model(
                expert, {t: cfg.tasks[t]}, e.split, e.limit, e.batch_size, cfg.seed, cache_dir
            )[t]
            known[t] = {
                "type": "reference",
                "task": t,
                "expert": str(expert),
                "spec": _spec_hash(cfg.tasks[t]),
                "metric": s.metric,
                "score": s.score,
                "n": s.n,
            }
            append_row(cfg.results, known[t])
        refs[t] = float(known[t]["score"])
    zero = [t for t, s in refs.items() if s == 0]
    if zero:
        raise UserError(
            f"{cfg.source}: experts.{zero[0]} scores 0 on its own task '{zero[0]}' "
            f"({cfg.eval.split} split), so ANP (score / expert's score) is undefined; check the "
            f"expert, the task's prompt/target/metric, or raise eval.limit"
        )
    return refs


def run_sweep(
    cfg: SweepConfig,
    progress: SweepProgress | None = None,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Run every cell not already in the results file; return sweep_rows(cfg) (the references,
    then every cell of this sweep in cell order), ready for write_reports.

    `cache_dir` holds the experts' score cache (cache_dir/eval) and the teacher cache of
    optimized methods (cache_dir/teacher); None: no score cache, the default teacher cache.
    Merged models are written under `work_dir` (default: beside the results file, in
    <results stem>-merged/) and deleted after scoring unless `keep_merged`.
    """
    check_checkpoints(cfg)
    _drop_torn_tail(cfg.results)
    rows = read_results(cfg.results)
    _check_compatible(cfg, rows)
    if not any(r.get("type") == "sweep" for r in rows):
        append_row(cfg.results, _header(cfg))
    eval_cache = Path(cache_dir) / "eval" if cache_dir else None
    refs = reference_scores(cfg, rows, eval_cache, progress)
    work = Path(work_dir) if work_dir else cfg.results.with_name(cfg.results.stem + "-merged")
    done = {cell_id(r) for r in rows if r.get("type") == "cell"}
    cells = cfg.cells()
    for i, (label, subset) in enumerate(cells):
        recipe = build_recipe(cfg, label, subset)
        name = f"{label} {'+'.join(subset)}"
        if (label, method_key(recipe), subset) in done:
            if progress:
                progress("skip", i + 1, len(cells), name)
            continue
        if progress:
            progress("start", i, len(cells), name)
        row = run_cell(cfg, label, subset, recipe, refs, work, cache_dir, device, progress)
        append_row(cfg.results, row)
        if progress:
            progress("cell", i + 1, len(cells), f"{name}: ANP {100 * row['anp']:.2f}")
    _remove_if_empty(work)
    return sweep_rows(cfg)


def sweep_rows(cfg: SweepConfig, rows: list[dict] | None = None) -> list[dict]:
    """The results-file lines that belong to this sweep: its tasks' references, then its cells in
    cfg.cells() order (cells not run yet are absent; cells of other methods or parameters that
    share the file are left out, so tables never mix two settings under one label)."""
    rows = read_results(cfg.results) if rows is None else rows
    refs = [r for r in rows if r.get("type") == "reference" and r["task"] in cfg.tasks]
    done = {cell_id(r): r for r in rows if r.get("type") == "cell"}
    keys = [(lb, method_key(build_recipe(cfg, lb, s)), s) for lb, s in cfg.cells()]
    return refs + [done[k] for k in keys if k in done]


def run_cell(
    cfg: SweepConfig,
    label: str,
    subset: tuple[str, ...],
    recipe: Recipe,
    refs: dict[str, float],
    work: Path,
    cache_dir: Path | None = None,
    device: str = "cpu",
    progress: SweepProgress | None = None,
) -> dict:
    """Merge one subset with one method, score it on the subset's tasks, and return its row."""
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if cfg.keep_merged:
        scratch, out = None, work / label / "+".join(subset)
    else:
        scratch = Path(tempfile.mkdtemp(prefix=".cell-", dir=work))
        out = scratch / "merged"
    optimized = METHODS[recipe.merge_method].optimized
    try:
        if optimized:
            teacher = Path(cache_dir) / "teacher" if cache_dir else None
            summary = run_optimized(
                plan_merge(recipe),
                out,
                force=True,
                seed=cfg.seed,
                device=device,
                cache_dir=teacher,
                progress=progress,
            )
            log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x]
        else:
            run_merge(plan_merge(recipe), out, force=True, seed=cfg.seed, device=device)
        e = cfg.eval
        specs = {t: cfg.tasks[t] for t in subset}
        scores = evaluate_model(out, specs, e.split, e.limit, e.batch_size, cfg.seed)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(state_dir_for(out), ignore_errors=True)  # optimizer state of a failed run
    row = {
        "type": "cell",
        "label": label,
        "key": method_key(recipe),
        "merge_method": recipe.merge_method,
        "parameters": cfg.methods[label].get("parameters", {}),
        "subset": list(subset),
        "k": len(subset),
        "scores": {t: s.score for t, s in scores.items()},
        "metrics": {t: s.metric for t, s in scores.items()},
        "anp": anp({t: s.score for t, s in scores.items()}, {t: refs[t] for t in subset}),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if optimized:
        row["groups"] = summary["groups"]
        row["gamma"] = dict(zip(summary["tasks"], summary["gamma"]))
        row["trace"] = [{"step": x["step"], "loss": x["loss"], "gamma": x["gamma"]} for x in log]
    if cfg.keep_merged:
        row["merged"] = str(out)
    return row


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # absent, or holds kept models


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float | None  # sample std (n - 1 denominator); None for a single cell
    ci95: float | None  # Z95 * std / sqrt(n), normal approximation


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]  # str / int / float (ANP in %) / None (no cell)


def stats(values: list[float]) -> Stats:
    n = len(values)
    if n < 2:
        return Stats(n, values[0], None, None)
    sd = statistics.stdev(values)
    return Stats(n, statistics.fmean(values), sd, Z95 * sd / math.sqrt(n))


def cell_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("type", "cell") == "cell"]


def summarize(rows: Iterable[dict]) -> dict[str, dict[int, Stats]]:
    """label -> k -> Stats of ANP (%) over that k's subsets. Labels in order of first appearance."""
    groups: dict[str, dict[int, list[float]]] = {}
    for r in cell_rows(rows):
        groups.setdefault(r["label"], {}).setdefault(int(r["k"]), []).append(100 * r["anp"])
    return {label: {k: stats(v) for k, v in sorted(by_k.items())} for label, by_k in groups.items()}


def pairwise_table(rows: Iterable[dict]) -> Table:
    """Table 3: per method, mean, std and 95% CI of ANP (%) over all pairwise (k = 2) merges."""
    out = [
        [label, s.n, s.mean, s.std, s.ci95]
        for label, by_k in summarize(rows).items()
        if (s := by_k.get(2))
    ]
    return Table(
        "Pairwise merges: ANP (%) over task pairs (paper Table 3)",
        ["method", "pairs", "mean", "std", "ci95"],
        out,
    )


def per_k_table(rows: Iterable[dict]) -> Table:
    """Tables 6/7: mean ANP (%) over subsets per k (rows) and method (columns), plus "Average",
    the unweighted mean of a method's per-k means (as the paper's tables: e.g. Table 7's model
    averaging, (97.92 + 82.62 + 53.38) / 3 = 77.97)."""
    summary = summarize(rows)
    labels = list(summary)
    ks = sorted({k for by_k in summary.values() for k in by_k})
    body: list[list[Any]] = [
        [k, *[summary[m][k].mean if k in summary[m] else None for m in labels]] for k in ks
    ]
    avg = [statistics.fmean(s.mean for s in summary[m].values()) for m in labels]
    return Table(
        "ANP (%) by number of merged tasks (paper Tables 6, 7)",
        ["k", *labels],
        [*body, ["Average", *avg]] if ks else [],
    )


def references_table(rows: Iterable[dict]) -> Table:
    refs = [r for r in rows if r.get("type") == "reference"]
    return Table(
        "Experts on their own task (the ANP denominators)",
        ["task", "metric", "score", "n", "expert"],
        [[r["task"], r["metric"], 100 * r["score"], r["n"], r["expert"]] for r in refs],
    )


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured markdown table under a bold title (floats to 2 decimals, "-" = no cell)."""
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    if not table.rows:
        lines.append("| " + " | ".join("-" for _ in table.columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with full precision (empty field = no cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    for row in table.rows:
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


# ----------------------------------------------------------------------------- reports


def write_reports(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """tables.md, pairwise.csv, per_k.csv and, when matplotlib is importable, anp_vs_k.png
    (Figure 2) and gamma_trace.png (Figure 7, if any optimized cell has a trace).
    Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"pairwise": pairwise_table(rows), "per_k": per_k_table(rows)}
    md = [to_markdown(t) for t in tables.values()]
    refs = references_table(rows)
    if refs.rows:
        md.append(to_markdown(refs))
    note = (
        f"ANP in %. std: sample standard deviation over subsets; ci95: {Z95} x std / sqrt(n) "
        "(normal approximation). Average: mean of the per-k means.\n"
    )
    written = [out / "tables.md"]
    written[0].write_text("\n".join(md) + "\n" + note)
    for name, t in tables.items():
        (out / f"{name}.csv").write_text(to_csv(t))
        written.append(out / f"{name}.csv")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return written
    cells = cell_rows(rows)
    if cells:
        written.append(
            _plot_anp_vs_k(summarize(cells), out / "anp_vs_k.png", Figure, FigureCanvasAgg)
        )
    traced = [r for r in cells if r.get("trace")]
    if traced:
        written.append(_plot_gamma(traced, out / "gamma_trace.png", Figure, FigureCanvasAgg))
    return written


def _plot_anp_vs_k(summary: dict[str, dict[int, Stats]], path: Path, Figure, Canvas) -> Path:
    """Figure 2: mean ANP vs number of merged tasks, error bars = 95% CI over subsets."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    for i, (label, by_k) in enumerate(summary.items()):
        ks = list(by_k)
        ax.errorbar(
            ks,
            [by_k[k].mean for k in ks],
            yerr=[by_k[k].ci95 or 0.0 for k in ks],
            marker="osD^v"[i // 10 % 5],  # the color cycle repeats after 10 series
            linestyle=("-", "--")[i // 10 % 2],
            capsize=3,
            label=label,
        )
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("ANP (%)")
    ax.set_xticks(sorted({k for by_k in summary.values() for k in by_k}))
    ax.set_title(f"Mean ANP over subsets, 95% CI ({Z95} std/sqrt(n))", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # keeps the curves clear
    fig.savefig(path, dpi=120)
    return path


def _plot_gamma(rows: list[dict], path: Path, Figure, Canvas) -> Path:
    """Figure 7: Gamma of the i-th task of each subset over optimizer steps (mean over groups),
    one panel per (method, position): the pairwise cells, else the smallest k with a trace."""
    from matplotlib.ticker import MaxNLocator

    ks = {r["k"] for r in rows}
    k = 2 if 2 in ks else min(ks)
    rows = [r for r in rows if r["k"] == k]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig = Figure(figsize=(4 * k, 3 * len(labels)), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(len(labels), k, squeeze=False)
    for li, label in enumerate(labels):
        for r in (r for r in rows if r["label"] == label):
            steps = [x["step"] for x in r["trace"]]
            for j in range(k):
                ys = [statistics.fmean(x["gamma"][j]) for x in r["trace"]]
                axes[li][j].plot(steps, ys, label="+".join(r["subset"]))
        for j in range(k):
            ax = axes[li][j]
            ax.set_title(f"{label}: Gamma of task {j + 1} (mean over groups)", fontsize=8)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[li][k - 1].legend(fontsize=6)
    fig.savefig(path, dpi=120)
    return path
