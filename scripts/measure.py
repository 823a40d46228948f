"""Wall time and peak memory of one child process: the one way the bench scripts measure them.

`measure(cmd)` runs `cmd` and returns its wall seconds, CPU seconds (user + sys) and peak resident
set in KiB: the `ru_maxrss` that `os.wait4` reports for it (KiB on Linux; macOS reports bytes and
is converted). That is the largest resident set of the command or of any descendant it waited for
(a maximum over processes, not a sum).

Linux copies a process's peak into a child it forks and keeps it across exec, so a command forked
from the (possibly large) calling script would report at least the script's own peak. The command
is therefore started by a small launcher process (a bare interpreter, about 10 MB), whose peak is
the only one it inherits. Linux and macOS only (os.wait4).

`own_peak_kib()` is for a process that reports figures about itself (per rank, per phase): its
own peak since exec (Linux VmHWM), without the peak `ru_maxrss` inherits from the parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# runs CMD and writes "wall cpu maxrss" to the file descriptor it is given; exits as CMD did
LAUNCHER = r"""
import os, sys, time
fd, cmd = int(sys.argv[1]), sys.argv[2:]
os.set_inheritable(fd, False)  # a lingering grandchild must not hold the report pipe open
t = time.perf_counter()
try:
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
except OSError as e:
    sys.exit(f"cannot run {cmd[0]}: {e}")
_, status, ru = os.wait4(pid, 0)
os.write(fd, f"{time.perf_counter() - t!r} {ru.ru_utime + ru.ru_stime!r} {ru.ru_maxrss}".encode())
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float  # user + sys of the command and its waited-for descendants
    peak_kib: int  # KiB (1024 bytes)
    stdout: str | None
    stderr: str | None

    @property
    def peak_bytes(self) -> int:
        return self.peak_kib * 1024


def measure(
    cmd: list[str],
    env: dict[str, str] | None = None,
    stdout: int | IO | None = None,
    stderr: int | IO | None = None,
    cwd: Path | None = None,
) -> Measured:
    """Run `cmd` (stdout/stderr as for subprocess.run: None inherits, a file or DEVNULL redirects,
    PIPE captures as text) and measure it. A command that cannot start gives returncode 1, NaN times, peak 0."""
    r, w = os.pipe()
    try:
        p = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, str(w), *map(str, cmd)],
            pass_fds=(w,),
            env=env,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            text=True,
        )
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        report = f.read().split()
    wall, cpu, maxrss = report if report else ("nan", "nan", "0")
    peak = int(maxrss) // 1024 if sys.platform == "darwin" else int(maxrss)
    return Measured(p.returncode, float(wall), float(cpu), peak, p.stdout, p.stderr)


def own_peak_kib() -> int:
    """This process's peak resident set since exec, KiB (Linux /proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
