"""Progress as plain one-line records, for logs and CI (stderr not a terminal).

`ProgressLog` takes the calls the CLI makes on rich's progress bars (`add_task`, `update`,
`advance`) and hands lines to `write` instead of drawing: when a phase starts, at most one line
per `interval` seconds while it runs, and when it ends, each with its counts, the elapsed time
and an ETA. A phase whose count goes back (or whose total changes) starts again: the bars of
one expert, task or cell are reused for the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

INTERVAL_ENV = "DIVMERGE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between two records of one phase


@dataclass
class _Phase:
    label: str
    total: int | None
    done: int = 0
    info: str = ""
    started: bool = False
    ended: bool = False
    t0: float = 0.0  # when this round started
    done0: int = 0  # the count then (a resumed run starts past 0)
    last: float = 0.0  # when the last record was written


class ProgressLog:
    """rich.progress.Progress's add_task/update/advance, written as rate-limited records."""

    def __init__(
        self,
        write: Callable[[str], None],
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.write, self.interval, self.clock = write, interval, clock
        self.phases: list[_Phase] = []

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, info: str = "", **_) -> int:
        """A new phase; it starts now if its total is known, else at the update that gives it."""
        self.phases.append(_Phase(description, None if total is None else int(total), info=info))
        self._record(self.phases[-1])
        return len(self.phases) - 1

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        info: str | None = None,
        **_,
    ) -> None:
        p = self.phases[task_id]
        done = p.done if completed is None else int(completed)
        done += int(advance or 0)
        new_total = p.total if total is None else int(total)
        if info is not None:
            p.info = info
        if p.started and (done < p.done or new_total != p.total):
            p.started = False  # the bar is reused for the next expert, task or cell
        p.done, p.total = done, new_total
        self._record(p)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _record(self, p: _Phase) -> None:
        if p.total is None:
            return
        now = self.clock()
        if not p.started:
            p.started, p.ended, p.t0, p.done0, p.last = True, False, now, p.done, now
            if p.done < p.total:
                self.write(_line(p.label, f"started, {p.done}/{p.total}", p.info))
                return
        if p.ended:
            return
        if p.done >= p.total:
            p.ended = True
            self.write(_line(p.label, f"done, {p.done}/{p.total} in {clock(now - p.t0)}", p.info))
        elif now - p.last >= self.interval:
            p.last = now
            self.write(_line(p.label, _counts(p, now), p.info))


def _counts(p: _Phase, now: float) -> str:
    elapsed = now - p.t0
    rate = (p.done - p.done0) / elapsed if elapsed > 0 else 0.0
    eta = clock((p.total - p.done) / rate) if rate > 0 else "?"
    pct = 100 * p.done // max(p.total, 1)
    return f"{p.done}/{p.total} ({pct}%), elapsed {clock(elapsed)}, ETA {eta}"


def _line(label: str, what: str, info: str) -> str:
    return f"progress: {label}: {what}" + (f" - {info}" if info else "")


def clock(seconds: float) -> str:
    """H:MM:SS, as rich's elapsed and remaining columns show it."""
    s = max(int(seconds + 0.5), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def interval_from(value: str | None) -> float:
    """DIVMERGE_PROGRESS_INTERVAL's seconds (default 10); ValueError names what is valid."""
    if value is None or not value.strip():
        return DEFAULT_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{INTERVAL_ENV}: {value!r} is not valid; use a number of seconds >= 0")
    return seconds
