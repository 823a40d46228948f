"""Content hashes for caches: a model folder's bytes plus whatever settings shape the result."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from .checkpoint import model_files


def file_stamps(folders: Iterable[str | Path]) -> dict[Path, tuple[int, ...]]:
    """(device, inode, size, mtime, ctime) of each file model_files lists in FOLDERS: a file
    replaced (a new inode), rewritten (a new size or time), added or removed stamps differently."""
    out = {}
    for folder in folders:
        for p in model_files(folder):
            st = p.stat()
            out[p] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


SHA256 = r"^[0-9a-f]{64}$"  # a hex digest, as recipes may pin their inputs with


def _update(h, path: Path, chunk: int = 1 << 22):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def hash_model_dir(model_dir: str | Path) -> str:
    """sha256 over the names and bytes of the weight, config and tokenizer files."""
    h = hashlib.sha256()
    for p in model_files(model_dir):
        h.update(p.name.encode() + b"\0")
        _update(h, p)
    return h.hexdigest()


def hash_file(path: str | Path) -> str:
    """sha256 of one file's bytes (what `sha256sum` prints)."""
    return _update(hashlib.sha256(), Path(path)).hexdigest()


def hash_json(obj: object) -> str:
    """sha256 of a JSON-serializable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
