"""Interrupts, leftovers of killed runs, concurrent runs, --force, YAML alias bombs and the user
errors that must exit 2 with one line (issue 11)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TEXTS, write_recipe
from divmerge_cli import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def ta_recipe(zoo: dict, *experts: str) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[e])} for e in experts or ("e0", "e1")],
    }


def one_line_error(code: int, err: str) -> bool:
    """Exit 2 with one error line (after the progress records of what had started, if any)."""
    lines = [x for x in err.strip().splitlines() if not x.startswith("progress: ")]
    return code == 2 and "Traceback" not in err and len(lines) == 1


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.divmerge-"))


# --- item 1: Ctrl-C exits 130, SIGTERM 143, saying what was kept ------------------------------


def _spawn(args: list[str], code: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = (
        [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "divmerge_cli.cli"]
    )
    return subprocess.Popen(
        cmd + ([] if code else args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test runner started in the background may ignore SIGINT; the user's shell does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be interrupted: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("never reached the point to interrupt")
        time.sleep(0.02)


def test_ctrl_c_during_divmerge_exits_130_and_names_the_resumable_state(tmp_path, llama_zoo):
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tasks = {
        f"t{i}": {"validation": "val.jsonl", "prompt": "{text}", "max_new_tokens": 3}
        for i in (0, 1)
    }
    write_recipe(tmp_path / "tasks.yaml", tasks)
    recipe = {
        "merge_method": "divmerge",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo[f"e{i}"]), "task": f"t{i}"} for i in (0, 1)],
        "tasks": "tasks.yaml",
        # enough steps that the run is still learning when the signal comes
        "parameters": {"samples": 4, "epochs": 100_000, "top_k": 8},
    }
    r = write_recipe(tmp_path / "r.yaml", recipe)
    out, state = tmp_path / "m", tmp_path / ".m.divmerge-state"
    proc = _spawn(["run", str(r), "-o", str(out), "--cache-dir", str(tmp_path / "cache")])
    _wait_for(proc, lambda: (state / "state.pt").is_file())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted (SIGINT)" in last and str(state) in last and "--resume" in last, err
    assert not out.exists() and leftovers(tmp_path, "m") == [".m.divmerge-state"]
    assert (state / "state.pt").is_file()  # what the message promises is there


# Slows the writer down so that the signal arrives while the merged tensors are being written.
SLOW_WRITE = """
import sys, time
from divmerge_cli.checkpoint import ShardWriter
real = ShardWriter.write
def slow(self, *a):
    time.sleep(0.2)
    return real(self, *a)
ShardWriter.write = slow
sys.argv = ["divmerge", *sys.argv[1:]]
from divmerge_cli.cli import main
main()
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_data_free_write_exits_128_plus_signal_and_leaves_nothing(
    sig, code, tmp_path, llama_zoo
):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    out = tmp_path / "m"
    proc = _spawn(["run", str(r), "-o", str(out)], SLOW_WRITE)
    _wait_for(proc, lambda: any(tmp_path.glob(".m.divmerge-tmp-*/model.safetensors")))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    name = signal.Signals(sig).name
    assert err.strip().splitlines()[-1] == f"interrupted ({name}): nothing was written to {out}"
    assert not out.exists() and leftovers(tmp_path, "m") == []


# --- item 3: YAML alias bombs, and every message capped ---------------------------------------


def alias_bomb(levels: int = 7) -> str:
    """A flow list of a few hundred bytes whose aliases expand to 10**levels values."""
    defs = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    defs += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(defs) + "]"


# Before the bound each of these printed a message of tens of MB, after up to 40 s of work.
BOMBS = {
    "recipe": (
        "r.yaml",
        "merge_method: linear\nmodels: [{model: BASE}]\nparameters: {weight: BOMB}\n",
        ["validate", "r.yaml"],
    ),
    "tasks": (
        "t.yaml",
        't0: {prompt: "{text}", metric: BOMB}\n',
        ["eval", "BASE", "--tasks", "t.yaml"],
    ),
    "sweep": ("s.yaml", "base_model: BASE\nexperts: BOMB\n", ["sweep", "s.yaml"]),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_a_yaml_alias_bomb_exits_2_at_once_with_a_short_line(kind, tmp_path, llama_zoo, cli):
    name, text, args = BOMBS[kind]
    text = text.replace("BASE", str(llama_zoo["base"])).replace("BOMB", alias_bomb())
    (tmp_path / name).write_text(text)
    assert len(text) < 1000
    start = time.monotonic()
    code, _, err = cli(*[str(tmp_path / a) if a == name else a for a in args])
    assert one_line_error(code, err) and "aliases" in err and len(err) < 700, err[:2000]
    assert time.monotonic() - start < 20
    assert leftovers(tmp_path, "m") == []


def test_a_self_referring_yaml_is_refused(tmp_path, cli):
    (tmp_path / "r.yaml").write_text("merge_method: linear\nmodels: &m [*m]\n")
    code, _, err = cli("validate", tmp_path / "r.yaml")
    assert one_line_error(code, err) and "aliases" in err, err


def test_long_error_messages_are_capped(tmp_path, llama_zoo, cli):
    deep = tmp_path.joinpath(*["d" * 100] * 8)  # a missing model whose path is 800+ characters
    recipe = {**ta_recipe(llama_zoo), "models": [{"model": str(deep)}]}
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert one_line_error(code, err) and err.rstrip().endswith("...") and len(err) < 560, err


# --- item 4: temporary folders of killed runs are removed by a later run ----------------------


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_later_run_removes_the_temp_folders_of_killed_runs(tmp_path, llama_zoo, cli):
    gone = dead_pid()
    stale = tmp_path / f".m.divmerge-tmp-{gone}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    live = tmp_path / ".m.divmerge-tmp-1"  # pid 1 is alive: that run may still be writing
    live.mkdir()
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    code, _, err = cli("run", r, "-o", tmp_path / "m")
    assert code == 0, err
    assert f"removed {stale}, left by a run that was killed" in err
    assert not stale.exists() and live.is_dir() and (tmp_path / "m" / "config.json").is_file()


def test_stale_old_output_is_removed_or_put_back(tmp_path):
    out, gone = tmp_path / "m", dead_pid()
    old = tmp_path / f".m.divmerge-old-{gone}"
    old.mkdir()
    (old / "divmerge_recipe.yaml").write_text("the previous output")
    # killed between setting OUT aside and renaming the new one in: OUT is put back
    assert checkpoint.remove_stale_temps(out) == [(old, f"restored as {out}")]
    assert (out / "divmerge_recipe.yaml").read_text() == "the previous output"
    old.mkdir()  # killed after the rename, while deleting the old copy: it goes
    assert (
        checkpoint.remove_stale_temps(out) == [(old, "removed")]
        and not old.exists()
        and out.is_dir()
    )


# --- item 9: --force only replaces what divmerge wrote ----------------------------------------


def test_force_only_replaces_a_folder_divmerge_wrote(tmp_path, llama_zoo, cli):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my recipe")
    (mine / "notes.md").write_text("my notes")
    code, _, err = cli("run", r, "-o", mine, "--force")
    assert one_line_error(code, err) and "divmerge wrote" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md", "recipe.yaml"]
    assert cli("run", r, "-o", tmp_path / "m")[0] == 0
    (tmp_path / "m" / "extra.txt").write_text("x")  # a divmerge output is still replaced whole
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--force")
    assert code == 0 and not (tmp_path / "m" / "extra.txt").exists(), err
    (tmp_path / "empty").mkdir()
    assert cli("run", r, "-o", tmp_path / "empty", "--force")[0] == 0


# --- item 10: two runs writing the same OUT ---------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from divmerge_cli.checkpoint import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_run_on_the_same_output_exits_2_naming_the_first(tmp_path, llama_zoo, cli):
    out = tmp_path / "m"
    holder = _spawn([str(out)], HOLD_LOCK)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
        code, _, err = cli("run", r, "-o", out)
        assert one_line_error(code, err) and f"PID {holder.pid}" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is left behind; the system released its lock with it
    assert (tmp_path / ".m.divmerge-lock").exists()
    code, _, err = cli("run", r, "-o", out)
    assert code == 0 and leftovers(tmp_path, "m") == [], err


def test_the_output_lock_is_reentrant_and_removed_after(tmp_path):
    out = tmp_path / "m"
    with checkpoint.output_lock(out), checkpoint.output_lock(out):
        assert (tmp_path / ".m.divmerge-lock").read_text().strip() == str(os.getpid())
    assert leftovers(tmp_path, "m") == []


# --- item 7: user errors that exited 1 --------------------------------------------------------


@pytest.fixture
def bad(tmp_path, llama_zoo) -> Path:
    """A tasks file, and a divmerge recipe over it, for the data-file cases."""
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    write_recipe(tmp_path / "tasks.yaml", {"t0": {"validation": "val.jsonl", "prompt": "{text}"}})
    write_recipe(
        tmp_path / "dm.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(llama_zoo["base"]),
            "models": [{"model": str(llama_zoo["e0"]), "task": "t0"}],
            "tasks": "tasks.yaml",
        },
    )
    write_recipe(tmp_path / "ta.yaml", ta_recipe(llama_zoo))
    return tmp_path


def _copy(zoo: dict, name: str, to: Path) -> Path:
    shutil.copytree(zoo[name], to)
    return to


def _header(folder: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)


def _case(case: str, t: Path, zoo: dict) -> tuple[list, str]:
    """Prepare one bad input under t; returns (divmerge arguments, text the message must hold)."""
    ta, dm, out = t / "ta.yaml", t / "dm.yaml", t / "out"
    if case == "non-UTF-8 data file":
        (t / "val.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
        return ["validate", dm], "not UTF-8"
    if case == "non-UTF-8 tasks file":
        (t / "tasks.yaml").write_bytes(b"t0:\n  prompt: 'caf\xe9 {text}'\n")
        return ["validate", dm], "not UTF-8"
    if case == "symlink loop as a model":
        (t / "loop").symlink_to(t / "loop")
        write_recipe(ta, {**ta_recipe(zoo), "models": [{"model": str(t / "loop")}]})
        return ["validate", ta], "loop"
    if case == "symlink loop as the output":
        (t / "out").symlink_to(t / "out")
        return ["run", ta, "-o", out], "loop"
    if case == "symlink loop as a data file":
        (t / "val.jsonl").unlink()
        (t / "val.jsonl").symlink_to(t / "val.jsonl")
        return ["validate", dm], "loop"
    if case in ("header is a list", "header entry lacks offsets", "header shape is text"):
        e = _copy(zoo, "e0", t / "e")
        entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        header = {
            "header is a list": [1, 2],
            "header entry lacks offsets": {"w": {"dtype": "F32", "shape": [2]}},
            "header shape is text": {"w": {**entry, "shape": "2x2"}},
        }[case]
        _header(e, header)
        write_recipe(ta, {**ta_recipe(zoo), "models": [{"model": str(e)}]})
        return ["validate", ta], str(e / "model.safetensors")
    if case == "config.json is a list":
        e = _copy(zoo, "e0", t / "e")
        (e / "config.json").write_text("[1, 2]")
        write_recipe(ta, {**ta_recipe(zoo), "models": [{"model": str(e)}]})
        return ["validate", ta], "config.json is not a JSON object"
    if case == "shard index is a list":
        e = _copy(zoo, "e0", t / "e")
        (e / "model.safetensors.index.json").write_text("[]")
        write_recipe(ta, {**ta_recipe(zoo), "models": [{"model": str(e)}]})
        return ["validate", ta], "not a valid index"
    if case == "multislerp task vectors cancel out":
        # on a zero base the task vectors are the weights, so -tau is exact: tau, -tau and 0
        e0 = load_file(zoo["e0"] / "model.safetensors")
        folders = []
        for name, scale in (("zero_base", 0), ("plus", 1), ("minus", -1), ("zero", 0)):
            folders.append(_copy(zoo, "e0", t / name))
            save_file({k: scale * v for k, v in e0.items()}, folders[-1] / "model.safetensors")
        recipe = {"merge_method": "multislerp", "base_model": str(folders[0])}
        recipe["models"] = [{"model": str(p)} for p in folders[1:]]
        write_recipe(ta, recipe)
        return ["run", ta, "-o", out], "cancel out"
    if case in ("--out-shard-size nan", "--out-shard-size inf"):
        return ["run", ta, "-o", out, "--out-shard-size", case.split()[-1]], "--out-shard-size"
    if case == "--seed 2**70":
        return ["run", ta, "-o", out, "--seed", str(2**70)], "--seed"
    if case == "eval --batch-size 0":
        return ["eval", zoo["e0"], "--tasks", t / "tasks.yaml", "--batch-size", "0"], "--batch-size"
    if case == "eval --json a folder":
        (t / "j").mkdir()
        return ["eval", zoo["e0"], "--tasks", t / "tasks.yaml", "--json", t / "j"], "is a folder"
    if case == "the output's parent is a file":
        (t / "file").write_text("x")
        return ["run", ta, "-o", t / "file" / "out"], "is a file"
    raise AssertionError(case)


CASES = [
    "non-UTF-8 data file",
    "non-UTF-8 tasks file",
    "symlink loop as a model",
    "symlink loop as the output",
    "symlink loop as a data file",
    "header is a list",
    "header entry lacks offsets",
    "header shape is text",
    "config.json is a list",
    "shard index is a list",
    "multislerp task vectors cancel out",
    "--out-shard-size nan",
    "--out-shard-size inf",
    "--seed 2**70",
    "eval --batch-size 0",
    "eval --json a folder",
    "the output's parent is a file",
]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_exit_2_with_one_line(case, bad, llama_zoo, cli):
    args, expected = _case(case, bad, llama_zoo)
    code, _, err = cli(*args)
    assert one_line_error(code, err) and expected in err, err
    assert not (bad / "out").is_dir() and leftovers(bad, "out") == []


def test_multislerp_of_models_that_all_equal_the_base_is_the_base(tmp_path, llama_zoo, cli):
    same = [_copy(llama_zoo, "base", tmp_path / f"b{i}") for i in range(3)]
    recipe = {**ta_recipe(llama_zoo), "merge_method": "multislerp"}
    recipe["models"] = [{"model": str(p)} for p in same]
    code, _, err = cli("run", write_recipe(tmp_path / "r.yaml", recipe), "-o", tmp_path / "m")
    assert code == 0, err
    got, base = (
        load_file(tmp_path / "m" / "model.safetensors"),
        load_file(same[0] / "model.safetensors"),
    )
    assert all(torch.equal(got[k], base[k]) for k in base)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_eval_json_in_a_read_only_folder_exits_2_before_evaluating(tmp_path, bad, llama_zoo, cli):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, err = cli(
        "eval", llama_zoo["e0"], "--tasks", bad / "tasks.yaml", "--json", ro / "s.json"
    )
    assert one_line_error(code, err) and "not writable" in err, err


def test_too_little_disk_space_is_refused_before_writing(tmp_path, llama_zoo, cli, monkeypatch):
    free = type("Usage", (), {"free": 1000})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: free)
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    code, _, err = cli("run", r, "-o", tmp_path / "m")
    assert one_line_error(code, err) and "needs" in err and "1.00 KB free" in err, err
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


@pytest.mark.parametrize(
    ("errno_", "expected"),
    [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "cannot write there")],
)
def test_a_full_or_read_only_disk_while_writing_exits_2(
    errno_, expected, tmp_path, llama_zoo, cli, monkeypatch
):
    def fail(self, name, tensor):
        raise OSError(errno_, os.strerror(errno_), str(self.folder / "model.safetensors"))

    monkeypatch.setattr(checkpoint.ShardWriter, "write", fail)
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    code, _, err = cli("run", r, "-o", tmp_path / "m")
    assert one_line_error(code, err) and expected in err, err
    if errno_ == errno.ENOSPC:
        assert "the merged model needs" in err  # how much space it takes
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


def test_an_environment_oserror_anywhere_exits_2(tmp_path, bad, llama_zoo, cli, monkeypatch):
    """The teacher cache folder on a full disk: one line naming the path, not a traceback."""
    from divmerge_cli import teacher

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache"))

    monkeypatch.setattr(teacher, "_write_entry", full)
    code, _, err = cli(
        "run", bad / "dm.yaml", "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache"
    )
    # a learned merge first says which task-vector mode it chose; then the error, on one line
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith("error:") and "No space left" in last and "free some space" in last, err


def test_an_interrupt_during_the_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "divmerge_recipe.yaml").write_text("previous")
    real, calls = Path.rename, []

    def rename(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # the new folder's rename into place
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt), checkpoint.atomic_folder(out) as tmp:
        (tmp / "divmerge_recipe.yaml").write_text("new")
    assert (out / "divmerge_recipe.yaml").read_text() == "previous"
    assert leftovers(tmp_path, "m") == []
