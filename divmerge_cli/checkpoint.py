"""Checkpoints, read one tensor at a time, and the atomic sharded safetensors writer.

Reading goes through the safetensors header plus plain positioned reads, not a memory map: a map
keeps every page it touched resident in the process for as long as it is open, so merging n models
would grow to n whole models. With reads, peak memory is the tensors we hold.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError, resolve
from .hashing import TOKENIZER_FILES, is_model_file

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets, start}}.

    Every entry is checked against the file as `run` would meet it, so `validate` fails where a
    merge would: offsets inside the body, and spanning exactly what the shape and dtype need.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(100_000_000, size - 8):
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - n)
        info["start"] = 8 + n + info["data_offsets"][0]
    return header


def _check_entry(path: Path, name: str, info: object, body: int) -> None:
    """One header entry: a known dtype, a shape of sizes, offsets that fit the body and the shape."""

    def ints(v: object, k: int | None = None) -> bool:
        ok = isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)
        return ok and (k is None or len(v) == k)

    if not isinstance(info, dict):
        raise UserError(f"{path}: tensor {name}: header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ST_DTYPES:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if not ints(shape) or not ints(offsets, 2) or offsets[0] > offsets[1]:
        raise UserError(
            f"{path}: tensor {name}: shape {shape!r} / data_offsets {offsets!r} are not sizes "
            "and a [begin, end] byte range"
        )
    if offsets[1] > body:
        raise UserError(
            f"{path}: tensor {name} ends at byte {offsets[1]} of the data but the file holds "
            f"{body}: the file is truncated"
        )
    need = _numel(shape) * ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        raise UserError(
            f"{path}: tensor {name} spans {offsets[1] - offsets[0]} bytes but shape {shape} of "
            f"{dtype} needs {need}: the header is inconsistent"
        )


def check_pickle(f: Path, where: str, allow_pickle: bool) -> None:
    """A pickled .bin weights file is read only with --allow-pickle, and only in torch's zip format:
    weights_only=True reads that format; older (pre-1.6) files fail inside the unpickler."""
    if not allow_pickle:
        raise UserError(
            f"{where}: {f.parent} holds only pickled .bin weights; convert them to safetensors "
            "or pass --allow-pickle (they are then read with torch.load(weights_only=True))"
        )
    if not zipfile.is_zipfile(f):
        raise UserError(
            f"{where}: {f} is in torch's old (non-zip) format, which divmerge does not unpickle; "
            "re-save it with torch.save (zip, the default since torch 1.6) or as safetensors"
        )


def check_weights_readable(folder: Path, where: str, allow_pickle: bool) -> None:
    """For commands that load a whole model with transformers (eval): the same rule as `run`,
    from the file names alone; transformers prefers safetensors when both are present."""
    if not any(folder.glob("*.safetensors")):
        for f in sorted(folder.glob("*.bin")):
            check_pickle(f, where, allow_pickle)


class Checkpoint:
    """A Hugging Face model folder opened lazily: names, shapes and dtypes from headers only."""

    def __init__(self, path: Path, where: str, allow_pickle: bool = False):
        self.path, self.where = Path(path), where
        if not self.path.is_dir():
            raise UserError(f"{where}: {path} is not a folder holding a Hugging Face checkpoint")
        cfg = self.path / "config.json"
        if not cfg.is_file() and (self.path / "adapter_model.safetensors").is_file():
            raise UserError(
                f"{where}: {path} holds adapter_model.safetensors but no adapter_config.json: a "
                "LoRA adapter folder needs both (PEFT's save_pretrained writes them)"
            )
        if not cfg.is_file():
            raise UserError(f"{where}: {path} has no config.json")
        try:
            self.config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: {cfg} is not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{where}: {cfg} is not a JSON object (a model's config mapping)")
        self.index: dict[str, tuple[Path, dict | None]] = {}  # name -> (file, header entry)
        st = self._shard_files("model.safetensors", "safetensors")
        if st:
            for f in st:
                for name, info in read_header(f).items():
                    self.index[name] = (f, info)
        else:
            bins = self._shard_files("pytorch_model.bin", "bin")
            if not bins:
                raise UserError(
                    f"{where}: {path} holds no model.safetensors or pytorch_model.bin weights"
                )
            for f in bins:
                check_pickle(f, where, allow_pickle)
            self._bins: dict[Path, dict] = {}
            for f in bins:
                for name in self._load_bin(f):
                    self.index[name] = (f, None)

    def _shard_files(self, single: str, ext: str) -> list[Path]:
        idx = self.path / f"{single}.index.json"
        if idx.is_file():
            try:
                files = sorted(
                    set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values())
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{self.where}: {idx} is not a valid index ({e})") from None
            if not all(isinstance(f, str) for f in files):
                raise UserError(f"{self.where}: {idx}: weight_map values must be file names")
            for f in files:  # a shard is a file of this folder, never a path out of it
                if not plain_name(f):
                    raise UserError(
                        f"{self.where}: {idx} names {f!r}, outside {self.path}; an index may "
                        "only name files inside its model folder"
                    )
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise UserError(f"{self.where}: {idx} names {missing[0]}, which does not exist")
            return [self.path / f for f in files]
        if (self.path / single).is_file():
            return [self.path / single]
        return sorted(self.path.glob(f"model-*.{ext}")) if ext == "safetensors" else []

    def _load_bin(self, f: Path) -> dict:
        if f not in self._bins:
            try:
                self._bins[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise UserError(
                    f"{self.where}: cannot read {f} safely ({str(e).splitlines()[0]})"
                ) from None
        return self._bins[f]

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        f, info = self.index[name]
        return tuple(info["shape"]) if info else tuple(self._load_bin(f)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        f, info = self.index[name]
        return ST_DTYPES[info["dtype"]] if info else self._load_bin(f)[name].dtype

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """One tensor, or rows [start, stop) of it, read from disk in its stored dtype."""
        f, info = self.index[name]
        if info is None:
            t = self._load_bin(f)[name]
            return (t if start is None else t[start:stop]).clone()
        shape = list(info["shape"])
        dtype = ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if start is not None:  # rows of a C-contiguous tensor are one contiguous byte range
            row = (end - begin) // shape[0] if shape and shape[0] else 0
            start, stop = max(0, start), min(shape[0], stop if stop is not None else shape[0])
            begin, end = begin + start * row, begin + max(start, stop) * row
            shape[0] = max(0, stop - start)
        buf = torch.empty(end - begin, dtype=torch.uint8)  # unlike a bytearray, not zeroed first
        with open(f, "rb") as fh:
            fh.seek(info["start"] + begin - info["data_offsets"][0])
            if fh.readinto(buf.numpy()) != len(buf):
                raise UserError(f"{self.where}: {f} is truncated (tensor {name})")
        if not len(buf):
            return torch.empty(shape, dtype=dtype)
        return buf.view(dtype).reshape(shape)

    def tau_is_dense(self, name: str) -> bool | None:
        """Whether tau(name) is a dense tensor, told from headers (None: only reading tells)."""
        return True

    def tau(self, name: str, base) -> torch.Tensor:
        """The task vector theta_t - theta0 on one tensor, float32 (see taskvectors.py)."""
        tau = self.get(name).float()  # a fresh buffer (read from disk): subtract in place
        # tau lives on the host (theta0 may sit on a GPU); the merge moves it when it is used
        return tau.sub_(base.get(name).to(tau.device, torch.float32))

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in {f for f, _ in self.index.values()})


def model_path(ref: str, where: str, allow_pickle: bool = False) -> Path:
    """A local folder, or a hub id resolved through huggingface_hub (needs a network or its cache).
    What the folder holds (a checkpoint, an adapter) is models.open_model's to say."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise UserError(f"{where}: {ref} does not exist (a local folder or a hub id like org/name)")
    return Path(_from_hub(ref, where, allow_pickle))


def _from_hub(repo_id: str, where: str, allow_pickle: bool) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *TOKENIZER_FILES] + (["*.bin"] if allow_pickle else [])
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{where}: {repo_id} is not a local folder and the hub cannot be reached "
            f"({type(e).__name__}); download it where a network exists and pass the local folder"
        ) from None


# --- writing --------------------------------------------------------------------------------


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


class ShardWriter:
    """Streams tensors into safetensors files whose headers are written first.

    Shapes and dtypes are known before merging (from the inputs' headers), so each shard's header
    and every tensor's offset are computed up front: tensors may arrive in any order (worker
    threads finish them out of order) and memory holds only the tensors not yet written.
    """

    def __init__(
        self, folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int
    ):
        self.folder, self.specs = folder, specs
        sizes = [(n, _numel(s) * d.itemsize) for n, (s, d) in specs.items()]
        self.shards = plan_shards(sizes, max_bytes)
        k = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if k == 1
            else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        )
        self.where = {n: i for i, shard in enumerate(self.shards) for n in shard}
        self._open: dict[int, object] = {}  # shard -> its open file
        self._left = [set(shard) for shard in self.shards]  # names not yet written, per shard
        self._offset: dict[str, int] = {}  # name -> byte offset in its shard's file
        self.total = sum(n for _, n in sizes)

    def _start(self, i: int):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        data: dict[str, int] = {}
        for n in self.shards[i]:
            shape, dtype = self.specs[n]
            size = _numel(shape) * dtype.itemsize
            header[n] = {
                "dtype": TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + size],
            }
            data[n] = off
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fh = open(self.folder / self.files[i], "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        self._offset |= {n: 8 + len(raw) + o for n, o in data.items()}
        self._open[i] = fh
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Each tensor of `specs` once, in any order."""
        i = self.where.get(name)
        shape, dtype = self.specs.get(name, (None, None))
        if i is None or name not in self._left[i]:
            raise RuntimeError(f"writer got {name}, which is not a tensor it still expects")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {name} {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        fh = self._open.get(i) or self._start(i)
        if fh.tell() != self._offset[name]:  # in order, the file is already there
            fh.seek(self._offset[name])
        # flattened first: a 0-dim tensor has no last axis to view as bytes
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        fh.write(t.view(torch.uint8).numpy() if t.numel() else b"")  # no copy
        self._left[i].discard(name)
        if not self._left[i]:  # the shard is whole
            self._open.pop(i).close()

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open = {}
        missing = [n for n in self.specs if n in self._left[self.where[n]]]
        if missing:
            raise RuntimeError(f"writer closed before {missing[0]} was written")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {n: self.files[i] for n, i in self.where.items()},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def specs_nbytes(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of the tensors that `specs` describes (the size of a checkpoint written from them)."""
    return sum(_numel(s) * d.itemsize for s, d in specs.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5G', '1000000' -> bytes (decimal units, as mergekit and transformers)."""
    t = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise UserError(
            f"--out-shard-size: {text!r} is not a size; use e.g. 5GB, 500MB or a byte count"
        ) from None
    if not math.isfinite(value) or value < 1:
        raise UserError(f"--out-shard-size: {text!r} must be a positive, finite size")
    return int(value)


RECIPE_COPY = "divmerge_recipe.yaml"  # every output holds it: --force replaces only such folders
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an existing OUT without --force, an OUT divmerge did not write even with --force, an
    OUT below a file, and any OUT that would replace or sit inside an input."""
    out_r = check_target(out, "-o", inputs, folder=True)
    blocker = next((d for d in out_r.parents if d.exists() and not d.is_dir()), None)
    if blocker:
        raise UserError(f"-o {out}: {blocker} is a file, not a folder; choose another output path")
    _probe(next(d for d in out_r.parents if d.exists()), out, "-o")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a folder")
    if not force:
        raise UserError(f"-o {out}: already exists; pass --force to replace it")
    if any(out.iterdir()) and not (out / RECIPE_COPY).is_file():
        raise UserError(
            f"-o {out}: --force only replaces a folder divmerge wrote (one holding {RECIPE_COPY}); "
            "this one holds other files, so it is left alone: remove it yourself or choose another"
        )


def check_out_file(path: Path, flag: str, inputs: Iterable[Path] = ()) -> None:
    """Before any work: a file option's PATH (--json) can be written and writing it replaces no
    input. '-' (stdout) always can."""
    if str(path) == "-":
        return
    real = check_target(path, flag, [p for p in inputs if not Path(p).is_dir()], folder=False)
    for folder in (Path(p) for p in inputs if Path(p).is_dir()):
        folder = resolve(folder, "input")
        if real.is_relative_to(folder) and not _free_in_model(real):
            raise UserError(
                f"{flag} {path}: overlaps the input model {folder}: it would add a file the model "
                "reads or replace one that is not a divmerge report; write the JSON elsewhere"
            )
    if real.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path")
    if not real.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {real.parent} does not exist")
    _probe(real.parent, path, flag)


def _free_in_model(path: Path) -> bool:
    """Whether a JSON report may be written at PATH inside a model folder: a new file the model
    does not read (weights, config, tokenizer, adapter files), or a report divmerge wrote there
    (a CI step's `--json OUT/gate.json`, rerun). Like --force, it replaces only its own."""
    if is_model_file(path.name) or path.name == "generation_config.json":
        return False
    if not path.exists():
        return True
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and ("models" in report or "ok" in report)


def check_target(path: Path, flag: str, inputs: Iterable[Path], folder: bool) -> Path:
    """The resolved PATH an output option names, refused when it is a dangling link or when
    writing it would replace an input or a file inside one (for a folder: or hold an input)."""
    path = Path(path)
    real = resolve(path, flag)  # a link loop is refused here
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{flag} {path}: is a link to {os.readlink(path)}, which does not exist; "
            "give a path that does"
        )
    for p in inputs:
        p = resolve(p, "input")
        if real == p or real.is_relative_to(p) or (folder and p.is_relative_to(real)):
            kind = "model" if p.is_dir() else "file"
            raise UserError(
                f"{flag} {path}: overlaps the input {kind} {p}; writing it would replace the "
                "input: choose another path"
            )
    return real


def _probe(folder: Path, path: Path, flag: str) -> None:
    """A file can be created in FOLDER: not a read-only disk, nor a pseudo-filesystem like /proc
    whose folders refuse new files (permissions alone do not tell, and root passes them)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".divmerge-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(
            f"{flag} {path}: {folder} is not writable (cannot create a file there: "
            f"{e.strerror}); choose another path"
        ) from None


def standard_json(obj: object, indent: int | None = None) -> str:
    """JSON that every parser reads: NaN and infinities, which json.dumps writes as the
    non-standard NaN / Infinity, become null."""

    def finite(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, list | tuple) else x

    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def human_size(n: float) -> str:
    """Bytes in the decimal units parse_size reads, three significant digits or more: 512 B,
    8.39 MB, 45.2 MB, 610 MB, 1.25 GB (every size divmerge prints goes through here)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000
    if unit == "B" or abs(n) >= 99.95:
        return f"{n:.0f} {unit}"
    return f"{n:.2f} {unit}" if abs(n) < 9.995 else f"{n:.1f} {unit}"


def check_space(out: Path, need: int) -> None:
    """Refuse to start when the disk holding OUT has less free space than the output needs."""
    where = next(d for d in Path(out).absolute().parents if d.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(
            f"-o {out}: the merge needs {human_size(need)} of disk but {where} has only "
            f"{human_size(free)} free"
        )


def _raise_disk_error(e: OSError, out: Path, need: int | None) -> None:
    """Re-raise an OSError met while writing OUT; a full or read-only disk as the user's error."""
    if e.errno in DISK_FULL:
        needed = f"; the merged model needs {human_size(need)}" if need else ""
        free = human_size(shutil.disk_usage(Path(out).absolute().parent).free)
        raise UserError(
            f"-o {out}: the disk is full ({free} free{needed}); nothing was written"
        ) from None
    if e.errno in NOT_WRITABLE:
        raise UserError(f"-o {out}: cannot write there ({e.strerror}: {e.filename})") from None
    raise e


@contextmanager
def disk_full_is_user_error(folder: Path, need: int, what: str) -> Iterator[None]:
    """A full disk while writing WHAT into FOLDER becomes the user's error, naming the folder and
    the space the write needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = next(d for d in [Path(folder), *Path(folder).absolute().parents] if d.exists())
        raise UserError(
            f"{what} in {folder}: the disk is full ({human_size(shutil.disk_usage(where).free)} "
            f"free, {human_size(need)} needed); free some space and rerun"
        ) from None


def write_file(path: Path, data: str | bytes, what: str) -> None:
    """Write PATH whole or not at all: a temporary file beside it, renamed into place, removed
    on any failure (a full disk leaves no empty or partial file behind)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = None
    with disk_full_is_user_error(path.parent, len(raw), what):
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise


def _temp_name(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / (f".{out.name}.divmerge-{kind}" + (f"-{pid}" if pid is not None else ""))


def remove_stale_temps(out: Path) -> list[tuple[Path, str]]:
    """Remove the temporary folders beside OUT left by runs that were killed (their process is
    gone). An old OUT set aside just before a killed rename is put back when OUT is missing.
    Returns (folder, what was done) pairs, for the caller to report."""
    import psutil

    out = Path(out)
    pattern = re.compile(re.escape(f".{out.name}.divmerge-") + r"(tmp|old)-(\d+)")
    done = []
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.divmerge-*")):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or psutil.pid_exists(int(m[2])):
            continue
        if m[1] == "old" and not out.exists():
            p.rename(out)
            done.append((p, f"restored as {out}"))
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append((p, "removed"))
    return done


def scratch_dir(parent: Path, kind: str) -> Path:
    """A new temporary folder `.KIND-PID-*` in `parent`; remove_orphans finds it after a kill."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{kind}-{os.getpid()}-", dir=parent))


def remove_orphans(parent: Path, kind: str) -> list[Path]:
    """Remove the `.KIND-PID-*` folders in `parent` whose process is gone (a killed run's)."""
    import psutil

    pattern = re.compile(re.escape(f".{kind}-") + r"(\d{1,7})-")  # PIDs are at most 2**22
    gone = []
    for p in sorted(Path(parent).glob(f".{kind}-*")):
        m = pattern.match(p.name)
        if m and p.is_dir() and not psutil.pid_exists(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


_held: dict[str, int] = {}  # lock files this process holds -> how many nested holders


@contextmanager
def output_lock(out: Path, what: str = "-o") -> Iterator[None]:
    """Hold `.OUT.divmerge-lock` beside OUT: a second run writing the same OUT at the same time is
    refused, naming the process that holds it (`what` names OUT: -o, a sweep's results file). The
    lock is an flock, so the system releases it when its process dies (a killed run never blocks
    the next one). Re-entrant within a process."""
    out = Path(out)
    lock = _temp_name(out, "lock")
    key = os.path.abspath(lock)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, out, what)
    except OSError as e:
        _raise_disk_error(e, out, None)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        Path(lock).unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, out: Path, what: str) -> int:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the file still names the writer, nothing is refused
        fcntl = None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{what} {out}: another divmerge run (PID {other}) is writing it; wait for it "
                "to finish or choose another path"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed the file after we opened it: lock the new one


@contextmanager
def atomic_folder(out: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it vanishes.
    `need` (bytes) goes into the message if the disk fills up."""
    out = Path(out)
    with output_lock(out):
        tmp = _temp_name(out, "tmp", os.getpid())
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            if out.exists():
                old = _temp_name(out, "old", os.getpid())
                out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:
                    old.rename(out)  # the previous output stays where it was
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _raise_disk_error(e, out, need)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def plain_name(name: str) -> bool:
    """A name a model folder may use for one of its files: relative, never climbing out (`..`)."""
    return not Path(name).is_absolute() and ".." not in Path(name).parts


def side_files(src: Path, names: tuple[str, ...], where: str) -> list[str]:
    """The files of NAMES that folder SRC holds, each checked to be the folder's own: the shard
    index's rule, and through links too. A link out of the folder (merges.txt -> a private file
    elsewhere) would copy that file into OUT. A hub cache snapshot's files link into its
    repository's blobs/, which is inside."""
    root = Path(src).resolve()
    if root.parent.name == "snapshots":  # huggingface_hub: snapshots/REV/f -> ../../blobs/HASH
        root = root.parent.parent
    found = [n for n in names if (Path(src) / n).is_file()]
    for n in found:
        real = (Path(src) / n).resolve()
        if not plain_name(n) or not real.is_relative_to(root):
            raise UserError(
                f"{where}: {Path(src) / n} links to {real}, outside {src}; divmerge copies only a "
                "model folder's own files into the output (replace the link with a copy)"
            )
    return found


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = side_files(src, names, str(src))
    for n in copied:
        shutil.copy2(src / n, dst / n)
    return copied


def has_weights(folder: Path) -> bool:
    """A model folder that a finished save left behind: config.json beside safetensors weights
    (one file or an index). Scripts that build models skip the work when it is true."""
    d = Path(folder)
    weights = (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()
    return (d / "config.json").is_file() and weights


def not_finite_input(tensors) -> UserError | None:
    """The error naming the first of `tensors` ((checkpoint, name) pairs) that holds NaN or Inf."""
    for c, n in tensors:
        if c.dtype(n).is_floating_point and not torch.isfinite(c.get(n).float()).all():
            return UserError(f"{c.where}: tensor {n} in {c.path} holds NaN or Inf values")
    return None
