"""Content hashes for caches: a model folder's bytes plus whatever settings shape the result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import TOKENIZER_FILES

# Files whose bytes decide what a model folder computes; README, recipes, cards do not. The
# tokenizer files are the ones a merge copies (one list: a file copied but not hashed, as
# added_tokens.json once was, would let a cache entry outlive a tokenizer change).
_MODEL_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "config.json")


def model_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    files = {p for pattern in _MODEL_GLOBS for p in d.glob(pattern)}
    files |= {d / n for n in TOKENIZER_FILES if (d / n).is_file()}
    return sorted(files)


def hash_model_dir(model_dir: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 over the names and bytes of the weight, config and tokenizer files."""
    h = hashlib.sha256()
    for p in model_files(model_dir):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def hash_json(obj: object) -> str:
    """sha256 of a JSON-serializable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
