"""`divmerge eval`: scores per task, ANP against the experts from a recipe, JSON, divergences."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TASKS, write_recipe
from divmerge_cli import cli as cli_module
from divmerge_cli import evaluate
from divmerge_cli.evaluate import evaluate_model
from divmerge_cli.tasks import load_tasks


def _recipe(toy, tmp_path):
    return write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n), "task": n} for n in TASKS],
            "tasks": str(toy / "tasks.yaml"),
        },
    )


def test_eval_scores_anp_and_json(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, out, err = cli(
        "eval",
        toy / "sent",
        toy / "base",
        "--tasks",
        r,
        "--json",
        tmp_path / "s.json",
        "--cache-dir",
        tmp_path / "cache",
        "--divergence",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    sent = report["models"][str(toy / "sent")]
    specs = load_tasks(str(toy / "tasks.yaml"), toy, "tasks.yaml")
    direct = evaluate_model(toy / "sent", specs)
    assert {t: s["score"] for t, s in sent["tasks"].items()} == {
        t: s.score for t, s in direct.items()
    }
    refs = {t: report["references"][t]["score"] for t in TASKS}
    expect = sum(sent["tasks"][t]["score"] / refs[t] for t in TASKS) / 2
    assert abs(sent["anp"] - expect) < 1e-12
    assert (
        sent["tasks"]["sent"]["score"] == refs["sent"]
    )  # the sentiment expert is its own reference
    # the expert diverges from itself by ~0 on its own task and from the base by more
    assert sent["divergence"]["sent"]["js"] < 1e-6
    assert sent["divergence"]["sent"]["kl"] < 1e-6
    base = report["models"][str(toy / "base")]["divergence"]["sent"]
    assert base["js"] > 1e-3 and base["kl"] > 1e-3
    assert base["js"] <= math.log(2) and base["kl"] != base["js"]  # two objectives, one pass
    assert "ANP" in out


def test_eval_errors(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, _, err = cli("eval", tmp_path / "nope", "--tasks", r)
    assert code == 2 and "not a Hugging Face model folder" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--reference", "zzz=/x")
    assert code == 2 and "TASK=PATH" in err
    code, _, err = cli("eval", toy / "base", "--tasks", tmp_path / "missing.yaml")
    assert code == 2 and "file not found" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--split", "train")
    assert code == 2 and "--split" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--device", "tpu")
    assert code == 2 and "--device: 'tpu' is not valid; use auto, cpu or cuda" in err
    if not torch.cuda.is_available():
        code, _, err = cli("eval", toy / "base", "--tasks", r, "--device", "cuda")
        assert code == 2 and "no CUDA device is available" in err


def spy_devices(monkeypatch) -> list:
    """The devices evaluate_model moves its models to (each model then stays on the CPU)."""
    seen, real = [], evaluate.load_expert_model

    def load(expert):
        model = real(expert)
        to = model.to

        def record(device, *a, **kw):
            seen.append(device)
            return to("cpu")

        model.to = record  # the instance's attribute shadows nn.Module.to
        return model

    monkeypatch.setattr(evaluate, "load_expert_model", load)
    monkeypatch.setattr(cli_module, "_device", lambda c: {"cuda": "cuda:7"}.get(c, "cpu"))
    return seen


def test_eval_and_run_eval_generate_on_the_device_asked_for(toy, tmp_path, cli, monkeypatch):
    seen = spy_devices(monkeypatch)
    r = _recipe(toy, tmp_path)
    code, _, err = cli("eval", toy / "sent", "--tasks", r, "--device", "cuda")
    assert code == 0, err
    assert seen == ["cuda:7"] * 3  # the model, then the two references
    seen.clear()
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--eval", "--device", "cuda")
    assert code == 0, err
    assert seen == ["cuda:7"]  # the merged model (the references' scores are cached above)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_cuda_scores_as_on_the_cpu(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    scores = {}
    for dev in ("cpu", "cuda"):
        code, _, err = cli(
            "eval", toy / "sent", "--tasks", r, "--device", dev, "--json", tmp_path / f"{dev}.json"
        )
        assert code == 0, err
        scores[dev] = json.loads((tmp_path / f"{dev}.json").read_text())["models"]
    assert scores["cuda"] == scores["cpu"]


def _pickled(src, dst, zip_format: bool):
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    return dst


def test_eval_loads_pickled_models_only_with_allow_pickle(toy, tmp_path, cli):
    """As `run`: a .bin-only model needs --allow-pickle; an old non-zip .bin is refused clearly."""
    model = _pickled(toy / "sent", tmp_path / "bin", zip_format=True)
    args = ("eval", model, "--tasks", toy / "tasks.yaml", "--cache-dir", tmp_path / "c")
    code, _, err = cli(*args, "--json", tmp_path / "a.json")
    assert code == 2 and "--allow-pickle" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.json").exists()
    code, _, err = cli(*args, "--json", tmp_path / "a.json", "--allow-pickle")
    assert code == 0, err
    got = json.loads((tmp_path / "a.json").read_text())["models"][str(model)]["tasks"]
    direct = evaluate_model(toy / "sent", load_tasks(str(toy / "tasks.yaml"), toy, "t"))
    assert {t: s["score"] for t, s in got.items()} == {t: s.score for t, s in direct.items()}
    old = _pickled(toy / "sent", tmp_path / "old", zip_format=False)
    code, _, err = cli("eval", old, "--tasks", toy / "tasks.yaml", "--allow-pickle")
    assert code == 2 and "old (non-zip) format" in err and "Traceback" not in err, err


def test_run_refuses_an_old_format_bin_with_the_same_message(toy, tmp_path, cli):
    old = _pickled(toy / "sent", tmp_path / "old", zip_format=False)
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [{"model": str(old)}],
        },
    )
    code, _, err = cli("run", r, "-o", tmp_path / "out", "--allow-pickle")
    assert code == 2 and "old (non-zip) format" in err and "re-save it" in err, err


def test_eval_gates_pass_fail_and_json(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    args = ("eval", toy / "sent", toy / "base", "--tasks", r, "--cache-dir", tmp_path / "c")
    code, out, err = cli(*args, "--json", tmp_path / "ok.json", "--fail-under-anp", "0")
    assert code == 0, err
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert [g["passed"] for g in ok["gates"]] == [True, True] and "passed 2 gate" in out
    anp_sent = 100 * ok["models"][str(toy / "sent")]["anp"]
    anp_base = 100 * ok["models"][str(toy / "base")]["anp"]
    assert anp_sent != anp_base
    # a threshold between the two models' ANP fails exactly the lower one; a task gate too
    mid = (anp_sent + anp_base) / 2
    sent_score = ok["models"][str(toy / "sent")]["tasks"]["sent"]["score"]
    code, out, err = cli(
        *args,
        "--json",
        tmp_path / "bad.json",
        "--fail-under-anp",
        f"{mid}",
        "--fail-under",
        f"sent={sent_score + 0.01}",
        "--fail-under",
        "rev=0",
    )
    assert code == 3
    bad = json.loads((tmp_path / "bad.json").read_text())  # written before the exit
    low = str(toy / "base") if anp_base < anp_sent else str(toy / "sent")
    failed = [(g["model"], g["gate"]) for g in bad["gates"] if not g["passed"]]
    assert sorted(failed) == sorted(
        [(low, "anp"), (str(toy / "sent"), "sent"), (str(toy / "base"), "sent")]
    )
    assert len(bad["gates"]) == 6
    lines = [ln for ln in err.splitlines() if ln.startswith("gate failed:")]
    assert len(lines) == 3 and any(f"is under {mid:g} %" in ln for ln in lines)
    assert "ANP" in out  # the tables were printed before the verdict


def test_eval_gate_errors(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--fail-under", "nope=1")
    assert code == 2 and "TASK=SCORE" in err
    code, _, err = cli("eval", toy / "base", "--tasks", r, "--fail-under", "sent=high")
    assert code == 2 and "TASK=SCORE" in err
    code, _, err = cli(
        "eval", toy / "base", "--tasks", toy / "tasks.yaml", "--fail-under-anp", "50"
    )
    assert code == 2 and "--fail-under-anp" in err and "reference" in err
    code, _, err = cli("eval", toy / "base")
    assert code == 2 and "--tasks" in err and "--harness" in err


def test_run_eval_writes_eval_json_and_gates(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    out_dir = tmp_path / "merged"
    code, out, err = cli(
        "run", r, "-o", out_dir, "--eval", "--cache-dir", tmp_path / "c", "--fail-under-anp", "0"
    )
    assert code == 0, err
    report = json.loads((out_dir / "eval.json").read_text())
    entry = report["models"][str(out_dir)]
    assert set(entry["tasks"]) == set(TASKS) and entry["anp"] is not None
    assert report["gates"][0]["passed"] is True
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    # the same merged folder evaluated by `divmerge eval` gives the same scores
    code, _, err = cli(
        "eval", out_dir, "--tasks", r, "--json", tmp_path / "e.json", "--cache-dir", tmp_path / "c"
    )
    again = json.loads((tmp_path / "e.json").read_text())["models"][str(out_dir)]
    assert code == 0 and again["anp"] == entry["anp"]
    # a failing gate exits 3 and keeps the merged folder and its eval.json (a CI artifact)
    code, _, err = cli(
        "run", r, "-o", out_dir, "--force", "--eval", "--cache-dir", tmp_path / "c",
        "--fail-under-anp", "1000",
    )  # fmt: skip
    assert code == 3 and "gate failed" in err
    assert json.loads((out_dir / "eval.json").read_text())["gates"][0]["passed"] is False
    assert (out_dir / "config.json").is_file()


def test_run_eval_errors_before_merging(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, _, err = cli("run", r, "-o", tmp_path / "o1", "--fail-under-anp", "50")
    assert code == 2 and "--eval" in err and not (tmp_path / "o1").exists()
    no_tasks = write_recipe(
        tmp_path / "nt.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n)} for n in TASKS],
        },
    )
    code, _, err = cli("run", no_tasks, "-o", tmp_path / "o2", "--eval")
    assert code == 2 and "no tasks" in err and not (tmp_path / "o2").exists()


def test_run_eval_refuses_an_adapter_output(toy, tmp_path, cli):
    r = _recipe(toy, tmp_path)
    code, _, err = cli("run", r, "-o", tmp_path / "a", "--eval", "--as-adapter")
    assert code == 2 and "--as-adapter" in err and not (tmp_path / "a").exists()
