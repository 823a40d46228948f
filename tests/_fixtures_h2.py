"""Tiny models for the teacher / objectives tests (helpers owned by test_teacher and test_objectives)."""

from __future__ import annotations

import functools

import pytest
import torch

from divmerge_cli import tiny

TEXTS = [
    "the movie was great",
    "a terrible film",
    "what a plot twist",
    "I loved the actors",
    "news about sports and politics",
] * 20
PROMPTS = [
    "the movie",
    "a terrible film was it",
    "x",
    "what a plot twist and I loved it",
    "sports",
    "politics today",
    "great actors",
    "film",
]
EOS = 1

# Tiny matmuls on a shared 2-core machine: more threads only add contention (about 10x slower).


@functools.lru_cache(maxsize=1)
def tokenizer():
    return tiny.build_tokenizer(TEXTS, 300)


def _boost_eos(model, factor: float):
    # A random model almost never emits EOS; a longer EOS row in the LM head makes some
    # generations stop early (lengths 1..max), so the EOS cut and padding are exercised.
    with torch.no_grad():
        model.lm_head.weight[EOS] *= factor
    return model


@functools.lru_cache(maxsize=1)
def llama():
    return _boost_eos(tiny.tiny_llama(len(tokenizer())), 5.0)


@functools.lru_cache(maxsize=1)
def t5():
    return _boost_eos(tiny.tiny_t5(len(tokenizer())), 12.0)


def naive_greedy(model, prompt: str, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Reference: one prompt, no padding, no KV cache, argmax of the full forward's last logits."""
    tok = tokenizer()
    ids = tok(prompt)["input_ids"]
    seq2seq = model.config.is_encoder_decoder
    out, probs = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if seq2seq:
                dec = torch.tensor([[model.config.decoder_start_token_id, *out]])
                logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=dec).logits[0, -1]
            else:
                logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            probs.append(torch.softmax(logits, -1))
            out.append(int(logits.argmax()))
            if out[-1] == EOS:
                break
    return out, torch.stack(probs)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny.save(llama(), tokenizer(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    return tiny.save(t5(), tokenizer(), tmp_path_factory.mktemp("t5"))
