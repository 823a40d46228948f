"""Completion-only supervised fine-tuning (the paper's Table 1) and plain LM pretraining.

Used to build the demo's experts from a tiny base, and by anyone who wants to make their own
experts. The loss covers only the answer tokens and the EOS after them: the model is taught to
*complete* a prompt, exactly what greedy evaluation later asks of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import UserError

IGNORE = -100  # label value the Hugging Face losses skip

# progress(step, steps, loss): called after each optimizer step (1-based step).
StepProgress = Callable[[int, int, float], None]

# The learning rate's factor at 0-based step i of n. Cosine decays to 0 at the last step, so a run
# ends where its last steps stopped moving the weights: its result no longer depends on which
# point of a noisy trajectory the step count happens to land on.
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda i, n: 1.0,
    "cosine": lambda i, n: 0.5 * (1.0 + math.cos(math.pi * i / n)),
}


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: str,
    max_length: int,
    seq2seq: bool,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example.

    The prompt is tokenized exactly as generation will tokenize it (special tokens included), the
    answer on its own, followed by EOS. Tokenizing the two apart keeps the prompt's tokens the
    ones the model sees at inference, so a prompt ending in "Answer:" wants an answer starting
    with a space (" positive") for BPE vocabularies built that way.

    Decoder-only: input = prompt + answer + EOS, labels = -100 over the prompt.
    Seq2seq (T5): input = prompt (encoder), labels = answer + EOS (decoder).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: no eos_token; completion fine-tuning needs one to end answers")
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    answer_ids = answer_ids[:max_length]  # an over-long answer keeps its beginning
    if seq2seq:
        return prompt_ids[-max_length:] or [eos], answer_ids
    # Keep the end of the prompt: it is the part next to the answer ("... Answer:").
    room = max_length - len(answer_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - room :] if room > 0 else []
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _pad_lists(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_examples(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, seq2seq: bool
) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and of the loss."""
    ids = [e[0] for e in encoded]
    labels = [e[1] for e in encoded]
    mask = [[1] * len(r) for r in ids]
    return {
        "input_ids": _pad_lists(ids, pad_id),
        "attention_mask": _pad_lists(mask, 0),
        "labels": _pad_lists(labels, IGNORE),
    }


def _step_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of indices, reshuffling with a seeded generator at each epoch."""
    rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=rng).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: StepProgress | None,
    schedule: str = "constant",
) -> list[float]:
    if not encoded:
        raise UserError("fine-tuning: no examples to train on")
    if schedule not in SCHEDULES:
        raise UserError(f"schedule {schedule!r}: valid schedules are {', '.join(SCHEDULES)}")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    # No weight decay: it would pull every weight toward 0 and put a task-independent
    # shrinkage into the task vector tau = theta_t - theta0.
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    factor = SCHEDULES[schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: factor(i, steps))
    losses: list[float] = []
    # Seed dropout (T5) without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        try:
            for step, idx in enumerate(
                _step_batches(len(encoded), batch_size, steps, seed), start=1
            ):
                batch = collate_examples([encoded[i] for i in idx], pad_id, seq2seq)
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step, steps, losses[-1])
        finally:
            model.eval()
    return losses


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    max_length: int = 256,
    progress: StepProgress | None = None,
    schedule: str = "constant",
) -> list[float]:
    """Train `model` in place on (prompt, answer) pairs, loss on answer + EOS only.

    AdamW at `lr` (constant, or decayed to 0 over the run with `schedule="cosine"`), gradient norm
    clipped to 1, `steps` optimizer steps over seeded reshuffled epochs. Returns the loss of each
    step. The model is left in eval mode.
    """
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    encoded = [encode_example(tokenizer, p, a, max_length, seq2seq) for p, a in examples]
    return _train(model, tokenizer, encoded, steps, batch_size, lr, seed, progress, schedule)


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    max_length: int = 256,
    progress: StepProgress | None = None,
    schedule: str = "constant",
) -> list[float]:
    """Plain causal LM training on `texts` (each followed by EOS), for decoder-only models."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError("pretrain: plain causal LM loss needs a decoder-only model, got seq2seq")
    # A text is a completion of the empty prompt: every token (and EOS) is in the loss.
    encoded = [encode_example(tokenizer, "", t, max_length, seq2seq=False) for t in texts]
    return _train(model, tokenizer, encoded, steps, batch_size, lr, seed, progress, schedule)
