"""`epochs: auto` and best-not-last for the learned merges (divmerge_cli/epochs.py): the stopping
rule on hand-made curves, and whole runs on the two toy experts of conftest.toy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_optimize import recipe

from conftest import run_interrupted, write_recipe
from divmerge_cli import optimize
from divmerge_cli.epochs import Rule, best_epoch, budget, held_count, holdout_split, stop_reason
from divmerge_cli.errors import UserError
from divmerge_cli.merge import plan_merge
from divmerge_cli.recipe import load_recipe, optimize_params

AUTO = Rule(auto=True, epochs=6, holdout=0.2, patience=2, min_delta=0.01)


# --- the stopping rule (pure) -------------------------------------------------------------------


def test_patience_counts_epochs_without_a_relative_improvement():
    # 1.0 -> 0.5 improves; 0.497 is 0.6% below 0.5 (< 1%): not an improvement; nor is 0.499
    assert stop_reason([1.0, 0.5], AUTO) is None
    assert stop_reason([1.0, 0.5, 0.497], AUTO) is None
    assert stop_reason([1.0, 0.5, 0.497, 0.499], AUTO) == "patience"
    # an improvement by more than 1% resets the count: 0.49 is 2% below 0.5
    assert stop_reason([1.0, 0.5, 0.497, 0.49], AUTO) is None
    assert stop_reason([1.0, 0.5, 0.497, 0.49, 0.6, 0.7], AUTO) == "patience"
    # the reference is the last improving value, not the last value: a slow creep stops
    assert stop_reason([1.0, 0.995, 0.989], AUTO) is None  # 1.1% below 1.0
    assert stop_reason([1.0, 0.995, 0.99], AUTO) == "patience"  # exactly 1%: not more
    assert stop_reason([1.0, 0.996, 0.992], AUTO) == "patience"


def test_the_cap_and_a_fixed_number_of_epochs_end_the_run():
    falling = [1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1]
    assert stop_reason(falling[:6], AUTO) is None
    assert stop_reason(falling, AUTO) == "cap"  # 6 epochs done, each improving
    fixed = Rule(auto=False, epochs=3, holdout=None, patience=2, min_delta=0.01)
    assert stop_reason([1.0, 1.0, 1.0], fixed) is None  # patience does not apply
    assert stop_reason([1.0, 1.0, 1.0, 1.0], fixed) == "fixed"
    # patience and cap at once: patience is the reason given
    assert stop_reason([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], AUTO) == "patience"


def test_the_best_epoch_is_the_lowest_finite_objective_earliest_on_ties():
    assert best_epoch([1.0, 0.5, 0.7]) == 1
    assert best_epoch([1.0, 1.2, 1.5]) == 0  # every epoch worse: the initial Gamma
    assert best_epoch([1.0, 0.5, 0.5, 0.6]) == 1
    assert best_epoch([1.0, float("nan"), 0.9, float("inf")]) == 2
    assert best_epoch([float("nan")]) == 0


def test_holdout_split_is_seeded_per_task_and_keeps_a_training_input():
    tasks = ["a"] * 10 + ["b"] * 3 + ["c"] * 2
    train, held = holdout_split(tasks, 0.2, seed=0)
    assert sorted(train + held) == list(range(15)) and not set(train) & set(held)
    # 0.2 x 10 = 2, 0.2 x 3 = 0.6 -> 1, 0.2 x 2 = 0.4 -> at least 1
    assert [sum(tasks[i] == t for i in held) for t in "abc"] == [2, 1, 1]
    assert holdout_split(tasks, 0.2, seed=0) == (train, held)
    assert holdout_split(tasks, 0.2, seed=1) != (train, held)
    # a task's draw does not depend on the other tasks
    alone = holdout_split(["a"] * 10, 0.2, seed=0)[1]
    assert [i for i in held if tasks[i] == "a"] == alone
    assert holdout_split(tasks, None, seed=0) == (list(range(15)), [])
    assert held_count(16, 0.2) == 3 and held_count(1, 0.5) == 1
    with pytest.raises(UserError, match="parameters.holdout: 0.5 of the 1 validation input"):
        holdout_split(["a", "a", "b"], 0.5, seed=0)


# --- whole runs on the toy experts ----------------------------------------------------------------


def _run(toy: Path, tmp: Path, out: str = "m", **params) -> dict:
    r = plan_merge(load_recipe(recipe(toy, tmp, **params)))
    return optimize.run_optimized(r, tmp / out, cache_dir=tmp / "cache")


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _written(out: Path) -> list[list[float]]:
    c = json.loads((out / "coefficients.json").read_text())
    return [[c["gamma"][t][g] for g in c["groups"]] for t in c["gamma"]]


def _gamma_after(log: list[dict], epoch: int) -> list[list[float]]:
    """Gamma at the end of `epoch` in train_log.jsonl (epoch 0: the initial 0.5)."""
    if epoch == 0:
        return [[0.5] * len(row) for row in log[0]["gamma"]]
    return [r for r in log if r["epoch"] == epoch][-1]["gamma"]


def test_auto_stops_early_on_a_flat_objective(toy, tmp_path):
    """lr 1e-6 barely moves Gamma: the held-back objective changes by far less than 1%, so the run
    stops after the patience of 2 epochs, not at the cap of 20."""
    s = _run(toy, tmp_path, epochs="auto", lr=1e-6, granularity="task")
    assert s["stopped"] == "patience" and len(s["curve"]) == 3, s["curve"]
    # 16 inputs per task, 3 held back each: 26 train in batches of 8 -> 4 steps an epoch
    assert s["steps"] == 2 * 4 and s["evaluated_on"] == "held_back"
    curve = [c["objective"] for c in s["curve"]]
    assert s["epoch"] == best_epoch(curve)
    assert max(curve) - min(curve) < 0.01 * curve[0]
    log = _log(tmp_path / "m")
    assert [r["eval"] for r in log if "eval" in r] == curve[1:]


def test_adamerging_takes_epochs_auto_too(toy, tmp_path):
    s = _run(toy, tmp_path, method="adamerging", epochs="auto", lr=1e-6, granularity="task")
    assert s["objective"] == "entropy" and s["stopped"] == "patience" and s["steps"] == 8


def test_auto_writes_the_best_held_back_gamma_when_later_epochs_are_worse(toy, tmp_path):
    """lr 0.3 at layer level: the held-back objective falls, then rises; the written Gamma (the
    output's coefficients.json and weights) is the one at the end of the lowest epoch."""
    s = _run(toy, tmp_path, epochs="auto", lr=0.3, granularity="layer")
    curve = [c["objective"] for c in s["curve"]]
    last = len(curve) - 1
    assert s["stopped"] == "patience" and s["epoch"] == best_epoch(curve)
    assert 0 < s["epoch"] < last and curve[last] > curve[s["epoch"]], curve
    log = _log(tmp_path / "m")
    assert log[-1]["epoch"] == last  # it trained past the best epoch
    assert _written(tmp_path / "m") == s["gamma"] == _gamma_after(log, s["epoch"])
    assert _written(tmp_path / "m") != log[-1]["gamma"]
    # the weights are theta0 + Gamma tau at the written Gamma: the output recipe reproduces them
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"| {s['epoch']} (written) | {curve[s['epoch']]:.5f} |" in card
    assert "held-back validation inputs (holdout 0.2)" in card and "(patience)" in card
    for c in s["curve"]:
        assert f"| {c['epoch']}" in card
    saved = json.loads((tmp_path / "m" / "coefficients.json").read_text())["epochs"]
    assert saved["epoch"] == s["epoch"] and saved["curve"] == s["curve"]
    recipe_out = yaml.safe_load((tmp_path / "m" / "divmerge_recipe.yaml").read_text())
    assert recipe_out["parameters"]["epochs"] == "auto"
    assert recipe_out["parameters"]["patience"] == 2  # auto's defaults made explicit


def test_a_fixed_epochs_run_writes_the_best_epoch_not_the_last(toy, tmp_path):
    """lr 1 overshoots from the first epoch on: every epoch's objective on the training inputs is
    above the initial Gamma's, so the initial Gamma is written (and the card says so)."""
    s = _run(toy, tmp_path, epochs=4, lr=1.0, granularity="layer")
    curve = [c["objective"] for c in s["curve"]]
    assert s["stopped"] == "fixed" and s["steps"] == 4 * 4 and len(curve) == 5
    assert s["evaluated_on"] == "training" and min(curve[1:]) > curve[0], curve
    assert s["epoch"] == 0
    assert _written(tmp_path / "m") == _gamma_after(_log(tmp_path / "m"), 0)
    assert (
        "the initial Gamma (the lowest) was written" in (tmp_path / "m" / "README.md").read_text()
    )
    # the objectives reported at the end are the written Gamma's: the initial ones
    assert s["after"] == s["before"]


def test_a_fixed_run_whose_objective_falls_every_epoch_is_unchanged(toy, tmp_path):
    """The default: no holdout, the training inputs evaluated. When every epoch lowers the
    objective, the written Gamma is the last step's, bit for bit, and the steps are main's
    schedule over every sample (what divmerge wrote before it chose the best epoch)."""
    s = _run(toy, tmp_path, epochs=4, lr=0.05, granularity="layer")
    curve = [c["objective"] for c in s["curve"]]
    assert all(b < a for a, b in zip(curve, curve[1:])), curve
    log = _log(tmp_path / "m")
    assert s["epoch"] == 4 and _written(tmp_path / "m") == log[-1]["gamma"] == s["gamma"]
    assert s["evaluated_on"] == "training"
    # the first epoch's curve value is `before`, the last `after` (the same passes, reused)
    assert s["curve"][0]["objective"] == sum(s["before"].values()) / 2
    assert s["curve"][-1]["objective"] == sum(s["after"].values()) / 2
    pb = optimize.prepare(
        plan_merge(load_recipe(recipe(toy, tmp_path, epochs=4))), cache_dir=tmp_path / "cache"
    )
    run = optimize._restore(pb, 0, tmp_path / "st", False, _Acc())
    assert run.schedule == optimize.batches(len(pb.samples), 8, 4, 0) and run.held == 0


def test_an_explicit_holdout_with_fixed_epochs_selects_on_the_held_back_inputs(toy, tmp_path):
    s = _run(toy, tmp_path, epochs=2, holdout=0.25, lr=0.05, granularity="task")
    # 4 of each task's 16 held back: 24 train in batches of 8
    assert s["evaluated_on"] == "held_back" and s["steps"] == 2 * 3 and s["stopped"] == "fixed"


class _Acc:
    device, process_index, num_processes, is_main_process = "cpu", 0, 1, True


def test_resume_keeps_the_best_gamma_its_epoch_and_the_curve(toy, tmp_path, monkeypatch):
    """Interrupted after the best epoch, the saved state holds the best Gamma and the curve: the
    resumed run writes what an uninterrupted one writes. Interrupted after the run had stopped
    (while writing), --resume trains no further."""
    params = dict(epochs="auto", lr=0.3, granularity="layer")
    full = _run(toy, tmp_path, "full", **params)
    r = plan_merge(load_recipe(recipe(toy, tmp_path, **params)))
    # 2 + 2 loss calls before epoch 1, then 4 steps + 2 evaluations an epoch: cut in epoch 10
    run_interrupted(monkeypatch, r, tmp_path / "part", tmp_path / "cache", 60)
    state = torch.load(optimize.state_dir_for(tmp_path / "part") / "state.pt", weights_only=True)
    assert full["epoch"] < len(state["curve"]) - 1 < len(full["curve"]) - 1  # past the best
    assert state["best"].tolist() == full["gamma"]
    resumed = optimize.run_optimized(
        r, tmp_path / "part", cache_dir=tmp_path / "cache", resume=True
    )
    for key in ("gamma", "epoch", "curve", "stopped", "steps"):
        assert resumed[key] == full[key], key

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(optimize, "run_merge", broken)
    with pytest.raises(KeyboardInterrupt):
        optimize.run_optimized(r, tmp_path / "late", cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    trained = []
    monkeypatch.setattr(optimize, "_step", lambda *a: trained.append(1))
    again = optimize.run_optimized(r, tmp_path / "late", cache_dir=tmp_path / "cache", resume=True)
    assert trained == [] and again["gamma"] == full["gamma"] and again["steps"] == full["steps"]


def test_validate_prints_the_worst_case_of_epochs_auto(toy, tmp_path, cli):
    path = recipe(toy, tmp_path, epochs="auto")
    code, out, err = cli("validate", path, "--json", tmp_path / "v.json")
    assert code == 0, err
    # 16 inputs per task, 3 held back each: 26 train in batches of 8, 4 steps an epoch
    line = (
        "estimate: epochs: auto, at most 20 epochs x 4 steps = at most 80 Adam steps, plus 21 "
        "objective passes (no gradient) over 6 held-back inputs"
    )
    assert line in " ".join(out.split()), out
    learning = json.loads((tmp_path / "v.json").read_text())["learning"]
    assert learning["max_steps"] == 80 and learning["eval_passes"] == 21
    code, out, err = cli("validate", recipe(toy, tmp_path, epochs=3))
    assert code == 0, err
    assert "estimate: 3 epochs x 4 steps = at most 12 Adam steps, plus 4 objective passes" in (
        " ".join(out.split())
    )
    assert "over 32 training inputs" in " ".join(out.split())


def test_budget_counts_the_training_inputs_after_the_holdout():
    class P:
        epochs, holdout, patience, min_delta, max_epochs, batch_size = "auto", 0.5, None, None, 5, 3

    b = budget({"a": 4, "b": 3}, P)  # held back 2 and 2 (1.5 rounds to 2): 3 train, 1 step
    assert (b["held_back"], b["steps_per_epoch"], b["max_steps"]) == (4, 1, 5)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"epochs": "soon"}, "parameters.epochs: 'soon' is not valid; epochs is a whole number"),
        ({"epochs": 0}, "parameters.epochs: 0 is not valid"),
        ({"epochs": True}, "parameters.epochs: True is not valid"),
        ({"epochs": "auto", "holdout": 1.5}, "parameters.holdout: 1.5 is out of range"),
        ({"epochs": "auto", "holdout": 0}, "parameters.holdout: 0.0 is out of range"),
        ({"epochs": "auto", "holdout": True}, "parameters.holdout:"),
        ({"epochs": "auto", "patience": 0}, "parameters.patience:"),
        ({"epochs": "auto", "patience": True}, "parameters.patience:"),
        ({"epochs": "auto", "patience": 1.5}, "parameters.patience:"),
        ({"epochs": "auto", "min_delta": -0.1}, "parameters.min_delta: -0.1 is out of range"),
        ({"epochs": "auto", "max_epochs": 0}, "parameters.max_epochs:"),
        ({"epochs": 4, "patience": 3}, "parameters.patience: only used with epochs: auto"),
        ({"max_epochs": 9}, "parameters.max_epochs: only used with epochs: auto (epochs is 3)"),
        ({"epochs": "auto", "samples": 1}, "parameters.holdout: 0.2 of the 1 validation input"),
        ({"holdout": 0.5, "samples": 1}, "parameters.holdout: 0.5 of the 1 validation input"),
    ],
)
def test_bad_epoch_settings_are_one_line_errors_naming_the_field(
    toy, tmp_path, cli, params, expected
):
    path = recipe(toy, tmp_path, **params)
    code, out, err = cli("validate", path)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1, err
    code, _, err = cli("run", path, "-o", tmp_path / "o", "--cache-dir", tmp_path / "cache")
    assert code == 2 and expected in err and not (tmp_path / "o").exists()
    assert not (tmp_path / "cache").exists()  # refused before any teacher generated


def test_auto_is_accepted_by_both_learned_methods_and_keeps_todays_default(toy, tmp_path):
    for method, default in (("divmerge", 4), ("adamerging", 5)):
        r = write_recipe(
            tmp_path / "r.yaml",
            {
                "merge_method": method,
                "base_model": str(toy / "base"),
                "models": [{"model": str(toy / "sent"), "task": "sent"}],
                "tasks": str(toy / "tasks.yaml"),
            },
        )
        p = optimize_params(load_recipe(r))
        assert p.epochs == default and p.holdout is None
        doc = yaml.safe_load(r.read_text())
        doc["parameters"] = {"epochs": "auto", "max_epochs": 7}
        p = optimize_params(load_recipe(write_recipe(r, doc)))
        assert p.epochs == "auto" and p.max_epochs == 7
