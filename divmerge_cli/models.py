"""Opening a model, whatever the recipe names: a checkpoint folder (or hub id), a LoRA adapter
folder over the base, or mergekit's `MODEL+ADAPTER`; and what every kind of expert answers the same
way (its task vector on a tensor, the folder it runs with, its content hash, itself loaded whole).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, model_path
from .errors import UserError
from .hashing import hash_json, hash_model_dir
from .lora import LoraExpert, home, is_adapter, read_adapter_config
from .taskvectors import LowRank


def model_folder(expert) -> Path:
    """The folder holding the config and tokenizer an expert (a folder, checkpoint or adapter)
    runs with: an adapter folder's own tokenizer files, if any, are not what the base reads."""
    h = home(expert)
    return Path(getattr(h, "path", h))


def mergekit_ref(expert) -> str:
    """How mergekit names the expert: a folder, or `model+adapter` (it reads no bare adapter)."""
    if isinstance(expert, LoraExpert):
        return f"{mergekit_ref(expert.base)}+{expert.path}"
    return str(expert.path)


def content_hash(expert) -> str:
    """sha256 of what an expert computes: a model folder's files, or an adapter's files and
    config together with the hash of the model it is applied to."""
    if not isinstance(expert, LoraExpert):
        return hash_model_dir(Path(getattr(expert, "path", expert)))
    config = hashlib.sha256((expert.path / "adapter_config.json").read_bytes()).hexdigest()
    return hash_json(
        {
            "adapter": hash_model_dir(expert.path),
            "adapter_config": config,
            "on": content_hash(expert.base),
        }
    )


def load_expert_model(expert, dtype: torch.dtype = torch.float32):
    """The expert as one model in memory: a checkpoint loaded, or the model under an adapter
    loaded and the adapter folded in (PEFT's merge_and_unload; local files only)."""

    if not isinstance(expert, LoraExpert):
        from . import hf  # lazy: transformers' models take seconds to import

        return hf.load_model(Path(getattr(expert, "path", expert)), dtype)
    from peft import PeftModel  # lazy for start-up time: only adapters need PEFT

    model = load_expert_model(expert.base, dtype)
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing` while wrapping the
            # model: a FutureWarning about PEFT's code that the user can do nothing about
            warnings.filterwarnings(
                "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
            )
            peft_model = PeftModel.from_pretrained(model, str(expert.path))  # local: no hub
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"{expert.where}: PEFT cannot apply {expert.path} ({str(e).splitlines()[0]})"
        ) from None
    return peft_model.merge_and_unload().eval()


def scored_model(ref: str | Path, where: str):
    """A model to score or generate with: a checkpoint folder, mergekit's `model+adapter`, or a
    LoRA adapter folder whose adapter_config.json names a local base model."""
    ref = str(ref)
    if "+" in ref and not Path(ref).exists():
        return open_model(ref, where)
    path = Path(ref)
    if not is_adapter(path):
        return path
    on = read_adapter_config(path, where).get("base_model_name_or_path")
    if not on or not Path(on).is_dir():
        raise UserError(
            f"{where}: {path} is a LoRA adapter whose base_model_name_or_path ({on!r}) is not a "
            f"local folder; name the model it applies to as BASE+{path}"
        )
    return open_model(f"{on}+{path}", where)


def load_scored(ref: str | Path, where: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of scored_model(ref): an adapter is folded into its base."""

    expert = scored_model(ref, where)
    from . import hf  # lazy: transformers' models take seconds to import

    return load_expert_model(expert, dtype), hf.load_tokenizer(model_folder(expert))


def open_model(
    ref: str,
    where: str,
    base: Checkpoint | None = None,
    *,
    resolve: Callable[[str], str] = str,
    allow_pickle: bool = False,
    base_ref: str | None = None,
):
    """The one way a model is opened: a checkpoint folder or hub id (a Checkpoint), a LoRA
    adapter folder over `base` (a LoraExpert), or mergekit's `model+adapter` (the adapter over
    that model). `resolve` turns a recipe's path into a file system one; `where` names it in
    errors."""
    path = resolve(ref)
    if "+" in ref and not Path(path).exists():
        left, right = ref.rsplit("+", 1)
        if not left.strip() or not right.strip():
            raise UserError(
                f"{where}: {ref!r} names no {'model' if not left.strip() else 'adapter'} "
                f"{'before' if not left.strip() else 'after'} '+'; write MODEL+ADAPTER (mergekit's "
                "form: the LoRA adapter folder applied to that model)"
            )
        if not is_adapter(Path(resolve(right))):
            raise UserError(
                f"{where}: {right} (after '+') is not a LoRA adapter folder: "
                + (
                    "it has no adapter_config.json"
                    if Path(resolve(right)).is_dir()
                    else "not found"
                )
            )
        on_base = base is not None and Path(resolve(left)).resolve() == base.path.resolve()
        model = (
            base if on_base else open_model(left, where, resolve=resolve, allow_pickle=allow_pickle)
        )
        adapter = _open(resolve(right), where, allow_pickle, model, left)
        adapter.on_base = on_base
        return adapter
    return _open(path, where, allow_pickle, base, base_ref)


def _open(ref: str, where: str, allow_pickle: bool, base, base_ref: str | None):
    """A folder (or hub id): a PEFT LoRA adapter opens as a LoraExpert over `base`."""
    p = model_path(ref, where, allow_pickle)
    if is_adapter(p):
        return LoraExpert(p, where, base, base_ref)
    return Checkpoint(p, where, allow_pickle)


def tau_of(expert, name: str, base: Checkpoint) -> Tensor | LowRank | None:
    """An expert's task vector on one tensor; None for the base itself (linear lists it)."""
    if expert is base or expert.path.resolve() == base.path.resolve():
        return None
    return expert.tau(name, base)


def combine(parts: list[tuple[float, Tensor | LowRank | None]]) -> Tensor | LowRank | None:
    """Σ c·τ over one tensor: low rank (factors side by side, c·s folded into B) when every
    nonzero term is, else dense float32."""
    parts = [(c, t) for c, t in parts if t is not None and c != 0]
    if not parts:
        return None
    if all(isinstance(t, LowRank) for _, t in parts):
        b = torch.cat([t.B.float() * (c * t.scale) for c, t in parts], dim=1)
        return LowRank(b, torch.cat([t.A.float() for _, t in parts], dim=0), 1.0)
    out = None
    for c, t in parts:
        d = (t.dense() if isinstance(t, LowRank) else t) * c
        out = d if out is None else out.add_(d)
    return out
