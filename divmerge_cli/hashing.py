"""Content hashes for caches: a model folder's bytes plus whatever settings shape the result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import platformdirs

from .checkpoint import model_files

HASH_CACHE = Path(platformdirs.user_cache_dir("divmerge")) / "hashes.json"
CACHED_FOLDERS = 256  # entries kept in the hash cache (the most recently stored)
SETTLED_NS = 2 * 10**9  # files changed this recently are hashed but not remembered


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


def cached_model_hash(model_dir: str | Path, cache: Path | None = HASH_CACHE) -> str:
    """hash_model_dir, remembered in the JSON file CACHE by the files' stamps (file_stamps: device,
    inode, size, mtime, ctime), so a rerun on the same inputs reads them once, not twice. Any
    write to a file changes its ctime, which no tool can set back, and a replaced file has a new
    inode; files changed in the last SETTLED_NS are not remembered, as a write within the same
    clock tick as the stamps could leave them equal. A cache that cannot be read or written is
    ignored."""
    if cache is None:
        return hash_model_dir(model_dir)
    key = str(Path(model_dir).resolve())
    started = time.time_ns()
    stamps = _stamp_rows(model_dir)
    entries = _read_cache(cache)
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("stamps") == stamps and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = hash_model_dir(model_dir)
    settled = all(row[-1] < started - SETTLED_NS for row in stamps)
    if settled and _stamp_rows(model_dir) == stamps:
        entries.pop(key, None)
        entries[key] = {"stamps": stamps, "sha256": digest}
        _write_cache(cache, dict(list(entries.items())[-CACHED_FOLDERS:]))
    return digest


def _stamp_rows(model_dir: str | Path) -> list[list]:
    """[name, device, inode, size, mtime_ns, ctime_ns] of each file hash_model_dir reads."""
    return [[p.name, *st] for p, st in file_stamps([model_dir]).items()]


def _read_cache(cache: Path) -> dict:
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(cache: Path, entries: dict) -> None:
    """Written whole and renamed into place: a concurrent run reads the old or the new file."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def hash_file(path: str | Path) -> str:
    """sha256 of one file's bytes (what `sha256sum` prints)."""
    return _update(hashlib.sha256(), Path(path)).hexdigest()


def hash_json(obj: object) -> str:
    """sha256 of a JSON-serializable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
