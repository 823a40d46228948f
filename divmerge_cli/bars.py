"""The library's progress callbacks, turned into bars.

Each function takes a set of bars, anything with rich.progress.Progress's `add_task`, `update`
and `advance` (rich's bars on a terminal, progress.ProgressLog's records elsewhere), and returns
the callback a library function reports to. The CLI owns the bars and draws them; nothing here
prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Bars = Any  # rich.progress.Progress or progress.ProgressLog: add_task, update, advance


def tick(prog: Bars, task) -> Callable[[int, int, str], None]:
    """progress(done, total, name) on one bar: a data-free merge's tensors."""
    return lambda done, total, name: prog.update(task, completed=done, total=total, info=name)


def learned_merge(prog: Bars, method: str) -> Callable[[str, int, int, str], None]:
    """optimize.run_optimized's progress(phase, done, total, info): a bar per expert's teacher,
    one for the optimization, one for the write."""
    bars: dict[str, object] = {}

    def report(phase: str, done: int, total: int, info: str) -> None:
        key = f"{phase}:{info}" if phase == "teacher" else phase
        if key not in bars:
            label = {"teacher": f"teacher {info}", "optimize": method, "write": "write"}[phase]
            bars[key] = prog.add_task(label, total=None, info="")  # total: the update's
        prog.update(bars[key], completed=done, total=total, info="" if phase == "teacher" else info)

    return report


def sweep(prog: Bars) -> Callable[[str, int, int, str], None]:
    """sweep.run_sweep's progress(phase, done, total, info): cells, experts, and the current
    cell's teacher, optimization and write. Cells found in the results file are counted, not
    shown: the bar starts at the first cell that runs (a log's first record named a finished
    cell, as if it ran again), and says how many were done before."""
    bars: dict[str, object] = {}
    skipped = 0

    def report(phase: str, done: int, total: int, info: str) -> None:
        nonlocal skipped
        if phase == "skip" and done < total:
            skipped += 1
            return
        if phase == "start" and skipped and "cells" not in bars:
            info = f"{info} ({skipped} cells already in the results)"
        key = "cells" if phase in ("start", "cell", "skip") else phase
        label = {
            "cells": "cells",
            "reference": "experts",
            "teacher": "teacher",
            "optimize": "optimize",
            "write": "write",
        }.get(key, key)
        if key not in bars:
            bars[key] = prog.add_task(label, total=None, info="")
        prog.update(bars[key], completed=done, total=total, info=info)

    return report


def zoo(prog: Bars) -> Callable[[str, int, int], None]:
    """demo_zoo.build_zoo's progress(stage, done, total): a bar per stage."""
    bars: dict[str, object] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = prog.add_task(f"zoo: {stage}", total=None, info="")
        prog.update(bars[stage], completed=done, total=total)

    return report


class EvalBars:
    """report.EvalProgress as three bars: models (and references) scored, tasks of the current
    model, its batches."""

    def __init__(self, prog: Bars, n_models: int):
        self.prog, self.done, self.n = prog, -1, n_models
        # totals come with the first model, task and batch (a log's first record names them)
        self.models = prog.add_task("models", total=None, info="")
        self.tasks = prog.add_task("tasks", total=None, info="")
        self.batches = prog.add_task("batches", total=None, info="")

    def model(self, name: str, n_tasks: int) -> None:
        self.done += 1
        self.prog.update(self.models, completed=self.done, total=self.n, info=name)
        self.prog.update(self.tasks, completed=0, total=max(n_tasks, 1), info="")

    def finish(self) -> None:
        self.prog.update(self.models, completed=self.done + 1, info="")

    def batch(self, task: str, done: int, total: int) -> None:
        self.prog.update(self.batches, completed=done, total=total, info=task)
        if done == total:
            self.prog.advance(self.tasks)

    def harness(self, done: int, total: int, kind: str) -> None:
        self.prog.update(self.batches, completed=done, total=total, info=f"lm-eval {kind}")

    def task_done(self, n: int) -> None:
        self.prog.advance(self.tasks, n)
