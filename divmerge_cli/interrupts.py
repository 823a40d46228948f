"""What a command interrupted by Ctrl-C or SIGTERM says it kept, and when a signal comes too late
to stop it: the bookkeeping behind the CLI's signal handler (the CLI prints the messages)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


class Interrupts:
    """One command's signals and what its interruption would leave behind."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stopped_by: list[int] = []  # the signals that interrupted this command
        self.kept: list[Callable[[], str | None]] = []  # what an interruption leaves, described
        # when the command's output is in place, saying so
        self.done: list[tuple[Callable[[], bool], str]] = []
        self.deferred: list[int] = []  # signals that came once it was: it finishes its last second

    def on_interrupt(self, describe: Callable[[], str | None]) -> None:
        """Register what to say if the command is interrupted: the latest registered that
        answers."""
        self.kept.insert(0, describe)

    def finish_once(self, path: Path, complete: str) -> None:
        """From now on, the command's work is done once a new PATH is in place (renamed there:
        its inode is not the one it has now). A signal after that lets the command finish (exit 0,
        saying so): stopping it would report an interruption, and "nothing was written", for work
        that is complete. A second signal stops it, saying COMPLETE."""

        def ino() -> int | None:
            try:
                return os.stat(path).st_ino
            except OSError:
                return None

        if self.deferred:  # a signal came while the previous phase finished: do not start this one
            self.deferred.clear()
            self.done.clear()
            raise KeyboardInterrupt
        before = ino()
        self.done[:] = [(lambda: (now := ino()) is not None and now != before, complete)]

    def handle(self, signum: int, _frame) -> None:
        """The signal handler: a first signal once the output is in place is deferred."""
        self.stopped_by.append(signum)
        if len(self.stopped_by) == 1 and self.complete():
            self.deferred.append(signum)
            return
        raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary folders are removed on the way out

    def complete(self) -> bool:
        return bool(self.done) and self.done[0][0]()

    def signal(self) -> int:
        """The signal that stopped the command (Ctrl-C when none came: click's Abort)."""
        return self.stopped_by[0] if self.stopped_by else signal.SIGINT

    def left(self) -> str | None:
        """What the interrupted command leaves: its complete output, or what it kept."""
        if self.complete():
            return self.done[0][1]
        return next((m for describe in self.kept if (m := describe())), None)

    def finished_after(self, code: object) -> str | None:
        """The command finished although a signal came: what was complete when it came."""
        if self.deferred and self.deferred == self.stopped_by and code != 130:
            return self.done[0][1]
        return None
