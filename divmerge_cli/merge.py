"""The merge pipeline: check everything from headers, then stream tensors through a method."""

from __future__ import annotations

import collections
import json
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .checkpoint import (
    DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    ShardWriter,
    atomic_folder,
    check_out,
    check_space,
    copy_side_files,
    not_finite_input,
    side_files,
    specs_nbytes,
)
from .errors import UserError, resolve
from .hashing import cached_model_hash, file_stamps, hash_file
from .layers import (
    block_counts,
    is_embedding,
    layer_position,
)
from .layout import conv1d_weights, module_names, plan_layout
from .lora import LoraExpert, check_low_rank, home
from .methods import METHODS, Method, Stages, run_stages
from .models import open_model
from .recipe import FilterValue, ModelEntry, ParamValue, Recipe, dump_recipe, recipe_data
from .slices import check_routes, slice_routes, tensor_inputs, whole_routes
from .slices import out_config as sliced_config
from .tasks import TaskSpec, load_tasks
from .taskvectors import LowRank
from .vocab import (
    build_vocabulary,
    chat_template,
    fills,
    is_vocab_tensor,
    load_tokenizer,
    readers,
    save_tokenizer,
    tokenizer_folder,
)

CHUNK_ELEMENTS = 1 << 17  # row chunks of ~128K elements: the per-chunk work stays in cache
WINDOW_PER_THREAD = 2  # tensors in flight per worker thread: enough to fill stage barriers
SIDE_FILES = ("generation_config.json",)  # copied from the checkpoint OUT's config comes from


def resolve_value(value: ParamValue, name: str | tuple[str, ...], t: float) -> float | None:
    """A scalar; a list interpolated across layers at t; or [{filter, value}], first entry whose
    filter is a substring of the tensor name (or has no filter) wins. None when no filter matches:
    the caller falls through to the global parameters, then the method's default (as mergekit).
    `name` may be several names of one tensor (stored and module): a filter matches any."""
    names = (name,) if isinstance(name, str) else name
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for fv in value:
            if fv.filter in (None, "*") or any(fv.filter in n for n in names):
                return resolve_value(fv.value, name, t)
        return None
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        x = t * (len(value) - 1)
        i = min(int(x), len(value) - 2)
        frac = x - i
        return float(value[i] * (1 - frac) + value[i + 1] * frac)
    return float(value)


def _first(
    name: str | tuple[str, ...], t: float, default: float, *values: ParamValue | None
) -> float:
    for v in values:
        if v is not None and (r := resolve_value(v, name, t)) is not None:
            return r
    return default


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    base: Checkpoint | None
    models: list[Checkpoint]  # the models passed as xs (base excluded for task-vector methods)
    entries: list  # their ModelEntry, same order
    names: list[str]
    out_specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    counts: dict[str, int]
    tokenizer: Path  # the folder whose tokenizer files the output gets
    # every checkpoint the recipe names, by its place in the recipe ("base_model", "models[0]")
    sources: dict[str, Checkpoint] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # content hashes checked or computed
    warnings: list[str] = field(default_factory=list)  # for the CLI to print (adapters' bases)
    layout: object | None = None  # learned merges: stored tensors <-> module (layout.Layout)
    # stored name -> its module names where they differ (MoE experts fused on load): filters
    # match either (layout.module_names)
    module_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stamps: dict = field(default_factory=dict)  # hashing.file_stamps of every input, at planning

    def check_unchanged(self) -> None:
        """Refuse to finish a merge whose input files changed since planning: OUT would mix old
        and new tensors, and its recipe would pin the new files' hash. Called before OUT is
        renamed into place, so nothing is written."""
        now = file_stamps(self.input_folders)
        was = self.stamps
        changed = sorted(set(now) ^ set(was) | {p for p in now if now[p] != was.get(p)})
        if changed:
            raise UserError(
                f"{changed[0]}: changed while the merge was reading its inputs (replaced, "
                "rewritten, added or removed); nothing was written: rerun once the inputs stay put"
            )

    @property
    def input_folders(self) -> set[Path]:
        return {c.path for c in self.inputs} | {self.tokenizer}

    # `slices:` or a rebuilt vocabulary: where each output tensor comes from (slices.Route)
    routes: dict | None = None
    vocab: object | None = None  # vocab.Vocabulary when the recipe sets the output's tokenizer
    vocab_names: set[str] = field(default_factory=set)  # output tensors indexed by token
    out_config: dict | None = None  # the output's config.json when it is not the reference's
    # output tensors an oriented method (Method.oriented) gets transposed: Conv1D weights
    in_out: set[str] = field(default_factory=set)

    @property
    def inputs(self) -> list[Checkpoint]:
        xs = ([self.base] if self.base else []) + self.models
        # model+adapter reads that model too (an adapter on the base reads the base, listed)
        return xs + [c.base for c in xs if isinstance(c, LoraExpert) and not c.on_base]


def plan_merge(recipe: Recipe, allow_pickle: bool = False) -> MergePlan:
    """Open every checkpoint (headers only) and check they can be merged. Raises UserError."""
    method = METHODS[recipe.merge_method]
    base_ref = recipe.resolve_path(recipe.base_model) if recipe.base_model else None
    base = (
        open_model(
            recipe.base_model, "base_model", resolve=recipe.resolve_path, allow_pickle=allow_pickle
        )
        if base_ref
        else None
    )
    models, entries, base_listed = [], [], False
    seen: dict[str, int] = {}
    sources = {"base_model": base} if base else {}
    for i, m in enumerate(recipe.models):
        ref = recipe.resolve_path(m.model)
        where = f"models[{i}].model"
        key = str(resolve(ref, where)) if Path(ref).exists() else ref
        if key in seen:
            raise UserError(
                f"{recipe.source}: models[{i}].model: {m.model} is listed twice (also "
                f"models[{seen[key]}]); list each model once"
                + ("" if method.optimized else " and give it the weight of both")
            )
        seen[key] = i
        is_base = bool(base) and resolve(ref, where) == base.path.resolve()
        if is_base and method.optimized:
            raise UserError(
                f"{recipe.source}: models[{i}].model: {m.model} is the base_model; "
                f"{recipe.merge_method} learns coefficients of the experts' task vectors and "
                "the base's is zero: list only the experts"
            )
        base_listed |= is_base
        ckpt = (
            base
            if is_base
            else open_model(
                m.model,
                where,
                base,
                resolve=recipe.resolve_path,
                allow_pickle=allow_pickle,
                base_ref=recipe.base_model,
            )
        )
        sources[f"models[{i}]"] = ckpt
        if is_base and not method.base_as_input and not recipe.slices:
            continue  # the base's task vector is zero: listing it changes nothing but the divisor
        models.append(ckpt)
        entries.append(m)
    if base and method.base_as_input and not base_listed and not recipe.slices:
        models.append(base)  # mergekit averages a base_model in, with the global weight
        entries.append(ModelEntry(model=recipe.base_model))
    if not models:
        raise UserError(f"{recipe.source}: models: no model besides the base to merge")
    ref = base or models[0]
    routed = recipe.slices or recipe.tokenizer or recipe.tokenizer_source
    if not routed:
        check_compatible(ref, [c for c in ([base] if base else []) + models if c is not ref])
    names = ref.names
    plan = MergePlan(
        recipe,
        method,
        base if method.uses_base and not recipe.slices else None,
        models,
        entries,
        names,
        {},
        block_counts(names),
        tokenizer_dir(recipe, home((base if method.uses_base else None) or models[0])),
        sources,
    )
    if routed:
        _route(plan, base)
    out_dtype = recipe.out_dtype or recipe.dtype
    for n in plan.names:
        d, shape = _spec(plan, ref, n)
        plan.out_specs[n] = (shape, DTYPES[out_dtype] if out_dtype and d.is_floating_point else d)
    if method.oriented:
        plan.in_out = _in_out(plan)
    plan.stamps = file_stamps(plan.input_folders)
    _check_hashes(plan)
    if method.optimized:  # the module the learned merge runs, checked before any teacher works
        plan.layout, unused = plan_layout(plan.base, plan.models)
        check_low_rank(plan.layout, plan.models)
        plan.warnings += unused
    if _has_filters(recipe):
        plan.module_names = module_names(plan.layout, ref)
    # every parameter resolves, before heavy work (a learned merge's: its base_method's)
    bm = METHODS.get(str(recipe.parameters.get("base_method"))) if method.optimized else method
    checked = replace(plan, method=bm) if bm else None
    for n in plan.names if checked else ():
        _check_values(checked, n)
    adapters = [c for c in plan.inputs if isinstance(c, LoraExpert)]
    plan.warnings = [w for c in adapters for w in c.warnings] + plan.warnings
    if "tsv" in (recipe.merge_method, recipe.parameters.get("base_method")):
        plan.warnings += _shared_lora_a(plan)
    return plan


def _shared_lora_a(plan: MergePlan) -> list[str]:
    """Adapters trained with one frozen lora_A share their input side exactly: TSV-M's stack of
    singular vectors is then rank-deficient and its orthogonalisation undefined (LAPACK picks the
    missing directions, outside the updates), as in the paper's code; say so once."""
    adapters = [(k, c) for k, c in plan.sources.items() if isinstance(c, LoraExpert)]
    a_of = [{n: c.lowrank(n).A for n in c.factors} for _, c in adapters]  # each read once
    for i, (ka, _) in enumerate(adapters):
        for j in range(i + 1, len(adapters)):
            kb, a, b = adapters[j][0], a_of[i], a_of[j]
            both = sorted(a.keys() & b.keys())
            same = [n for n in both if torch.equal(a[n], b[n])]
            if same:
                return [
                    f"{ka} and {kb} share lora_A on {len(same)} of the {len(both)} matrices both "
                    f"adapt (e.g. {same[0]}): TSV-M's orthogonalisation is undefined there and "
                    "may leave the updates' span; Iso-C, Iso-CTS or TIES do not depend on it"
                ]
    return []


def _in_out(plan: MergePlan) -> set[str]:
    """The output tensors whose inputs are Conv1D weights, stored [in, out] (layout.conv1d_weights
    of the model an input is or sits on; every input of a tensor has one architecture)."""
    conv: dict[Path, frozenset[str]] = {}
    out = set()
    for name in plan.names:
        if name in plan.vocab_names:
            continue  # embeddings and heads: never Conv1D
        x, stored = tensor_inputs(plan, name)[0]
        ckpt = home(x)
        if ckpt.path not in conv:
            conv[ckpt.path] = conv1d_weights(ckpt)
        if stored in conv[ckpt.path]:
            out.add(name)
    return out


def _has_filters(recipe: Recipe) -> bool:
    values = [*recipe.parameters.values()]
    values += [v for m in recipe.models for v in (m.parameters or {}).values()]
    return any(isinstance(v, list) and v and isinstance(v[0], FilterValue) for v in values)


def _check_hashes(plan: MergePlan) -> None:
    """The sha256 a recipe pins a model with (divmerge_recipe.yaml does) matches its files."""
    r = plan.recipe
    pinned = [("base_model", r.base_model_sha256, "base_model_sha256")]
    pinned += [(f"models[{i}]", m.sha256, f"models[{i}].sha256") for i, m in enumerate(r.models)]
    for k, sl in enumerate(r.slices or ()):
        pinned += [
            (source_key(plan, s.model), s.sha256, f"slices[{k}].sources[{j}].sha256")
            for j, s in enumerate(sl.sources)
        ]
    for key, want, field_ in pinned:
        if want and (got := input_hash(plan, key)) != want:
            raise UserError(
                f"{r.source}: {field_}: {plan.sources[key].path} hashes to {got[:16]}..., the "
                f"recipe expects {want[:16]}... (the model changed since the recipe was "
                "written; remove the hash to merge it as it is)"
            )


def source_key(plan: MergePlan, ref: str) -> str:
    """The key in plan.sources of the checkpoint a recipe's model reference opens."""
    want = _key(Path(plan.recipe.resolve_path(ref)))
    return next(k for k, c in plan.sources.items() if _key(c.path) in (want, ref))


def input_hash(plan: MergePlan, key: str) -> str:
    """hash_model_dir of the checkpoint at `key` ("base_model", "models[0]"), computed once."""
    if key not in plan.hashes:
        path = plan.sources[key].path  # a folder listed twice (slerp's base) is hashed once
        done = [h for k, h in list(plan.hashes.items()) if plan.sources[k].path == path]
        plan.hashes[key] = done[0] if done else cached_model_hash(path)
    return plan.hashes[key]


def tokenizer_dir(recipe: Recipe, ref: Checkpoint) -> Path:
    """The folder `tokenizer_source` names (default: the checkpoint the output's config comes
    from), checked here so that a run cannot fail on it after the merge."""
    src = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    own = src in (None, "base", "union")
    folder = ref.path if own else Path(recipe.resolve_path(src))
    where = f"{recipe.source}: {ref.where if own else 'tokenizer_source'}"
    side_files(ref.path, SIDE_FILES, f"{recipe.source}: {ref.where}")  # copied into OUT too
    if not side_files(folder, TOKENIZER_FILES, where):
        raise UserError(
            f"{where}: {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
            "...); set tokenizer_source to a model folder that has them"
        )
    return folder


def check_compatible(ref: Checkpoint, others: list[Checkpoint]) -> None:
    """Same architecture, tensor names and shapes as the reference checkpoint."""
    mt = ref.config.get("model_type")
    for c in others:
        if c.config.get("model_type") != mt:
            raise UserError(
                f"{c.where}: model_type is {c.config.get('model_type')!r} but {ref.where} is {mt!r}; "
                "only checkpoints of one architecture can be merged"
            )
        missing = [n for n in ref.names if n not in c.index]
        extra = [n for n in c.names if n not in ref.index]
        if missing or extra:
            what = f"lacks tensor {missing[0]}" if missing else f"has an extra tensor {extra[0]}"
            raise UserError(
                f"{c.where}: {c.path} {what} that {ref.where} does not; tensor names must match"
            )
        for n in ref.names:
            a, b = ref.shape(n), c.shape(n)
            if a != b:
                hint = ""
                if is_embedding(n) or "lm_head" in n:
                    hint = " (vocabulary sizes differ: resize both to one tokenizer before merging)"
                raise UserError(
                    f"{c.where}: tensor {n} has shape {list(b)} but {ref.where} has {list(a)}{hint}"
                )


def tensor_params(plan: MergePlan, name: str) -> tuple[list[dict], dict]:
    r, m = plan.recipe, plan.method
    if plan.routes:
        return _routed_params(plan, name)
    t = layer_position(name, plan.counts)
    name = (name, *plan.module_names.get(name, ()))  # a filter may name the module tensor
    per_model = [
        {
            k: _first(name, t, d, e.parameters.get(k), r.parameters.get(k))
            for k, d in m.model_params.items()
        }
        for e in plan.entries
    ]
    glob = {k: _first(name, t, d, r.parameters.get(k)) for k, d in m.global_params.items()}
    # a switch (normalize, rescale) reaches the method as a bool, however the YAML spelled it
    return per_model, {
        k: bool(v) if isinstance(m.global_params[k], bool) else v for k, v in glob.items()
    }


# --- slices and rebuilt vocabularies: each output tensor from its route (slices.py, vocab.py) ---


def _route(plan: MergePlan, base: Checkpoint | None) -> None:
    """Plan where each output tensor comes from, for `slices:` or a recipe that sets the output
    tokenizer; the output's tensor names, config and vocabulary. UserError: what cannot be
    merged, named."""

    r, method = plan.recipe, plan.method
    opened = {_key(c.path): c for c in plan.sources.values()}

    def ckpt_of(ref: str, where: str = "slices") -> Checkpoint:
        c = opened.get(_key(Path(r.resolve_path(ref)))) or opened.get(ref)
        if c is None:
            raise UserError(
                f"{r.source}: {where}: {ref} is not a model the recipe merges (name its "
                "base_model or one of its models)"
            )
        return c

    listed = [plan.sources[f"models[{i}]"] for i in range(len(r.models))]
    first = base or listed[0]
    mt = first.config.get("model_type")
    for c in listed:
        if c.config.get("model_type") != mt:
            raise UserError(
                f"{c.where}: model_type is {c.config.get('model_type')!r} but {first.where} is "
                f"{mt!r}; only checkpoints of one architecture can be merged"
            )
    if r.slices:
        plan.routes, depth = slice_routes(r, method, ckpt_of)
        ref = home(base or ckpt_of(r.slices[0].sources[0].model))
        plan.out_config = sliced_config(ref.config, depth, block_counts(ref.names)[_stack(ref)])
    else:
        members = tuple(dict.fromkeys(listed + ([base] if base else [])))
        plan.routes = whole_routes(
            plan.names, plan.base, plan.models, plan.entries, r, members, base
        )
    plan.names = list(plan.routes)
    if r.tokenizer or r.tokenizer_source:
        plan.vocab = build_vocabulary(r, first, list(dict.fromkeys(listed)), ckpt_of)
        plan.vocab_names = {
            n for n, rt in plan.routes.items() if is_vocab_tensor(rt.inputs[0].ckpt, n)
        }
        if plan.vocab.identity:
            plan.vocab_names = set()
        elif method.optimized:
            raise UserError(
                f"{r.source}: {'tokenizer' if r.tokenizer else 'tokenizer_source'}: the output "
                f"vocabulary ({len(plan.vocab.tokens)} tokens) is not every expert's own; "
                f"{r.merge_method} compares teacher and student token by token, so its experts "
                "must share one vocabulary (merge these with a data-free method)"
            )
        config = dict(plan.out_config or home(base or listed[0]).config)
        config["vocab_size"] = plan.vocab.size  # as mergekit, whenever it builds a tokenizer
        plan.out_config = config
        for n in plan.vocab_names:  # every token's source is read for its tensor
            fills(plan.vocab, plan.routes[n].members, plan.routes[n].base_ckpt)
    if not r.slices and not plan.vocab_names:  # every row is already where the output wants it
        ref = plan.base or plan.models[0]
        plan.routes, plan.names = None, ref.names
        check_compatible(ref, [c for c in ([base] if base else []) + plan.models if c is not ref])
        return
    check_routes(plan.routes, plan.vocab_names)


def _key(path: Path) -> str:
    return str(path.resolve()) if Path(path).exists() else str(path)


def _stack(c: Checkpoint) -> str:
    return next(iter(block_counts(c.names)))


def _spec(plan: MergePlan, ref: Checkpoint, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """An output tensor's stored dtype and shape (a rebuilt vocabulary's rows)."""
    if not plan.routes:
        return ref.dtype(name), ref.shape(name)
    inp = plan.routes[name].inputs[0]
    shape = inp.ckpt.shape(inp.name)
    if name in plan.vocab_names:
        shape = (plan.vocab.size, *shape[1:])
    return inp.ckpt.dtype(inp.name), shape


def _readers(plan: MergePlan, name: str) -> tuple[Rows | None, list]:
    """Row readers of one output tensor's base and merged inputs."""
    if not plan.routes:
        return (Rows(plan.base, name) if plan.base else None), [Rows(c, name) for c in plan.models]
    route = plan.routes[name]
    if name in plan.vocab_names:
        return readers(plan.vocab, route)
    base = Rows(route.base.ckpt, route.base.name) if route.base else None
    return base, [Rows(x.ckpt, x.name) for x in route.xs]


def _routed_params(plan: MergePlan, name: str) -> tuple[list[dict], dict]:
    """tensor_params for a routed tensor: each input's scopes (a filter matches its own tensor name),
    the shared scopes (a filter matches the output name), at the route's t."""
    m, route = plan.method, plan.routes[name]
    per_model = [
        {
            k: _first(x.name, route.t, d, *(s.get(k) for s in x.scopes))
            for k, d in m.model_params.items()
        }
        for x in route.xs
    ]
    glob = {
        k: _first(name, route.t, d, *(s.get(k) for s in route.glob_scopes))
        for k, d in m.global_params.items()
    }
    return per_model, {
        k: bool(v) if isinstance(m.global_params[k], bool) else v for k, v in glob.items()
    }


def _check_values(plan: MergePlan, name: str) -> None:
    """The parameters resolve for this tensor, and the values go together (DELLA's density and
    epsilon): checked for every tensor before any is merged."""
    per_model, glob = tensor_params(plan, name)
    check = plan.method.check_values
    for j, problem in check(per_model, glob) if check else ():
        r = plan.recipe
        # a routed (sliced) tensor's j-th input is its route's, not the recipe's j-th model
        who = (
            plan.routes[name].xs[j].ckpt.where.removesuffix(".model")
            if plan.routes
            else f"models[{r.models.index(plan.entries[j])}]"
        )
        raise UserError(f"{r.source}: {who}.parameters: {problem}, at tensor {name}")


class Rows:
    """A tensor left on disk: `rows[a:b]` reads rows a..b-1. Elementwise methods stream through
    these, so no input tensor is ever whole in memory."""

    def __init__(self, ckpt: Checkpoint, name: str):
        self.ckpt, self.name, self.shape = ckpt, name, ckpt.shape(name)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.ckpt.get(self.name, rows.start, rows.stop)

    def whole(self) -> torch.Tensor:
        return self.ckpt.get(self.name)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def merge_tensor(plan: MergePlan, name: str, rng: torch.Generator, device: str) -> torch.Tensor:
    """Merge one tensor across the models in float32, on this thread."""
    return run_stages(tensor_stages(plan, name, rng, device))


def compute_device(m: Method, device: str) -> str:
    """Where method m merges when `device` is asked for: there if it runs on a device
    (Method.on_device), else on the CPU."""
    return device if m.on_device else "cpu"


def tensor_stages(
    plan: MergePlan, name: str, rng: torch.Generator, device: str
) -> Stages[torch.Tensor]:
    """One merged tensor as stages of jobs (methods.Stages): elementwise methods run on row chunks
    (after their whole-tensor statistics), the others as one job. Chunk bounds depend only on the
    tensor's shape, so the result is the same on any number of threads. A method that does not
    run on a device (Method.on_device) runs on the CPU whatever `device` says."""
    p, glob = tensor_params(plan, name)
    dtype = plan.out_specs[name][1]
    m, f32 = plan.method, torch.float32
    device = compute_device(m, device)
    base, xs = _readers(plan, name)
    ref = base or xs[0]
    shape = plan.out_specs[name][0]
    if not ref.ckpt.dtype(ref.name).is_floating_point:
        return (yield [ref.whole])[0]  # integer buffers are copied from the base
    if m.copies and isinstance(xs[0], Rows) and m.copies(p, glob):
        return (yield [partial(_copied, xs[0], dtype, name)])[0]
    numel = ref.numel()
    if not m.elementwise or numel <= CHUNK_ELEMENTS or len(shape) < 2:

        def whole() -> torch.Tensor:
            b = base.whole().to(device, f32) if base is not None else None
            flip = name in plan.in_out  # [in, out] as stored: the method gets [out, in]
            b = b.T if flip else b
            try:
                taus = _lowrank_taus(base, xs, device) if hasattr(m.fn, "lowrank") else None
                if taus is not None:  # LoRA experts: the method works on their factors
                    if flip:  # (s B A)^T = s A^T B^T
                        taus = [None if t is None else LowRank(t.A.T, t.B.T, t.scale) for t in taus]
                    merged = m.fn.lowrank(b, taus, glob)
                else:
                    ins = [_model_tensor(x, m, device) for x in xs]
                    merged = m.fn(b, [x.T for x in ins] if flip else ins, p, glob, rng)
            except UserError as e:  # a method's refusal: say which tensor
                raise UserError(f"tensor {name}: {e}") from None
            except FloatingPointError:  # an SVD of NaN or Inf inputs: run_merge names them
                raise NotFinite(name) from None
            merged = merged.T.contiguous() if flip else merged
            return _finite(merged.to(dtype), name)

        return (yield [whole])[0]
    rows = max(1, CHUNK_ELEMENTS // (numel // shape[0]))
    # whole-tensor statistics (TIES thresholds), streamed over the same row chunks
    prep = (yield from m.prepare(base, xs, p, rows)) if m.prepare else None
    out = torch.empty(shape, dtype=dtype, device=device)

    def chunk(i: int) -> None:
        b = base[i : i + rows].to(device, f32) if base is not None else None
        part = [x[i : i + rows].to(device) for x in xs]  # methods upcast while subtracting
        out[i : i + rows] = m.fn(b, part, p, glob, rng, prep).to(dtype)
        _finite(out[i : i + rows], name)

    yield [partial(chunk, i) for i in range(0, shape[0], rows)]
    return out


def _lowrank_taus(base: Rows | None, xs: list, device: str) -> list | None:
    """Each input's task vector on this tensor as its LoRA factors (LowRank on the device, None
    where the adapter leaves it alone), when every input is a LoRA adapter on the merge's base
    and at least one adapts this tensor; else None (the inputs are merged dense, as a saved
    module is). Stored rows only: a tensor of a rebuilt vocabulary (vocab.VocabRows) has other
    rows than the adapter's factors."""
    if type(base) is not Rows or not all(
        type(x) is Rows
        and isinstance(x.ckpt, LoraExpert)
        and x.ckpt.on_base
        and x.ckpt.base is base.ckpt
        and x.name == base.name
        for x in xs
    ):
        return None
    taus = [x.ckpt.tau(x.name, base.ckpt) for x in xs]
    if not all(t is None or isinstance(t, LowRank) for t in taus) or all(t is None for t in taus):
        return None
    return [None if t is None else LowRank(t.B.to(device), t.A.to(device), t.scale) for t in taus]


def _copied(x: Rows, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A model's tensor as stored (through float32 when the output's dtype differs, as a method
    would round it), for a method whose merge is that tensor."""
    t = x.whole()
    return _finite(t if t.dtype == dtype else t.float().to(dtype), name)


def _model_tensor(x: Rows, m: Method, device: str) -> torch.Tensor:
    """A model's whole tensor as a method takes it: float32, or 16-bit as stored for a method
    that upcasts as it computes (float32 arithmetic on them is exact upcasting, so the result is
    the same; a float32 copy of each is spared)."""
    t = x.whole()
    half = t.dtype in INF_BITS  # the 16-bit floats
    return t.to(device, None if m.upcasts and half else torch.float32)


class NotFinite(Exception):
    """A merged tensor holds NaN or Inf (run_merge names the input or parameter to blame)."""


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype.is_floating_point and not all_finite(t):
        raise NotFinite(name)
    return t


INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # exponent all ones: Inf or NaN


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor. Half types by their bits (a 16-bit integer max: 5x
    faster than upcasting); others by numpy's isfinite (~10x faster than torch's on CPU)."""
    inf = INF_BITS.get(t.dtype)
    if inf is None:
        return bool(np.isfinite(t.float().cpu().numpy()).all())
    bits = t.detach().cpu().view(torch.int16).numpy()
    return bits.size == 0 or int((bits & 0x7FFF).max()) < inf


def pipeline(
    works: Iterator[Stages[torch.Tensor]], threads: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, tensor) of each of `works` as it is finished, with up to `threads` worker threads
    running the jobs of the next few tensors (memory: about WINDOW_PER_THREAD tensors per thread).
    Finished tensors come out of order (the writer puts each at its place), so one big tensor
    (an embedding merged whole) does not hold up the tensors behind it. Workers run
    single-threaded torch ops and take jobs from one queue, so a core slowed by another process
    delays only its own jobs, where OpenMP's fixed split of every op waits for the slowest core."""
    if threads <= 1:
        yield from ((i, run_stages(w)) for i, w in enumerate(works))
        return
    window = WINDOW_PER_THREAD * threads
    ready: queue.SimpleQueue = queue.SimpleQueue()  # items whose stage finished
    live: set[_Live] = set()
    done: collections.deque[_Live] = collections.deque()
    works = enumerate(works)
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        while True:
            while len(live) < window and (w := next(works, None)) is not None:
                item = _Live(*w)
                live.add(item)
                item.advance(pool, ready, None)
                if item.done:
                    done.append(item)
            if done:
                item = done.popleft()
                live.discard(item)
                yield item.take()  # then admit the next tensor before waiting again
                continue
            if not live:
                return
            item = ready.get()
            item.advance(pool, ready, [f.result() for f in item.futures])
            if item.done:
                done.append(item)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)


class _Live:
    """One tensor in flight: its stage generator and the futures of its current stage."""

    def __init__(self, index: int, work: Stages[torch.Tensor]):
        self.index, self.work, self.futures, self.done, self.value = index, work, [], False, None
        self.left, self.lock = 0, threading.Lock()

    def advance(self, pool: ThreadPoolExecutor, ready: queue.SimpleQueue, results) -> None:
        try:
            jobs = next(self.work) if results is None else self.work.send(results)
        except StopIteration as stop:
            self.done, self.value, self.futures = True, stop.value, []
            return
        if not jobs:  # a stage with nothing to do
            return self.advance(pool, ready, [])
        self.left = len(jobs)
        self.futures = [pool.submit(j) for j in jobs]
        for f in self.futures:
            f.add_done_callback(lambda _, self=self: self._job_done(ready))

    def take(self) -> tuple[int, torch.Tensor]:
        """(index, tensor), no longer held here."""
        value, self.value = self.value, None
        return self.index, value

    def _job_done(self, ready: queue.SimpleQueue) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            ready.put(self)


def _not_finite(plan: MergePlan, name: str) -> UserError:
    return not_finite_input(tensor_inputs(plan, name)) or UserError(
        f"tensor {name}: the merge produced NaN or Inf (check the method's parameters)"
    )


def run_merge(
    plan: MergePlan,
    out: Path,
    *,
    force: bool = False,
    seed: int = 0,
    shard_bytes: int = 5 * 10**9,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    tensors: Callable[[str], torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
    card_extra: str = "",
    threads: int = 1,
) -> Path:
    """Write the merged checkpoint to OUT atomically. `tensors` overrides how each tensor is made
    (optimized methods pass their learned merge, made on this thread); `extra_files` are written
    beside the weights. `threads` workers compute tensors ahead while this thread writes them in
    order; the output is bit-identical for any number of threads."""
    check_out(out, force, [c.path for c in plan.inputs])
    need = specs_nbytes(plan.out_specs)
    check_space(out, need)
    if tensors:
        works = (_made(tensors, n) for n in plan.names)
    else:
        works = (tensor_stages(plan, n, tensor_generator(seed, n), device) for n in plan.names)
    hasher = threading.Thread(target=_hash_inputs, args=(plan,), daemon=True)
    if threads > 1:  # the recipe written beside the weights pins every input by its hash
        hasher.start()
    with atomic_folder(out, need) as tmp:
        writer = ShardWriter(tmp, plan.out_specs, shard_bytes)
        try:
            on_cpu = compute_device(plan.method, device) == "cpu"
            merged = pipeline(works, threads if on_cpu else 1)
            if progress:
                progress(0, len(plan.names), "")
            written = 0
            # no enumerate or zip: they keep their last item, so the last tensor would live on
            # while the next is merged
            for k, t in merged:
                name = plan.names[k]
                writer.write(name, t.to(plan.out_specs[name][1]))
                del t
                written += 1
                if progress:
                    progress(written, len(plan.names), name)
        except NotFinite as e:
            raise _not_finite(plan, e.args[0]) from None
        writer.close()
        if hasher.is_alive():
            hasher.join()
        write_side_files(plan, tmp, card_extra)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        plan.check_unchanged()
    return out


def _hash_inputs(plan: MergePlan) -> None:
    """Hash every input while the merge runs (hashlib releases the GIL): reproducible_recipe
    then finds the hashes done. A failure here is met again, and reported, when it hashes."""
    try:
        for key in list(plan.sources):
            input_hash(plan, key)
    except Exception:  # noqa: BLE001 - only a head start
        pass


def _made(make: Callable[[str], torch.Tensor], name: str) -> Stages[torch.Tensor]:
    """A tensor made by `make` on the calling thread, as stages with no jobs."""
    return _finite(make(name), name)
    yield


def tensor_generator(seed: int, name: str) -> torch.Generator:
    # seeded per tensor, so a tensor's random mask does not depend on the order tensors are merged
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def out_config(plan: MergePlan) -> dict:
    """The output's config.json: the reference model's, with a sliced merge's depth, a rebuilt
    vocabulary's size and the output dtype."""
    config = dict(plan.out_config or home(plan.base or plan.models[0]).config)
    out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
    if out_dtype:
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = out_dtype
    return config


def write_side_files(plan: MergePlan, folder: Path, card_extra: str = "") -> None:
    """config.json (dtype updated), generation config, tokenizer, the resolved recipe, a model card."""
    ref = home(plan.base or plan.models[0])
    (folder / "config.json").write_text(json.dumps(out_config(plan), indent=2) + "\n")
    copy_side_files(ref.path, folder, SIDE_FILES)
    v = plan.vocab
    if plan.recipe.chat_template or (v and (plan.vocab_names or v.added)):
        folders = [f for c in plan.sources.values() if (f := tokenizer_folder(c))]
        tok = v.tokenizer if v else load_tokenizer(plan.tokenizer, "tokenizer_source")
        save_tokenizer(tok, chat_template(plan.recipe, folders), folder)
    else:
        copy_side_files(plan.tokenizer, folder, TOKENIZER_FILES)  # plan_merge checked it has some
    recipe = reproducible_recipe(plan)
    (folder / "divmerge_recipe.yaml").write_text(recipe)
    (folder / "README.md").write_text(model_card(plan, card_extra, recipe))


def reproducible_recipe(plan: MergePlan) -> str:
    """divmerge_recipe.yaml: the recipe with its defaults made explicit, every input named by its
    absolute path (a hub id stays an id) and pinned by its content hash, and the tasks inline with
    their data files likewise. `divmerge run` on it redoes this merge from any folder, or says
    which input changed."""
    r = plan.recipe
    data = recipe_data(r)

    def where(ref: str, key: str) -> str:
        local = Path(r.resolve_path(ref)).exists()
        return str(plan.sources[key].path.resolve()) if local else ref

    if r.base_model:
        data["base_model"] = where(r.base_model, "base_model")
        data["base_model_sha256"] = input_hash(plan, "base_model")
    for i, (m, entry) in enumerate(zip(r.models, data.get("models", ()))):
        entry["model"] = where(m.model, f"models[{i}]")
        entry["sha256"] = input_hash(plan, f"models[{i}]")
        if not entry.get("parameters"):
            entry.pop("parameters", None)
    for sl, out in zip(r.slices or (), data.get("slices", ())):
        if sl.base_model:
            out["base_model"] = where(sl.base_model, source_key(plan, sl.base_model))
        for s, entry in zip(sl.sources, out["sources"]):
            key = source_key(plan, s.model)
            entry |= {"model": where(s.model, key), "sha256": input_hash(plan, key)}
    if r.tokenizer_source not in (None, "base", "union"):
        data["tokenizer_source"] = str(plan.tokenizer.resolve())
    if r.tokenizer:
        _pin_tokenizer(plan, data["tokenizer"], where)
    if r.tasks is not None:
        tasks = load_tasks(r.tasks, r.source.parent, str(r.source))
        data["tasks"] = {name: _pinned_task(spec) for name, spec in tasks.items()}
    ordered = {k: data[k] for k in Recipe.model_fields if k in data}  # the schema's order
    return yaml.safe_dump(ordered, sort_keys=False)


def _pin_tokenizer(plan: MergePlan, block: dict, where) -> None:
    """The tokenizer block's models named as the merge opened them."""
    if block.get("source") not in (None, "base", "union"):
        block["source"] = str(plan.tokenizer.resolve())
    for setting in (block.get("tokens") or {}).values():
        src = setting.get("source")
        if isinstance(src, str):
            setting["source"] = where(src, source_key(plan, src))
        elif isinstance(src, dict) and "model" in src:
            src["model"] = where(src["model"], source_key(plan, src["model"]))


def _pinned_task(spec: TaskSpec) -> dict:
    out = spec.model_dump(mode="json", exclude_none=True)
    files = {s: p for s in ("validation", "test") if (p := out.get(s)) and Path(p).is_file()}
    if files:
        out["sha256"] = {s: hash_file(p) for s, p in files.items()}
    return out


def model_card(plan: MergePlan, extra: str = "", recipe: str | None = None) -> str:
    """README.md: front matter, inputs and the recipe. Inputs are named as the merge read them
    (a folder's absolute path, a hub id as given), not as `$VAR` or relative to the recipe."""
    r = plan.recipe
    base = r.resolve_path(r.base_model) if r.base_model else None
    front = {"tags": ["merge", "divmerge"], **({"base_model": base} if base else {})}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),  # quoted where a path needs it
        "---",
        f"# Merged with divmerge {__version__}",
        "",
        f"Method: **{r.merge_method}** ({plan.method.paper}).",
        "",
        f"Base model: `{base}`" if base else "No base model.",
        "",
        "Models:",
        *[
            f"- `{r.resolve_path(m.model)}`" + (f" (task `{m.task}`)" if m.task else "")
            for m in r.models
        ],
        "",
        "Recipe (`divmerge_recipe.yaml` reproduces this merge):",
        "",
        "```yaml",
        (recipe or dump_recipe(r)).rstrip(),
        "```",
        extra,
    ]
    return "\n".join(lines) + "\n"
