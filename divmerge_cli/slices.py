"""mergekit's `slices:`: which input tensors, layers and parameters make each output tensor.

A slice lists sources, each a layer range [first, end) of one model, all of one depth; its output
layers are their layers merged one by one, numbered after the previous slices' (a passthrough
slice with one source copies its layers: a "frankenmerge" stacks ranges into a deeper model).
Tensors outside the blocks come from the first slice's sources when they sit before the blocks
(token embeddings), from the last slice's otherwise (final norm, head), as mergekit plans them.

Parameters resolve as in mergekit 0.1.5: per input, the source's own `parameters`, then its
slice's, then the recipe's; shared ones from the slice's, then the recipe's. A list (gradient) is
interpolated over the slice's own layers (layer i of n at i / (n - 1)); tensors outside the blocks
take t = 0. A per-input filter matches the input tensor's name, a shared one the output's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import UserError
from .layers import block_counts, block_of, is_embedding, layer_position
from .methods import Method
from .recipe import Recipe, SliceDef

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # config: block count
_HEAD = re.compile(r"head|embed_out")


@dataclass(frozen=True)
class Input:
    """One model's tensor that goes into an output tensor, and its parameter scopes."""

    ckpt: Checkpoint
    name: str  # its name in that checkpoint (renumbered layers differ from the output's)
    scopes: tuple[dict, ...]  # parameter mappings, highest precedence first


@dataclass(frozen=True)
class Route:
    """Where one output tensor comes from."""

    base: Input | None  # theta0, for the methods that read one
    xs: tuple[Input, ...]  # the merged inputs, in recipe order
    glob_scopes: tuple[dict, ...]  # shared-parameter mappings, highest precedence first
    t: float  # position for gradient (list) parameters
    members: tuple[Checkpoint, ...]  # every model read for it (mergekit's vocabulary rule)
    base_ckpt: Checkpoint | None  # the base model of its slice, read or not

    @property
    def inputs(self) -> tuple[Input, ...]:
        return ((self.base,) if self.base else ()) + self.xs


def tensor_inputs(plan, name: str, base: bool = True) -> list[tuple]:
    """(checkpoint, stored name) of each input of one output tensor (its `slices:` route's, else
    the plan's), the base first when it is read and `base` asks for it."""
    if plan.routes:
        route = plan.routes[name]
        return [(i.ckpt, i.name) for i in (route.inputs if base else route.xs)]
    return [(c, name) for c in (plan.inputs if base else plan.models)]


def whole_routes(
    names: list[str],
    base: Checkpoint | None,
    models: list[Checkpoint],
    entries: list,
    r: Recipe,
    members: tuple[Checkpoint, ...],
    base_ckpt: Checkpoint | None,
) -> dict[str, Route]:
    """The routes of a `models:` merge: each tensor from the same name in every model. `members`
    are the models mergekit reads for it (the listed ones, then the base if it is not listed)."""
    counts = block_counts(names)
    return {
        n: Route(
            Input(base, n, ()) if base else None,
            tuple(Input(c, n, (e.parameters, r.parameters)) for c, e in zip(models, entries)),
            (r.parameters,),
            layer_position(n, counts),
            members,
            base_ckpt,
        )
        for n in names
    }


def slice_routes(
    r: Recipe, method: Method, ckpt_of: Callable[[str], Checkpoint]
) -> tuple[dict[str, Route], list[tuple[Checkpoint, int]]]:
    """The routes of a `slices:` merge, in output order, and each output layer's source (the
    first source of its slice, and the layer there) for the output config. UserError: a layer
    range outside a model, a slice without its base, tensors that do not line up."""
    slices = r.slices
    first = ckpt_of(slices[0].sources[0].model)
    stack = _one_stack(first, r)
    layers = {}  # checkpoint -> {layer: [tensor names]}

    def layer_names(c: Checkpoint, i: int, where: str) -> list[str]:
        if c not in layers:
            layers[c] = _by_layer(c, stack, r)
        if i not in layers[c]:
            raise UserError(
                f"{r.source}: {where}.layer_range: {c.path} has {len(layers[c])} layers "
                f"({stack}.0 to {stack}.{len(layers[c]) - 1}); a range ends at most at "
                f"{len(layers[c])}"
            )
        return layers[c][i]

    outside = [n for n in first.names if block_of(n) is None]
    pre = [n for n in outside if is_embedding(n) and not _HEAD.search(n)]
    routes = {n: _route(r, method, 0, {}, n, 0.0, ckpt_of) for n in pre}
    depth: list[tuple[Checkpoint, int]] = []
    for k, sl in enumerate(slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            at = {
                j: layer_names(ckpt_of(s.model), s.layer_range[0] + i, f"slices[{k}].sources[{j}]")
                for j, s in enumerate(sl.sources)
            }
            src0 = ckpt_of(sl.sources[0].model)
            depth.append((src0, sl.sources[0].layer_range[0] + i))
            for name in at[0]:
                suffix = name.split(".", stack.count(".") + 2)[-1]
                out = f"{stack}.{len(depth) - 1}.{suffix}"
                ins = {
                    j: f"{stack}.{s.layer_range[0] + i}.{suffix}" for j, s in enumerate(sl.sources)
                }
                for j, names in at.items():
                    if ins[j] not in names:
                        raise UserError(
                            f"{r.source}: slices[{k}].sources[{j}]: {sl.sources[j].model} has no "
                            f"tensor {ins[j]} (sources[0] has {name}); the layers of one slice "
                            "must hold the same tensors"
                        )
                routes[out] = _route(r, method, k, ins, out, t, ckpt_of)
    post = [n for n in outside if n not in routes]
    routes |= {n: _route(r, method, len(slices) - 1, {}, n, 0.0, ckpt_of) for n in post}
    return routes, depth


def _one_stack(c: Checkpoint, r: Recipe) -> str:
    counts = block_counts(c.names)
    if len(counts) != 1:
        found = ", ".join(counts) or "none"
        raise UserError(
            f"{r.source}: slices: {c.path} has {len(counts)} stacks of blocks ({found}); slices "
            "cut one stack (a decoder-only model); merge encoder-decoder models under `models:`"
        )
    return next(iter(counts))


def _by_layer(c: Checkpoint, stack: str, r: Recipe) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in c.names:
        b = block_of(n)
        if b and b[0] == stack:
            out.setdefault(b[1], []).append(n)
    if not out:
        raise UserError(f"{r.source}: slices: {c.path} has no tensors under {stack}.<layer>")
    return out


def _route(
    r: Recipe,
    method: Method,
    k: int,
    ins: dict[int, str],
    out: str,
    t: float,
    ckpt_of: Callable[[str], Checkpoint],
) -> Route:
    """Output tensor `out` from slice k's sources (their tensor names `ins`, default `out`)."""
    sl: SliceDef = r.slices[k]
    base_ref = sl.base_model or r.base_model
    base_ckpt = ckpt_of(base_ref) if base_ref else None
    reads_base = method.uses_base and not method.base_as_input and base_ckpt is not None
    base, xs = None, []
    for j, s in enumerate(sl.sources):
        c = ckpt_of(s.model)
        same = [o.parameters for o in sl.sources if ckpt_of(o.model) is c]
        inp = Input(c, ins.get(j, out), (*same, sl.parameters, r.parameters))
        if reads_base and c is base_ckpt:
            base = inp
        else:
            xs.append(inp)
    if reads_base and base is None:
        raise UserError(
            f"{r.source}: slices[{k}].sources: {r.merge_method} reads the base model "
            f"{base_ref} as theta0, so each slice lists it among its sources with the layer "
            "range to take (as mergekit requires)"
        )
    if not xs:
        raise UserError(
            f"{r.source}: slices[{k}].sources: only the base model; {r.merge_method} needs a "
            "model besides it"
        )
    members = tuple(ckpt_of(s.model) for s in sl.sources)
    return Route(base, tuple(xs), (sl.parameters, r.parameters), t, members, base_ckpt)


def check_routes(routes: dict[str, Route], vocab: set[str]) -> None:
    """Every input of a tensor has its shape (a vocabulary tensor: all but its first axis)."""
    for out, route in routes.items():
        ref = route.inputs[0]
        want = ref.ckpt.shape(ref.name)
        for inp in route.inputs:
            if inp.name not in inp.ckpt.index:
                raise UserError(
                    f"{inp.ckpt.where}: {inp.ckpt.path} lacks tensor {inp.name} that "
                    f"{ref.ckpt.where} has; tensor names must match"
                )
            got = inp.ckpt.shape(inp.name)
            if (got[1:], len(got)) != (want[1:], len(want)) or (out not in vocab and got != want):
                raise UserError(
                    f"{inp.ckpt.where}: tensor {inp.name} has shape {list(got)} but "
                    f"{ref.ckpt.where}'s {ref.name} has {list(want)}"
                )


def out_config(config: dict, depth: list[tuple[Checkpoint, int]], stack_len: int) -> dict:
    """The output config of a sliced merge: its block count, and each per-layer list (as
    `layer_types`) rebuilt from the layers the output's come from. UserError: no key holds the
    block count."""
    out = dict(config)
    keys = [k for k in LAYER_KEYS if out.get(k) == stack_len]
    if not keys:
        raise UserError(
            f"config.json has no layer count ({', '.join(LAYER_KEYS)}) equal to the model's "
            f"{stack_len} blocks, so the output's depth cannot be written"
        )
    for k in keys:
        out[k] = len(depth)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == stack_len and key not in ("architectures",):
            rows = [c.config.get(key) for c, _ in depth]
            if all(isinstance(v, list) and len(v) > i for v, (_, i) in zip(rows, depth)):
                out[key] = [v[i] for v, (_, i) in zip(rows, depth)]
    return out
