"""Tiny fixture models (2 blocks, hidden 32): a Llama family and a T5 family, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from divmerge_cli import tiny

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


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `divmerge ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from divmerge_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what fixtures printed
        monkeypatch.setattr(sys, "argv", ["divmerge", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
