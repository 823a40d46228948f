"""`divmerge eval --harness`: lm-evaluation-harness tasks from recipes/harness/ on the demo's
small zoo, offline, beside divmerge's own tasks; and the flag without lm-eval installed."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from divmerge_cli.generate import greedy_generate
from divmerge_cli.hf import load_model, load_tokenizer

HARNESS = Path(__file__).resolve().parent.parent / "recipes" / "harness"
SENT, ADD = HARNESS / "demo_sentiment.yaml", HARNESS / "demo_addition.yaml"


def _rows(zoo, task):
    return [json.loads(x) for x in (zoo.data_dir / task / "test.jsonl").read_text().splitlines()]


@torch.no_grad()
def _choice_accuracy(model_dir, rows) -> float:
    """lm-eval's multiple_choice `acc`, worked out here: the label whose tokens after the prompt
    have the highest summed log-probability."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    hits = 0
    for r in rows:
        ctx = f"Review: {r['text']}.\nIs this review positive or negative? Answer:"
        n_ctx = len(tok(ctx)["input_ids"])
        lls = []
        for choice in ("positive", "negative"):
            ids = torch.tensor([tok(f"{ctx} {choice}")["input_ids"]])
            logp = model(ids).logits.log_softmax(-1)[0, :-1]
            targets = ids[0, 1:]
            lls.append(logp[n_ctx - 1 :].gather(-1, targets[n_ctx - 1 :, None]).sum().item())
        hits += (("positive", "negative")[lls.index(max(lls))]) == r["label"]
    return hits / len(rows)


def _exact_match(model_dir, rows) -> float:
    """lm-eval's generate_until + regex filter + exact_match, worked out here."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    prompts = [f"Compute {r['a']}+{r['b']}. Answer:" for r in rows]
    gens = greedy_generate(model, tok, prompts, 4)
    found = [re.search(r"(-?[0-9]+)", g.text.split("\n")[0]) for g in gens]
    return sum(bool(m) and m.group(0) == r["answer"] for m, r in zip(found, rows)) / len(rows)


def test_harness_local_yaml_offline(demo_small, tmp_path, cli, monkeypatch):
    pytest.importorskip("lm_eval")
    zoo = demo_small
    monkeypatch.chdir(zoo.root)  # the YAMLs' data_files are relative to the working directory

    attempts = []

    def no_network(*a, **k):
        attempts.append(a)  # recorded: a library may swallow the error and fall back
        raise OSError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    code, out, err = cli(
        "eval",
        "experts/sentiment",
        "base",
        "--tasks",
        zoo.tasks_yaml,
        "--harness",
        f"{SENT},{ADD}",
        "--reference",
        "divmerge_demo_sentiment=experts/sentiment",
        "--reference",
        "sentiment=experts/sentiment",
        "--json",
        tmp_path / "s.json",
        "--cache-dir",
        tmp_path / "cache",
        "--fail-under",
        "divmerge_demo_sentiment=0",
        "--divergence",  # only divmerge tasks have validation inputs to diverge on
    )
    assert code == 0, err
    assert attempts == []
    report = json.loads((tmp_path / "s.json").read_text())
    sent_rows, add_rows = _rows(zoo, "sentiment"), _rows(zoo, "addition")
    for m in ("experts/sentiment", "base"):
        tasks = report["models"][m]["tasks"]
        assert set(tasks) == {*zoo.experts, "divmerge_demo_sentiment", "divmerge_demo_addition"}
        lm = tasks["divmerge_demo_sentiment"]
        assert lm["source"] == "lm-eval" and lm["metric"] == "acc,none"
        assert lm["n"] == len(sent_rows)
        assert abs(lm["score"] - _choice_accuracy(m, sent_rows)) < 1e-9
        add = tasks["divmerge_demo_addition"]
        assert add["metric"] == "exact_match,strip" and add["n"] == len(add_rows)
        assert abs(add["score"] - _exact_match(m, add_rows)) < 1e-9
        assert tasks["sentiment"]["source"] == "divmerge"
        assert set(report["models"][m]["divergence"]) == {"sentiment"}
        # ANP averages every task with a reference: divmerge's sentiment and lm-eval's
        refs = {t: report["references"][t]["score"] for t in report["references"]}
        expect = sum(tasks[t]["score"] / refs[t] for t in refs) / len(refs)
        assert abs(report["models"][m]["anp"] - expect) < 1e-12
    assert report["gates"] == [
        {"model": m, "gate": "divmerge_demo_sentiment", "threshold": 0.0, "passed": True,
         "value": report["models"][m]["tasks"]["divmerge_demo_sentiment"]["score"]}
        for m in ("experts/sentiment", "base")
    ]  # fmt: skip
    assert "lm-eval" in out and "divmerge_demo" in out  # its rows in the same table


def test_every_shipped_harness_task_is_tested():
    assert sorted(p.name for p in HARNESS.iterdir()) == [ADD.name, SENT.name]


def test_harness_errors(demo_small, tmp_path, cli, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)  # the YAML's data file is not here
    code, _, err = cli("eval", demo_small.base, "--harness", SENT)
    assert code == 2 and "could not load the task" in err and "demo_sentiment.yaml" in err
    code, _, err = cli("eval", demo_small.base, "--harness", tmp_path / "none.yaml")
    assert code == 2 and "file not found" in err
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    code, _, err = cli("eval", demo_small.base, "--harness", tmp_path / "bad.yaml")
    assert code == 2 and "no `task:` name" in err
    (tmp_path / "broken.yaml").write_text("task: [x\n")
    code, _, err = cli("eval", demo_small.base, "--harness", tmp_path / "broken.yaml")
    assert code == 2 and "not valid YAML at line 2" in err
    code, _, err = cli(
        "eval", demo_small.base, "--tasks", demo_small.tasks_yaml, "--harness", "sentimnet"
    )
    assert code == 2 and "not an lm-eval task" in err


def test_harness_without_lm_eval_exits_2(demo_small, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = cli("eval", demo_small.base, "--harness", "hellaswag")
    assert code == 2 and "pip install 'divmerge[harness]'" in err


@pytest.mark.parametrize("hub_offline", [False, True], ids=["no network", "HF_HUB_OFFLINE"])
def test_a_registry_task_offline_fails_fast_in_one_line(
    hub_offline, demo_small, tmp_path, cli, monkeypatch
):
    """Offline, `--harness hellaswag` printed 22 retry warnings over 25 s before its error: the
    local caches are tried first, then the hub only if it answers."""
    pytest.importorskip("lm_eval")
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # no copy
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", hub_offline)

    lookups = []

    def no_dns(*a, **k):
        lookups.append(a[0])
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no network, wherever the test runs
    code, _, err = cli("eval", demo_small.base, "--harness", "hellaswag", "--limit", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Retry" not in err, err
    assert len(lookups) == (0 if hub_offline else 1), lookups  # one quick look, no retries
    why = "HF_HUB_OFFLINE is set" if hub_offline else "huggingface.co cannot be reached"
    assert "could not load the task from the local caches" in err and why in err, err
