"""Completion-only SFT (sft.py) and the offline demo zoo (demo_zoo.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from divmerge_cli import demo_zoo, sft, tiny
from divmerge_cli.errors import UserError
from divmerge_cli.evaluate import evaluate_model
from divmerge_cli.tasks import check_task, load_rows, render_prompt

TEXTS = ["Review: the plot was dull. Answer: negative", "Review: great acting. Answer: positive"]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(TEXTS * 4, vocab_size=300)


# ----------------------------------------------------------------------------- sft


def test_labels_mask_the_prompt(tok):
    prompt, answer = "Review: the plot was dull. Answer:", " negative"
    p_ids = tok(prompt)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    ids, labels = sft.encode_example(tok, prompt, answer, 256, seq2seq=False)
    assert ids == p_ids + a_ids + [tok.eos_token_id]
    assert labels == [-100] * len(p_ids) + a_ids + [tok.eos_token_id]


def test_truncation_keeps_the_answer_and_the_prompts_end(tok):
    prompt, answer = "Review: the plot was dull. Answer:", " negative"
    p_ids = tok(prompt)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = sft.encode_example(tok, prompt, answer, len(a_ids) + 2, seq2seq=False)
    assert ids == p_ids[-2:] + a_ids
    assert labels == [-100, -100] + a_ids


def test_seq2seq_prompt_is_encoder_input_answer_is_labels(tok):
    ids, labels = sft.encode_example(tok, "Review: great acting. Answer:", " positive", 256, True)
    assert ids == tok("Review: great acting. Answer:")["input_ids"]
    assert labels == tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_collate_masks_padding(tok):
    batch = sft.collate_examples([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0, seq2seq=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_model_loss_covers_only_answer_tokens(tok):
    """The loss HF computes from our labels equals cross-entropy over answer + EOS positions."""
    model = tiny.tiny_llama(len(tok), 32, 2)
    enc = [sft.encode_example(tok, "Review: great acting. Answer:", " positive", 256, False)]
    batch = sft.collate_examples(enc, 0, False)
    with torch.no_grad():
        out = model(**batch)
    ids, labels = enc[0]
    first = labels.index(next(x for x in labels if x != -100))  # first answer token
    logits = out.logits[0, first - 1 : len(ids) - 1]  # positions predicting answer + EOS
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[first:]))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_finetune_loss_decreases_and_is_seeded(tok, family):
    make = tiny.tiny_llama if family == "llama" else tiny.tiny_t5
    examples = [("Review: the plot was dull. Answer:", " negative")] * 3 + [
        ("Review: great acting. Answer:", " positive")
    ] * 3
    seen = []
    losses = sft.finetune(make(len(tok)), tok, examples, steps=30, batch_size=4, lr=1e-2,
                          progress=lambda s, n, loss: seen.append((s, n)))  # fmt: skip
    assert len(losses) == 30 and seen[0] == (1, 30) and seen[-1] == (30, 30)
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    again = sft.finetune(make(len(tok)), tok, examples, steps=30, batch_size=4, lr=1e-2)
    assert again == losses


def _step_sizes(tok, schedule: str) -> list[float]:
    """How far each optimizer step of a 30-step fine-tuning moved the weights (L2 norm)."""
    model = tiny.tiny_llama(len(tok))
    flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    seen = [flat()]

    def record(step, steps, loss):
        seen.append(flat())

    examples = [("Review: the plot was dull. Answer:", " negative")] * 4
    sft.finetune(model, tok, examples, 30, 4, 1e-2, progress=record, schedule=schedule)
    return [float((b - a).norm()) for a, b in zip(seen, seen[1:])]


def test_cosine_schedule_lets_the_last_steps_settle(tok):
    """Decayed to 0, the last step barely moves the weights: a run's result is where it settled,
    not one point of a noisy trajectory (the demo's addition expert at a constant rate)."""
    cosine, constant = _step_sizes(tok, "cosine"), _step_sizes(tok, "constant")
    assert cosine[0] == pytest.approx(constant[0])  # both start at the full rate
    assert cosine[-1] < 0.01 * cosine[0] and cosine[-1] < 0.05 * constant[-1]
    with pytest.raises(UserError, match="valid schedules are constant, cosine"):
        sft.finetune(tiny.tiny_llama(len(tok)), tok, [("a", " b")], 1, schedule="linear")


def test_pretrain_decreases_and_refuses_seq2seq(tok):
    model = tiny.tiny_llama(len(tok), 32, 2)
    losses = sft.pretrain(model, tok, TEXTS, steps=30, batch_size=2, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(UserError, match="decoder-only"):
        sft.pretrain(tiny.tiny_t5(len(tok)), tok, TEXTS, steps=1)


# ----------------------------------------------------------------------------- toy tasks


def test_rows_are_deterministic_and_splits_disjoint():
    n = {"train": 50, "validation": 10, "test": 10}
    for name, task in demo_zoo.TASKS.items():
        a, b = demo_zoo.make_rows(name, n, seed=0), demo_zoo.make_rows(name, n, seed=0)
        assert a == b and a != demo_zoo.make_rows(name, n, seed=1)
        assert {k: len(v) for k, v in a.items()} == n
        if task.unique:
            keys = [json.dumps(r, sort_keys=True) for rows in a.values() for r in rows]
            assert len(set(keys)) == len(keys), name


def _sentiment_by_rule(text: str) -> str:
    """Each clause's polarity, flipped by "not"; the toy reviews never mix polarities."""
    labels = set()
    for clause in text.split(" and "):
        *_, adj = clause.split()
        positive = adj in demo_zoo.POSITIVE
        labels.add("positive" if positive != (" not " in clause) else "negative")
    assert len(labels) == 1
    return labels.pop()


def test_toy_answers_follow_their_rules():
    rows = {
        name: demo_zoo.make_rows(name, {"train": 200}, seed=3)["train"] for name in demo_zoo.TASKS
    }
    assert any(" not " in r["text"] for r in rows["sentiment"])
    for r in rows["sentiment"]:
        assert r["label"] == _sentiment_by_rule(r["text"])
    for r in rows["topic"]:
        words = set(r["text"].split())
        for topic, vocab in demo_zoo.TOPICS.items():
            assert bool(words & set(vocab)) == (topic == r["label"])
    for r in rows["addition"]:
        assert int(r["answer"]) == int(r["a"]) + int(r["b"])
    # Word for word, the adjective after the noun: "the red cat sleeps" -> "le chat rouge dort".
    fr = {**demo_zoo.DETS_FR, **demo_zoo.NOUNS_FR, **demo_zoo.ADJS_FR, **demo_zoo.VERBS_FR}
    for r in rows["translation"]:
        for en, want in zip(r["en"].split(" and "), r["fr"].split(" et ")):
            det, adj, noun, verb = en.split()
            assert want == " ".join(fr[w] for w in (det, noun, adj, verb))


# ----------------------------------------------------------------------------- build_zoo


def test_build_zoo_small_builds_a_usable_zoo(tmp_path):
    stages = set()
    zoo = demo_zoo.build_zoo(tmp_path / "zoo", "small", progress=lambda s, i, n: stages.add(s))
    assert stages == {"pretrain base"} | {f"fine-tune expert {t}" for t in demo_zoo.TASKS}
    assert set(zoo.experts) == set(demo_zoo.TASKS)
    for d in [zoo.base, *zoo.experts.values()]:
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    specs = zoo.task_specs()
    assert set(specs) == set(demo_zoo.TASKS)
    for name, spec in specs.items():
        check_task(name, spec, "validation")
        check_task(name, spec, "test")
        row = load_rows(spec.test)[0]
        assert render_prompt(name, spec, row) == demo_zoo.TASKS[name].prompt.format(**row)
    assert len(load_rows(zoo.train_file("topic"))) == demo_zoo.SIZES["small"].rows["train"]
    manifest = demo_zoo.read_manifest(zoo.root)
    assert manifest["complete"] is True and manifest["settings"]["size"] == "small"
    # Each expert's validation score is the one a fresh scoring of the saved expert gives, and
    # it trained in whole rounds until it reached its target or ran out of rounds.
    cfg = demo_zoo.SIZES["small"]
    for name, fit in manifest["experts"].items():
        score = evaluate_model(zoo.experts[name], {name: specs[name]}, "validation")[name].score
        assert fit["validation"] == pytest.approx(score, abs=1e-4), name
        assert fit["reached"] == (score >= cfg.target) and fit["target"] == cfg.target
        rounds, rest = divmod(fit["steps"], cfg.sft_steps)
        assert rest == 0 and (rounds == cfg.sft_rounds or (fit["reached"] and rounds >= 1))
    warned = [n for n in demo_zoo.TASKS for w in demo_zoo.missed_targets(zoo) if f" {n} " in w]
    assert warned == [n for n, fit in manifest["experts"].items() if not fit["reached"]]
    # Experts differ from the base (they were trained) and share its shapes (mergeable).
    from safetensors.torch import load_file

    base = load_file(zoo.base / "model.safetensors")
    expert = load_file(zoo.experts["addition"] / "model.safetensors")
    assert base.keys() == expert.keys()
    assert any(not torch.equal(base[k], expert[k]) for k in base)
    assert all(v.dtype == torch.float32 for v in expert.values())


def test_build_zoo_is_reused_and_rebuilt_on_new_settings(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    demo_zoo.build_zoo(root, "small")
    stamp = (root / "base" / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a complete zoo with the same settings must be reused")

    monkeypatch.setattr(demo_zoo.sft, "finetune", boom)
    monkeypatch.setattr(demo_zoo.sft, "pretrain", boom)
    assert demo_zoo.build_zoo(root, "small").base == root / "base"
    assert (root / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()

    demo_zoo.build_zoo(root, "small", seed=1)  # other settings: rebuilt in place
    assert demo_zoo.read_manifest(root)["settings"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]


def test_interrupted_build_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_zoo.sft, "finetune", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo_zoo.build_zoo(tmp_path / "zoo", "small")
    assert list(tmp_path.iterdir()) == []


def test_build_zoo_refuses_foreign_folder_and_unknown_size(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a divmerge demo zoo"):
        demo_zoo.build_zoo(tmp_path / "mine", "small")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="small, default"):
        demo_zoo.build_zoo(tmp_path / "zoo", "huge")


@pytest.mark.parametrize("target, rounds", [(0.0, 1), (1.01, 2)])
def test_experts_train_until_their_target_and_the_demo_warns_if_missed(
    tmp_path, cli, monkeypatch, target, rounds
):
    """Round after round until the validation target (here: met at once, or never); an expert
    still under it when the rounds run out is named on stderr, and the zoo is kept."""
    small = dataclasses.replace(demo_zoo.SIZES["small"], sft_steps=10, sft_rounds=2, target=target)
    monkeypatch.setitem(demo_zoo.SIZES, "small", small)
    code, out, err = cli("demo", "--size", "small", "--seed", "1", "--root", tmp_path, "--zoo-only")
    assert code == 0, err
    manifest = demo_zoo.read_manifest(tmp_path / "zoo")
    assert manifest["settings"]["seed"] == 1 and manifest["settings"]["target"] == target
    assert {f["steps"] for f in manifest["experts"].values()} == {10 * rounds}
    warnings = [line for line in err.splitlines() if line.startswith("warning: demo expert")]
    if target > 1:
        assert [w.split()[3] for w in warnings] == list(demo_zoo.TASKS)
        assert all("after 20 fine-tuning steps, under its target 1.01" in w for w in warnings)
    else:
        assert warnings == [] and all(f["reached"] for f in manifest["experts"].values())
