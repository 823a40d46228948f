"""Content hashes for caches: a model folder's bytes plus whatever settings shape the result."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

import platformdirs

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)


# Files whose bytes decide what a model folder computes; README, recipes, cards do not. The
# tokenizer files are the ones a merge copies (one list: a file copied but not hashed, as
# added_tokens.json once was, would let a cache entry outlive a tokenizer change).
_MODEL_GLOBS = (
    "*.safetensors",
    "*.bin",
    "*.safetensors.index.json",
    "config.json",
    "adapter_config.json",
)


def is_model_file(name: str) -> bool:
    """Whether a file of this name in a model folder is part of the model (model_files)."""
    return name in TOKENIZER_FILES or any(fnmatch.fnmatchcase(name, g) for g in _MODEL_GLOBS)


def model_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    files = {p for pattern in _MODEL_GLOBS for p in d.glob(pattern)}
    files |= {d / n for n in TOKENIZER_FILES if (d / n).is_file()}
    return sorted(files)


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
    buf = memoryview(bytearray(chunk))  # one buffer: a new 4 MB block per read page-faults anew
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
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
    ignored. A hash `prehash` started for this folder is waited for and used if the stamps it
    was taken under still hold."""
    key = str(Path(model_dir).resolve())
    with _LOCK:
        early = _EARLY.pop((key, cache), None)
    if early is not None:
        with contextlib.suppress(Exception):  # its failure is met again, and reported, below
            stamps, digest = early.result()
            if _stamp_rows(key) == stamps:
                return digest
    return _stamped_hash(key, cache)[1]


def prehash(folders: Iterable[str | Path], cache: Path | None = HASH_CACHE) -> None:
    """Start cached_model_hash of each existing folder in FOLDERS on one daemon thread, for a
    later call to find done: file reads and sha256 release the GIL, so on a first run the
    hashing overlaps the seconds torch and transformers take to import."""
    jobs = []
    with _LOCK:
        for folder in folders:
            key = (str(Path(folder).resolve()), cache)
            if key not in _EARLY and Path(key[0]).is_dir():
                jobs.append((key, _EARLY.setdefault(key, Future())))
    if jobs:
        threading.Thread(target=_run_early, args=(jobs,), daemon=True).start()


_LOCK = threading.Lock()
_EARLY: dict[tuple[str, Path | None], Future] = {}  # prehash's results, each taken once


def _run_early(jobs: list[tuple[tuple[str, Path | None], Future]]) -> None:
    for key, future in jobs:
        try:
            future.set_result(_stamped_hash(*key))
        except Exception as e:  # noqa: BLE001 - handed to whoever takes the result
            future.set_exception(e)


def _stamped_hash(key: str, cache: Path | None) -> tuple[list[list], str]:
    """(stamps, digest) of the folder KEY, through CACHE."""
    started = time.time_ns()
    stamps = _stamp_rows(key)
    if cache is None:
        return stamps, hash_model_dir(key)
    with _LOCK:
        hit = _read_cache(cache).get(key)
    if isinstance(hit, dict) and hit.get("stamps") == stamps and isinstance(hit.get("sha256"), str):
        return stamps, hit["sha256"]
    digest = hash_model_dir(key)
    settled = all(row[-1] < started - SETTLED_NS for row in stamps)
    if settled and _stamp_rows(key) == stamps:
        with _LOCK:  # read again: another thread may have stored a folder meanwhile
            entries = _read_cache(cache)
            entries.pop(key, None)
            entries[key] = {"stamps": stamps, "sha256": digest}
            _write_cache(cache, dict(list(entries.items())[-CACHED_FOLDERS:]))
    return stamps, digest


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
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
