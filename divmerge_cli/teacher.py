"""Teacher targets for DivMerge and their content-addressed cache on disk.

Each expert (teacher) greedily generates on its task's prompts once; the distribution at every
generated position is kept (paper B.1). Generation is the slow part and is identical across
runs that share the expert, the prompts and the settings, so it is cached under a sha256 of
exactly those inputs. One entry is a folder named by the key:

    tensors.safetensors   the samples' tensors concatenated along the token axis, plus offsets
    meta.json             format, counts, texts, and the sha256 of tensors.safetensors

An entry is built in a temporary folder and renamed into place, so a crash leaves no half entry.
A damaged entry (truncated, bad header, checksum or shape mismatch) is deleted and rebuilt.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs
import torch
from safetensors.torch import load, save

from . import hf
from .checkpoint import disk_full_is_user_error, remove_orphans, scratch_dir
from .generate import Generation, greedy_generate
from .hashing import hash_json
from .models import content_hash, load_expert_model, model_folder
from .tasks import TaskSpec, load_rows, render_prompt

FORMAT_VERSION = 2  # bump when the entry layout or the generation procedure changes
TENSORS, META = "tensors.safetensors", "meta.json"


@dataclass(kw_only=True)
class TeacherSample(Generation):
    """A teacher generation and the task whose prompt produced it."""

    task: str


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("divmerge")) / "teacher"


def teacher_cache_key(model_dir, prompts: list[str], max_new_tokens: int, top_k: int | str) -> str:
    """sha256 over everything that decides the targets: weights, config, tokenizer, prompts, settings.

    The rendered prompts carry both the data rows and the prompt template. `model_dir` is a model
    folder or a LoRA expert (its adapter files and the model it is applied to).
    """
    return hash_json(
        {
            "format": FORMAT_VERSION,
            "model": content_hash(model_dir),
            "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "max_new_tokens": int(max_new_tokens),
            "top_k": top_k,
        }
    )


def teacher_samples(
    expert,
    task: str,
    spec: TaskSpec,
    *,
    samples: int,
    top_k: int | Literal["full"] | None,
    seed: int,
    cache_dir: Path,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[TeacherSample]:
    """The teacher targets of `expert` on `samples` seeded validation rows of `task`: the one path
    from a task to its samples, shared by the learned merges, `eval --divergence` and Table 2, so
    that each scores against the teacher the merge learned from. `expert`: a model folder, or a
    LoRA expert (lora.LoraExpert: the adapter folded into the model it is applied to)."""
    rows = load_rows(spec.validation, limit=samples, seed=seed)
    prompts = [render_prompt(task, spec, r) for r in rows]
    got, _hit = load_or_build_teacher(
        expert, task, prompts, spec.max_new_tokens, top_k, cache_dir, batch_size, progress
    )
    return got


def resolve_top_k(top_k: int | str, model_dir: Path) -> int | str:
    """top_k capped at the model's vocabulary: the default (256) is valid for any model, and a k
    at or above the vocabulary keeps every id either way (so one cache entry serves both)."""
    vocab = hf.vocab_size(model_dir) if top_k != "full" else None
    return min(top_k, vocab) if vocab and isinstance(top_k, int) else top_k


def load_or_build_teacher(
    model_dir,
    task: str,
    prompts: list[str],
    max_new_tokens: int,
    top_k: int | str,
    cache_dir: Path,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[TeacherSample], bool]:
    """The teacher samples for `prompts`, from the cache when possible; returns (samples, cache_hit).

    On a miss the expert is loaded in float32, generates, and is freed before returning, so only
    one expert is in memory at a time.
    """
    if not prompts:
        raise ValueError(f"task '{task}': no prompts to generate on")
    folder = model_folder(model_dir)  # config and tokenizer (the base's, for an adapter)
    top_k = resolve_top_k(top_k, folder)
    key = teacher_cache_key(model_dir, prompts, max_new_tokens, top_k)
    entry = Path(cache_dir) / key
    if entry.exists():
        gens = _read_entry(entry, len(prompts), top_k)
        if gens is not None:
            return [_with_task(gen, task) for gen in gens], True
        _remove(entry)  # damaged: rebuild below
    model = load_expert_model(model_dir, torch.float32)
    tokenizer = hf.load_tokenizer(folder)
    try:
        gens = greedy_generate(
            model, tokenizer, prompts, max_new_tokens, batch_size, top_k, progress
        )
    finally:
        alive = weakref.ref(model)
        del model
        if alive() is not None:  # freed by refcount normally; a full gc pass costs ~0.5 s
            gc.collect()
    _write_entry(entry, gens, top_k, max_new_tokens, str(getattr(model_dir, "path", model_dir)))
    # what a later hit returns (fp16-rounded probabilities): a miss must give the same targets
    gens = _read_entry(entry, len(prompts), top_k) or gens
    return [_with_task(gen, task) for gen in gens], False


def _with_task(gen: Generation, task: str) -> TeacherSample:
    return TeacherSample(**vars(gen), task=task)


# ---------------------------------------------------------------------------------------------
# Entry layout


def _flatten(gens: list[Generation], top_k: int | str) -> dict[str, torch.Tensor]:
    def offsets(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    prompts, gen_ids = [gen.prompt_ids for gen in gens], [gen.gen_ids for gen in gens]
    t = {
        "prompt_ids": torch.cat(prompts),
        "prompt_offsets": offsets(prompts),
        "gen_ids": torch.cat(gen_ids),
        "gen_offsets": offsets(gen_ids),
    }
    if top_k == "full":
        t["probs"] = torch.cat([gen.probs for gen in gens])
    elif top_k is not None:  # None: the token ids only
        # int32 halves the ids on disk; vocabularies are far below 2**31.
        t["topk_ids"] = torch.cat([gen.topk_ids for gen in gens]).to(torch.int32)
        # float16 probabilities: a quarter of a dense row's precision needs, 25% fewer bytes
        t["topk_probs"] = torch.cat([gen.topk_probs for gen in gens]).to(torch.float16)
        t["tail"] = torch.cat([gen.tail for gen in gens])
    return {k: v.contiguous() for k, v in t.items()}


def _write_entry(
    entry: Path, gens: list[Generation], top_k, max_new_tokens: int, source: str
) -> None:
    # serialized in memory, then written: safetensors' own file writer reports a full disk as a
    # SafetensorError, not as the OSError a plain write raises
    data = save(_flatten(gens, top_k))
    meta = {
        "format": FORMAT_VERSION,
        "n": len(gens),
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "source": source,  # informational only; the key holds the content hash
        "texts": [gen.text for gen in gens],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    text = json.dumps(meta)
    with disk_full_is_user_error(entry.parent, len(data) + len(text), "the teacher cache"):
        remove_orphans(entry.parent, "tmp")  # entries a killed run was writing
        tmp = scratch_dir(entry.parent, "tmp")
        try:
            (tmp / TENSORS).write_bytes(data)
            (tmp / META).write_text(text, encoding="utf-8")
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.exists():  # another process may have written the same entry first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Free the entry's name first (renaming needs only the cache folder to be writable), so a
    damaged entry that cannot be deleted, e.g. one made unreadable, is still rebuilt."""
    aside = Path(tempfile.mkdtemp(prefix=f".damaged-{entry.name[:16]}-", dir=entry.parent))
    try:
        os.replace(entry, aside / "entry")
    except OSError:
        aside.rmdir()
        return
    shutil.rmtree(aside, ignore_errors=True)


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_entry(entry: Path, n: int, top_k) -> list[Generation] | None:
    """The entry's generations, or None when anything about it is wrong."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        if (meta.get("format"), meta.get("n"), meta.get("top_k")) != (FORMAT_VERSION, n, top_k):
            return None
        # read into memory (not a memory map): a later rebuild of the entry must not pull the
        # tensors out from under a running process
        data = (entry / TENSORS).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return None
        return _unflatten(load(data), meta["texts"], n, top_k)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError):
        # json, safetensors and torch report damage as one of these; AttributeError and
        # IndexError come from valid JSON of the wrong shape (a list where a mapping belongs)
        return None


def _unflatten(
    t: dict[str, torch.Tensor], texts: list[str], n: int, top_k
) -> list[Generation] | None:
    po, go = t["prompt_offsets"], t["gen_offsets"]
    dist = {"full": ["probs"], None: []}.get(top_k, ["topk_ids", "topk_probs", "tail"])
    total = int(go[-1]) if len(go) else -1
    ok = (
        len(texts) == n
        and po.shape == go.shape == (n + 1,)
        and int(po[0]) == int(go[0]) == 0
        and bool((po.diff() >= 0).all() and (go.diff() >= 1).all())
        and int(po[-1]) == len(t["prompt_ids"])
        and total == len(t["gen_ids"])
        and all(len(t[k]) == total for k in dist)
        and (
            top_k in ("full", None)
            or t["topk_ids"].shape[1:] == t["topk_probs"].shape[1:] == (top_k,)
        )
    )
    if not ok:
        return None
    gens = []
    for i in range(n):
        prompt, span = slice(int(po[i]), int(po[i + 1])), slice(int(go[i]), int(go[i + 1]))
        fields = {k: t[k][span] for k in dist}
        if "topk_ids" in fields:
            fields["topk_ids"] = fields["topk_ids"].long()
            # back to float32, rescaled so that top-k + tail sums to 1 again after fp16 rounding
            probs = fields["topk_probs"].float()
            total = probs.sum(-1, keepdim=True)
            fields["topk_probs"] = probs * ((1 - fields["tail"][:, None]) / total.clamp_min(1e-30))
        gens.append(Generation(t["prompt_ids"][prompt], t["gen_ids"][span], texts[i], **fields))
    return gens
