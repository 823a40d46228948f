"""How many epochs a learned merge (divmerge, adamerging) runs, and which epoch's Gamma it writes.

After every epoch the objective (the training divergence or entropy, no gradient) is evaluated on
a set of inputs: a fixed, seeded part of each task's validation inputs held back from training
(`holdout`), or, with a fixed `epochs: N` and no `holdout`, the training inputs themselves. The
Gamma with the lowest value is written (best, not last). `epochs: auto` also stops once the value
has not improved by a relative margin `min_delta` for `patience` epochs, or at `max_epochs`.
Pure functions: the loop (optimize.py) calls them and saves what they return.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import UserError
from .methods import AUTO_EPOCHS

# Why a run ended, as the model card and the summary say it.
REASONS = {
    "fixed": "ran the fixed number of epochs",
    "patience": "no relative improvement of {min_delta:g} for {patience} epochs (patience)",
    "cap": "reached max_epochs ({max_epochs})",
}


@dataclass(frozen=True)
class Rule:
    """The resolved epoch settings of one run."""

    auto: bool
    epochs: int  # the epochs scheduled: N, or max_epochs under auto
    holdout: float | None  # fraction held back per task; None: evaluate on the training inputs
    patience: int
    min_delta: float


def rule_of(params) -> Rule:
    """The Rule of an OptimizeParams (recipe.py): auto's defaults filled in from AUTO_EPOCHS."""
    auto = params.epochs == "auto"

    def get(key: str):
        value = getattr(params, key)
        return AUTO_EPOCHS[key] if value is None else value

    holdout = get("holdout") if auto else params.holdout
    epochs = get("max_epochs") if auto else params.epochs
    return Rule(auto, int(epochs), holdout, int(get("patience")), float(get("min_delta")))


def check_params(params) -> None:
    """patience, min_delta and max_epochs say when `epochs: auto` stops; with a fixed number of
    epochs they would change nothing, so they are refused there (ValueError naming the field)."""
    if params.epochs == "auto":
        return
    for key in ("patience", "min_delta", "max_epochs"):
        if getattr(params, key) is not None:
            raise ValueError(
                f"parameters.{key}: only used with epochs: auto (epochs is {params.epochs}); "
                f"remove it, or set epochs: auto"
            )


def held_count(n: int, fraction: float) -> int:
    """Inputs held back of a task's n: the nearest whole number to fraction * n, at least one."""
    return max(1, math.floor(fraction * n + 0.5))


def check_holdout(task: str, n: int, fraction: float | None, where: str) -> None:
    """A task must keep at least one training input after its held-back ones."""
    if fraction is None:
        return
    held = held_count(n, fraction)
    if held >= n:
        raise UserError(
            f"{where}: parameters.holdout: {fraction:g} of the {n} validation input(s) of task "
            f"'{task}' holds back {held}, leaving none to train on; use more validation rows "
            "(samples) or a smaller holdout"
        )


def holdout_split(
    tasks: list[str], fraction: float | None, seed: int, where: str = "recipe"
) -> tuple[list[int], list[int]]:
    """(training indices, held-back indices) into samples whose tasks are `tasks`, both in
    sample order. Each task's held-back inputs are a seeded draw of held_count of them (the same
    for a seed, whatever the other tasks); no fraction: every sample trains, none is held back."""
    if fraction is None:
        return list(range(len(tasks))), []
    held: set[int] = set()
    for task in dict.fromkeys(tasks):
        mine = [i for i, t in enumerate(tasks) if t == task]
        check_holdout(task, len(mine), fraction, where)
        rng = random.Random(f"divmerge-holdout:{seed}:{task}")  # str seeds hash stably (sha512)
        held.update(rng.sample(mine, held_count(len(mine), fraction)))
    return [i for i in range(len(tasks)) if i not in held], sorted(held)


def improved(value: float, reference: float, min_delta: float) -> bool:
    """value is below reference by more than min_delta of its size (a relative margin)."""
    return value < reference - min_delta * abs(reference)


def best_epoch(curve: list[float]) -> int:
    """The epoch with the lowest finite objective (curve[0] is the initial Gamma); the earliest
    on a tie. 0 when no value is finite."""
    finite = [(v, e) for e, v in enumerate(curve) if math.isfinite(v)]
    return min(finite)[1] if finite else 0


def stop_reason(curve: list[float], rule: Rule) -> str | None:
    """Why the run stops after the epochs in `curve` (curve[0]: the initial Gamma, curve[e]:
    after epoch e), or None to go on. Patience counts the epochs since the last one that improved
    on the best so far by the relative margin."""
    done = len(curve) - 1
    if rule.auto:
        since, reference = 0, curve[0]
        for value in curve[1:]:
            if improved(value, reference, rule.min_delta):
                since, reference = 0, value
            else:
                since += 1
        if since >= rule.patience:
            return "patience"
    if done >= rule.epochs:
        return "cap" if rule.auto else "fixed"
    return None


def budget(counts: dict[str, int], params, where: str = "recipe") -> dict:
    """The worst case of a run, from each task's number of validation inputs: epochs, Adam
    steps and the no-gradient evaluation passes (one per epoch plus the initial Gamma). Refuses a
    holdout that leaves a task nothing to train on (UserError)."""
    rule = rule_of(params)
    held = {t: held_count(n, rule.holdout) if rule.holdout else 0 for t, n in counts.items()}
    for t, n in counts.items():
        check_holdout(t, n, rule.holdout, where)
    train = sum(counts.values()) - sum(held.values())
    batch = params.batch_size or 4 * len(counts)
    per_epoch = math.ceil(train / batch)
    return {
        "auto": rule.auto,
        "max_epochs": rule.epochs,
        "steps_per_epoch": per_epoch,
        "max_steps": per_epoch * rule.epochs,
        "eval_passes": rule.epochs + 1,
        "eval_inputs": sum(held.values()) if rule.holdout else train,
        "held_back": sum(held.values()),
    }


def describe(reason: str, rule: Rule) -> str:
    """The stop reason in words, for the model card."""
    return REASONS[reason].format(
        min_delta=rule.min_delta, patience=rule.patience, max_epochs=rule.epochs
    )


def curve_card(curve: list[dict], chosen: int, reason: str, rule: Rule, holdout_n: int) -> str:
    """The model card's section on the epochs: the per-epoch objective, the chosen epoch, why the
    run stopped."""
    on = (
        f"the {holdout_n} held-back validation inputs (holdout {rule.holdout:g})"
        if rule.holdout
        else "the training inputs"
    )
    mode = (
        f"epochs: auto (patience {rule.patience}, min_delta {rule.min_delta:g}, max_epochs "
        f"{rule.epochs})"
        if rule.auto
        else f"epochs: {rule.epochs}"
    )
    which = "the initial Gamma" if chosen == 0 else f"the Gamma of epoch {chosen}"
    lines = [
        "",
        "",
        "## Epochs",
        "",
        f"{mode}. After each epoch the objective was evaluated on {on}; {which} (the lowest) "
        f"was written. Stopped after epoch {len(curve) - 1}: "
        f"{describe(reason, rule)}.",
        "",
        "| epoch | objective |",
        "|---|---|",
    ]
    for c in curve:
        mark = " (written)" if c["epoch"] == chosen else ""
        lines.append(f"| {c['epoch']}{mark} | {c['objective']:.5f} |")
    return "\n".join(lines)
