"""Defects found by the attacker's trial (issue 23, item 4): outputs that replace inputs, bad
output paths, non-finite gates, an expert scoring 0, inputs replaced mid-merge, a full disk,
tokenizer links out of a model folder, late signals and damaged resume state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_eval_cli import _recipe
from test_hardening import one_line_error, ta_recipe
from test_optimize import recipe as toy_learned

from conftest import TASKS, run_interrupted, write_recipe

# --- --json and -o never replace an input, and bad paths exit 2 before any work --------------


def test_validate_json_onto_its_own_recipe_is_refused(llama_zoo, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    before = r.read_text()
    code, _, err = cli("validate", r, "--json", r)
    assert one_line_error(code, err) and "overlaps the input file" in err, err
    assert r.read_text() == before


def test_eval_json_onto_a_file_of_an_input_model_is_refused(toy, tmp_path, cli):
    model = shutil.copytree(toy / "sent", tmp_path / "sent")
    (model / "notes.json").write_text('{"mine": 1}')
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    # a file the model is made of, existing or new, and any file that is not a divmerge report
    for name in ("config.json", "tokenizer_config.json", "added_tokens.json", "notes.json"):
        args = ["eval", model, "--tasks", toy / "tasks.yaml", "--limit", "1", "--json"]
        code, _, err = cli(*args, model / name)
        assert one_line_error(code, err) and "overlaps the input model" in err, (name, err)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    # a new report beside the weights is not part of the model (docs/ci.md's OUT/gate.json),
    # and a report divmerge wrote there may be written again
    for _ in range(2):
        code, _, err = cli(*args, model / "gate.json", "--cache-dir", tmp_path / "c")
        assert code == 0 and json.loads((model / "gate.json").read_text())["models"], err
    # the tasks file and the data it names are inputs too
    code, _, err = cli(
        "eval", model, "--tasks", toy / "tasks.yaml", "--json", toy / "sent.test.jsonl"
    )
    assert one_line_error(code, err) and "overlaps the input file" in err, err


def _bad_path(case: str, t: Path) -> Path:
    if case == "missing folder":
        return t / "nope" / "x"
    if case == "dangling link":
        (t / "link").symlink_to(t / "gone" / "x")
        return t / "link"
    return Path("/proc/divmerge-x")  # a pseudo-filesystem: its folders take no new file


@pytest.mark.parametrize("case", ["missing folder", "dangling link", "pseudo-filesystem"])
def test_bad_json_paths_exit_2_before_any_work(case, toy, tmp_path, cli):
    path = _bad_path(case, tmp_path)
    r = _recipe(toy, tmp_path)
    for args in (["validate", r], ["eval", toy / "base", "--tasks", toy / "tasks.yaml"]):
        code, _, err = cli(*args, "--json", path)
        assert one_line_error(code, err) and f"--json {path}" in err, err
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("case", ["dangling link", "pseudo-filesystem"])
def test_bad_output_folders_exit_2_before_any_work(case, llama_zoo, tmp_path, cli):
    path = _bad_path(case, tmp_path)
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    code, _, err = cli("run", r, "-o", path)
    assert one_line_error(code, err) and f"-o {path}" in err, err
    assert not list(tmp_path.glob(".link.divmerge-*"))


def test_json_dash_writes_the_json_to_stdout(toy, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("validate", _recipe(toy, tmp_path), "--json", "-")
    assert code == 0, err
    assert json.loads(out)["ok"] is True and "ok" in err  # the human line moved to stderr
    code, out, err = cli(
        "eval", toy / "base", "--tasks", toy / "tasks.yaml", "--json", "-", "--limit", "2",
        "--cache-dir", tmp_path / "c",
    )  # fmt: skip
    assert code == 0, err
    assert set(json.loads(out)["models"][str(toy / "base")]["tasks"]) == set(TASKS)
    assert not (tmp_path / "-").exists()


# --- gates are finite numbers, and JSON output is standard JSON --------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-inf"])
def test_non_finite_gates_are_refused_everywhere(value, toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    for gate in (["--fail-under-anp", value], ["--fail-under", f"sent={value}"]):
        code, _, err = cli("eval", toy / "base", "--tasks", r, *gate, "--json", tmp_path / "e.json")
        assert one_line_error(code, err) and "finite" in err, err
        code, _, err = cli("run", r, "-o", tmp_path / "m", "--eval", *gate)
        assert one_line_error(code, err) and "finite" in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "e.json").exists()


def test_json_output_has_no_nan_or_infinity():
    from divmerge_cli.checkpoint import standard_json

    got = standard_json({"a": float("nan"), "b": [1.5, float("inf")], "c": (float("-inf"),)})
    assert json.loads(got) == {"a": None, "b": [1.5, None], "c": [None]}


# --- a reference expert scoring 0: every score is written, ANP is undefined -------------------


def _zero_reference_recipe(toy: Path, tmp_path: Path) -> Path:
    """The base as the `sent` reference: it answers no review right, so it scores 0."""
    return write_recipe(
        tmp_path / "z.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [
                {"model": str(toy / "base"), "task": "sent"},
                {"model": str(toy / "rev"), "task": "rev"},
            ],
            "tasks": str(toy / "tasks.yaml"),
        },
    )


def test_eval_with_a_reference_scoring_0_writes_every_score(toy, tmp_path, cli):
    r = _zero_reference_recipe(toy, tmp_path)
    args = ["eval", toy / "sent", "--tasks", r, "--cache-dir", tmp_path / "c"]
    code, out, err = cli(*args, "--json", tmp_path / "e.json")
    assert code == 0 and "scores 0" in err and "undefined" in out, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["references"]["sent"]["score"] == 0  # what the test relies on
    entry = report["models"][str(toy / "sent")]
    assert set(entry["tasks"]) == set(TASKS) and entry["anp"] is None
    assert entry["tasks"]["sent"]["normalized"] is None
    rev = entry["tasks"]["rev"]
    assert rev["normalized"] == rev["score"] / report["references"]["rev"]["score"]
    # a gate on the task that has a reference works; an ANP gate cannot pass, and says why
    code, _, err = cli(*args, "--fail-under", "rev=0", "--json", tmp_path / "g.json")
    assert code == 0, err
    code, _, err = cli(*args, "--fail-under-anp", "0", "--json", tmp_path / "a.json")
    assert code == 3 and "ANP is undefined (the expert scores 0 on task 'sent')" in err, err
    assert json.loads((tmp_path / "a.json").read_text())["gates"][0]["passed"] is False


def test_run_eval_with_a_reference_scoring_0_writes_eval_json(toy, tmp_path, cli):
    r = _zero_reference_recipe(toy, tmp_path)
    out_dir = tmp_path / "m"
    code, _, err = cli("run", r, "-o", out_dir, "--eval", "--cache-dir", tmp_path / "c")
    assert code == 0 and "scores 0" in err, err
    entry = json.loads((out_dir / "eval.json").read_text())["models"][str(out_dir)]
    assert set(entry["tasks"]) == set(TASKS) and entry["anp"] is None


# --- an input replaced while a merge reads it ---------------------------------------------------


def _replace_midway(monkeypatch, victim: Path, donor: Path, after: int = 5) -> None:
    """After `after` tensor reads, VICTIM is replaced by a copy of DONOR (as `mv new old` does)."""
    from divmerge_cli import checkpoint

    real, calls = checkpoint.Checkpoint.get, []

    def get(self, *a, **k):
        calls.append(1)
        if len(calls) == after:
            shutil.copy(donor, victim.with_name("incoming"))
            victim.with_name("incoming").replace(victim)
        return real(self, *a, **k)

    monkeypatch.setattr(checkpoint.Checkpoint, "get", get)


@pytest.mark.parametrize("extra", [[], ["--as-adapter", "--adapter-rank", "2"]])
def test_an_input_replaced_during_a_merge_exits_2_and_writes_nothing(
    extra, llama_zoo, tmp_path, cli, monkeypatch
):
    zoo = {n: shutil.copytree(llama_zoo[n], tmp_path / n) for n in ("base", "e0", "e1")}
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(zoo))
    _replace_midway(monkeypatch, zoo["e1"] / "model.safetensors", zoo["e0"] / "model.safetensors")
    code, _, err = cli("run", r, "-o", tmp_path / "m", *extra)
    assert one_line_error(code, err) and "changed while the merge" in err, err
    assert str(zoo["e1"] / "model.safetensors") in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.divmerge-*"))


# --- files copied into OUT are the model folder's own --------------------------------------------


def test_a_tokenizer_file_linking_out_of_the_model_folder_is_not_copied(llama_zoo, tmp_path, cli):
    zoo = {n: shutil.copytree(llama_zoo[n], tmp_path / n) for n in ("base", "e0", "e1")}
    secret = tmp_path / "private" / "id_key"
    secret.parent.mkdir()
    secret.write_text("a private file")
    (zoo["base"] / "merges.txt").symlink_to(secret)
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(zoo))
    for args in (["validate", r], ["run", r, "-o", tmp_path / "m"]):
        code, _, err = cli(*args)
        assert one_line_error(code, err) and "merges.txt links to" in err and "outside" in err, err
    assert not (tmp_path / "m").exists()
    # a link to a file inside the folder is the folder's own file; so is a hub snapshot's link
    # into its repository's blobs/
    (zoo["base"] / "merges.txt").unlink()
    (zoo["base"] / "merges.txt").symlink_to(zoo["base"] / "tokenizer.json")
    snapshot = tmp_path / "models--org--base" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--base" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(zoo["base"], snapshot)
    for f in snapshot.iterdir():
        f.replace(blobs / f.name)
        f.symlink_to(Path("..") / ".." / "blobs" / f.name)
    for base in (zoo["base"], snapshot):
        recipe = {**ta_recipe(zoo), "base_model": str(base)}
        r = write_recipe(tmp_path / "ok.yaml", recipe)
        code, _, err = cli("run", r, "-o", tmp_path / "m", "--force")
        assert code == 0, err
        assert (tmp_path / "m" / "merges.txt").read_text() == (
            zoo["base"] / "tokenizer.json"
        ).read_text()


# --- a full disk while saving the optimizer state, the teacher cache or --json ------------------

PAGE = 4096
FULL_DISK = r"""
set -e
mount -t tmpfs -o size=1m tmpfs "$DISK"
mkdir "$DISK/state" "$DISK/cache"
dd if=/dev/zero of="$DISK/fill" bs=4096 count=$((256 - FREE)) 2>/dev/null || true
set +e
"$PYTHON" -m divmerge_cli.cli "$@" 2>"$OUT/err" >/dev/null
echo $? >"$OUT/rc"
rm "$DISK/fill"
find "$DISK" -mindepth 1 -type f -printf '%P %s\n' >"$OUT/left"
"""


def _unshare_works() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _on_a_full_disk(tmp_path: Path, args: list, free_pages: int) -> tuple[int, str, list[str]]:
    """Run divmerge with tmp_path/disk a real 1 MB tmpfs (mounted in a private user and mount
    namespace) with FREE_PAGES pages free; returns the exit code, stderr and the files left on
    it (name and size) once the filler is removed."""
    import os
    import subprocess
    import sys

    disk, out = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    out.mkdir()
    env = {
        **os.environ,
        "DISK": str(disk),
        "OUT": str(out),
        "FREE": str(free_pages),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = ["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", *map(str, args)]
    subprocess.run(cmd, env=env, check=True, timeout=600, cwd=tmp_path)  # not the checkout
    left = (out / "left").read_text().split("\n")
    return int((out / "rc").read_text()), (out / "err").read_text(), [x for x in left if x]


def _learned_recipe(llama_zoo: dict, tmp_path: Path) -> Path:
    from conftest import TEXTS

    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tasks = {"t0": {"validation": "val.jsonl", "prompt": "{text}", "max_new_tokens": 3}}
    write_recipe(tmp_path / "tasks.yaml", tasks)
    recipe = {
        "merge_method": "divmerge",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo["e0"]), "task": "t0"}],
        "tasks": "tasks.yaml",
        "parameters": {"samples": 4, "epochs": 1, "top_k": 8, "granularity": "task"},
    }
    return write_recipe(tmp_path / "dm.yaml", recipe)


needs_unshare = pytest.mark.skipif(
    not _unshare_works(), reason="needs `unshare -rm` to mount a small tmpfs"
)


@needs_unshare
def test_a_full_disk_while_saving_the_optimizer_state_exits_2_and_leaves_no_empty_state(
    llama_zoo, tmp_path
):
    r = _learned_recipe(llama_zoo, tmp_path)
    # the state folder (beside OUT) on the full disk: one page free takes the log, not the state
    (tmp_path / ".m.divmerge-state").symlink_to(tmp_path / "disk" / "state")
    args = ["run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache"]
    code, err, left = _on_a_full_disk(tmp_path, args, free_pages=1)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert "the optimizer state in" in last and "disk is full" in last and "needed" in last, err
    assert str(tmp_path / ".m.divmerge-state") in last
    assert not [x for x in left if x.startswith("state/") and "train_log" not in x], left
    assert not (tmp_path / "m").exists()


@needs_unshare
def test_a_full_disk_while_writing_the_teacher_cache_exits_2_and_leaves_nothing(
    llama_zoo, tmp_path
):
    r = _learned_recipe(llama_zoo, tmp_path)
    args = ["run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "disk" / "cache"]
    code, err, left = _on_a_full_disk(tmp_path, args, free_pages=0)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert f"the teacher cache in {tmp_path / 'disk' / 'cache'}" in last and "needed" in last, err
    assert left == [], left


@needs_unshare
def test_a_full_disk_under_eval_json_exits_2_and_leaves_no_temp_file(toy, tmp_path):
    args = ["eval", toy / "base", "--tasks", toy / "tasks.yaml", "--limit", "1"]
    args += ["--cache-dir", tmp_path / "c", "--json", tmp_path / "disk" / "e.json"]
    code, err, left = _on_a_full_disk(tmp_path, args, free_pages=0)
    assert left == [], left  # no temporary file: it was left, 0 bytes
    assert code == 2 and "Traceback" not in err and "--json" in err and "disk is full" in err, err


# --- a signal once OUT is in place ---------------------------------------------------------------


def _signal_after(monkeypatch, module, name: str, signals: int) -> None:
    """`module.name` (what writes OUT) sends this process SIGTERM SIGNALS times once it returns."""
    import os
    import signal

    real = getattr(module, name)

    def wrapped(*a, **k):
        got = real(*a, **k)
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
        return got

    monkeypatch.setattr(module, name, wrapped)


def test_a_signal_after_out_is_in_place_finishes_with_exit_0(llama_zoo, tmp_path, cli, monkeypatch):
    from divmerge_cli import merge

    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    _signal_after(monkeypatch, merge, "run_merge", 1)
    code, out, err = cli("run", r, "-o", tmp_path / "m")
    assert code == 0, err
    assert (
        err.strip().splitlines()[-1] == f"SIGTERM came after {tmp_path / 'm'} is complete: finished"
    )
    assert "merged" in out and (tmp_path / "m" / "model.safetensors").is_file()
    # a second signal stops the last second, and says OUT is complete (not "nothing was written")
    _signal_after(monkeypatch, merge, "run_merge", 2)
    code, _, err = cli("run", r, "-o", tmp_path / "m2")
    assert code == 143, err
    assert err.strip().splitlines()[-1] == f"interrupted (SIGTERM): {tmp_path / 'm2'} is complete"


def test_a_signal_after_a_learned_merge_is_in_place_removes_the_state(
    llama_zoo, tmp_path, cli, monkeypatch
):
    from divmerge_cli import optimize

    r = _learned_recipe(llama_zoo, tmp_path)
    _signal_after(monkeypatch, optimize, "run_merge", 1)
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "c")
    assert code == 0 and "SIGTERM came after" in err and "--resume" not in err, err
    assert (tmp_path / "m" / "coefficients.json").is_file()
    assert not (tmp_path / ".m.divmerge-state").exists()


def test_a_signal_between_the_merge_and_its_eval_stops_before_the_eval(
    toy, tmp_path, cli, monkeypatch
):
    from divmerge_cli import merge

    _signal_after(monkeypatch, merge, "run_merge", 1)
    out_dir = tmp_path / "m"
    code, _, err = cli("run", _recipe(toy, tmp_path), "-o", out_dir, "--eval")
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted (SIGTERM): {out_dir} is complete; its eval.json was not written"
    assert (out_dir / "config.json").is_file() and not (out_dir / "eval.json").exists()


# --- the state folder of a learned merge: processed vectors, the log, execution settings --------


def test_damaged_processed_task_vectors_are_computed_again(toy, tmp_path):
    import torch

    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    r = plan_merge(load_recipe(toy_learned(toy, tmp_path, base_method="ties", density=0.3)))
    params = optimize.optimize_params(r.recipe)
    name = "model.layers.1.self_attn.q_proj.weight"
    first = optimize.task_vector_sources(r, params, 0, tmp_path / "w")
    want = [e.tau(name, None) for e in first]
    (stored,) = (tmp_path / "w").glob("processed-*/e1/model.safetensors")
    stored.write_bytes(stored.read_bytes()[:-100])  # a truncated file: every run exited 2
    again = optimize.task_vector_sources(r, params, 0, tmp_path / "w")
    assert all(torch.equal(e.tau(name, None), w) for e, w in zip(again, want))


def _interrupted_run(toy, tmp_path: Path, monkeypatch, **params):
    """A learned merge stopped at its 4th loss evaluation (2 at init, then step 2): its plan, and
    the state folder it left with 1 step saved."""
    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    r = plan_merge(load_recipe(toy_learned(toy, tmp_path, granularity="layer", epochs=2, **params)))
    run_interrupted(monkeypatch, r, tmp_path / "m", tmp_path / "cache", 5)
    return r, optimize.state_dir_for(tmp_path / "m")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: [lines[0], '{"step": 2, "loss": 0.5, "gam'], "line 2 is not the record"),
        (lambda lines: lines[:1], "holds 1 steps but the optimizer state is at step 2"),
    ],
    ids=["garbled line", "truncated"],
)
def test_a_damaged_train_log_is_named_not_resumed_silently(
    damage, message, toy, tmp_path, monkeypatch
):
    from divmerge_cli import optimize
    from divmerge_cli.errors import UserError

    r, state = _interrupted_run(toy, tmp_path, monkeypatch)
    log = state / "train_log.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 2  # two steps saved before the interruption
    log.write_text("\n".join(damage(lines)) + "\n")
    with pytest.raises(UserError, match=message) as e:
        optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache", resume=True)
    assert "state.pt is damaged" not in str(e.value) and str(log) in str(e.value)


def test_resume_may_switch_where_the_task_vectors_live(toy, tmp_path, monkeypatch):
    import dataclasses

    import torch

    from divmerge_cli import optimize

    r, state = _interrupted_run(toy, tmp_path, monkeypatch, task_vectors="memory")
    full = optimize.run_optimized(r, tmp_path / "full", cache_dir=tmp_path / "cache")
    params = {**r.recipe.parameters, "task_vectors": "stream"}
    streamed = dataclasses.replace(r, recipe=r.recipe.model_copy(update={"parameters": params}))
    resumed = optimize.run_optimized(
        streamed, tmp_path / "m", cache_dir=tmp_path / "cache", resume=True
    )
    assert resumed["task_vectors"] == "stream" and resumed["steps"] == full["steps"]
    assert torch.allclose(torch.tensor(resumed["gamma"]), torch.tensor(full["gamma"]), atol=1e-6)
