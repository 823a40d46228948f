"""Evaluation reports: what `divmerge eval` and `run --eval` print and write to JSON, as data.

Each model's scores on divmerge tasks and lm-eval tasks, normalized by the experts' (references')
scores, its ANP (Eq. 5), and optionally the JS / KL of each expert to it. The CLI draws the tables
and bars; this module only computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .checkpoint import check_weights_readable
from .errors import UserError, read_yaml
from .evaluate import Gate, anp, evaluate_model, labelled_rows, normalized, parse_gates
from .harness import HarnessTasks, harness_scores, only, resolve_tasks
from .methods import OPTIMIZE_DEFAULTS
from .models import model_folder, scored_model
from .optimize import model_divergences
from .recipe import Recipe, load_recipe
from .tasks import TaskSpec, load_tasks, task_files
from .teacher import default_cache_dir, teacher_samples


@dataclass(frozen=True)
class EvalOptions:
    """How every model is scored: the labelled split, at most `limit` rows (seeded sample)."""

    split: str = "test"
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"  # where the models generate


@dataclass(frozen=True)
class EvalPlan:
    """`run --eval`'s evaluation, checked before any merging."""

    tasks: dict[str, TaskSpec]
    references: dict[str, Path]  # task -> its expert
    gates: list[Gate]


class EvalProgress(Protocol):
    """What eval_report reports: a model (or reference) started, a batch, an lm-eval call."""

    def model(self, name: str, n_tasks: int) -> None: ...

    def batch(self, task: str, done: int, total: int) -> None: ...

    def harness(self, done: int, total: int, kind: str) -> None: ...

    def task_done(self, n: int) -> None: ...


def recipe_references(r: Recipe) -> dict[str, Path]:
    """The expert of each task a recipe's models are tagged with: the references of its ANP."""
    return {m.task: Path(r.resolve_path(m.model)) for m in r.models if m.task}


def eval_tasks(path: Path) -> tuple[dict[str, TaskSpec], dict[str, Path], list[Path]]:
    """(tasks, reference expert per task, the files read) from --tasks: a tasks YAML or a recipe
    with tasks."""
    try:
        raw = read_yaml(path, "tasks") if path.is_file() else None
    except UserError:
        raw = None  # load_tasks below reports the error
    if isinstance(raw, dict) and "merge_method" in raw:
        r = load_recipe(path)
        if r.tasks is None:
            raise UserError(f"--tasks {path}: the recipe has no tasks")
        tasks = load_tasks(r.tasks, r.source.parent, str(path))
        return tasks, recipe_references(r), [path, *task_files(r.tasks, r.source.parent, str(path))]
    if not path.is_file():
        raise UserError(f"--tasks {path}: file not found (a tasks YAML or a recipe with tasks)")
    raw_ = str(path.resolve())
    return load_tasks(raw_, path.parent, str(path)), {}, task_files(raw_, path.parent, str(path))


def harness_tasks(items: list[str], specs: dict[str, TaskSpec]) -> HarnessTasks:
    """The --harness items resolved; refused if a name is also one of the divmerge tasks."""
    lm_tasks = resolve_tasks(items)
    clash = sorted(set(lm_tasks.names) & set(specs))
    if clash:
        raise UserError(
            f"--harness: task {clash[0]!r} is also a divmerge task of --tasks; a task name must "
            "say which one it scores (rename the lm-eval task)"
        )
    return lm_tasks


def eval_gates(
    anp_min: float | None, task_mins: list[str] | None, names: list[str], refs: dict
) -> list[Gate]:
    """--fail-under-anp and --fail-under over the tasks `names`; an ANP gate needs references."""
    if anp_min is not None and not refs:
        raise UserError(
            "--fail-under-anp: ANP needs reference scores; pass a recipe to --tasks (its experts) "
            "or --reference TASK=PATH"
        )
    return parse_gates(anp_min, task_mins or [], names)


def eval_plan(
    r: Recipe, recipe: Path, anp_min: float | None, task_mins: list[str] | None, seed: int
) -> EvalPlan:
    """`run --eval`'s tasks, references and gates, checked before any merging."""
    if r.tasks is None:
        raise UserError(f"--eval: {recipe} has no tasks to evaluate on")
    specs = load_tasks(r.tasks, r.source.parent, str(recipe))
    for t, spec in specs.items():
        labelled_rows(t, spec, "test", None, seed)  # no test rows: say so now, not after merging
    refs = recipe_references(r)
    return EvalPlan(specs, refs, eval_gates(anp_min, task_mins, list(specs), refs))


def check_scored(m: Path, allow_pickle: bool) -> None:
    """A model folder with readable weights, an adapter over a local base, or BASE+ADAPTER."""
    if not (Path(m) / "config.json").is_file() and not (Path(m) / "adapter_config.json").is_file():
        if "+" not in str(m) or Path(m).exists():
            raise UserError(
                f"{m}: not a Hugging Face model folder (no config.json) nor a LoRA adapter folder"
            )
    folder = model_folder(scored_model(m, "eval"))  # an adapter's header checks happen here
    check_weights_readable(folder, "eval", allow_pickle)


def score_model(
    path: Path,
    own: dict[str, TaskSpec],
    lm_tasks: HarnessTasks | None,
    opts: EvalOptions,
    cache: Path,
    progress: EvalProgress,
) -> dict[str, dict]:
    """{task: score entry} of one model on divmerge tasks `own` and lm-eval tasks `lm_tasks`."""
    out = {}
    if own:
        found = evaluate_model(
            path,
            own,
            opts.split,
            opts.limit,
            opts.batch_size,
            opts.seed,
            cache,
            progress=progress.batch,
            device=opts.device,
        )
        out = {t: {**vars(s), "source": "divmerge"} for t, s in found.items()}
    if lm_tasks is not None and lm_tasks.names:
        found = harness_scores(
            path, lm_tasks, opts.limit, opts.batch_size, opts.seed, progress.harness, opts.device
        )
        out.update({t: vars(s) for t, s in found.items()})
        progress.task_done(len(lm_tasks.names))
    return out


def eval_report(
    models: list[Path],
    specs: dict[str, TaskSpec],
    refs: dict[str, Path],
    lm_tasks: HarnessTasks | None,
    opts: EvalOptions,
    cache: Path,
    progress: EvalProgress,
) -> dict:
    """Scores of every reference, then of every model with its normalized scores and ANP:
    {"models": {model: {"tasks": ..., "anp": ...}}, "references": {task: {"model", "score"}}}."""
    ref_scores = {}
    for t, p in refs.items():
        progress.model(f"reference {t}: {p}", 1)
        own = {t: specs[t]} if t in specs else {}
        lm = only(lm_tasks, {t}) if lm_tasks is not None and t not in specs else None
        ref_scores[t] = score_model(p, own, lm, opts, cache, progress)[t]["score"]
    report: dict = {"models": {}}
    for m in models:
        progress.model(str(m), len(specs) + (len(lm_tasks.names) if lm_tasks else 0))
        entry: dict = {"tasks": score_model(m, specs, lm_tasks, opts, cache, progress)}
        known = {t: s["score"] for t, s in entry["tasks"].items() if t in ref_scores}
        for t, score in known.items():
            entry["tasks"][t]["normalized"] = normalized(score, ref_scores[t])
        entry["anp"] = anp(known, ref_scores) if known else None
        report["models"][str(m)] = entry
    if refs:
        report["references"] = {
            t: {"model": str(p), "score": ref_scores[t]} for t, p in refs.items()
        }
    return report


def zero_references(report: dict) -> dict[str, str]:
    """{task: its reference} for the references that score 0: those tasks' ANP is undefined."""
    return {t: r["model"] for t, r in report.get("references", {}).items() if not r["score"]}


def divergences(
    model: Path,
    refs: dict[str, Path],
    specs: dict[str, TaskSpec],
    opts: EvalOptions,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """JS and KL of each expert to MODEL on the teacher targets a merge with default settings
    learns from (same samples count, top_k and cache)."""
    out = {}
    for task, expert in refs.items():
        spec = specs.get(task)  # lm-eval tasks have no divmerge validation inputs
        if spec is None or not spec.validation:
            continue
        samples = teacher_samples(
            scored_model(expert, f"--reference {task}"),
            task,
            spec,
            samples=opts.limit or OPTIMIZE_DEFAULTS["samples"],
            top_k=OPTIMIZE_DEFAULTS["top_k"],
            seed=opts.seed,
            cache_dir=cache_dir or default_cache_dir(),
            batch_size=opts.batch_size,
            progress=progress,
        )
        out[task] = model_divergences(model, samples, opts.batch_size)
    return out
