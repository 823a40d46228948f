"""The two views of one model: the checkpoint's stored tensors and the module's (design.md,
"Checkpoints, modules and architectures").

transformers 5 converts a checkpoint while loading it: keys are renamed (GPT-NeoX's `embed_out`
becomes `lm_head`, Mixtral's `block_sparse_moe` becomes `mlp`), per-expert tensors are stacked and
concatenated into fused parameters (`mlp.experts.gate_up_proj`), stored buffers the module does
not keep are dropped, and a tied head reads the embedding. The learned merge needs the module's
tensors; data-free methods, the writer and the exported recipes keep the stored ones. The map
between the two is asked of transformers' own loading conversion (`get_model_conversion_mapping`,
`rename_source_key`, the `WeightConverter` operations), never written here per architecture, so an
architecture transformers loads is bridged unchanged. Those operations stack, concatenate,
transpose, chunk or permute: they are linear, so a task vector converts like a weight,
convert(theta_t) - convert(theta0) = convert(tau_t).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .taskvectors import LowRank, dense_tau


@dataclass(frozen=True)
class Unit:
    """Stored tensors that become module tensors together: one tensor kept or renamed, or a
    converter's group (one layer's per-expert tensors -> one fused parameter). A `copy` is a
    second stored copy of a module tensor another unit provides (a tied head stored beside the
    embedding): it is written with that tensor's coefficients, never read for the module."""

    stored: tuple[str, ...]
    params: tuple[str, ...]  # module tensors, tied ones under the name the module owns
    targets: tuple[str, ...]  # the same tensors under the names the loader gives them
    converter: Any = None  # a transformers WeightConverter; None: the tensor is at most renamed
    patterns: tuple[str | None, ...] = ()  # the converter's source pattern of each stored tensor
    copy: bool = False

    @property
    def name(self) -> str:
        return self.params[0]


@dataclass
class Layout:
    """Every stored tensor's unit, the stored tensors no module tensor comes from (`unused`:
    buffers the module does not keep, leftovers), and the meta-device module (converters read
    its config and shapes)."""

    units: list[Unit]
    unused: list[str]
    model: nn.Module
    of_param: dict[str, Unit] = field(default_factory=dict)
    of_stored: dict[str, Unit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for u in self.units:
            if not u.copy:
                self.of_param.update(dict.fromkeys(u.params, u))
            self.of_stored.update(dict.fromkeys(u.stored, u))

    def convert(self, unit: Unit, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The unit's module tensors from its stored ones (`tensors`: stored name -> tensor), by
        transformers' own converter, as from_pretrained does it."""
        if unit.converter is None:
            return {unit.params[0]: tensors[unit.stored[0]]}
        got = _convert(unit.converter, unit.targets[0], unit, tensors, self.model)
        return {p: got[t] for p, t in zip(unit.params, unit.targets)}


def _convert(converter, key: str, unit: Unit, tensors: Mapping[str, Tensor], model) -> dict:
    """Run a WeightConverter on one group of stored tensors: {loader's target name: tensor}."""
    conv = copy.deepcopy(converter)  # the loader gives each group its own instance
    for s, pattern in zip(unit.stored, unit.patterns):
        conv.add_tensor(key, s, pattern, tensors[s])
    out = conv.convert(key, model=model, config=model.config)
    return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


def build(model: nn.Module, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> Layout:
    """The layout of a checkpoint whose tensors are `specs` (name -> (shape, dtype), from its
    headers) loaded into `model` (built on the meta device): what from_pretrained does with each
    stored tensor, found without reading one. Raises UserError where it would not load: a group
    its converter refuses, a tensor whose shape differs from the module's, a module parameter no
    stored tensor becomes (transformers would initialize it at random)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    arch = type(model).__name__
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    groups: dict[str, list[tuple[str, str | None]]] = {}
    unused = []
    for key in sorted(specs, key=dot_natural_key):  # the loader's order: experts 0, 1, ..., 10
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:  # as the loader: keep the name, fix the prefix
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        if renamed in meta:
            groups.setdefault(renamed, []).append((key, pattern))
        else:
            unused.append(key)
    units = []
    for key, members in groups.items():
        stored = tuple(s for s, _ in members)
        patterns = tuple(p for _, p in members)
        if patterns[0] is None:  # a rename (or the name kept); a second copy is written alike
            units += [Unit((s,), (key,), (key,), copy=i > 0) for i, s in enumerate(stored)]
            continue
        unit = Unit(stored, (), (), by_pattern[patterns[0]], patterns)
        fake = {s: torch.empty(specs[s][0], dtype=specs[s][1], device="meta") for s in stored}
        try:
            out = _convert(unit.converter, key, unit, fake, model)
        except Exception as e:  # noqa: BLE001 - whatever the converter raised, it will not load
            raise UserError(
                f"tensors {stored[0]} and {len(stored) - 1} more do not convert to {key} of the "
                f"{arch} they load as ({type(e).__name__}: {_first_line(e)})"
            ) from None
        for t, v in out.items():
            if t not in meta or tuple(v.shape) != tuple(meta[t].shape):
                want = list(meta[t].shape) if t in meta else "no such tensor"
                raise UserError(
                    f"tensors {stored[0]} and {len(stored) - 1} more convert to {t} of shape "
                    f"{list(v.shape)}, but the {arch} they load as expects {want}"
                )
        targets = tuple(out)
        units.append(Unit(stored, targets, targets, unit.converter, patterns))
    order = {n: i for i, n in enumerate(specs)}  # the checkpoint's own order, as plan.names
    units.sort(key=lambda u: order[u.stored[0]])
    layout = _tie(model, units, [n for n in specs if n in set(unused)])
    _check(layout, specs, meta, arch)
    return layout


def _first_line(e: Exception) -> str:
    """The exception's first sentence, short enough for a one-line error."""
    line = (str(e).splitlines() or [""])[0]
    return line.split(". ")[0][:200]


def _tie(model: nn.Module, units: list[Unit], unused: list[str]) -> Layout:
    """Name tied module tensors by the parameter the module owns (the embedding, not the head
    that reads it), whichever copy is stored: a head stored beside its embedding becomes a copy
    of the embedding's unit; a head stored alone provides the embedding (as from_pretrained ties
    it then), so its Gamma group is `embeddings` either way."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    provided = {p for u in units for p in u.targets}
    out = []
    for u in units:
        params = tuple(tied.get(p, p) for p in u.targets)
        if params != u.targets and u.converter is None:
            u = Unit(u.stored, params, u.targets, copy=params[0] in provided)
        out.append(u)
    return Layout(out, unused, model)


def _check(layout: Layout, specs, meta: Mapping[str, Tensor], arch: str) -> None:
    for u in layout.units:
        if u.converter is None:
            want, got = tuple(meta[u.targets[0]].shape), tuple(specs[u.stored[0]][0])
            if want != got:
                raise UserError(
                    f"tensor {u.stored[0]} has shape {list(got)} but the {arch} it loads as "
                    f"expects {list(want)} for {u.targets[0]}"
                )
    tied = dict(getattr(layout.model, "all_tied_weights_keys", None) or {})
    have = set(layout.of_param)
    have |= {t for t, s in tied.items() if s in have} | {s for t, s in tied.items() if t in have}
    missing = [n for n, _ in layout.model.named_parameters() if n not in have]
    if missing:
        raise UserError(
            f"the {arch} this checkpoint loads as has a parameter {missing[0]} that no stored "
            "tensor becomes (transformers would initialize it at random)"
        )


class ModuleView:
    """A checkpoint, an adapter or processed task vectors read under the module's tensor names:
    the read API taskvectors.py takes (`get`, `dtype`, `tau`, `tau_is_dense`). A renamed tensor
    is read as stored; a converter's group is read whole and converted (its tau from the stored
    tau, against `theta0`: the base's stored tensors, shared by every expert's view)."""

    def __init__(self, source, layout: Layout, theta0: StoredTheta0 | None = None):
        self.source, self.layout, self.theta0 = source, layout, theta0
        self.path, self.where = getattr(source, "path", None), getattr(source, "where", "")

    @property
    def names(self) -> list[str]:
        return list(self.layout.of_param)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        u = self.layout.of_param[name]
        if u.converter is None:
            return self.source.get(u.stored[0], start, stop)
        t = self.layout.convert(u, {s: self.source.get(s) for s in u.stored})[name]
        return t if start is None else t[max(0, start) : stop]

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.layout.of_param[name].stored[0])

    def tau_is_dense(self, name: str) -> bool | None:
        kinds = {self.source.tau_is_dense(s) for s in self.layout.of_param[name].stored}
        return kinds.pop() if len(kinds) == 1 else None

    def tau(self, name: str, base):
        """tau on one module tensor: the source's own form (dense, LowRank, None) where the tensor
        is only renamed; a converted group is converted densely (a LowRank factor does not
        stack into a fused tensor)."""
        u = self.layout.of_param[name]
        if u.converter is None:
            return self.source.tau(u.stored[0], _Renamed(base, u.stored[0], name))
        theta0 = self.theta0.of(u)
        parts = {s: dense_tau(self.source, s, theta0) for s in u.stored}
        if all(p is None for p in parts.values()):
            return None
        parts = {s: torch.zeros(theta0.shape(s)) if p is None else p for s, p in parts.items()}
        return self.layout.convert(u, parts)[name]


class _Renamed:
    """theta0 under one stored name, read from the module tensor it becomes."""

    def __init__(self, base, stored: str, param: str):
        self.base, self.stored, self.param = base, stored, param

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        return self.base.get(self.param if name == self.stored else name, start, stop)


class StoredTheta0:
    """The base's stored tensors of one converter group, read once for the n experts that need
    them in a row (their task vectors are taken in stored space, then converted)."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._held: tuple[Unit, _Held] | None = None

    def of(self, unit: Unit) -> _Held:
        if self._held is None or self._held[0] is not unit:
            self._held = (unit, _Held({s: self.ckpt.get(s) for s in unit.stored}))
        return self._held[1]


class _Held:
    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        t = self.tensors[name]
        return t if start is None else t[max(0, start) : stop]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)


def skeleton(path, where: str) -> nn.Module:
    """The model `path` loads as, on the meta device; UserError when transformers cannot build
    it (the learned merge needs the module)."""
    import transformers

    try:
        from . import hf  # lazy: transformers' models take seconds to import

        return hf.skeleton(path)
    except Exception as e:  # noqa: BLE001 - an unknown model_type, remote code, a bad config
        raise UserError(
            f"{where}: transformers {transformers.__version__} cannot build the model of {path} "
            f"({type(e).__name__}: {_first_line(e)}); a learned merge needs it (divmerge and "
            "adamerging run the model), a data-free method does not"
        ) from None


def plan_layout(base, experts: list) -> tuple[Layout, list[str]]:
    """The base checkpoint's layout for a learned merge, checked from headers and the config as
    `run` would meet it, and the warnings to print (tensors the module does not hold)."""
    model = skeleton(base.path, base.where)
    specs = {n: (base.shape(n), base.dtype(n)) for n in base.names}
    try:
        layout = build(model, specs)
    except UserError as e:
        raise UserError(f"{base.where}: {base.path}: {e}") from None
    return layout, _unused_warning(layout, base)


def module_view(ckpt) -> ModuleView:
    """`ckpt` under the module's tensor names, as PEFT names an adapter's tensors (GPT-NeoX's
    `embed_out` as `lm_head`, a MoE layer's experts as the fused `mlp.experts.gate_up_proj`);
    UserError when transformers would not load it (an adapter over it would not apply)."""
    model = skeleton(ckpt.path, ckpt.where)
    try:
        layout = build(model, {n: (ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.names})
    except UserError as e:
        raise UserError(f"{ckpt.where}: {ckpt.path}: {e}") from None
    return ModuleView(ckpt, layout)


def module_delta(view: ModuleView, delta: Callable) -> Callable:
    """A change to the module's tensors from `delta`, a change to the stored ones: a renamed
    tensor's as it is; a converter group's stored changes (densified, zero where None) converted
    together, since the conversion is linear. A stored copy of a tied tensor is not read (its
    owner carries the change once)."""
    held: dict = {}

    def of(name: str):
        u = view.layout.of_param[name]
        if u.converter is None:
            return delta(u.stored[0])
        if held.get("unit") is not u:  # a group's tensors are asked for in a row
            parts = {s: delta(s) for s in u.stored}
            got = None
            if any(p is not None for p in parts.values()):
                dense = {
                    s: torch.zeros(view.source.shape(s))
                    if p is None
                    else (p.dense() if isinstance(p, LowRank) else p.float())
                    for s, p in parts.items()
                }
                got = view.layout.convert(u, dense)
            held.update(unit=u, got=got)
        return None if held["got"] is None else held["got"][name]

    return of


def module_names(layout: Layout | None, ckpt=None) -> dict[str, tuple[str, ...]]:
    """stored name -> the module tensor names it becomes, where they differ (Mixtral's
    `block_sparse_moe.experts.0.w1.weight` -> `mlp.experts.gate_up_proj`): a recipe's `filter:`
    matches either, so filters written against the module (as mergekit under transformers 5
    names tensors) reach the stored tensors. Without a layout, `ckpt`'s (data-free merges: {}
    when transformers cannot load it as it is)."""
    layout = layout or (_unchecked(ckpt) if ckpt is not None else None)
    if layout is None:
        return {}
    return {s: u.targets for u in layout.units for s in u.stored if u.targets != (s,)}


def stored_names(ckpt) -> dict[str, str]:
    """module tensor name -> the stored name it is loaded from, for tensors transformers only
    renames (GPT-NeoX's `lm_head.weight` is stored as `embed_out.weight`): PEFT adapters name
    the module's. {} when transformers cannot load the checkpoint as it is."""
    layout = _unchecked(ckpt)
    units = layout.units if layout else []
    return {
        u.targets[0]: u.stored[0] for u in units if not u.converter and u.targets[0] != u.stored[0]
    }


def conv1d_weights(ckpt) -> frozenset[str]:
    """Stored names of ckpt's Conv1D weights (GPT-2's layers), kept [in, out]: the transpose of
    nn.Linear's [out, in]. Empty when transformers cannot build its architecture."""
    layout = _unchecked(ckpt)
    if layout is None:
        return frozenset()
    kinds = {n: type(m).__name__ for n, m in layout.model.named_modules()}
    return frozenset(
        u.stored[0]
        for u in layout.units
        if not u.converter
        and u.params[0].endswith(".weight")
        and kinds.get(u.params[0].rpartition(".")[0]) == "Conv1D"
    )


_LAYOUTS: dict[tuple, Layout | None] = {}


def _unchecked(ckpt) -> Layout | None:
    """`ckpt`'s layout, or None when its architecture cannot be built or would not load (data-
    free merges and adapters need no module); built once per checkpoint."""
    key = (str(ckpt.path), tuple(ckpt.names))
    if key not in _LAYOUTS:
        try:
            specs = {n: (ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.names}
            from . import hf  # lazy: transformers' models take seconds to import

            _LAYOUTS[key] = build(hf.skeleton(ckpt.path), specs)
        except Exception:  # noqa: BLE001 - no module: stored names only
            _LAYOUTS[key] = None
    return _LAYOUTS[key]


def _unused_warning(layout: Layout, base) -> list[str]:
    """One line naming the stored tensors the module does not hold (layer numbers folded)."""
    if not layout.unused:
        return []
    import re

    kinds: dict[str, int] = {}
    for n in layout.unused:
        key = re.sub(r"\.\d+\.", ".*.", n)
        kinds[key] = kinds.get(key, 0) + 1
    named = ", ".join(f"{k} ({c})" if c > 1 else k for k, c in kinds.items())
    return [
        f"{base.where}: {len(layout.unused)} stored tensors are not tensors of the "
        f"{type(layout.model).__name__} it loads as ({named}): no coefficient is learned for "
        "them; a learned merge merges them by task arithmetic at each task's mean Gamma "
        "(integer ones are copied from the base)"
    ]
