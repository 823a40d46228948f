"""The `divmerge` command line: the only module that prints or reads argv."""

from __future__ import annotations

import atexit
import errno
import gc
import os
import random
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__, bars
from .errors import GateFailed, UserError
from .hashing import prehash
from .interrupts import Interrupts
from .progress import INTERVAL_ENV, ProgressLog, interval_from

# The rest of the library is imported inside the commands, not here: torch and transformers take
# seconds to import, and `--help`, `--version` or a refused option should not wait for them.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Merge fine-tuned language models that share one base (DivMerge, TIES, DARE, SLERP, ...).",
)
out = Console()
err = Console(stderr=True)

Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
FailUnderAnp = Annotated[
    float | None,
    typer.Option(help="exit 3 if a model's ANP is under X percent (after writing every output)"),
]
FailUnder = Annotated[
    list[str] | None,
    typer.Option(help="TASK=SCORE: exit 3 if a model scores under SCORE on TASK (repeatable)"),
]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="no progress bars or records (warnings, errors, results still print)"
    ),
]
_ui = {"quiet": False}  # set by each command that shows progress
_signals = Interrupts()  # what an interrupted command says it kept


def _progress():
    """Bars on a terminal; elsewhere (a log, CI) plain one-line records on stderr, at most one
    per phase every DIVMERGE_PROGRESS_INTERVAL seconds (10) plus its start and end. Under a
    multi-process launch only the main process shows progress."""
    quiet = _ui["quiet"] or _distributed_rank() != 0
    if err.is_terminal or quiet:
        return _Bars(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
            disable=quiet,
        )
    try:
        interval = interval_from(os.environ.get(INTERVAL_ENV))
    except ValueError as e:
        raise UserError(str(e)) from None
    return ProgressLog(
        lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True), interval
    )


class _Bars(Progress):
    """rich's bars, a bar's info cut to its last 60 characters (a path's or a cell's end) so that
    each bar keeps one line; the records of a log get the whole info."""

    def update(self, task_id, *, info: str | None = None, **kw) -> None:
        super().update(task_id, **kw, **({} if info is None else {"info": info[-60:]}))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Imports (torch's) without the cyclic garbage collector, whose passes over the objects they
    create free nothing and cost ~0.25 s of CPU (15% of importing the merge)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _device(choice: str) -> str:
    import torch

    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: {choice!r} is not valid; use auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return (
        "cuda"
        if choice == "auto" and torch.cuda.is_available()
        else ("cpu" if choice == "auto" else choice)
    )


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style YAML recipe")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="output folder (written atomically)")
    ],
    force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="seed for DARE masks and sampling")] = 0,
    out_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    allow_pickle: Annotated[
        bool, typer.Option(help="read pickled .bin weights (weights_only)")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="teacher cache (default: the user cache dir)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue an interrupted divmerge/adamerging run")
    ] = False,
    as_adapter: Annotated[
        bool, typer.Option(help="write a PEFT LoRA adapter over the base instead of a full model")
    ] = False,
    adapter_rank: Annotated[
        int | None,
        typer.Option(help="with --as-adapter: truncate each module to this rank by SVD"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="worker threads for data-free merges (default: $OMP_NUM_THREADS, else every "
            "core this process may use)"
        ),
    ] = None,
    eval_: Annotated[
        bool,
        typer.Option(
            "--eval", help="then score OUTPUT on the recipe's tasks into OUTPUT/eval.json"
        ),
    ] = False,
    fail_under_anp: FailUnderAnp = None,
    fail_under: FailUnder = None,
    quiet: Quiet = False,
) -> None:
    """Merge the models of RECIPE into a Hugging Face checkpoint at OUTPUT."""
    _ui["quiet"] = quiet
    n_threads = _threads(threads)
    if n_threads > 1 and _distributed_rank() == 0:  # a spare core hashes while torch imports
        prehash(_recipe_folders(recipe))  # (for divmerge_recipe.yaml, which rank 0 writes)
    with _collector_paused():
        from .checkpoint import check_out, parse_size
        from .merge import plan_merge, run_merge
        from .recipe import load_recipe

    shard = parse_size(out_shard_size)
    _check_seed(seed)
    r = _warn(load_recipe(recipe))
    dev = _device(device)
    if adapter_rank is not None and (not as_adapter or adapter_rank < 1):
        raise UserError("--adapter-rank: needs --as-adapter and a rank of at least 1")
    if eval_ and as_adapter:
        raise UserError("--eval scores a full model folder; it does not go with --as-adapter")
    gated = _run_eval_plan(r, recipe, eval_, fail_under_anp, fail_under, seed)
    plan = plan_merge(r, allow_pickle)
    for w in plan.warnings:
        _warning(w)
    check_out(output, force, [c.path for c in plan.inputs])
    _signals.on_interrupt(lambda: f"nothing was written to {output}")
    _signals.finish_once(output, f"{output} is complete")
    with _writing(output, plan.method.optimized):
        if as_adapter and not plan.method.optimized:
            return _run_as_adapter(plan, output, adapter_rank, force, seed, dev)
        if plan.method.optimized:
            from .optimize import slow_dtype_warning

            slow = slow_dtype_warning(r, dev)
            if slow:
                _warning(slow)
            _signals.on_interrupt(lambda: _kept_state(output))
            adapter = None
            if as_adapter:  # refused before any teacher generates, not after the learning
                from .optimize import check_adapter_output

                check_adapter_output(plan, adapter_rank)
                adapter = (adapter_rank,)
            _run_optimized(
                plan, output, force, seed, dev, cache_dir, resume, shard, adapter=adapter
            )
            return _run_eval(gated, output, seed, cache_dir, dev)
        import torch

        # Parallelism comes from worker threads each running single-threaded ops: with OpenMP
        # threads inside small ops, one core busy elsewhere made a TIES merge 13x slower.
        torch.set_num_threads(1)
        random.seed(seed)
        with _progress() as prog:
            # starts when run_merge has checked OUT and the disk, at its first report
            task = prog.add_task(f"{r.merge_method}", total=None, info="")
            run_merge(
                plan,
                output,
                force=force,
                seed=seed,
                shard_bytes=shard,
                device=dev,
                progress=bars.tick(prog, task),
                threads=n_threads,
            )
    out.print(f"[green]merged[/] {len(plan.names)} tensors with {r.merge_method} -> {output}")
    _run_eval(gated, output, seed, cache_dir, dev)


def _run_eval_plan(r, recipe: Path, enabled: bool, anp_min, task_mins, seed: int):
    """For `run --eval`: its EvalPlan, checked before any merging; None without --eval."""
    if not enabled:
        if anp_min is not None or task_mins:
            raise UserError("--fail-under-anp / --fail-under: gates need --eval")
        return None
    # imported only here: evaluate's scorers (rouge, nltk) would add seconds to every merge
    from .report import eval_plan

    return eval_plan(r, recipe, anp_min, task_mins, seed)


def _run_eval(plan, output: Path, seed: int, cache_dir: Path | None, device: str) -> None:
    if plan is None or _distributed_rank() != 0:  # under accelerate, one process evaluates
        return
    from .report import EvalOptions  # only here: the scorers take seconds to import

    _signals.on_interrupt(lambda: f"{output} is complete; its eval.json was not written")
    _signals.finish_once(output / "eval.json", f"{output} and its eval.json are complete")
    cache = cache_dir or _default_cache("eval")
    report = _eval_report(
        [output], plan.tasks, plan.references, None, EvalOptions(seed=seed, device=device), cache
    )
    _report_and_gate(report, plan.gates, output / "eval.json")


def _recipe_folders(recipe: Path) -> list[Path]:
    """The local model folders a recipe names (base_model, models, slices' sources), read from
    its YAML without validating it: a head start for hashing, so anything odd is skipped here
    and reported by load_recipe."""
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []

    def items(d: object, key: str) -> list[dict]:
        v = d.get(key) if isinstance(d, dict) else None
        return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []

    refs = [data.get("base_model") if isinstance(data, dict) else None]
    refs += [m.get("model") for m in items(data, "models")]
    for sl in items(data, "slices"):
        refs += [sl.get("base_model")] + [s.get("model") for s in items(sl, "sources")]
    return [recipe.parent / os.path.expanduser(r) for r in refs if isinstance(r, str)]


def _threads(option: int | None) -> int:
    """--threads, else $OMP_NUM_THREADS (the usual way to cap a process's threads), else the
    cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    if option is not None:
        if option < 1:
            raise UserError(f"--threads: {option} is not valid; use 1 or more")
        return option
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) >= 1:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _writing(output: Path, optimized: bool) -> Iterator[None]:
    """Hold OUT's lock (a second run on OUT exits 2 naming this one) and clear what killed runs
    left beside OUT. Under `accelerate launch` only the main process writes OUT and the optimizer
    state, so the other processes of an optimized run take no lock."""
    from .checkpoint import output_lock, remove_stale_temps

    if optimized and _distributed_rank() != 0:
        yield
        return
    with output_lock(output):
        for folder, done in remove_stale_temps(output):
            err.print(
                escape(f"{done} {folder}, left by a run that was killed"),
                highlight=False,
                soft_wrap=True,
            )
        yield


def _distributed_rank() -> int:
    """This process's rank under accelerate, torchrun or MPI (0 when not launched that way)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _kept_state(output: Path) -> str | None:
    from .optimize import state_dir_for

    state = state_dir_for(output)
    if (state / "state.pt").is_file():
        return (
            f"nothing was written to {output}; the optimizer state is kept in {state}: "
            "rerun the same command with --resume to continue"
        )
    return None


def _check_seed(seed: int) -> None:
    from .recipe import check_seed

    check_seed(seed, "--seed")


def _run_as_adapter(plan, output: Path, rank: int | None, force, seed, dev) -> None:
    from .adapter_writer import merge_as_adapter

    with _progress() as prog:
        task = prog.add_task(f"{plan.recipe.merge_method} -> adapter", total=None, info="")
        ranks = merge_as_adapter(
            plan,
            output,
            rank,
            force,
            seed,
            dev,
            lambda d, t, n: prog.update(task, completed=d, total=t, info=n),
        )
    worst = max((e for _, e in ranks.values()), default=0.0)
    out.print(
        f"[green]merged[/] {plan.recipe.merge_method} into a LoRA adapter of {len(ranks)} modules "
        f"(rank <= {max(k for k, _ in ranks.values())}, worst relative error {worst:.2e}) -> {output}"
    )
    _warn_lossy_adapter(ranks, rank, output)


def _warn_lossy_adapter(ranks: dict, rank: int | None, output: Path) -> None:
    """--adapter-rank: say which modules the truncation loses most of (the card lists them all)."""
    from .adapter_writer import ADAPTER_ERROR_WARN, lossy_modules

    lossy = lossy_modules(ranks)
    if not lossy:
        return
    most = ", ".join(f"{m} ({e:.2f})" for m, e in lossy[:3])
    err.print(
        f"[yellow]warning:[/] --adapter-rank {rank}: {len(lossy)} of {len(ranks)} modules have a "
        f"relative error above {ADAPTER_ERROR_WARN} (half of their merged change lost), most: "
        f"{escape(most)}; raise --adapter-rank or write a full model (every module's error: "
        f"{escape(str(output / 'README.md'))})",
        highlight=False,
        soft_wrap=True,
    )


def _run_optimized(plan, output, force, seed, dev, cache_dir, resume, shard, adapter=None) -> None:
    """`adapter`: (rank,) for --as-adapter (rank None: exact)."""
    from .optimize import run_optimized
    from .validation import learns_gamma, preflight_run

    r = plan.recipe
    if not learns_gamma(plan):  # Gamma fixed: a plain streamed write, no teacher
        summary = run_optimized(
            plan,
            output,
            force=force,
            seed=seed,
            shard_bytes=shard,
            as_adapter=adapter is not None,
            adapter_rank=(adapter or (None,))[0],
        )
        out.print(f"[green]merged[/] with {r.merge_method} (Gamma from a file) -> {output}")
        if adapter:
            _warn_lossy_adapter(summary["adapter"], adapter[0], output)
        return
    plan, mode, reason, notes = preflight_run(plan, seed, dev, output)
    for line in notes:
        err.print(line, highlight=False)
    with _progress() as prog:
        summary = run_optimized(
            plan,
            output,
            force=force,
            seed=seed,
            device=dev,
            cache_dir=cache_dir,
            resume=resume,
            shard_bytes=shard,
            progress=bars.learned_merge(prog, r.merge_method),
            mode=(mode, reason),
            as_adapter=adapter is not None,
            adapter_rank=(adapter or (None,))[0],
        )
    table = _table(
        f"{r.merge_method}: objective ({summary['objective']}) per task",
        ["task", "at init", "learned", "mean Gamma"],
    )
    for t, row in zip(summary["tasks"], summary["gamma"]):
        table.add_row(
            t,
            f"{summary['before'][t]:.5f}",
            f"{summary['after'][t]:.5f}",
            f"{sum(row) / len(row):.4f}",
        )
    out.print(table)
    what = "into a LoRA adapter " if adapter else ""
    kept = "the initial Γ" if summary["epoch"] == 0 else f"Γ of epoch {summary['epoch']}"
    out.print(
        f"[green]merged[/] with {r.merge_method} {what}({summary['steps']} steps, {kept}, "
        f"stopped: {summary['stopped']}) -> {output}"
    )
    if adapter:
        _warn_lossy_adapter(summary["adapter"], adapter[0], output)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style YAML recipe")],
    allow_pickle: bool = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the checks and estimates as JSON")
    ] = None,
) -> None:
    """Check RECIPE and every checkpoint it names (headers and configs only, no weights)."""
    from .validation import may_report_to

    _stdout_for_json(json_out)
    try:
        report = _validate(recipe, allow_pickle, json_out)
    except UserError as e:  # a refused recipe is a result too: CI reads why from the JSON
        if json_out and may_report_to(json_out, recipe):
            error = _short(" ".join(str(e).splitlines()))
            _write_json(json_out, {"recipe": str(recipe), "ok": False, "error": error})
        raise
    if json_out:
        _write_json(json_out, report)


def _validate(recipe: Path, allow_pickle: bool, json_out: Path | None) -> dict:
    """validate's checks, printed as they pass; their report for --json. UserError: refused."""
    from .checkpoint import check_out_file
    from .checkpoint import human_size as gb
    from .merge import plan_merge
    from .optimize import slow_dtype_warning
    from .recipe import load_recipe
    from .validation import learned_estimate, learns_gamma, output_shape, recipe_inputs

    r = _warn(load_recipe(recipe))
    plan = plan_merge(r, allow_pickle)
    if json_out:
        check_out_file(json_out, "--json", recipe_inputs(r, plan))
    report: dict = {"recipe": str(recipe), "merge_method": r.merge_method, "ok": True}
    report["warnings"] = plan.warnings
    for w in plan.warnings:
        _warning(w)
    if learns_gamma(plan):
        slow = slow_dtype_warning(plan.recipe, _device("auto"))
        if slow:
            report["warnings"] = [*report["warnings"], slow]
            _warning(slow)
        plan, estimates = learned_estimate(plan, _device("auto"))
        report.update(estimates)
    size = sum(c.nbytes for c in plan.inputs)
    out.print(
        f"[green]ok[/] {recipe}: {r.merge_method} over {len(plan.inputs)} checkpoints "
        f"({len(plan.names)} tensors, {gb(size)} to read)"
    )
    report.update(output_shape(plan))
    if "vocab_size" in report:
        layers = f"{report['layers']} layers, " if "layers" in report else ""
        out.print(f"output: {layers}vocabulary of {report['vocab_size']} tokens")
    if "peak_memory_bytes" in report:
        out.print(
            f"estimate: peak memory {gb(report['peak_memory_bytes'])} "
            f"(available {gb(report['available_memory_bytes'])}), "
            f"disk {gb(report['disk_bytes'])}; {report['task_vectors_reason']}"
        )
        out.print(_budget_line(report["learning"]))
    _svd_estimate(plan, report)
    return report


def _budget_line(b: dict) -> str:
    """The learning phase's worst case, as validate prints it (epochs.budget)."""
    epochs = f"epochs: auto, at most {b['max_epochs']}" if b["auto"] else f"{b['max_epochs']}"
    inputs = "held-back" if b["held_back"] else "training"
    return (
        f"estimate: {epochs} epochs x {b['steps_per_epoch']} steps = at most {b['max_steps']} "
        f"Adam steps, plus {b['eval_passes']} objective passes (no gradient) over "
        f"{b['eval_inputs']} {inputs} inputs"
    )


def _svd_estimate(plan, report: dict) -> None:
    """The SVD work of a singular-value method (or of a learned merge's base_method), printed
    and added to the report."""
    from .validation import svd_estimate

    svd = svd_estimate(plan)
    if svd:
        report["svd_estimate"] = svd.report()
        out.print(f"estimate: {svd.line()}", soft_wrap=True)  # one line, as logs grep it


def _stdout_for_json(json_out: Path | None) -> None:
    """With `--json -` the JSON is the command's stdout: tables and lines go to stderr."""
    out.stderr = str(json_out) == "-"


def _warning(message: str) -> None:
    """One warning line on stderr (`message` is rich markup: escape what a user wrote)."""
    err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _warn(recipe):
    """The recipe, after printing what its loading ignored (one line each, on stderr)."""
    for w in recipe.warnings:
        _warning(_plain(w))
    return recipe


def _plain(message: object) -> str:
    """A message as one line of text: rich markup in it ('[/x]' from a YAML key) is shown, not
    parsed, line breaks (from a file or key name) do not split it, and it is capped in length."""
    return escape(_short(" ".join(str(message).splitlines())))


@app.command("eval")
def eval_(
    models: Annotated[list[Path], typer.Argument(help="merged or expert checkpoint folders")],
    tasks: Annotated[
        Path | None, typer.Option(help="a tasks YAML, or a recipe (its experts are the references)")
    ] = None,
    harness: Annotated[
        list[str] | None,
        typer.Option(
            help="lm-evaluation-harness tasks: names or task YAML paths, comma-separated or "
            "repeated (pip install 'divmerge[harness]')"
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="validation | test")] = "test",
    limit: Annotated[
        int | None, typer.Option(help="at most N rows per task (seeded sample)")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the scores as JSON")
    ] = None,
    reference: Annotated[
        list[str] | None, typer.Option(help="TASK=PATH: the expert for ANP")
    ] = None,
    divergence: Annotated[
        bool, typer.Option(help="also JS and KL of each expert to the model")
    ] = False,
    batch_size: int = 16,
    seed: int = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="score and teacher cache")] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="load pickled .bin weights (weights_only)")
    ] = False,
    fail_under_anp: FailUnderAnp = None,
    fail_under: FailUnder = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Score MODELS on the tasks' labelled rows (accuracy / ROUGE-1) and their ANP vs the experts."""
    _ui["quiet"] = quiet

    if split not in ("validation", "test"):
        raise UserError(f"--split: {split!r} is not valid; use validation or test")
    if batch_size < 1:
        raise UserError(f"--batch-size: {batch_size} is not valid; use an integer >= 1")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: {limit} is not valid; use an integer >= 1")
    _check_seed(seed)
    dev = _device(device)
    _stdout_for_json(json_out)
    from .checkpoint import check_out_file
    from .report import EvalOptions, check_scored, eval_gates, eval_tasks, harness_tasks

    specs, refs, read = eval_tasks(tasks) if tasks is not None else ({}, {}, [])
    items = [i.strip() for h in harness or [] for i in h.split(",") if i.strip()]
    if not specs and not items:
        raise UserError(
            "eval: give --tasks (a tasks YAML or a recipe) or --harness (lm-eval tasks)"
        )
    lm_tasks = harness_tasks(items, specs) if items else None
    names = [*specs, *(lm_tasks.names if lm_tasks else [])]
    for item in reference or []:
        task, sep, p = item.partition("=")
        if not sep or task not in names:
            raise UserError(
                f"--reference {item}: use TASK=PATH with TASK one of {', '.join(names)}"
            )
        refs[task] = Path(p)
    if json_out:
        check_out_file(json_out, "--json", [*models, *refs.values(), *read])
    gates = eval_gates(fail_under_anp, fail_under, names, refs)
    for m in [*models, *refs.values()]:
        check_scored(m, allow_pickle)
    opts = EvalOptions(split, limit, batch_size, seed, dev)
    report = _eval_report(models, specs, refs, lm_tasks, opts, cache_dir or _default_cache("eval"))
    if divergence:
        _add_divergences(report, models, refs, specs, opts, cache_dir)
    _report_and_gate(report, gates, json_out)


def _eval_report(models, specs, refs, lm_tasks, opts, cache: Path) -> dict:
    """report.eval_report, with progress bars per model, task and batch."""
    from .report import eval_report, zero_references

    with _progress() as prog:
        shown = bars.EvalBars(prog, len(refs) + len(models))
        report = eval_report(models, specs, refs, lm_tasks, opts, cache, shown)
        shown.finish()
    for t, model in zero_references(report).items():
        _warning(
            f"{escape(model)}, the reference of task {escape(t)}, scores 0 on it, so that task's "
            "normalized score and ANP are undefined (null); "
            + ("score more rows than --limit" if opts.limit else "check the expert and task")
        )
    return report


def _add_divergences(report: dict, models, refs, specs, opts, cache_dir: Path | None) -> None:
    """eval --divergence: each model's JS and KL to every expert, into its report entry."""
    from .report import divergences

    with _progress() as prog:
        bar = prog.add_task("divergence", total=len(models), info="")
        teacher = prog.add_task("teacher", total=None, info="")
        for i, m in enumerate(models):
            prog.update(bar, completed=i, info=str(m))
            report["models"][str(m)]["divergence"] = divergences(
                m, refs, specs, opts, cache_dir,
                lambda d, n: prog.update(teacher, completed=d, total=n),
            )  # fmt: skip
        prog.update(bar, completed=len(models), info="")


def _report_and_gate(report: dict, gates: list, json_out: Path | None) -> None:
    """Print the tables, record the gates, write the JSON, then fail (exit 3) on a failed gate."""
    from .evaluate import record_gates

    refs = {t: r["score"] for t, r in report.get("references", {}).items()}
    for m, entry in report["models"].items():
        out.print(_score_table(m, entry, refs))
    failed = record_gates(report, gates)
    if json_out:
        _write_json(json_out, report)
    if failed:
        raise GateFailed(failed)
    if gates:
        out.print(f"[green]passed[/] {len(report['gates'])} gate(s)")


def _write_json(path: Path, obj) -> None:
    """Standard JSON, to stdout for '-', else whole or not at all (a temporary file renamed)."""
    from .checkpoint import standard_json, write_file

    text = standard_json(obj, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        write_file(path, text, f"--json {path}")
    except OSError as e:
        raise UserError(f"--json {path}: cannot write it ({e.strerror})") from None


def _default_cache(kind: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("divmerge")) / kind


def _score_table(name: str, entry: dict, refs: dict[str, float]) -> Table:
    table = _table(name, ["task", "metric", "score", "n", "expert", "normalized"], left=2)
    for t, s in entry["tasks"].items():
        ref = refs.get(t)
        norm = f"{s['score'] / ref:.3f}" if ref else "-"
        table.add_row(
            t,
            f"lm-eval {s['metric']}" if s.get("source") == "lm-eval" else s["metric"],
            f"{s['score']:.4f}",
            str(s["n"]),
            f"{ref:.4f}" if ref is not None else "-",
            norm,
        )
    if entry.get("anp") is not None:
        table.add_row("[bold]ANP[/]", "", "", "", "", f"[bold]{100 * entry['anp']:.2f} %[/]")
    elif any(s.get("normalized", 0) is None for s in entry["tasks"].values()):
        table.add_row("[bold]ANP[/]", "", "", "", "", "undefined")
    for t, d in entry.get("divergence", {}).items():
        table.add_row(f"JS / KL ({t} expert)", "", "", "", "", f"{d['js']:.4f} / {d['kl']:.4f}")
    return table


def _rich_table(t) -> Table:
    """A sweep.Table (ANP in %) as a rich table."""
    from .sweep import fmt_value

    table = _table(t.title, [str(col) for col in t.columns])
    for row in t.rows:
        table.add_row(*[fmt_value(v) for v in row])
    return table


def _table(title: str, columns: list[str], left: int = 1) -> Table:
    """A rich table, its first `left` columns left-justified. Cells wrap, and a word longer than
    its column folds onto the next line instead of being cut with an ellipsis: method, task and
    model names stay whole at 80 columns."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < left else "right", overflow="fold")
    return table


def _run_sweep(
    cfg, cache_dir: Path | None, device: str, only: list[str] | None = None
) -> tuple[list[dict], list[Path]]:
    from .sweep import run_sweep, write_reports

    with _progress() as prog:
        rows = run_sweep(
            cfg,
            bars.sweep(prog),
            cache_dir=cache_dir or _default_cache(""),
            device=device,
            only=only,
        )
    written = write_reports(rows, cfg.results.parent)
    from .sweep.plots import can_plot

    if not can_plot():
        err.print(
            "[yellow]warning:[/] plots not drawn (anp_vs_k.png, gamma_trace.png): matplotlib is "
            "not installed; pip install 'divmerge\\[plot]' draws them on the next run",
            highlight=False,
            soft_wrap=True,
        )
    return rows, written


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML (see recipes/sweep.example.yaml)")],
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="teacher and score cache")] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(help="run only the cells of this method label (repeatable); tables show all"),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Merge every k-subset of tasks with every method, score, and tabulate ANP (resumable)."""
    _ui["quiet"] = quiet
    from .sweep import load_sweep, pairwise_table, per_k_table

    cfg = load_sweep(sweep_file)
    _sweep_warnings(cfg)
    _signals.on_interrupt(
        lambda: (
            f"the finished cells are kept in {cfg.results}; rerun to continue"
            if cfg.results.is_file()
            else None
        )
    )
    rows, written = _run_sweep(cfg, cache_dir, _device(device), method)
    if any(r.get("k") == 2 for r in rows):
        out.print(_rich_table(pairwise_table(rows)))
    out.print(_rich_table(per_k_table(rows)))
    out.print("wrote " + ", ".join(str(p) for p in written))


def _sweep_warnings(cfg) -> None:
    """What each method's recipe ignores, once per method (its cells share the parameters)."""
    from .sweep.config import build_recipe

    first = cfg.subsets()[0]
    for label in cfg.methods:
        for w in build_recipe(cfg, label, first).warnings:
            msg = f"{cfg.source}: methods.{label}: {_plain(w).removeprefix(f'{cfg.source}: ')}"
            _warning(msg)


@app.command()
def demo(
    size: Annotated[
        str,
        typer.Option(help="default (README's table) | small (seconds; too small to rank methods)"),
    ] = "default",
    root: Annotated[Path | None, typer.Option(help="where the zoo and results go")] = None,
    k: Annotated[str, typer.Option(help="subset sizes to merge, e.g. 4, 2..4")] = "4",
    zoo_only: Annotated[
        bool, typer.Option(help="build the zoo (for recipes/) and stop; no merges")
    ] = False,
    quiet: Quiet = False,
    seed: Annotated[
        int, typer.Option(help="seeds the toy data, the zoo's training and the merges")
    ] = 0,
) -> None:
    """Build a tiny base and four toy experts offline, merge them with five methods, print ANP."""
    _ui["quiet"] = quiet
    import torch

    from .demo import demo_sweep
    from .demo_zoo import build_zoo, drop_stale_results, missed_targets
    from .sweep import per_k_table

    root = root or _default_cache("demo") / (size if seed == 0 else f"{size}-seed{seed}")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on shared cores
    with _progress() as prog:
        zoo = build_zoo(root / "zoo", size=size, seed=seed, progress=bars.zoo(prog))
    for line in missed_targets(zoo):
        _warning(line)
    out.print(f"zoo: {zoo.root} (recipes/ run against it after:)", highlight=False)
    out.print(
        f"export DIVMERGE_ZOO={shlex.quote(str(zoo.root.resolve()))}",
        highlight=False,
        soft_wrap=True,
    )
    if zoo_only:
        return
    if drop_stale_results(root / "results.jsonl", zoo):
        err.print(
            f"{root / 'results.jsonl'}: computed on another build of the zoo; computing again",
            highlight=False,
            soft_wrap=True,
        )
    cfg = demo_sweep(zoo, root, size, k, seed)
    rows, written = _run_sweep(cfg, root / "cache", "cpu")
    cells = [r for r in rows if r.get("type") == "cell" and r["k"] == len(zoo.experts)]
    refs = {r["task"]: r["score"] for r in rows if r.get("type") == "reference"}
    if cells:
        tasks_ = list(cells[0]["scores"])
        scores = _table("demo: score per task (merged over all tasks)", ["model", *tasks_, "ANP %"])
        scores.add_row("experts", *[f"{refs[t]:.3f}" for t in tasks_], "100.0")
        for r in cells:
            scores.add_row(
                r["label"], *[f"{r['scores'][t]:.3f}" for t in tasks_], f"{100 * r['anp']:.1f}"
            )
        out.print(scores)
    out.print(_rich_table(per_k_table(rows)))
    out.print(f"zoo: {zoo.root}; results and plots: " + ", ".join(str(p) for p in written))


@app.command()
def methods() -> None:
    """List the merge methods, their parameters and papers."""
    from .methods import AUTO_EPOCHS, BASE_METHODS, METHODS, OPTIMIZE_DEFAULTS, TEACHER_ONLY

    table = _table(
        "divmerge methods", ["method", "per-model parameters", "global parameters", "paper"], left=4
    )
    for name, m in METHODS.items():
        per_model, glob = m.model_params, m.global_params
        if m.optimized:  # every learned-merge parameter, with this method's defaults
            glob = {k: v for k, v in {**OPTIMIZE_DEFAULTS, **glob}.items() if v is not None}
            for key in TEACHER_ONLY if m.objective else ():
                glob.pop(key, None)
            per_model = {"density, gamma, epsilon": "as base_method's"}
        table.add_row(name, _fmt_params(per_model), _fmt_params(glob), m.paper)
    out.print(f"base_method (learned merges): {', '.join(BASE_METHODS)}")
    out.print(f"epochs: auto (learned merges): {_fmt_params(AUTO_EPOCHS)}")
    out.print(table)


def _fmt_params(d: dict) -> str:
    def fmt(v) -> str:  # as a recipe would spell it: normalize=true, lambda=1
        return (
            str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
        )

    return ", ".join(f"{k} (required)" if v is None else f"{k}={fmt(v)}" for k, v in d.items())


def version_callback(value: bool) -> None:
    if value:
        out.print(f"divmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True)
    ] = False,
) -> None:
    pass


# OSErrors that say what is wrong with the machine or a path the user gave, not with divmerge
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ELOOP,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
}
MAX_MESSAGE = 500  # characters: a message quoting a huge input must stay one readable line


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _interrupted() -> None:
    """Ctrl-C exits 130 and SIGTERM 143 (128 + signal, as shells do), saying what was kept."""
    sig = _signals.signal()
    err.print(
        f"[yellow]interrupted[/] ({signal.Signals(sig).name}): "
        f"{escape(_signals.left() or 'nothing was written')}",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(128 + sig)


def main() -> None:
    """The `divmerge` command: `command()`, then the process ends without the interpreter's
    teardown (freeing torch's and every module's objects one by one: ~0.6 s of CPU after the
    work is done). Exit handlers run and stdout and stderr are flushed first; while a non-daemon
    thread runs, the ordinary exit, which waits for it."""
    try:
        command()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # a message: the ordinary exit prints it
        sys.exit(code)
    me = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not me for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the ordinary exit runs before its teardown
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def command() -> None:
    """The command line, in this process (tests call it): user errors exit 2 with one line,
    failed quality gates 3, unexpected failures 1, Ctrl-C 130, SIGTERM 143 (SystemExit)."""
    _signals.reset()
    _ui["quiet"] = False
    out.stderr = False
    handlers = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if the shell ignores it
        handlers[signal.SIGINT] = signal.default_int_handler
    for sig in handlers:
        signal.signal(sig, _signals.handle)
    try:
        _main_inner()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _unexpected(e: Exception) -> None:
    if os.environ.get("DIVMERGE_DEBUG"):
        raise e
    err.print(
        f"[red]unexpected failure:[/] {_plain(f'{type(e).__name__}: {e}')} "
        "(set DIVMERGE_DEBUG=1 for a traceback)",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(1)


def _main_inner() -> None:
    try:
        # not standalone: click returns the exit code (130 after Ctrl-C) instead of exiting
        code = app(standalone_mode=False)
    except UserError as e:
        err.print(f"[red]error:[/] {_plain(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except GateFailed as e:
        for line in e.lines:
            err.print(f"[red]gate failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(3)
    except KeyboardInterrupt:
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS or os.environ.get("DIVMERGE_DEBUG"):
            _unexpected(e)
        where = f"{e.filename}: " if e.filename else ""
        hint = " (free some space and rerun)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        text = where + (e.strerror or str(e)) + hint
        err.print(f"[red]error:[/] {_plain(text)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click/typer usage errors
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        _unexpected(e)
    if complete := _signals.finished_after(code):
        err.print(
            f"{signal.Signals(_signals.signal()).name} came after {escape(complete)}: finished",
            highlight=False,
            soft_wrap=True,
        )
    elif _signals.stopped_by or code == 130:
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
