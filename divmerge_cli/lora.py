"""PEFT LoRA adapters read as task vectors (the adapter reader, beside the checkpoint reader).

An adapter trained on θ0 is the expert θ_t = θ0 + s·B·A on each target weight (s = lora_alpha/r,
lora_alpha/√r with rsLoRA) plus whole tensors for `modules_to_save`. `LoraExpert` reads one like a
checkpoint (data-free methods see θ_t rows, formed one tensor at a time) and gives its task vector
in native form through `tau` (LowRank factors, never densified). Writing a merge as an adapter is
adapter_writer.py; opening any model (folder, adapter, `BASE+ADAPTER`) is models.open_model.
"""

from __future__ import annotations

import json
import math
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import ST_DTYPES, Checkpoint, read_header
from .errors import UserError
from .layout import Layout, stored_names
from .taskvectors import LowRank, low_rank_users

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

    def tau_rank(self, name: str) -> int | None:
        """A bound on τ_t's rank on one tensor, from headers (validate's estimate): the adapter's
        rank on a target, 0 where it changes nothing, None where τ_t may be dense (a saved
        module, or an adapter on another model)."""
        if not self.on_base or name in self.own:
            return None
        if name in self.factors:
            return self._file.index[self.factors[name][1]][1]["shape"][0]
        return 0

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


def home(expert):
    """The full model an adapter sits on (its config, side files and tokenizer are the ones the
    adapter runs with); anything else is its own home."""
    while isinstance(expert, LoraExpert):
        expert = expert.base
    return expert


_KINDS: dict[str, dict[str, str] | str] = {}  # config JSON -> kinds, or why they are unknown


def module_kinds(config: dict) -> dict[str, str] | str:
    """module path -> 'linear' | 'embedding' | 'conv1d' | 'other', from the architecture built on
    the meta device (no weights); or, when it cannot be built, a string saying why."""
    import transformers  # lazy for start-up time: merges without adapters never build a module

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


def check_low_rank(layout: Layout, experts: list) -> None:
    """A LoRA factor is learned through the nn.Linear or nn.Embedding that owns the module
    tensor (taskvectors.MergedModel); say so at plan time, before any teacher runs, when it cannot be."""
    params = dict(layout.model.named_parameters(remove_duplicate=False))  # a tied head too
    for e in experts:
        if not isinstance(e, LoraExpert) or not e.on_base:
            continue
        for name in e.factors:
            u = layout.of_stored.get(name)
            if u is None or u.converter is not None or u.copy:
                continue  # converted tensors are densified; copies are not read
            try:
                low_rank_users(layout.model, params.get(u.name), u.name)
            except UserError as err:
                raise UserError(f"{e.where}: {err}") from None
