"""Tiny models and tokenizers built from scratch: test fixtures and the offline demo."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from .checkpoint import Checkpoint, ShardWriter, atomic_folder, copy_side_files, has_weights

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`; pad=0, eos=1, bos=2, unk=3."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _fast(tok)


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word of `texts` after the specials: a vocabulary of a few
    dozen, far below what byte-level BPE needs (its alphabet alone is 256)."""
    words = sorted({w for t in texts for w in t.split()})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *words])}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _fast(tok)


def _fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )


def tiny_llama(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, **kw
) -> PreTrainedModel:
    """A random Llama with `layers` blocks of width `hidden` (mergekit's test model shape)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=kw.pop("tie_word_embeddings", False),
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, **kw
) -> PreTrainedModel:
    """A random T5 with `layers` encoder and `layers` decoder blocks; `kw` goes to T5Config
    (e.g. feed_forward_proj="gated-gelu" for the T5 v1.1 / flan layout)."""
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **kw,
    )
    return T5ForConditionalGeneration(cfg).eval()


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into one Hugging Face folder."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturbed(model: PreTrainedModel, scale: float, seed: int) -> PreTrainedModel:
    """A copy of `model` with Gaussian noise of std `scale` added to every parameter (a fake expert)."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return out


def perturbed_folder(
    base: Path,
    out: Path,
    seed: int,
    scale: float,
    spread: Callable[[torch.Tensor], torch.Tensor] = torch.std,
) -> Path:
    """A fake expert on disk: base + seeded Gaussian noise of std `scale` x `spread(tensor)` on
    every floating tensor (`scale` itself on one-element tensors), written tensor by tensor so
    that memory holds one tensor, with the base's other files. Kept if OUT already holds weights."""
    if has_weights(out):
        return out
    ck = Checkpoint(base, "base")
    specs = {n: (ck.shape(n), ck.dtype(n)) for n in ck.names}
    g = torch.Generator().manual_seed(seed)
    with atomic_folder(out) as tmp:
        w = ShardWriter(tmp, specs, 5 * 10**9)
        for n in ck.names:
            t = ck.get(n)
            if t.dtype.is_floating_point:
                f = t.float()
                std = scale * float(spread(f)) if f.numel() > 1 else scale
                t = (f + torch.randn(f.shape, generator=g) * std).to(t.dtype)
            w.write(n, t)
        w.close()
        side = [p.name for p in base.iterdir() if p.suffix != ".safetensors"]
        copy_side_files(base, tmp, tuple(x for x in side if x != "model.safetensors.index.json"))
    return out
