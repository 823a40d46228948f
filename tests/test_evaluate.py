"""Scoring (accuracy, ROUGE-1), ANP (Eq. 5) and evaluate_model with its score cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from divmerge_cli import evaluate, sft, tiny
from divmerge_cli.errors import UserError
from divmerge_cli.generate import Generation
from divmerge_cli.tasks import TaskSpec

# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Positive", "positive"),
        (" Positive.\nThe review praises the plot", "positive"),  # only the first line counts
        ('"Paris"', "paris"),
        ("  New   York!! ", "new york"),
        ("\n\nnegative", "negative"),  # first non-empty line
        ("(B)", "b"),
        ("-3", "-3"),  # a sign is part of the answer, not punctuation
        ("", ""),
    ],
)
def test_normalize_answer(raw, want):
    assert evaluate.normalize_answer(raw) == want


def test_accuracy_counts_normalized_matches():
    preds = ["Positive.", "neg", "7\n8", "-3"]
    targets = ["positive", "negative", "7", "3"]
    assert evaluate.accuracy(preds, targets) == pytest.approx(2 / 4)


def test_rouge1_f1_by_hand():
    # pred "the cat sat" vs ref "the cat is here": 2 shared unigrams, P = 2/3, R = 2/4,
    # F = 2PR / (P + R) = 4/7.
    assert evaluate.rouge1(["the cat sat"], ["the cat is here"]) == pytest.approx(4 / 7)
    # Mean over rows; case and punctuation do not count; an empty prediction scores 0.
    got = evaluate.rouge1(["the cat sat", "The Cat!", ""], ["the cat is here", "the cat", "x"])
    assert got == pytest.approx((4 / 7 + 1 + 0) / 3)


def test_rouge1_counts_repeated_words_once_per_match():
    # pred "le le chat" vs ref "le chat": overlap = min counts = le:1 + chat:1 = 2,
    # P = 2/3, R = 2/2, F = 2 * (2/3) / (5/3) = 4/5.
    assert evaluate.rouge1(["le le chat"], ["le chat"]) == pytest.approx(4 / 5)


def test_metrics_reject_mismatched_or_empty():
    with pytest.raises(ValueError):
        evaluate.accuracy(["a"], ["a", "b"])
    with pytest.raises(UserError):
        evaluate.rouge1([], [])


def test_anp_is_mean_of_ratios():
    scores = {"a": 0.5, "b": 0.9}
    refs = {"a": 1.0, "b": 0.6, "c": 0.7}  # extra references are ignored
    assert evaluate.anp(scores, refs) == pytest.approx((0.5 / 1.0 + 0.9 / 0.6) / 2)


def test_anp_with_a_zero_reference_is_undefined_and_a_missing_one_names_the_task():
    # an expert scoring 0 (often on a few rows): its task's ratio, so the mean, is undefined
    assert evaluate.normalized(0.2, 0.0) is None
    assert evaluate.anp({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0}) is None
    with pytest.raises(UserError, match="'b'"):
        evaluate.anp({"b": 0.2}, {"a": 1.0})


# ----------------------------------------------------------------------------- evaluate_model


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path):
    tok = tiny.build_tokenizer(["Q: is it ok? A: yes no maybe"] * 4, vocab_size=300)
    return tiny.save(tiny.tiny_llama(len(tok), 32, 2), tok, tmp_path / "model")


@pytest.fixture
def two_tasks(tmp_path):
    qa = _write_jsonl(
        tmp_path / "qa.jsonl",
        [{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}, {"q": "x"}],
    )
    gen = _write_jsonl(tmp_path / "gen.jsonl", [{"s": "one", "t": "the cat is here"}])
    return {
        "qa": TaskSpec(test=qa, prompt="Q: {q} A:", target="a", max_new_tokens=3),
        "gen": TaskSpec(test=gen, prompt="S: {s}", target="t", metric="rouge1"),
    }


def _record(seen: list):
    return lambda task, done, total: seen.append((task, done, total))


class FakeGenerate:
    """Stands in for greedy_generate: fixed answers per prompt, and records every call."""

    ANSWERS = {"Q: 1+1 A:": "2", "Q: 2+2 A:": "5", "Q: 3+3 A:": "6.", "S: one": "the cat sat"}

    def __init__(self):
        self.calls = []

    def __call__(
        self, model, tokenizer, prompts, max_new_tokens, batch_size=8, top_k=None, progress=None
    ):
        self.calls.append((list(prompts), max_new_tokens))
        if progress is not None:
            progress(len(prompts), len(prompts))
        empty = torch.zeros(0, dtype=torch.long)
        return [Generation(empty, empty, self.ANSWERS[p]) for p in prompts]


def test_evaluate_model_scores_with_each_tasks_metric(tiny_dir, two_tasks, monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(evaluate, "greedy_generate", fake)
    out = evaluate.evaluate_model(tiny_dir, two_tasks)
    # The row without the target field is not scored; 2 of 3 answers right ("6." counts).
    assert out["qa"] == evaluate.TaskScore("accuracy", pytest.approx(2 / 3), 3)
    assert out["gen"] == evaluate.TaskScore("rouge1", pytest.approx(4 / 7), 1)
    assert (["Q: 1+1 A:", "Q: 2+2 A:", "Q: 3+3 A:"], 3) in fake.calls  # template, max_new_tokens


def test_evaluate_model_limit_samples_rows(tiny_dir, two_tasks, monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(evaluate, "greedy_generate", fake)
    out = evaluate.evaluate_model(tiny_dir, {"qa": two_tasks["qa"]}, limit=2, seed=1)
    assert out["qa"].n <= 2


def test_evaluate_model_needs_test_file_and_target(tiny_dir, two_tasks):
    no_file = two_tasks["qa"].model_copy(update={"test": None})
    with pytest.raises(UserError, match=r"tasks\.qa\.test"):
        evaluate.evaluate_model(tiny_dir, {"qa": no_file})
    no_target = two_tasks["qa"].model_copy(update={"target": None})
    with pytest.raises(UserError, match=r"tasks\.qa\.target"):
        evaluate.evaluate_model(tiny_dir, {"qa": no_target})


def test_eval_cache_hits_on_rerun_and_misses_after_a_change(
    tiny_dir, two_tasks, tmp_path, monkeypatch
):
    fake = FakeGenerate()
    monkeypatch.setattr(evaluate, "greedy_generate", fake)
    cache = tmp_path / "cache"
    first = evaluate.evaluate_model(tiny_dir, two_tasks, cache_dir=cache)
    assert len(fake.calls) == 2

    def boom(*a, **k):
        raise AssertionError("cache hit expected: nothing should be loaded or generated")

    monkeypatch.setattr(evaluate, "greedy_generate", boom)
    monkeypatch.setattr(evaluate, "load_expert_model", boom)
    seen = []
    hit = evaluate.evaluate_model(tiny_dir, two_tasks, cache_dir=cache, progress=_record(seen))
    assert hit == first and seen == [("qa", 1, 1), ("gen", 1, 1)]  # a cached task is done at once

    # Changing one task's rows recomputes that task only.
    monkeypatch.undo()
    fake = FakeGenerate()
    monkeypatch.setattr(evaluate, "greedy_generate", fake)
    Path(two_tasks["gen"].test).write_text(json.dumps({"s": "one", "t": "the cat sat"}) + "\n")
    again = evaluate.evaluate_model(tiny_dir, two_tasks, cache_dir=cache)
    assert [c[0] for c in fake.calls] == [["S: one"]]
    assert again["gen"].score == pytest.approx(1.0) and again["qa"] == first["qa"]

    # Other model bytes: every task misses.
    fake.calls.clear()
    other = tmp_path / "other"
    tok = tiny.build_tokenizer(["Q: is it ok? A: yes no maybe"] * 4, vocab_size=300)
    tiny.save(tiny.tiny_llama(len(tok), 32, 2, seed=1), tok, other)
    evaluate.evaluate_model(other, two_tasks, cache_dir=cache)
    assert len(fake.calls) == 2
    # Changing the metric of a task (its spec) misses too.
    fake.calls.clear()
    as_rouge = {"qa": two_tasks["qa"].model_copy(update={"metric": "rouge1"})}
    assert evaluate.evaluate_model(tiny_dir, as_rouge, cache_dir=cache)["qa"].metric == "rouge1"
    assert len(fake.calls) == 1


def test_evaluate_model_real_generation_on_a_trained_model(tmp_path):
    """End to end with the real greedy_generate: a model fine-tuned to always answer "yes"."""
    texts = ["Q: is the sky blue? A: yes", "Q: is fire cold? A: no"] * 4
    tok = tiny.build_tokenizer(texts, vocab_size=300)
    model = tiny.tiny_llama(len(tok), 32, 2)
    prompts = [f"Q: is {w} ok? A:" for w in ["tea", "rain", "sand", "milk", "wood", "salt"]]
    sft.finetune(model, tok, [(p, " yes") for p in prompts], steps=40, batch_size=6, lr=3e-3)
    model_dir = tiny.save(model, tok, tmp_path / "yes-model")
    rows = [{"w": "gold", "a": "yes"}, {"w": "iron", "a": "Yes."}, {"w": "lead", "a": "no"}]
    data = _write_jsonl(tmp_path / "t.jsonl", rows)
    spec = TaskSpec(test=data, prompt="Q: is {w} ok? A:", target="a", max_new_tokens=4)
    out = evaluate.evaluate_model(model_dir, {"yn": spec}, batch_size=2)
    assert out["yn"].score == pytest.approx(2 / 3) and out["yn"].n == 3


def test_evaluate_model_reports_every_generation_batch(tiny_dir, two_tasks):
    seen = []
    evaluate.evaluate_model(tiny_dir, two_tasks, batch_size=2, progress=_record(seen))
    # 3 labelled qa rows, 1 gen row; each task's generation reports its start (0) first
    assert seen == [("qa", 0, 3), ("qa", 2, 3), ("qa", 3, 3), ("gen", 0, 1), ("gen", 1, 1)]
