"""Batched greedy generation that also returns the generating model's per-token distributions.

Used for the DivMerge teacher (paper B.1: greedy until EOS, keep the distribution at every
generated position) and for evaluation (only the text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .errors import UserError


@dataclass
class Generation:
    """One prompt's greedy continuation.

    `prompt_ids` are the unpadded input ids (the encoder input for T5). `gen_ids` are the generated
    tokens up to and including the first EOS. When requested, the distribution at each generated
    position from the raw logits: top-k (`topk_ids`, `topk_probs`, `tail` = mass outside the top k)
    or dense (`probs`).
    """

    prompt_ids: torch.Tensor  # int64 [P]
    gen_ids: torch.Tensor  # int64 [T]
    text: str
    topk_ids: torch.Tensor | None = None  # int64 [T, k]
    topk_probs: torch.Tensor | None = None  # float32 [T, k]
    tail: torch.Tensor | None = None  # float32 [T]
    probs: torch.Tensor | None = None  # float32 [T, V]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a generation: the model's generation_config EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UserError(
            "the model and tokenizer define no EOS token; greedy generation cannot stop"
        )
    return sorted(set(ids))


def _greedy_config(model, tokenizer, max_new_tokens: int, eos: list[int]) -> GenerationConfig:
    """Plain greedy decoding; nothing from the checkpoint's generation_config may change the tokens."""
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
        decoder_start_token_id=_decoder_start_id(model),
        return_dict_in_generate=True,
        output_logits=True,
        use_cache=True,
    )
    return cfg


def _decoder_start_id(model: PreTrainedModel) -> int | None:
    start = model.generation_config.decoder_start_token_id
    return getattr(model.config, "decoder_start_token_id", None) if start is None else start


def _dist(logits: torch.Tensor, top_k: int | str | None) -> dict[str, torch.Tensor]:
    """Distribution fields of Generation from raw logits [T, V]."""
    if top_k is None:
        return {}
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == "full":
        return {"probs": probs}
    topk_probs, topk_ids = probs.topk(top_k, dim=-1)
    # Sum the mass outside the top k directly: 1 - sum(top k) loses the tail to rounding when
    # the teacher is confident, and is exactly 0 when k = V.
    tail = probs.scatter(-1, topk_ids, 0.0).sum(-1).clamp_min(0.0)
    return {"topk_ids": topk_ids.long(), "topk_probs": topk_probs, "tail": tail}


def _check_top_k(top_k: int | str | None, vocab: int) -> None:
    if top_k is None or top_k == "full":
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise UserError(
            f"top_k: expected an integer in 1..{vocab} (the vocabulary) or 'full', got {top_k!r}"
        )


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    top_k: int | None | str = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Greedy-decode each prompt until EOS or `max_new_tokens`; outputs in the order of `prompts`.

    Decoder-only models are fed left-padded batches, T5 right-padded encoder inputs. Prompts are
    batched by length to waste little on padding. `progress(done, total)` is called before the
    first batch (done 0) and after each batch.
    """
    _check_top_k(top_k, model.config.get_text_config().vocab_size)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    eos = eos_ids(model, tokenizer)
    cfg = _greedy_config(model, tokenizer, max_new_tokens, eos)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[Generation | None] = [None] * len(prompts)
    saved = model.generation_config, tokenizer.padding_side
    model.generation_config = GenerationConfig()  # generate() fills unset options from it
    tokenizer.padding_side = "right" if seq2seq else "left"
    try:
        if progress is not None:
            progress(0, len(order))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, gen in zip(
                idx,
                _generate_batch(
                    model, tokenizer, [prompts[i] for i in idx], cfg, seq2seq, eos, top_k
                ),
            ):
                out[i] = gen
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.generation_config, tokenizer.padding_side = saved
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, prompts, cfg, seq2seq, eos, top_k) -> list[Generation]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    res = model.generate(**enc, generation_config=cfg)
    # Decoder-only output repeats the (padded) prompt; T5's starts with the decoder start token.
    new = res.sequences[:, 1:] if seq2seq else res.sequences[:, enc["input_ids"].shape[1] :]
    logits = torch.stack(res.logits, dim=1)  # raw, before any logits processor: [B, steps, V]
    eos_t = torch.tensor(eos, device=new.device)
    gens = []
    for b in range(len(prompts)):
        is_eos = torch.isin(new[b], eos_t).nonzero()
        t = int(is_eos[0]) + 1 if len(is_eos) else new.shape[1]
        gen_ids = new[b, :t].cpu().long()
        gens.append(
            Generation(
                prompt_ids=enc["input_ids"][b][enc["attention_mask"][b].bool()].cpu().long(),
                gen_ids=gen_ids,
                text=tokenizer.decode(gen_ids, skip_special_tokens=True).strip(),
                **{k: v.cpu() for k, v in _dist(logits[b, :t], top_k).items()},
            )
        )
    return gens
