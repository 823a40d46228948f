"""Recipe schema (mergekit-compatible keys + divmerge's tasks) and load_recipe().

Validated once, at load: every error names the file and the field and says what would be valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .epochs import check_params as check_epoch_params
from .errors import Integer, Number, UserError, misspelling_of, pydantic_message, read_yaml, suggest
from .hashing import SHA256
from .methods import (
    AUTO_EPOCHS,
    BASE_METHODS,
    METHODS,
    OPTIMIZE_DEFAULTS,
    RANGES,
    TEACHER_ONLY,
    Method,
)
from .objectives import DIVERGENCES
from .tasks import expand_path

DTYPES = ("float32", "float16", "bfloat16")
# mergekit keys we recognise but do not implement: a clear error beats a silent ignore.
UNSUPPORTED = {
    "modules": "mergekit's per-module recipes; list whole checkpoints under `models:` or layer "
    "ranges under `slices:`",
}
# Every merge method mergekit has registered (0.1.5, and names from its other versions), so that
# one divmerge lacks is said to be unsupported, not answered with a look-alike's name.
MERGEKIT_METHODS = (
    "linear", "slerp", "nuslerp", "multislerp", "passthrough", "task_arithmetic", "ties",
    "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "model_stock", "sce", "karcher", "arcee_fusion", "nearswap", "ram", "ramplus_tl",
    "lrp", "core_space", "cabs",
)  # fmt: skip
# mergekit-multi's multi-stage recipes: several YAML documents in one file
MULTI_DOCUMENT = (
    "mergekit's multi-stage merges (mergekit-multi) are not supported by divmerge: write one "
    "recipe per stage and run `divmerge run` on each, naming the previous stage's output folder"
)


class FilterValue(BaseModel):
    """One entry of a filtered parameter: the first entry whose `filter` is in the tensor name wins."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Number | list[Number]


ParamValue = Number | list[Number] | list[FilterValue]
_param_value = TypeAdapter(ParamValue)

SEED_MAX = 2**32
Seed = Annotated[Integer, Field(ge=0, lt=SEED_MAX)]  # torch and numpy generators take 32 bits
_seed = TypeAdapter(Seed)


def check_seed(value: object, where: str) -> int:
    """The one seed rule (run --seed, a sweep's seed, parameters.seed): an integer in [0, 2**32)."""
    try:
        return _seed.validate_python(value)
    except ValidationError:
        raise UserError(f"{where}: {value!r} is not valid; use an integer in [0, 2**32)") from None


_D = OPTIMIZE_DEFAULTS
# Bounds that catch a slip (1e30, .inf) at load instead of after the teacher cache is built.
INIT_MAX = 10.0  # |Gamma| at init; the paper starts at 0.5 (Table 9) or 1/n (Algorithm 1)
LR_MAX = 1.0  # Adam moves each Gamma by about lr per step, and Gamma is of order 1


class OptimizeParams(BaseModel):
    """`parameters:` of the optimized methods (divmerge, adamerging); defaults from
    methods.OPTIMIZE_DEFAULTS, overridden by each method's global_params."""

    model_config = ConfigDict(extra="forbid")
    divergence: Literal[DIVERGENCES] = _D["divergence"]  # divmerge only
    granularity: Literal["task", "layer", "tensor"] = _D["granularity"]
    init: Number | Literal["uniform"] = _D["init"]
    lr: Number = _D["lr"]
    epochs: Annotated[Integer, Field(ge=1, le=1_000_000)] | Literal["auto"] = _D["epochs"]
    holdout: Number | None = _D["holdout"]  # epochs.py
    patience: Integer | None = Field(_D["patience"], ge=1, le=1_000_000)
    min_delta: Number | None = _D["min_delta"]
    max_epochs: Integer | None = Field(_D["max_epochs"], ge=1, le=1_000_000)
    batch_size: Integer | None = Field(_D["batch_size"], ge=1, le=1_000_000)
    samples: Integer = Field(_D["samples"], ge=1, le=10_000_000)
    top_k: Annotated[Integer, Field(ge=1)] | Literal["full"] = _D["top_k"]
    gen_batch_size: Integer = Field(_D["gen_batch_size"], ge=1, le=100_000)
    task_vectors: Literal["memory", "stream", "auto"] = _D["task_vectors"]  # taskvectors.py
    # Remark 3: Gamma fitted on top of a data-free method's processed task vectors (processed.py)
    base_method: Literal[BASE_METHODS] = _D["base_method"]
    # a coefficients.json of an earlier run: Gamma is fixed to it, nothing is learned (this is
    # how a learned merge's output folder reproduces it)
    coefficients: str | None = _D["coefficients"]
    # with coefficients: the --seed of the run that learned them (DARE's masks depend on it)
    seed: Seed | None = _D["seed"]

    @field_validator("init")
    @classmethod
    def _sane_init(cls, v: float | str) -> float | str:
        if v != "uniform" and not (math.isfinite(v) and abs(v) <= INIT_MAX):
            raise ValueError(
                f"{v} is out of range; init is 'uniform' (1/n) or a number in "
                f"[-{INIT_MAX:g}, {INIT_MAX:g}] (the paper uses 0.5)"
            )
        return v

    @field_validator("epochs", mode="wrap")
    @classmethod
    def _epochs(cls, v: object, handler) -> int | str:
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(
                f"{v!r} is not valid; epochs is a whole number in [1, 1000000] or auto (stop on "
                "the held-back objective)"
            ) from None

    @field_validator("holdout")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(
                f"{v} is out of range; holdout is the fraction of each task's validation inputs "
                "held back, in (0, 1) (e.g. 0.2)"
            )
        return v

    @field_validator("min_delta")
    @classmethod
    def _margin(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v < 1:
            raise ValueError(
                f"{v} is out of range; min_delta is a relative improvement in [0, 1) (e.g. 0.01)"
            )
        return v

    @field_validator("lr")
    @classmethod
    def _sane_lr(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= LR_MAX):
            raise ValueError(
                f"{v} is out of range; lr must be in (0, {LR_MAX:g}] (the paper uses 0.01 for "
                "divmerge, 0.001 for adamerging)"
            )
        return v


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None  # divmerge / adamerging: the task this expert was fine-tuned on
    # the content hash of the model's files (hashing.hash_model_dir), checked before merging;
    # divmerge writes it into the output's divmerge_recipe.yaml
    sha256: str | None = Field(None, pattern=SHA256)


# --- mergekit's `slices:` and tokenizer block (planned in slices.py and vocab.py) ---------------


class SliceSource(BaseModel):
    """Layers [first, end) of one model, in a slice."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[NonNegativeInt, NonNegativeInt]
    parameters: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = Field(None, pattern=SHA256)  # as ModelEntry.sha256

    @field_validator("layer_range")
    @classmethod
    def _not_empty(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] >= v[1]:
            raise ValueError(
                f"[{v[0]}, {v[1]}] holds no layer; a layer range is [first, end) with first < "
                "end, e.g. [0, 16] for the first 16 blocks"
            )
        return v


class SliceDef(BaseModel):
    """One output slice: its sources' layers merged, layer by layer, into as many output layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None  # this slice's base (default: the recipe's)
    parameters: dict[str, Any] = Field(default_factory=dict)
    residual_weight: float | None = None  # accepted as mergekit 0.1.5 accepts it, and unused

    @model_validator(mode="after")
    def _same_depth(self) -> SliceDef:
        n = [s.layer_range[1] - s.layer_range[0] for s in self.sources]
        for i, k in enumerate(n):
            if k != n[0]:
                raise ValueError(
                    f"sources[{i}].layer_range spans {k} layers but sources[0]'s spans {n[0]}; "
                    "the sources of one slice are merged layer by layer, so they span as many"
                )
        return self


class ModelToken(BaseModel):
    """A token's row taken from one model's own vocabulary, by id or by token."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: NonNegativeInt | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give one of token_id or token, the row to take from the model")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """`tokenizer.tokens.<token>`: where its embedding rows come from; `force` uses that row
    even in the models that have the token."""

    model_config = ConfigDict(extra="forbid")
    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class TokenizerBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # "union", "base" or a model
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: PositiveInt | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    base_model_sha256: str | None = Field(None, pattern=SHA256)  # as ModelEntry.sha256
    # with `slices:`, the distinct models the slices name, filled in at load (see _one_input_list)
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None  # mergekit's layer slices (slices.py)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model path (vocab.py)
    tokenizer: TokenizerBlock | None = None  # mergekit's tokenizer block (vocab.py)
    chat_template: str | None = None  # "auto" or a Jinja template (vocab.py)
    tasks: dict[str, Any] | str | None = (
        None  # inline mapping or a YAML file (divmerge, adamerging)
    )

    # Set by load_recipe, not by the user: where relative paths are resolved from.
    source: Path = Field(default=Path("recipe.yaml"), exclude=True)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """What load_recipe accepted but ignored (mergekit keys another method takes)."""
        return self._warnings

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v in METHODS:
            return v
        if v in MERGEKIT_METHODS:
            raise ValueError(
                f"mergekit method '{v}' is not supported by divmerge (supported: "
                f"{', '.join(METHODS)})"
            )
        raise ValueError(
            f"unknown method '{v}'{misspelling_of(v, METHODS)}; valid: {', '.join(METHODS)}"
        )

    def resolve_path(self, ref: str) -> str:
        """Relative paths are tried against the recipe's folder first, then the working directory."""
        p = Path(expand_path(ref, str(self.source)))
        if p.is_absolute():
            return str(p)
        beside = self.source.parent / p
        if beside.exists() or not p.exists():
            return str(beside.resolve()) if beside.exists() else str(p)
        return str(p.resolve())


def _fields_at(parent: tuple) -> list[str]:
    if not parent:
        return [f for f in Recipe.model_fields if f != "source"]
    if parent[0] == "models":
        return list(ModelEntry.model_fields)
    if parent[0] in ("slices", "tokenizer"):
        return list(_block_at(parent).model_fields)
    return list(FilterValue.model_fields)


def _check_parameters(recipe: Recipe) -> None:
    """Parameter names must exist for the method, and values must be in range."""
    spec = METHODS[recipe.merge_method]
    _drop_foreign(recipe)
    if spec.optimized:
        return _check_optimized(recipe)
    allowed_model = set(spec.model_params)
    allowed_global = allowed_model | set(spec.global_params)
    _check_scope("parameters", recipe.parameters, allowed_global, recipe.merge_method, True)
    for i, m in enumerate(recipe.models):
        _check_scope(f"models[{i}].parameters", m.parameters, allowed_model, recipe.merge_method)


def _check_scope(
    where: str, params: dict, allowed: set[str], method: str, switches: bool = False
) -> None:
    """Every key of `params` is one `method` takes there; values typed in place and in range.
    `switches`: a global scope, where true/false is taken by the method's switches (normalize)."""
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(_bad_param(where, key, allowed, method))
        spec = METHODS[method]
        params[key] = _typed(f"{where}.{key}", value, switches and _is_switch(spec, key))
        _check_value(f"{where}.{key}", key, params[key], spec.ranges)


def _takes(name: str, per_model: bool, base_method: object = None) -> set[str]:
    """The parameters method `name` takes per model, or globally (where an entry also sets the
    per-model defaults). A learned merge takes its base_method's sparsification parameters too."""
    m = METHODS[name]
    if not m.optimized:
        return set(m.model_params) | (set() if per_model else set(m.global_params))
    own = _base_params(base_method, per_model)
    if per_model:
        return own
    return own | set(OptimizeParams.model_fields) - (set(TEACHER_ONLY) if m.objective else set())


def _takers(key: str, per_model: bool) -> list[str]:
    return [name for name in METHODS if key in _takes(name, per_model)]


_ALL_PARAMS = {
    *OptimizeParams.model_fields,
    *(k for m in METHODS.values() for k in (*m.model_params, *m.global_params)),
}


def _drop_foreign(recipe: Recipe) -> None:
    """A parameter another method takes (mergekit's `density` on task_arithmetic) is ignored with a
    warning, as mergekit ignores it; a name no method takes is left for the checks to refuse."""
    name = recipe.merge_method
    base_method = recipe.parameters.get("base_method", "task_arithmetic")
    for where, params, per_model in [
        ("parameters", recipe.parameters, False),
        *((f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(recipe.models)),
        *slice_scopes(recipe),
    ]:
        for key in list(params):
            takers = _takers(str(key), per_model)
            if takers and key not in _takes(name, per_model, base_method):
                del params[key]
                recipe.warnings.append(
                    f"{recipe.source}: {where}.{key}: ignored; {name} takes no {key} "
                    f"(a parameter of {', '.join(takers)})"
                )


def _is_switch(method: Method | None, key: str) -> bool:
    """A parameter whose default is true/false (normalize, rescale): it takes a boolean."""
    return method is not None and isinstance(method.global_params.get(key), bool)


def _typed(where: str, value: Any, switch: bool) -> ParamValue:
    """A parameter's value: a number, list or filters; true/false only for a switch (kept as
    written, not as 1.0)."""
    if isinstance(value, bool) and switch:
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a number; true/false is for switches")
    try:
        return _param_value.validate_python(value)
    except ValidationError:
        raise ValueError(
            f"{where}: {value!r} is not a number, a list of numbers or a list of {{filter, value}}"
        ) from None


def _check_optimized(recipe: Recipe) -> None:
    name = recipe.merge_method
    defaults = METHODS[name].global_params
    own = base_method_params(recipe)
    bm = METHODS.get(str(recipe.parameters.get("base_method", "task_arithmetic")))
    for key in own & set(recipe.parameters):  # the base method's own, read as it reads them
        value = recipe.parameters[key]
        recipe.parameters[key] = _typed(f"parameters.{key}", value, _is_switch(bm, key))
        _check_value(f"parameters.{key}", key, recipe.parameters[key], RANGES)
    try:
        check_epoch_params(OptimizeParams.model_validate({**defaults, **_optimize_only(recipe)}))
    except ValidationError as e:
        e0 = e.errors()[0]
        key = str(e0["loc"][0])
        if e0["type"] == "extra_forbidden":
            raise ValueError(
                _bad_param("parameters", key, set(OptimizeParams.model_fields), name)
            ) from None
        if e0["type"] == "value_error":
            raise ValueError(
                f"parameters.{key}: {e0['msg'].removeprefix('Value error, ')}"
            ) from None
        raise ValueError(f"parameters.{key}: {e0['msg']} (got {e0.get('input')!r})") from None
    if not recipe.base_model:
        raise ValueError(
            f"base_model: {name} needs a base model (task vectors are theta_t - theta0)"
        )
    if recipe.tasks is None and "coefficients" not in recipe.parameters:
        raise ValueError(
            f"tasks: {name} needs a tasks mapping (or file) with validation data per task"
        )
    bm = recipe.parameters.get("base_method", "task_arithmetic")
    own_per_model = _base_params(bm, per_model=True)
    for i, m in enumerate(recipe.models):
        for key, value in m.parameters.items():
            if key not in own_per_model:
                raise ValueError(
                    f"models[{i}].parameters.{key}: {name} learns the coefficients; only the "
                    f"base method's sparsification may be set per model (base_method: {bm} "
                    f"takes {', '.join(sorted(own_per_model)) or 'none'})"
                )
            m.parameters[key] = _typed(f"models[{i}].parameters.{key}", value, False)
            _check_value(f"models[{i}].parameters.{key}", key, m.parameters[key], RANGES)
        if not m.task:
            raise ValueError(
                f"models[{i}].task: {name} needs the task each expert was fine-tuned on"
            )


def optimize_params(recipe: Recipe) -> OptimizeParams:
    """The resolved parameters of an optimized method (defaults filled in)."""
    return OptimizeParams.model_validate(
        {**METHODS[recipe.merge_method].global_params, **_optimize_only(recipe)}
    )


def base_method_params(recipe: Recipe) -> set[str]:
    """The parameters a learned merge reads for its base_method (Remark 3): its sparsification's
    (density, gamma, epsilon, rescale, select_topk). Weights, lambda and normalization are what
    Gamma learns."""
    return _base_params(recipe.parameters.get("base_method", "task_arithmetic"))


def _base_params(bm: object, per_model: bool = False) -> set[str]:
    """A base method's parameters that a learned merge reads (density, gamma, epsilon, rescale,
    select_topk), or those of them set per model."""
    if not isinstance(bm, str) or bm not in BASE_METHODS:
        return set()  # an invalid base_method is reported by OptimizeParams
    m = METHODS[bm]
    return (set(m.model_params) | (set() if per_model else set(m.global_params))) - {
        "weight",
        "lambda",
        "normalize",
        "int8_mask",
        "scaling_factor",  # tsv's alpha: Gamma learns the scale
    }


def _optimize_only(recipe: Recipe) -> dict:
    own = base_method_params(recipe)
    return {k: v for k, v in recipe.parameters.items() if k not in own}


def _bad_param(where: str, key: str, allowed: set[str], method: str) -> str:
    valid = ", ".join(sorted(allowed)) or "none"
    near = suggest(key, allowed) or suggest(key, _ALL_PARAMS)  # a typo of another method's name
    return f"{where}.{key}: not a parameter of {method}{near}; valid: {valid}"


def _check_value(where: str, key: str, value: ParamValue, ranges: dict) -> None:
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for j, fv in enumerate(value):
            _check_value(f"{where}[{j}].value", key, fv.value, ranges)
        return
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError(f"{where}: an empty list; give a number or a list of numbers")
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{where}: {v} is not a finite number")
        if key in ranges:
            lo, hi, text = ranges[key]
            if not (lo(v) and hi(v)):
                raise ValueError(f"{where}: {v} is out of range; {key} must be in {text}")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises UserError naming the file and field at fault."""
    path = Path(path)
    raw = read_yaml(path, "recipe", several=MULTI_DOCUMENT)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping with merge_method, models, ...")
    return recipe_from_dict(raw, path)


def recipe_from_dict(raw: dict, source: Path) -> Recipe:
    try:
        recipe = Recipe.model_validate({**raw, "source": source})
        _slices_as_models(recipe)
        _check_parameters(recipe)
        if recipe.slices:
            _check_slices(recipe)
        else:
            METHODS[recipe.merge_method].check(recipe)
    except ValidationError as e:
        raise UserError(f"{source}: {pydantic_message(e, _fields_at, UNSUPPORTED)}") from None
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, as the user wrote it plus the method's defaults made explicit."""
    return yaml.safe_dump(recipe_data(recipe), sort_keys=False)


def recipe_data(recipe: Recipe) -> dict:
    """The recipe as plain data, as the user wrote it plus the method's defaults made explicit."""
    data = recipe.model_dump(mode="json", exclude_none=True, exclude={"source"})
    if recipe.slices:  # the models were read off the slices
        del data["models"]
    if METHODS[recipe.merge_method].optimized:
        defaults = optimize_params(recipe).model_dump(exclude_none=True)
        if METHODS[recipe.merge_method].objective:  # not a divergence to a teacher
            for key in TEACHER_ONLY:
                defaults.pop(key)
        if defaults["epochs"] == "auto":  # when it stops, made explicit too
            defaults.update({k: v for k, v in AUTO_EPOCHS.items() if k not in defaults})
    else:
        defaults = dict(METHODS[recipe.merge_method].global_params)
    data["parameters"] = {**defaults, **data.get("parameters", {})}
    return data


# --- slices and the tokenizer block: checks at load --------------------------------------------

# mergekit 0.1.5's bundled chat templates, named instead of written out (divmerge ships none)
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _block_at(parent: tuple) -> type[BaseModel]:
    """The schema class of a slices/tokenizer location, for an unknown key's list of valid keys."""
    if parent[0] == "slices":
        return SliceSource if "sources" in parent else SliceDef
    if len(parent) == 1:
        return TokenizerBlock
    return ModelToken if "source" in parent[1:] and len(parent) > 3 else TokenSetting


def _slices_as_models(recipe: Recipe) -> None:
    """Exactly one of `models:` and `slices:` (as mergekit); with slices, `models` becomes the
    distinct models they name (each opened once), and the other keys are checked."""
    if recipe.slices is not None and recipe.models:
        raise ValueError(
            "slices: give either `models:` (whole checkpoints) or `slices:` (layer ranges), "
            "not both"
        )
    if not recipe.slices:
        if recipe.slices is not None:
            raise ValueError("slices: an empty list; give at least one slice with its sources")
        if not recipe.models:
            raise ValueError(
                "models: no model listed; list the checkpoints to merge under `models:` (or "
                "layer ranges under `slices:`)"
            )
    elif METHODS[recipe.merge_method].optimized:
        raise ValueError(
            f"slices: {recipe.merge_method} learns coefficients of whole experts' task vectors; "
            "list the experts under `models:` (slices are merged by the data-free methods)"
        )
    else:
        seen = set()
        for sl in recipe.slices:
            for src in sl.sources:
                key = recipe.resolve_path(src.model)
                if key not in seen:
                    seen.add(key)
                    recipe.models.append(ModelEntry(model=src.model))
    if recipe.tokenizer and recipe.tokenizer_source:
        raise ValueError(
            "tokenizer: give either tokenizer_source or a tokenizer block (its `source`), not both"
        )
    t = recipe.chat_template
    if t is not None and t != "auto" and "{" not in t:
        known = (
            f"'{t}' names one of mergekit's bundled templates, which divmerge does not ship"
            if t in MERGEKIT_TEMPLATES
            else f"{t!r} is not a template"
        )
        raise ValueError(
            f"chat_template: {known}; give `auto` (the template most input models share) or "
            "the Jinja template itself"
        )


def slice_scopes(recipe: Recipe) -> list[tuple[str, dict, bool]]:
    """(where, parameters, per model) of every slice and slice source."""
    out = []
    for k, sl in enumerate(recipe.slices or ()):
        out.append((f"slices[{k}].parameters", sl.parameters, False))
        for i, src in enumerate(sl.sources):
            out.append((f"slices[{k}].sources[{i}].parameters", src.parameters, True))
    return out


def _check_slices(recipe: Recipe) -> None:
    """Parameters of each slice and source, and the method's own check on each slice's inputs
    (mergekit checks every slice as a merge of its own)."""
    name = recipe.merge_method
    spec = METHODS[name]
    allowed_model = set(spec.model_params)
    for where, params, per_model in slice_scopes(recipe):
        allowed = allowed_model if per_model else allowed_model | set(spec.global_params)
        _check_scope(where, params, allowed, name, not per_model)
    for k, sl in enumerate(recipe.slices):
        seen: dict[str, int] = {}
        for i, src in enumerate(sl.sources):
            key = recipe.resolve_path(src.model)
            if key in seen:
                raise ValueError(
                    f"slices[{k}].sources[{i}].model: {src.model} is also sources[{seen[key]}]; "
                    "a slice merges each model once"
                )
            seen[key] = i
        view = recipe.model_copy(
            update={
                "models": [ModelEntry(model=s.model, parameters=s.parameters) for s in sl.sources],
                # a method that reads no base (passthrough, linear) ignores one, as mergekit
                "base_model": (sl.base_model or recipe.base_model) if spec.uses_base else None,
                "slices": None,
            }
        )
        try:
            spec.check(view)
        except ValueError as e:
            raise ValueError(f"slices[{k}].{str(e).replace('models:', 'sources:', 1)}") from None
