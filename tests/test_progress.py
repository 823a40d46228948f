"""Progress without a terminal: plain one-line records on stderr, rate-limited per phase."""

from __future__ import annotations

import re

import pytest
from test_optimize import recipe as learned_recipe

from conftest import TASKS
from divmerge_cli import bars
from divmerge_cli.progress import ProgressLog, interval_from


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_records_start_end_and_at_most_one_per_interval_with_an_eta():
    lines, clock = [], Clock()
    log = ProgressLog(lines.append, interval=10, clock=clock)
    bar = log.add_task("teacher sent", total=100, info="")
    for i in range(1, 101):  # one unit per second
        clock.now = float(i)
        log.update(bar, completed=i, info=f"loss {i}")
    assert lines[0] == "progress: teacher sent: started, 0/100"
    assert lines[-1] == "progress: teacher sent: done, 100/100 in 0:01:40 - loss 100"
    ticks = lines[1:-1]
    assert len(ticks) == 9  # at 10, 20, ..., 90 s: never two within 10 s
    assert (
        ticks[0] == "progress: teacher sent: 10/100 (10%), elapsed 0:00:10, ETA 0:01:30 - loss 10"
    )
    log.update(bar, completed=100)  # a finished phase says nothing more
    assert len(lines) == 11


def test_a_reused_bar_starts_again_and_a_total_comes_with_the_first_update():
    lines, clock = [], Clock()
    log = ProgressLog(lines.append, interval=10, clock=clock)
    bar = log.add_task("batches", total=None)
    assert lines == []  # no total yet: nothing to report
    log.update(bar, completed=0, total=4, info="sent")
    log.update(bar, completed=4)
    log.update(bar, completed=0, total=2, info="rev")  # the next task reuses the bar
    clock.now = 5.0
    log.advance(bar)
    log.advance(bar)
    assert lines == [
        "progress: batches: started, 0/4 - sent",
        "progress: batches: done, 4/4 in 0:00:00 - sent",
        "progress: batches: started, 0/2 - rev",
        "progress: batches: done, 2/2 in 0:00:05 - rev",
    ]
    # a resumed phase starts where it is; its ETA counts only the work done since
    resumed = log.add_task("divmerge", total=None)
    log.update(resumed, completed=50, total=100)
    clock.now = 15.0
    log.update(resumed, completed=60)
    assert lines[-2:] == [
        "progress: divmerge: started, 50/100",
        "progress: divmerge: 60/100 (60%), elapsed 0:00:10, ETA 0:00:40",
    ]


def test_a_resumed_sweep_starts_its_cells_at_the_first_that_runs():
    """Cells found in the results file are not named as if they ran again (a resumed zoo sweep's
    log read "started, 1/30 - <a finished cell>")."""
    lines, clock = [], Clock()
    report = bars.sweep(ProgressLog(lines.append, interval=10, clock=clock))
    report("skip", 1, 3, "ta a+b")
    report("skip", 2, 3, "ta a+c")
    report("start", 2, 3, "ta b+c")
    clock.now = 4.0
    report("cell", 3, 3, "ta b+c: ANP 98.00")
    assert lines == [
        "progress: cells: started, 2/3 - ta b+c (2 cells already in the results)",
        "progress: cells: done, 3/3 in 0:00:04 - ta b+c: ANP 98.00",
    ]
    lines.clear()  # a sweep found whole says so once
    report = bars.sweep(ProgressLog(lines.append, interval=10, clock=clock))
    for i, name in enumerate(("ta a+b", "ta a+c"), 1):
        report("skip", i, 2, name)
    assert lines == ["progress: cells: done, 2/2 in 0:00:00 - ta a+c"]


def test_interval_from_the_environment():
    assert interval_from(None) == interval_from("") == 10
    assert interval_from("0") == 0 and interval_from("2.5") == 2.5
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match="DIVMERGE_PROGRESS_INTERVAL"):
            interval_from(bad)


def _records(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("progress: ")]


def test_run_without_a_terminal_prints_records_and_quiet_silences_them(
    toy, tmp_path, cli, monkeypatch
):
    r, cache = learned_recipe(toy, tmp_path, epochs=2, samples=8), tmp_path / "cache"
    monkeypatch.setenv("DIVMERGE_PROGRESS_INTERVAL", "3600")  # no record between start and end
    code, _, err = cli("run", r, "-o", tmp_path / "a", "--cache-dir", cache)
    assert code == 0, err
    records = _records(err)
    for task in TASKS:
        i = records.index(f"progress: teacher {task}: started, 0/8")
        assert records[i + 1].startswith(f"progress: teacher {task}: done, 8/8 in ")
    steps = 2 * 2  # 16 samples in batches of 8 (4 x 2 tasks), 2 epochs
    i = records.index(f"progress: divmerge: started, 0/{steps}")
    assert re.fullmatch(
        rf"progress: divmerge: done, {steps}/{steps} in \d:\d\d:\d\d - epoch 2/2, loss \d\.\d+",
        records[i + 1],
    )
    i = records.index("progress: write: started, 0/21")
    assert records[i + 1].startswith("progress: write: done, 21/21 in ")
    assert len(records) == 2 * 4  # start and end of the 4 phases, nothing between

    monkeypatch.setenv("DIVMERGE_PROGRESS_INTERVAL", "0")  # a record at every update
    code, _, err = cli("run", r, "-o", tmp_path / "a", "--force", "--cache-dir", cache)
    assert code == 0, err
    learn = [x for x in _records(err) if x.startswith("progress: divmerge: ")]
    assert len(learn) == steps + 1
    assert learn[1].startswith(f"progress: divmerge: 1/{steps} (25%), elapsed ")
    assert " ETA " in learn[1] and "epoch 1/2, loss" in learn[1]

    code, out, err = cli("run", r, "-o", tmp_path / "a", "--force", "--cache-dir", cache, "-q")
    assert code == 0 and "merged" in out, err
    assert _records(err) == []

    monkeypatch.setenv("DIVMERGE_PROGRESS_INTERVAL", "soon")
    code, _, err = cli("run", r, "-o", tmp_path / "b", "--cache-dir", cache)
    assert code == 2 and "DIVMERGE_PROGRESS_INTERVAL: 'soon' is not valid" in err
    assert not (tmp_path / "b").exists()


def test_eval_records_each_model_and_quiet_silences_them(toy, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("DIVMERGE_PROGRESS_INTERVAL", "3600")
    tasks = toy / "tasks.yaml"
    args = ("eval", toy / "sent", toy / "rev", "--tasks", tasks, "--cache-dir", tmp_path / "c")
    code, _, err = cli(*args)
    assert code == 0, err
    records = _records(err)
    assert records[0] == f"progress: models: started, 0/2 - {toy / 'sent'}"
    assert records[-1].startswith("progress: models: done, 2/2 in ")
    assert "progress: tasks: started, 0/2" in records
    code, _, err = cli(*args, "--quiet")
    assert code == 0 and _records(err) == [], err
