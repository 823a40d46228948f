"""PEFT LoRA adapters as task vectors, and merged task vectors written back as a LoRA adapter.

An adapter trained on θ0 is the expert θ_t = θ0 + s·B·A on each target weight (s = lora_alpha/r,
lora_alpha/√r with rsLoRA) plus whole tensors for `modules_to_save`. `LoraExpert` reads one like a
checkpoint (data-free methods see θ_t rows, formed one tensor at a time) and gives its task vector
in native form through `tau` (LowRank factors, never densified). `write_adapter` writes
Σ_t c_t·τ_t as a PEFT adapter: exact at rank Σ r_t when every τ is low rank, else truncated by SVD.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (
    ST_DTYPES,
    Checkpoint,
    atomic_folder,
    check_out,
    open_checkpoint,
    read_header,
)
from .errors import UserError
from .layout import ModuleView, module_delta
from .taskvectors import LowRank

PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(.+)\.lora_(A|B)\.weight$")
_EMB_FACTOR = re.compile(r"^(.+)\.lora_embedding_(A|B)$")
# adapter_config.json keys that make an adapter something other than θ0 + s·B·A per weight
_REFUSED = {
    "use_dora": "a DoRA adapter (use_dora: true)",
    "lora_bias": "a LoRA adapter with a trained lora_B bias (lora_bias: true)",
    "target_parameters": "a LoRA adapter on raw parameters (target_parameters)",
    "layer_replication": "a LoRA adapter that replicates layers (layer_replication)",
    "alora_invocation_tokens": "an activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "a LoRA adapter with trainable tokens (trainable_token_indices)",
}


def _rank(v: object) -> bool:
    return type(v) is int and v >= 1


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _regex(v: object, pattern: str = "{}") -> bool:
    """V is a string that compiles within PATTERN (as PEFT uses it); re's FutureWarnings about
    odd patterns stay quiet: library code does not print."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(pattern.format(v))
    except (re.error, TypeError, ValueError, RecursionError, OverflowError):
        return False
    return isinstance(v, str)


def _patterns(v: object, value: Callable[[object], bool]) -> bool:
    """rank_pattern / alpha_pattern: {regex of a module path's end: value}, as _pattern_value
    reads them (null is PEFT's empty default)."""
    if v is None:
        return True
    ok = isinstance(v, dict) and all(_regex(k, r"(.*\.)?({})$") for k in v)
    return ok and all(value(x) for x in v.values())


def _names(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# adapter_config.json fields an adapter is read with: field -> (valid?, what would be valid).
# PEFT fills in a missing field with its default; null is an unset optional field.
_CONFIG_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string, LORA"),
    "r": (_rank, "an integer >= 1 (the rank of the factors)"),
    "lora_alpha": (_number, "a finite number"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: _patterns(v, _rank), "{module regex: integer >= 1}"),
    "alpha_pattern": (lambda v: _patterns(v, _number), "{module regex: number}"),
    "target_modules": (
        lambda v: v is None or _names(v) or _regex(v),
        "a list of module names or one regular expression",
    ),
    "modules_to_save": (lambda v: v is None or _names(v), "a list of module names"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a path or hub id"),
}


def read_adapter_config(path: Path, where: str) -> dict:
    """A LoRA adapter folder's adapter_config.json: a JSON object whose fields have the types
    PEFT reads them as. Raises UserError naming the file and the field."""
    cfg_file = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: {cfg_file} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(
            f"{where}: {cfg_file} is not a JSON object (PEFT's mapping of LoRA settings: "
            "peft_type, r, lora_alpha, target_modules, ...)"
        )
    for key, (valid, what) in _CONFIG_FIELDS.items():
        if key in cfg and not valid(cfg[key]):
            raise UserError(f"{where}: {cfg_file}: {key}: {cfg[key]!r} is not valid; use {what}")
    return cfg


def _targeted(target_modules: list[str] | str | None, module: str) -> bool:
    """Whether PEFT's target_modules name `module` (its check_target_module_exists, by name):
    one regex matching the whole path, or names matching the path or its last parts."""
    if target_modules is None or target_modules == "all-linear":  # PEFT picks them itself
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith(f".{t}") for t in target_modules)


class _File:
    """One safetensors file read by Checkpoint's positioned reader (no memory map, no full load)."""

    get = Checkpoint.get

    def __init__(self, path: Path, where: str):
        self.where = where
        self.index = {n: (path, info) for n, info in read_header(path).items()}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraExpert:
    """A PEFT LoRA adapter folder over `base`, read like a checkpoint (headers checked up front)."""

    def __init__(
        self, path: Path, where: str, base: Checkpoint | None, base_ref: str | None = None
    ):
        self.path, self.where, self.base = Path(path), where, base
        self.on_base = True  # `base` is the merge's θ0 (open_model clears it for model+adapter)
        cfg_file, st = self.path / "adapter_config.json", self.path / "adapter_model.safetensors"
        if base is None:
            raise UserError(
                f"{where}: {path} is a LoRA adapter; set base_model to the model it was trained on"
            )
        cfg = read_adapter_config(self.path, where)
        kind = cfg.get("peft_type", "?")
        if kind != "LORA":
            raise UserError(
                f"{where}: {cfg_file} is a {kind} adapter; divmerge reads LoRA adapters only"
            )
        for key, what in _REFUSED.items():
            if cfg.get(key):
                raise UserError(f"{where}: {cfg_file} is {what}; divmerge reads plain LoRA only")
        if not st.is_file():
            raise UserError(f"{where}: {path} has no adapter_model.safetensors")
        self.config, self.index = base.config, base.index
        self._file = _File(st, where)
        self.factors: dict[str, tuple[str, str, float, bool]] = {}  # name -> (B key, A key, s, T)
        self.own: dict[str, str] = {}  # base name -> adapter key of a whole tensor it replaces
        self._map(cfg, st)
        self.warnings = self._base_warning(cfg.get("base_model_name_or_path"), base_ref)
        self._local = threading.local()  # per worker thread: .cache = (name, LowRank)

    def _map(self, cfg: dict, st: Path) -> None:
        """PEFT key names -> base tensor names, each checked against the base's shapes."""
        from .layout import stored_names

        pairs: dict[str, dict] = {}
        # PEFT names tensors by the module; the base may store them renamed (GPT-NeoX's lm_head
        # is stored as embed_out)
        stored = stored_names(home(self.base))
        for key in self._file.index:
            # modules_to_save are stored under the base's name; a targeted embedding's own
            # weights (saved with it when the vocabulary may have changed) under base_layer
            rest = key.removeprefix(PREFIX).replace(".base_layer.", ".")
            rest = stored.get(rest, rest)
            m = _FACTOR.match(rest) or _EMB_FACTOR.match(rest)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = key
                pairs[m.group(1)]["emb"] = m.re is _EMB_FACTOR
            elif "lora_" in rest:
                raise UserError(f"{self.where}: {st} holds {key}, which plain LoRA does not have")
            elif rest in self.base.index:
                if self._file.index[key][1]["shape"] != list(self.base.shape(rest)):
                    raise UserError(
                        f"{self.where}: {st} tensor {key} does not match the base's {rest}"
                    )
                self.own[rest] = key
            else:
                raise UserError(f"{self.where}: {st} tensor {key} maps to no tensor of the base")
        # PEFT transposes a target's factors when the layer is a Conv1D (GPT-2), whatever the
        # config's fan_in_fan_out says (it corrects the flag per layer, with a warning)
        kinds = module_kinds(self.base.config)
        conv = (
            (lambda m: kinds.get(m) == "conv1d")
            if isinstance(kinds, dict)
            else (lambda m: bool(cfg.get("fan_in_fan_out")))
        )
        cfg_file = self.path / "adapter_config.json"
        targets = cfg.get("target_modules")
        modules = {n.rpartition(".")[0] for n in self.base.names}
        if not any(_targeted(targets, m) for m in modules):  # PEFT: "not found in the base model"
            raise UserError(
                f"{self.where}: {cfg_file}: target_modules: {targets!r} names no module of the "
                f"base (e.g. {sorted(modules)[-1]}); PEFT would not load it"
            )
        for module, p in pairs.items():
            name = stored.get(f"{module}.weight", f"{module}.weight")
            if "A" not in p or "B" not in p:
                raise UserError(f"{self.where}: {st} has only one LoRA factor of {module}")
            if name not in self.base.index:
                raise UserError(
                    f"{self.where}: {st} adapts {module}, but the base has no tensor {name}"
                )
            if not _targeted(targets, module):  # PEFT would skip these factors, not apply them
                raise UserError(
                    f"{self.where}: {st} adapts {module}, which {cfg_file} target_modules "
                    f"({targets!r}) does not name"
                )
            infos = [self._file.index[p[k]][1] for k in "AB"]
            if not all(ST_DTYPES[i["dtype"]].is_floating_point for i in infos):
                raise UserError(
                    f"{self.where}: {st} factors of {module} are {infos[0]['dtype']} / "
                    f"{infos[1]['dtype']}; LoRA factors are floating point (F32, F16, BF16)"
                )
            a, b = (i["shape"] for i in infos)
            r = a[0]
            # PEFT stores embedding factors transposed, and Conv1D (fan_in_fan_out) weights as [in, out]
            transpose = p["emb"] or conv(module)
            out_in = (a[1], b[0]) if transpose else (b[0], a[1])
            if b[1] != r or tuple(out_in) != self.base.shape(name):
                raise UserError(
                    f"{self.where}: {st} factors of {module} (A {a}, B {b}) do not fit the base's "
                    f"{name} {list(self.base.shape(name))}"
                )
            rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
            if r != rank:  # PEFT builds rank-`rank` layers and cannot load these factors
                raise UserError(
                    f"{self.where}: {st} factors of {module} have rank {r}, but {cfg_file} says "
                    f"{rank} (r, or its rank_pattern entry); the config and the factors disagree"
                )
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.factors[name] = (p["B"], p["A"], s, transpose)
        if not self.factors and not self.own:
            raise UserError(
                f"{self.where}: {st} holds no LoRA factors (lora_A / lora_B) nor saved modules: "
                "it changes nothing"
            )

    def _base_warning(self, named: str | None, base_ref: str | None) -> list[str]:
        """The adapter names its base: say so when that is not the model it is applied to (the
        recipe's base_model, or MODEL of `MODEL+ADAPTER`); a warning, since the same model is often
        spelled as a hub id in one place and a local folder in another."""
        if not named:
            return []
        same = {str(self.base.path.resolve()), self.base.path.name.lower(), base_ref or ""}
        if named in same or Path(named).name.lower() in same:
            return []
        if Path(named).expanduser().exists() and Path(named).resolve() == self.base.path.resolve():
            return []
        return [
            f"{self.where}: {self.path} was trained on {named} (its adapter_config.json's "
            f"base_model_name_or_path) but is applied to {base_ref or self.base.path}"
        ]

    # --- the checkpoint read API ----------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self.base.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self.factors else self.base.dtype(name)

    @property
    def nbytes(self) -> int:
        return (self.path / "adapter_model.safetensors").stat().st_size  # its model is an input

    @property
    def adapter_bytes(self) -> int | None:
        """Bytes the learned loop holds for this expert in memory mode (estimate.py): the float32
        factors and the saved modules' task vectors (in the base's dtype), from headers. None when
        the adapter sits on another model: its τ is then dense everywhere."""
        if not self.on_base:
            return None
        shapes = lambda key: self._file.index[key][1]["shape"]  # noqa: E731
        held = sum(
            4 * math.prod(shapes(kb)) + 4 * math.prod(shapes(ka))
            for kb, ka, *_ in self.factors.values()
        )
        size = lambda n: torch.empty((), dtype=self.base.dtype(n)).element_size()  # noqa: E731
        return held + sum(math.prod(self.base.shape(n)) * size(n) for n in self.own)

    def lowrank(self, name: str) -> LowRank:
        # row chunks of one tensor reuse it; one entry per worker thread, so threads working on
        # different tensors do not evict each other's factors
        cached = getattr(self._local, "cache", None)
        if cached is None or cached[0] != name:
            kb, ka, s, t = self.factors[name]
            b, a = self._file.get(kb).float(), self._file.get(ka).float()
            cached = (
                name,
                LowRank(a.T.contiguous(), b.T.contiguous(), s) if t else LowRank(b, a, s),
            )
            self._local.cache = cached
        return cached[1]

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """θ_t rows: θ0 (or the adapter's own copy of the tensor) + s·B[rows]@A on a target."""
        if name in self.own:
            x = self._file.get(self.own[name], start, stop)
        else:
            x = self.base.get(name, start, stop)
        if name not in self.factors:
            return x
        lr = self.lowrank(name)
        b = lr.B if start is None else lr.B[start:stop]
        return x.float() + (b @ lr.A) * lr.scale

    def tau_is_dense(self, name: str) -> bool | None:
        return None  # low rank, dense or absent: a saved module equal to θ0 is absent

    def tau(self, name: str, base) -> Tensor | LowRank | None:
        """τ_t on one tensor against θ0 (`base` needs only `get`): LowRank on a target, dense on a
        saved module, None elsewhere; dense everywhere when the adapter sits on another model."""
        if not self.on_base:
            d = self.get(name).float()
            d -= base.get(name).to(d.device, torch.float32)  # theta0 may sit on a GPU
            return d if d.any() else None
        lr = self.lowrank(name) if name in self.factors else None
        if name in self.own:  # a saved module, or an embedding's own copy (often θ0 itself)
            d = self._file.get(self.own[name]).float()
            d -= base.get(name).to(d.device, torch.float32)
            if d.any():
                return d + lr.dense() if lr else d
        return lr


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


# --- an adapter expert as a whole model (the teacher that generates DivMerge's targets) -----


def home(expert):
    """The full model an adapter sits on (its config, side files and tokenizer are the ones the
    adapter runs with); anything else is its own home."""
    while isinstance(expert, LoraExpert):
        expert = expert.base
    return expert


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
    from .hashing import hash_json, hash_model_dir

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
    from . import hf

    if not isinstance(expert, LoraExpert):
        return hf.load_model(Path(getattr(expert, "path", expert)), dtype)
    from peft import PeftModel

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
        return open_model(ref, str, where, None)
    path = Path(ref)
    if not is_adapter(path):
        return path
    on = read_adapter_config(path, where).get("base_model_name_or_path")
    if not on or not Path(on).is_dir():
        raise UserError(
            f"{where}: {path} is a LoRA adapter whose base_model_name_or_path ({on!r}) is not a "
            f"local folder; name the model it applies to as BASE+{path}"
        )
    return open_model(f"{on}+{path}", str, where, None)


def load_scored(ref: str | Path, where: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of scored_model(ref): an adapter is folded into its base."""
    from . import hf

    expert = scored_model(ref, where)
    return load_expert_model(expert, dtype), hf.load_tokenizer(model_folder(expert))


def open_model(
    ref: str,
    resolve: Callable[[str], str],
    where: str,
    base: Checkpoint | None,
    allow_pickle: bool = False,
    base_ref: str | None = None,
):
    """A recipe's model: a checkpoint, an adapter folder over `base`, or mergekit's
    `model+adapter` (the model with the adapter folded in)."""
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
        model = base if on_base else open_model(left, resolve, where, None, allow_pickle)
        adapter = open_checkpoint(resolve(right), where, allow_pickle, base=model, base_ref=left)
        adapter.on_base = on_base
        return adapter
    return open_checkpoint(path, where, allow_pickle, base=base, base_ref=base_ref)


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


# --- writing a merged task vector as an adapter --------------------------------------------


def factor(delta: Tensor | LowRank, rank: int | None) -> tuple[Tensor, Tensor, float] | None:
    """(B, A, relative Frobenius error) with B@A ≈ delta: exact for a LowRank when rank is None or
    at least its width, else the best rank-`rank` approximation (Eckart-Young). A LowRank is
    truncated through QR of its factors, so its dense form is never built. None for a zero delta."""
    if isinstance(delta, LowRank):
        b, a = delta.B.float() * delta.scale, delta.A.float()
        if rank is None or rank >= b.shape[1]:
            return (b, a, 0.0) if b.abs().sum() and a.abs().sum() else None
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    else:
        if rank is None:
            raise ValueError("a dense task vector needs a rank")
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    total = float(s.square().sum())
    if total == 0:
        return None
    k = min(rank or len(s), len(s))
    root = s[:k].sqrt()  # split the singular values evenly: both factors stay well scaled
    err = math.sqrt(max(0.0, float(s[k:].square().sum())) / total)
    return u[:, :k] * root, root[:, None] * vh[:k], err


_KINDS: dict[str, dict[str, str] | str] = {}  # config JSON -> kinds, or why they are unknown


def module_kinds(config: dict) -> dict[str, str] | str:
    """module path -> 'linear' | 'embedding' | 'conv1d' | 'other', from the architecture built on
    the meta device (no weights); or, when it cannot be built, a string saying why."""
    import transformers

    key = json.dumps(config, sort_keys=True)
    if key not in _KINDS:
        arch = (config.get("architectures") or [""])[0]
        try:
            cfg = transformers.AutoConfig.for_model(
                config["model_type"], **{k: v for k, v in config.items() if k != "model_type"}
            )
            with torch.device("meta"):
                model = getattr(transformers, arch)(cfg)
            kinds = {torch.nn.Linear: "linear", torch.nn.Embedding: "embedding"}
            _KINDS[key] = {
                n: "conv1d" if type(m).__name__ == "Conv1D" else kinds.get(type(m), "other")
                for n, m in model.named_modules()
            }
        except Exception as e:  # noqa: BLE001 - any failure means we cannot see the layer types
            _KINDS[key] = f"cannot build the architecture {arch or '(none)'} ({type(e).__name__})"
    return _KINDS[key]


def save_adapter(
    out: Path,
    base: Checkpoint,
    delta: Callable[[str], Tensor | LowRank | None],
    rank: int | None,
    inputs: list[Path],
    *,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    base_ref: str | None = None,
    card: str = "",
    files: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    verify: Callable[[], None] | None = None,
) -> dict[str, tuple[int, float]]:
    """Write θ0 + delta(name) (`name`: a stored tensor) as a PEFT LoRA adapter folder at OUT
    (atomically), under the module's names and tensors (a MoE layer's fused experts). nn.Linear
    and nn.Embedding weights become LoRA factors (rank None: exact, needs LowRank deltas); any other
    changed module, or one with a dense delta at exact rank, is saved whole (modules_to_save).
    `verify` runs last, before OUT is in place (MergePlan.check_unchanged).
    Returns {module: (rank, relative Frobenius error)}."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    check_out(out, force, inputs)
    kinds, theta0 = adapter_modules(base)  # module tensor names from here on
    delta = module_delta(theta0, delta)
    modules: dict[str, list[str]] = {}
    for n in theta0.names:
        modules.setdefault(n.rpartition(".")[0], []).append(n)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    whole: list[str] = []
    if progress:
        progress(0, len(modules), "")
    for i, (mod, names) in enumerate(modules.items()):
        ds = {n: delta(n) for n in names if theta0.dtype(n).is_floating_point}
        w = ds.get(f"{mod}.weight")
        others = [d for n, d in ds.items() if n != f"{mod}.weight" and d is not None]
        lora = kinds.get(mod) in ("linear", "embedding") and w is not None and not others
        if lora and (rank is not None or isinstance(w, LowRank)):
            f = factor(w, rank)
            if f is not None:
                b, a, err = f
                ranks[mod] = (b.shape[1], err)
                if kinds[mod] == "embedding":  # PEFT stores embedding factors transposed
                    tensors[f"{PREFIX}{mod}.lora_embedding_A"] = b.T.to(dtype)
                    tensors[f"{PREFIX}{mod}.lora_embedding_B"] = a.T.to(dtype)
                else:
                    tensors[f"{PREFIX}{mod}.lora_A.weight"] = a.to(dtype)
                    tensors[f"{PREFIX}{mod}.lora_B.weight"] = b.to(dtype)
        elif w is not None or others:
            whole.append(mod)
            for n in names:  # the whole module's new values, exact
                d = ds.get(n)
                x = theta0.get(n)
                if d is not None:
                    x = x.float() + (d.dense() if isinstance(d, LowRank) else d)
                tensors[f"{PREFIX}{n}"] = x.to(dtype if x.is_floating_point() else x.dtype)
        if progress:
            progress(i + 1, len(modules), mod)
    if not ranks:
        raise UserError(
            "--as-adapter: the merge changes no linear or embedding weight; nothing to write"
        )
    r = max(k for k, _ in ranks.values())
    other = {m: k for m, (k, _) in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # alpha = r everywhere (per-module patterns below): PEFT's scale is 1
        target_modules=sorted(ranks),
        rank_pattern=other,
        alpha_pattern=dict(other),
        modules_to_save=whole or None,
        base_model_name_or_path=base_ref,
        task_type=_task_type(base.config),
        lora_dropout=0.0,
        inference_mode=True,
    )
    with atomic_folder(out) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp / "adapter_model.safetensors",
            {"format": "pt"},
        )
        config.save_pretrained(tmp)
        (tmp / "README.md").write_text(card + adapter_card(ranks, whole, rank))
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text)
        if verify:
            verify()
    return ranks


def adapter_modules(base: Checkpoint) -> tuple[dict[str, str], ModuleView]:
    """The base's module kinds, and the base read under the module's tensor names: PEFT applies
    an adapter by module path, so one written under stored names it does not find (a MoE's
    per-expert tensors, GPT-NeoX's `embed_out`) would be silently ignored. UserError when the
    architecture cannot be built or the base would not load as it."""
    from .layout import module_view

    kinds = module_kinds(base.config)
    if isinstance(kinds, str):  # only real nn.Linear / nn.Embedding weights become LoRA factors
        raise UserError(f"--as-adapter: {kinds} to find its linear layers; write a full model")
    try:
        return kinds, module_view(base)
    except UserError as e:
        raise UserError(f"--as-adapter: {e}") from None


def _task_type(config: dict) -> str | None:
    """PEFT's task type, so AutoPeftModelFor... picks the right head (None: PeftModel only)."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "SEQ_2_SEQ_LM" if config.get("is_encoder_decoder") else None


# Relative Frobenius error ||Δ - B·A|| / ||Δ|| above which --adapter-rank warns: the module's
# adapter misses half of its merged change or more. Below it a truncated merge tends to behave
# like the full one (DARE drops 90 % of a task vector's entries and keeps its behaviour).
ADAPTER_ERROR_WARN = 0.5


def lossy_modules(ranks: dict[str, tuple[int, float]]) -> list[tuple[str, float]]:
    """(module, relative error) of the modules above ADAPTER_ERROR_WARN, the worst first."""
    lossy = [(m, e) for m, (_, e) in ranks.items() if e > ADAPTER_ERROR_WARN]
    return sorted(lossy, key=lambda x: -x[1])


def adapter_card(ranks: dict[str, tuple[int, float]], whole: list[str], rank: int | None) -> str:
    how = (
        "exact: the low-rank task vectors side by side"
        if rank is None
        else f"truncated by SVD to rank {rank} per module"
    )
    lines = [
        "",
        "## LoRA adapter",
        "",
        f"Load with `PeftModel.from_pretrained(base, path)`. Ranks: {how}.",
        "The error is ||Δ - B·A||_F / ||Δ||_F for the module's merged task vector Δ.",
        "",
        "| module | rank | relative Frobenius error |",
        "|---|---:|---:|",
        *[f"| `{m}` | {k} | {e:.3e} |" for m, (k, e) in ranks.items()],
    ]
    if whole:
        lines += ["", "Saved whole (modules_to_save): " + ", ".join(f"`{m}`" for m in whole)]
    return "\n".join(lines) + "\n"


def require_low_rank(experts: list, base: Checkpoint) -> None:
    """An exact-rank adapter output needs no full checkpoint among the experts (the base itself
    is fine: its τ is zero)."""
    for e in experts:
        if e.path.resolve() == base.path.resolve():
            continue
        if not isinstance(e, LoraExpert):
            raise UserError(
                f"--as-adapter: {e.where} ({e.path}) is a full checkpoint, whose task vector has "
                "no exact low rank; pass --adapter-rank R to truncate it by SVD"
            )


def write_adapter(
    out: Path,
    base: Checkpoint,
    experts: list,
    coefficient: Callable[[str, int], float],
    rank: int | None = None,
    **kw,
) -> dict[str, tuple[int, float]]:
    """θ0 + Σ_t coefficient(name, t)·τ_t as a PEFT LoRA adapter (see save_adapter for **kw). At
    exact rank (None) every expert must be a LoRA adapter on `base`: a full checkpoint's τ has no
    exact low rank."""
    if rank is None:
        require_low_rank(experts, base)

    def delta(name: str) -> Tensor | LowRank | None:
        return combine(
            [(coefficient(name, t), tau_of(e, name, base)) for t, e in enumerate(experts)]
        )

    inputs = [base.path, *(e.path for e in experts)]
    return save_adapter(out, base, delta, rank, kw.pop("inputs", inputs), **kw)


def linear_coefficients(plan) -> Callable[[str, int], float] | None:
    """c_t(name) with merged = θ0 + Σ c_t·τ_t, for the methods linear in the task vectors
    (task_arithmetic; linear when its weights are normalized or sum to 1); None otherwise."""
    from .merge import _params

    m = plan.recipe.merge_method
    if m not in ("linear", "task_arithmetic"):
        return None

    def coefficient(name: str, t: int) -> float:
        p, g = _params(plan, name)
        w = [x["weight"] for x in p]
        total = sum(w) if g["normalize"] and abs(sum(w)) >= 1e-8 else 1.0
        return g.get("lambda", 1.0) * w[t] / total

    if m == "linear":  # Σ w·θ / Σ w keeps θ0 whole only when the weights end up summing to 1
        for n in plan.names:
            p, g = _params(plan, n)
            if not g["normalize"] and abs(sum(x["weight"] for x in p) - 1) > 1e-6:
                return None
    return coefficient


def merge_as_adapter(
    plan,
    out: Path,
    rank: int | None,
    force: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, tuple[int, float]]:
    """`divmerge run --as-adapter`: the recipe's merge as a PEFT LoRA adapter over its base."""
    from .checkpoint import DTYPES
    from .merge import _generator, merge_tensor, model_card
    from .recipe import dump_recipe

    r = plan.recipe
    if plan.method.optimized:
        raise UserError(
            f"--as-adapter: {r.merge_method} cannot write an adapter yet; write a full model"
        )
    if plan.routes:  # an adapter keeps its base's tensors and shapes
        what = "slices restack the layers" if r.slices else "the output vocabulary is rebuilt"
        raise UserError(
            f"--as-adapter: {what}, so the merge is no adapter of the base; write a full model"
        )
    if not r.base_model:
        raise UserError(
            "--as-adapter: the recipe needs a base_model (an adapter is a change to it)"
        )
    base = plan.base or open_model(r.base_model, r.resolve_path, "base_model", None)
    coefficient = linear_coefficients(plan)
    if coefficient is None and rank is None:
        raise UserError(
            f"--as-adapter: {r.merge_method} is not linear in the task vectors here, so its merged "
            "delta has no exact rank; pass --adapter-rank R (SVD of the merged delta)"
        )
    kw = dict(
        force=force,
        dtype=DTYPES[r.out_dtype or r.dtype or "float32"],
        base_ref=r.resolve_path(r.base_model),  # where the adapter's base is, for AutoPeftModel
        card=model_card(plan),
        files={"divmerge_recipe.yaml": dump_recipe(r)},
        progress=progress,
        inputs=[c.path for c in plan.inputs] + [base.path],
        verify=plan.check_unchanged,
    )
    if coefficient is not None:
        return write_adapter(out, base, plan.models, coefficient, rank, **kw)

    def delta(name: str) -> Tensor | None:
        d = (
            merge_tensor(plan, name, _generator(seed, name), device).float()
            - base.get(name).float()
        )
        return d if d.any() else None

    return save_adapter(out, base, delta, rank, kw.pop("inputs"), **kw)
