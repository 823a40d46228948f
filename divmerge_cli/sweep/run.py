"""Running a sweep (paper Sec. 5.2-5.3): every cell (method, subset) not yet in the results file
is merged into a temporary folder, scored on the subset's tasks and normalized by the experts' own
scores (ANP, Eq. 5); its line is appended as soon as it is done.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..checkpoint import output_lock, remove_orphans, scratch_dir
from ..errors import UserError, suggest
from ..evaluate import evaluate_model
from ..lora import is_adapter
from ..merge import plan_merge, run_merge
from ..methods import METHODS
from ..optimize import run_optimized, state_dir_for
from ..recipe import Recipe
from .config import SweepConfig, build_recipe, check_checkpoints, method_key
from .results import (
    append_row,
    cell_id,
    cell_row,
    check_results_file,
    drop_torn_tail,
    header_row,
    read_results,
    spec_hash,
    sweep_rows,
)

# progress(phase, done, total, info). Sweep phases: "reference" (an expert is about to be
# scored), "start" (a cell begins), "cell" (a cell finished; info ends with its ANP), "skip"
# (a cell found in the results file). Optimized methods' own phases ("teacher", "optimize",
# "write") are passed through unchanged with their own done/total.
SweepProgress = Callable[[str, int, int, str], None]


def reference_scores(
    cfg: SweepConfig,
    rows: list[dict],
    cache_dir: Path | None = None,
    progress: SweepProgress | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Each expert's score on its own task: read from the results file, else measured and appended."""
    known = {r["task"]: r for r in rows if r.get("type") == "reference"}
    refs_read, refs = dict(known), {}
    for i, (t, expert) in enumerate(cfg.experts.items()):
        if t not in known:
            if progress:
                progress("reference", i, len(cfg.experts), t)
            e = cfg.eval
            # an adapter expert is scored on the sweep's base, not the one its config names
            model = f"{cfg.base_model}+{expert}" if is_adapter(expert) else expert
            s = evaluate_model(
                model,
                {t: cfg.tasks[t]},
                e.split,
                e.limit,
                e.batch_size,
                cfg.seed,
                cache_dir,
                device=device,
            )[t]
            known[t] = {
                "type": "reference",
                "task": t,
                "expert": str(expert),
                "spec": spec_hash(cfg.tasks[t]),
                "metric": s.metric,
                "score": s.score,
                "n": s.n,
            }
            append_row(cfg.results, known[t])
        refs[t] = float(known[t]["score"])
    if progress and len(known) > len(refs_read):  # the last expert scored: the phase ends
        progress("reference", len(cfg.experts), len(cfg.experts), "")
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
    only: Iterable[str] | None = None,
) -> list[dict]:
    """Run every cell not already in the results file (of the methods labelled in `only`, when
    given); return sweep_rows(cfg) (the references, then every finished cell of this sweep in
    cell order, whatever its method), ready for write_reports.

    `cache_dir` holds the experts' score cache (cache_dir/eval) and the teacher cache of
    optimized methods (cache_dir/teacher); None: no score cache, the default teacher cache.
    Merged models are written under `work_dir` (default: beside the results file, in
    <results stem>-merged/) and deleted after scoring unless `keep_merged`.
    """
    only = None if only is None else set(only)
    for label in only or ():
        if label not in cfg.methods:
            raise UserError(
                f"{cfg.source}: methods: no method labelled '{label}'{suggest(label, cfg.methods)};"
                f" labels: {', '.join(cfg.methods)}"
            )
    check_checkpoints(cfg)
    with output_lock(cfg.results, f"{cfg.source}: results"):  # two sweeps would do every cell
        return _run_cells(cfg, progress, cache_dir, work_dir, device, only)


def _run_cells(cfg, progress, cache_dir, work_dir, device, only) -> list[dict]:
    drop_torn_tail(cfg.results)
    rows = read_results(cfg.results)
    check_results_file(cfg, rows)
    if not any(r.get("type") == "sweep" for r in rows):
        append_row(cfg.results, header_row(cfg))
    eval_cache = Path(cache_dir) / "eval" if cache_dir else None
    refs = reference_scores(cfg, rows, eval_cache, progress, device)
    work = Path(work_dir) if work_dir else cfg.results.with_name(cfg.results.stem + "-merged")
    remove_orphans(work, "cell")  # merged models of cells a killed sweep was scoring
    done = {cell_id(r) for r in rows if r.get("type") == "cell"}
    cells = [c for c in cfg.cells() if only is None or c[0] in only]
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


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM);
    elsewhere a no-op, and peak_rss_mb answers None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> int | None:
    """This process's peak resident memory (MB) since the last reset_peak_rss, where Linux says."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


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
    start, cpu_start = time.perf_counter(), time.process_time()
    reset_peak_rss()
    work.mkdir(parents=True, exist_ok=True)
    if cfg.keep_merged:
        scratch, out = None, work / label / "+".join(subset)
    else:
        scratch = scratch_dir(work, "cell")
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
        merged_at, merge_peak = time.perf_counter() - start, peak_rss_mb()
        merge_cpu = time.process_time() - cpu_start  # unlike wall time, not counting a SIGSTOP
        e = cfg.eval
        specs = {t: cfg.tasks[t] for t in subset}
        scores = evaluate_model(out, specs, e.split, e.limit, e.batch_size, cfg.seed, device=device)
    except UserError as e:  # a merge that fails (NaN, a bad tensor) names its cell
        raise UserError(f"{cfg.source}: cell {label} {'+'.join(subset)}: {e}") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(state_dir_for(out), ignore_errors=True)  # optimizer state of a failed run
        for folder in (out.parent, work):  # made for this cell: a failed one leaves no folder
            _remove_if_empty(folder)
    row = cell_row(
        label,
        method_key(recipe),
        recipe.merge_method,
        cfg.methods[label].get("parameters", {}),
        subset,
        scores,
        refs,
        time.perf_counter() - start,
    )
    row["merge_seconds"] = round(merged_at, 3)
    row["merge_cpu_seconds"] = round(merge_cpu, 3)
    if merge_peak is not None:
        row["merge_peak_rss_mb"] = merge_peak
    if optimized:
        row["epochs"] = {k: summary[k] for k in ("epoch", "stopped", "evaluated_on", "curve")}
        row["steps"] = summary["steps"]
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
