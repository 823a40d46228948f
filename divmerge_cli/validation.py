"""What `validate` reports and `run` checks before any work, as data: what a recipe reads (which
no output may replace), a learned merge's estimates and fit, the output's shape. Headers and
configs only, no weights."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import check_out_file, check_space
from .errors import UserError
from .estimate import SvdEstimate, estimate_svd
from .merge import MergePlan, out_config
from .optimize import learning_budget, preflight_learned
from .recipe import Recipe, load_recipe, optimize_params
from .slices import LAYER_KEYS
from .tasks import task_files


def recipe_inputs(r: Recipe, plan: MergePlan) -> list[Path]:
    """Every file and folder a recipe reads (an output must replace none of them)."""
    files = [r.source, plan.tokenizer, *(c.path for c in plan.inputs)]
    if plan.method.optimized and (fixed := optimize_params(r).coefficients):
        files.append(Path(r.resolve_path(fixed)))
    return files + task_files(r.tasks, r.source.parent, str(r.source))


def may_report_to(json_out: Path, recipe: Path) -> bool:
    """Whether a refused recipe's report may go to --json: never onto the recipe or a model it
    names (the refusal may be that very overlap, or come before the plan knew its inputs)."""
    inputs = [recipe]
    try:
        r = load_recipe(recipe)
        refs = [r.base_model or "", *(e.model for e in r.models)]
        inputs += [Path(r.resolve_path(x)) for ref in refs for x in ref.split("+") if x]
    except Exception:  # a recipe that does not load names no model: the recipe is the input
        pass
    try:
        check_out_file(json_out, "--json", [p for p in inputs if p.exists()])
    except UserError:
        return False
    return True


def learns_gamma(plan: MergePlan) -> bool:
    """A learned merge that will learn its coefficients (not read them from a file)."""
    return plan.method.optimized and not optimize_params(plan.recipe).coefficients


def learned_estimate(plan: MergePlan, device: str) -> tuple[MergePlan, dict]:
    """A learned merge's plan as `run` would fit it (teacher batch lowered to the memory), and
    its estimates for validate's report."""
    plan, est, mode, reason, lowered = preflight_learned(plan, device=device)
    reason = f"{lowered}; {reason}" if lowered else reason
    return plan, {
        "gen_batch_size": optimize_params(plan.recipe).gen_batch_size,
        "peak_memory_bytes": est.peak(mode),
        "device": est.device,
        "device_memory_bytes": est.device_peak(mode),
        "disk_bytes": est.disk_bytes,
        "task_vectors": mode,
        "task_vectors_reason": reason,
        "available_memory_bytes": est.available,
        "learning": learning_budget(plan),
    }


def output_shape(plan: MergePlan) -> dict:
    """The output's block count (sliced merges) and vocabulary size, for validate's report."""
    config = out_config(plan)
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    shape = {"vocab_size": vocab} if isinstance(vocab, int) else {}
    if plan.recipe.slices:
        shape["layers"] = next(config[k] for k in LAYER_KEYS if k in config)
    return shape


def preflight_run(
    plan: MergePlan, seed: int, device: str, output: Path
) -> tuple[MergePlan, str, str, list[str]]:
    """What `run` checks before a learned merge's work: the teacher batch fitted to the memory,
    the task-vector mode, room in memory and on OUTPUT's disk (before the optimization, not after
    it). (plan, mode, the mode's reason, the notes to show). UserError: it does not fit."""
    source = plan.recipe.source
    plan, est, mode, reason, lowered = preflight_learned(plan, seed, device)
    problem = est.too_big(mode)
    if problem:
        raise UserError(f"{source}: {problem}")
    check_space(output, est.disk_bytes)
    return plan, mode, reason, [line for line in (lowered, reason) if line]


def svd_estimate(plan: MergePlan) -> SvdEstimate | None:
    """What a singular-value method's SVDs cost, for the recipe's method or, in a learned merge,
    its base_method; None for any other method."""
    r = plan.recipe
    if plan.method.optimized:
        return estimate_svd(plan, optimize_params(r).base_method, factored=False)
    return estimate_svd(plan, r.merge_method)
