"""Loading whole Hugging Face models, for the methods and commands that need one in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .errors import UserError

# Library code does not print: transformers' own progress bars ("Loading weights") stay off.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


def is_seq2seq(path: str | Path) -> bool:
    """True for encoder-decoder checkpoints (T5), False for decoder-only ones."""
    return bool(getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False))


def vocab_size(path: str | Path) -> int | None:
    """The width of the model's output distribution, from its config (None if it does not say)."""
    try:
        size = getattr(AutoConfig.from_pretrained(path).get_text_config(), "vocab_size", None)
    except (OSError, ValueError):
        return None  # loading the model reports what is wrong with the folder
    return int(size) if size else None


def skeleton(path: str | Path) -> PreTrainedModel:
    """The model a checkpoint loads as, on the meta device (no weights): for its structure."""
    config = AutoConfig.from_pretrained(path)
    auto = (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )
    with torch.device("meta"):
        return auto.from_config(config)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local checkpoint folder in eval mode; never runs remote code."""
    auto = AutoModelForSeq2SeqLM if is_seq2seq(path) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from e
    return model.eval()


def empty_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of a checkpoint folder, its parameters on the meta device (no memory, no values;
    buffers are real), in eval mode: for a caller that fills the parameters itself."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path)
    auto = (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot build the model ({str(e).splitlines()[0]})") from e
    model.tie_weights()  # from_pretrained ties the head to the embeddings; from_config here does not
    return model.eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token; decoder-only models pad on the left for batched generation."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if is_seq2seq(path) else "left"
    return tok
