"""Tiny fixture models (2 blocks, hidden 32): a Llama family and a T5 family, built once per session."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

from divmerge_cli import tiny
from divmerge_cli.sft import finetune

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine they lose a lot.
torch.set_num_threads(1)

TEXTS = [
    "the movie was great and the actors were superb",
    "the film was awful, boring and far too long",
    "stocks rose today as markets rallied",
    "the team won the final match of the season",
] * 8


@pytest.fixture(scope="session")
def tok():
    return tiny.build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="session")
def llama_zoo(tmp_path_factory, tok) -> dict[str, Path]:
    """base + three experts (base plus small noise), float32 safetensors folders."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny.tiny_llama(len(tok))
    zoo = {"base": tiny.save(base, tok, root / "base")}
    for i in range(3):
        zoo[f"e{i}"] = tiny.save(tiny.perturbed(base, 0.02, seed=i + 1), tok, root / f"e{i}")
    return zoo


@pytest.fixture(scope="session")
def t5_zoo(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    base = tiny.tiny_t5(len(tok))
    zoo = {"base": tiny.save(base, tok, root / "base")}
    for i in range(2):
        zoo[f"e{i}"] = tiny.save(tiny.perturbed(base, 0.02, seed=i + 1), tok, root / f"e{i}")
    return zoo


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The root of `divmerge demo --size small`, its zoo built once (recipes/ name its files)."""
    from divmerge_cli.demo_zoo import build_zoo

    root = tmp_path_factory.mktemp("demo_small")
    build_zoo(root / "zoo", "small")
    return root


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `divmerge ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from divmerge_cli.cli import command

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what fixtures printed
        monkeypatch.setattr(sys, "argv", ["divmerge", *map(str, args)])
        code = 0
        try:
            command()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


# --- two real toy experts: a tiny base fine-tuned a few dozen steps per task ---

WORDS_POS = ["great", "superb", "lovely", "fine", "good"]
WORDS_NEG = ["awful", "boring", "bad", "dull", "poor"]
LETTERS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "book"]


def _sentiment(rng):
    pos = rng.random() < 0.5
    w = rng.choice(WORDS_POS if pos else WORDS_NEG)
    return {"text": f"the film was {w}", "label": "positive" if pos else "negative"}


def _reverse(rng):
    s = rng.sample(LETTERS, 3)
    return {"seq": " ".join(s), "out": " ".join(reversed(s))}


TASKS = {
    "sent": (_sentiment, "Review: {text}\nSentiment:", "label"),
    "rev": (_reverse, "Reverse: {seq}\nAnswer:", "out"),
}


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """base + 2 experts fine-tuned ~40 steps on two toy tasks, their data and a tasks file."""
    root = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    data = {}
    for name, (make, _, _) in TASKS.items():
        rows = [make(rng) for _ in range(120)]
        data[name] = rows
        (root / f"{name}.val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
        (root / f"{name}.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))
    texts = [TASKS[n][1].format(**r) + " " + r[TASKS[n][2]] for n in TASKS for r in data[n]]
    tok = tiny.build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    base = tiny.tiny_llama(len(tok), hidden=32, layers=2)
    tiny.save(base, tok, root / "base")
    for name, (_, prompt, target) in TASKS.items():
        expert = tiny.tiny_llama(len(tok), hidden=32, layers=2)
        expert.load_state_dict(base.state_dict())
        ex = [(prompt.format(**r), " " + r[target]) for r in data[name]]
        finetune(expert, tok, ex, steps=60, batch_size=8, lr=3e-3, seed=1)
        tiny.save(expert, tok, root / name)
    tasks = {
        n: {
            "validation": f"{n}.val.jsonl",
            "test": f"{n}.test.jsonl",
            "metric": "accuracy" if n == "sent" else "rouge1",
            "prompt": TASKS[n][1],
            "target": TASKS[n][2],
            "max_new_tokens": 8,
        }
        for n in TASKS
    }
    write_recipe(root / "tasks.yaml", tasks)
    return root


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """The demo's small zoo (base, four experts, their JSONL data), built once per session."""
    from divmerge_cli.demo_zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("demo") / "zoo", size="small")


def run_interrupted(monkeypatch, plan, out: Path, cache: Path, n: int) -> None:
    """optimize.run_optimized(plan, out) cut by Ctrl-C at the n-th per_sample_loss call (a learned
    merge interrupted mid-way: its state folder is left, OUT is not); the real loss is back after."""
    from divmerge_cli import optimize

    real, calls = optimize.per_sample_loss, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(optimize, "per_sample_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        optimize.run_optimized(plan, out, cache_dir=cache)
    monkeypatch.setattr(optimize, "per_sample_loss", real)
