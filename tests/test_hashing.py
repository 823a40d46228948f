"""Content hashes (hashing.py): what changes a model folder's hash, and what does not."""

from __future__ import annotations

import json
import shutil
import time

from divmerge_cli import hashing
from divmerge_cli.hashing import (
    TOKENIZER_FILES,
    cached_model_hash,
    hash_json,
    hash_model_dir,
    model_files,
    prehash,
)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_every_copied_tokenizer_file_is_hashed(tmp_path, llama_zoo):
    d = _copy(llama_zoo["base"], tmp_path / "m")
    for name in TOKENIZER_FILES:
        if not (d / name).exists():
            (d / name).write_text("{}")
    hashed = {p.name for p in model_files(d)}
    assert set(TOKENIZER_FILES) <= hashed


def test_added_tokens_change_the_hash(tmp_path, llama_zoo):
    # the teacher cache key is this hash: a new added token must not hit a stale entry
    d = _copy(llama_zoo["base"], tmp_path / "m")
    before = hash_model_dir(d)
    (d / "added_tokens.json").write_text('{"<extra>": 300}')
    after = hash_model_dir(d)
    assert after != before
    (d / "added_tokens.json").write_text('{"<extra>": 301}')
    assert hash_model_dir(d) != after


def test_weights_change_the_hash_and_a_readme_does_not(tmp_path, llama_zoo):
    d = _copy(llama_zoo["base"], tmp_path / "m")
    before = hash_model_dir(d)
    (d / "README.md").write_text("a model card")
    assert hash_model_dir(d) == before
    weights = next(d.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert hash_model_dir(d) != before


def test_hash_json_ignores_key_order_only():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1, "b": [1, 2]}) != hash_json({"a": 1, "b": [2, 1]})


def test_an_adapters_config_changes_its_hash(tmp_path):
    # lora_alpha scales tau: a sha256 pin or cache entry must not survive a changed config
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    before = hash_model_dir(d)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 16}')
    assert hash_model_dir(d) != before


def test_cached_hash_is_remembered_by_the_files_stamps(tmp_path, llama_zoo, monkeypatch):
    d = _copy(llama_zoo["base"], tmp_path / "m")
    cache = tmp_path / "cache" / "hashes.json"
    want = hash_model_dir(d)
    reads = []
    monkeypatch.setattr(hashing, "hash_model_dir", lambda p: reads.append(p) or hash_model_dir(p))
    assert cached_model_hash(d, cache) == want
    assert not cache.exists()  # files written this second: not remembered yet
    monkeypatch.setattr(hashing, "SETTLED_NS", 0)
    assert cached_model_hash(d, cache) == want
    assert json.loads(cache.read_text())[str(d.resolve())]["sha256"] == want
    assert cached_model_hash(d, cache) == want and len(reads) == 2  # from the cache: not read
    time.sleep(0.05)  # past the clock tick of the stamps
    weights = next(d.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size, rewritten in place: a new ctime
    changed = cached_model_hash(d, cache)
    assert changed == hash_model_dir(d) != want and len(reads) == 3
    cache.write_text("not json")  # a damaged cache is ignored, then replaced
    assert cached_model_hash(d, cache) == changed and len(reads) == 4
    assert cached_model_hash(d, cache) == changed and len(reads) == 4
    assert cached_model_hash(d, None) == changed and len(reads) == 5


def test_prehash_is_used_once_and_only_while_the_files_are_unchanged(
    tmp_path, llama_zoo, monkeypatch
):
    d = _copy(llama_zoo["base"], tmp_path / "m")
    want = hash_model_dir(d)
    reads = []
    monkeypatch.setattr(hashing, "hash_model_dir", lambda p: reads.append(p) or hash_model_dir(p))
    prehash([d, tmp_path / "missing"], None)  # a folder that does not exist is skipped
    assert cached_model_hash(d, None) == want and len(reads) == 1  # the early hash, not a second
    assert cached_model_hash(d, None) == want and len(reads) == 2  # taken once
    prehash([d], None)
    hashing._EARLY[(str(d.resolve()), None)].result()  # done under the old bytes
    time.sleep(0.05)
    weights = next(d.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert cached_model_hash(d, None) == hash_model_dir(d) != want and len(reads) == 4
