"""hf.py: which family a folder is, the tokenizer's padding side, errors as one line."""

from __future__ import annotations

import pytest

from divmerge_cli import hf
from divmerge_cli.errors import UserError


def test_family_padding_side_and_vocabulary(llama_zoo, t5_zoo, tok):
    assert not hf.is_seq2seq(llama_zoo["base"]) and hf.is_seq2seq(t5_zoo["base"])
    # batched greedy generation needs decoder-only prompts flush right, T5's encoder inputs left
    assert hf.load_tokenizer(llama_zoo["base"]).padding_side == "left"
    assert hf.load_tokenizer(t5_zoo["base"]).padding_side == "right"
    assert hf.vocab_size(llama_zoo["base"]) == hf.vocab_size(t5_zoo["base"]) == len(tok)
    assert not hf.load_model(llama_zoo["base"]).training  # eval mode: no dropout


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path, llama_zoo):
    import json
    import shutil

    d = shutil.copytree(llama_zoo["base"], tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    t = hf.load_tokenizer(d)
    assert t.pad_token is not None and t.pad_token_id == t.eos_token_id


def test_a_folder_without_a_model_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match=f"{tmp_path}: cannot load the model"):
        hf.load_model(tmp_path)
    assert hf.vocab_size(tmp_path / "nowhere") is None
