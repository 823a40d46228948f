"""The sweep file: its schema, validation at load, and the recipe of each cell.

A sweep file names one base, one expert per task, the tasks, the subset sizes k and the methods.
Loading checks everything a run would need (tasks render, every method builds a recipe for every k)
so that a mistake is reported before hours of merges, naming the file and the field.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import Integer, UserError, pydantic_message, read_yaml, suggest
from ..hashing import hash_json
from ..merge import check_compatible
from ..methods import METHODS, OPTIMIZE_DEFAULTS
from ..models import open_model
from ..recipe import Recipe, check_seed, optimize_params, recipe_from_dict
from ..tasks import TaskSpec, check_task, expand_path, load_tasks

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used as a folder name under work_dir


class MethodEntry(BaseModel):
    """One column of the tables: the recipe fields every cell of this method shares."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["validation", "test"] = "test"
    limit: Annotated[Integer, Field(ge=1)] | None = None  # labelled rows per task; None = all
    batch_size: Annotated[Integer, Field(ge=1)] = 16


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: dict[str, str] = Field(min_length=1)  # task -> fine-tuned checkpoint folder
    tasks: Any  # inline mapping or a YAML file, as in recipes
    k: Any = Field(default_factory=lambda: [2])  # int, list of ints, or "a..b"
    subsets_per_k: Annotated[Integer, Field(ge=1)] | None = None  # a seeded sample per k
    methods: dict[str, MethodEntry] = Field(min_length=1)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    results: str = "results.jsonl"
    seed: Any = 0  # checked by recipe.check_seed, as `run --seed`
    keep_merged: bool = False


def _fields_at(parent: tuple) -> list[str]:
    """The valid keys under a location (methods.<label> and eval have their own)."""
    if parent[:1] == ("methods",):
        return list(MethodEntry.model_fields)
    if parent[:1] == ("eval",):
        return list(EvalSettings.model_fields)
    return list(SweepFile.model_fields)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: absolute paths, tasks in file order, one recipe template per method."""

    source: Path
    base_model: Path
    experts: dict[str, Path]  # in the tasks' order
    tasks: dict[str, TaskSpec]
    ks: list[int]
    methods: dict[str, dict]  # label -> recipe fields (merge_method, parameters, dtype, ...)
    eval: EvalSettings
    results: Path
    seed: int = 0
    keep_merged: bool = False
    subsets_per_k: int | None = None

    def cells(self) -> list[tuple[str, tuple[str, ...]]]:
        """(label, subset) for every k, every subset (itertools.combinations order), every method."""
        return [(label, s) for s in self.subsets() for label in self.methods]

    def subsets(self) -> list[tuple[str, ...]]:
        """Every k-subset in itertools.combinations order, or a seeded sample of `subsets_per_k`
        of them (kept in that order; the same for a given seed, k and task list)."""
        names = list(self.tasks)
        out = []
        for k in self.ks:
            combos = list(itertools.combinations(names, k))
            n = self.subsets_per_k
            if n is not None and n < len(combos):
                keep = random.Random(f"{self.seed}:{k}:{','.join(names)}").sample(
                    range(len(combos)), n
                )
                combos = [combos[i] for i in sorted(keep)]
            out += combos
        return out


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file. Raises UserError naming the file and the field at fault."""
    path = Path(path)
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file must be a YAML mapping (base_model, experts, ...)")
    return sweep_from_dict(raw, path)


def sweep_from_dict(raw: dict, source: Path) -> SweepConfig:
    """Validate a sweep mapping; relative paths resolve against `source`'s folder."""
    source = Path(source)
    try:
        f = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {pydantic_message(e, _fields_at)}") from None
    folder = source.parent
    check_seed(f.seed, f"{source}: seed")
    tasks = load_tasks(f.tasks, folder, str(source))
    if not tasks:
        raise UserError(f"{source}: tasks: no tasks defined")
    try:
        ks = parse_k(f.k, len(tasks))
    except ValueError as e:
        raise UserError(f"{source}: k: {e}") from None
    base = _existing(folder, f.base_model, source, "base_model")
    experts = _experts(f.experts, tasks, folder, source)
    for t, spec in tasks.items():
        check_task(t, spec, f.eval.split)  # labelled rows exist and render, before any merge
    cfg = SweepConfig(
        source=source,
        base_model=base,
        experts=experts,
        tasks=tasks,
        ks=ks,
        methods={label: m.model_dump(exclude_none=True) for label, m in f.methods.items()},
        eval=f.eval,
        results=(folder / expand_path(f.results, f"{source}: results")).resolve(),
        seed=f.seed,
        keep_merged=f.keep_merged,
        subsets_per_k=f.subsets_per_k,
    )
    for label, fields in cfg.methods.items():
        if not LABEL.match(label):
            raise UserError(
                f"{source}: methods.{label}: a label names a folder; use letters, digits, _ . -"
            )
        # Build the first subset's recipe for each k: a bad method, parameter or arity
        # (slerp takes two models) is reported now, not after hours of other cells.
        for k in ks:
            build_recipe(cfg, label, tuple(tasks)[:k])
        if METHODS[fields["merge_method"]].optimized:
            for t, spec in tasks.items():
                check_task(t, spec, "validation")  # the unlabelled inputs Gamma is learned on
    return cfg


def check_checkpoints(cfg: SweepConfig) -> None:
    """Base and experts fit together (architecture, tensor names, shapes); headers only."""
    base = open_model(str(cfg.base_model), f"{cfg.source}: base_model")
    experts = [
        open_model(str(p), f"{cfg.source}: experts.{t}", base) for t, p in cfg.experts.items()
    ]
    check_compatible(base, experts)


def parse_k(value: Any, n_tasks: int) -> list[int]:
    """`2`, `[2, 3]` or `"2..5"` -> sorted distinct subset sizes, each in [1, n_tasks]."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, a list of integers or 'a..b', got {value!r}")
    if isinstance(value, int):
        ks = [value]
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"'{value}' is not a range; write e.g. '2..5' (both ends included)")
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise ValueError(f"'{value}' is empty; the first end must be <= the second")
        ks = list(range(lo, hi + 1))
    elif isinstance(value, list) and value and all(type(x) is int for x in value):
        ks = value
    else:
        raise ValueError(f"expected an integer, a list of integers or 'a..b', got {value!r}")
    for k in ks:
        if not 1 <= k <= n_tasks:
            raise ValueError(
                f"{k} is out of range; there are {n_tasks} tasks, so k must be in [1, {n_tasks}]"
            )
    return sorted(set(ks))


def build_recipe(cfg: SweepConfig, label: str, subset: tuple[str, ...]) -> Recipe:
    """The recipe of one cell: the subset's experts (with `task:`) and tasks, the method's fields,
    the base for methods that read theta0. Errors name the sweep file and methods.<label>."""
    method = METHODS.get(cfg.methods[label]["merge_method"])  # unknown: recipe_from_dict says so
    raw = {
        **cfg.methods[label],
        # linear reads no theta0; given a base_model it would average the base in as one more
        # model (mergekit), but the paper's "model averaging" is the mean of the experts.
        **({"base_model": str(cfg.base_model)} if not method or method.uses_base else {}),
        "models": [{"model": str(cfg.experts[t]), "task": t} for t in subset],
        "tasks": {t: cfg.tasks[t].model_dump(mode="json", exclude_none=True) for t in subset},
    }
    try:
        return recipe_from_dict(raw, cfg.source)
    except UserError as e:
        msg = str(e).removeprefix(f"{cfg.source}: ")
        at = f" (subset {'+'.join(subset)})" if msg.startswith("models") else ""
        raise UserError(f"{cfg.source}: methods.{label}: {msg}{at}") from None


# learned-merge parameters newer than sweeps
_ADDED_LATER = (
    "base_method",
    "coefficients",
    "seed",
    "holdout",
    "patience",
    "min_delta",
    "max_epochs",
)


def method_key(recipe: Recipe) -> str:
    """A hash of what the method computes: its name, dtypes and parameters with defaults filled
    in, so `lambda: 1` and `lambda: 1.0` (or an explicit default) name the same cells."""
    spec = METHODS[recipe.merge_method]
    if spec.optimized:
        params = optimize_params(recipe).model_dump(mode="json")
        # Where the task vectors live changes memory, not Gamma; parameters added later name the
        # same cells as before while at their defaults. Both stay out, so older results files
        # keep their cells.
        params.pop("task_vectors", None)
        for k in _ADDED_LATER:
            if params.get(k) == OPTIMIZE_DEFAULTS[k]:
                params.pop(k)
    else:
        params = {**spec.global_params, **recipe.model_dump(mode="json")["parameters"]}
        # switches hash as the numbers they were before they became booleans: old results
        # files keep their cells, and `normalize: true` and `normalize: 1` name the same ones
        params = {k: float(v) if isinstance(v, bool) else v for k, v in params.items()}
    fields = {
        "merge_method": recipe.merge_method,
        "parameters": params,
        "dtype": recipe.dtype,
        "out_dtype": recipe.out_dtype,
    }
    return hash_json(fields)[:16]


def _experts(
    given: dict[str, str], tasks: dict[str, TaskSpec], folder: Path, source: Path
) -> dict[str, Path]:
    """One existing expert folder per task, in the tasks' order; no expert without a task."""
    for t in given:
        if t not in tasks:
            raise UserError(
                f"{source}: experts.{t}: no task '{t}' under tasks{suggest(t, tasks)}; "
                f"tasks: {', '.join(tasks)}"
            )
    missing = [t for t in tasks if t not in given]
    if missing:
        raise UserError(
            f"{source}: experts: no expert for task '{missing[0]}'; each task needs the "
            "checkpoint fine-tuned on it (or remove the task)"
        )
    return {t: _existing(folder, given[t], source, f"experts.{t}") for t in tasks}


def _existing(folder: Path, ref: str, source: Path, field: str) -> Path:
    p = Path(expand_path(ref, f"{source}: {field}"))
    p = p if p.is_absolute() else folder / p
    if not p.is_dir():
        raise UserError(
            f"{source}: {field}: folder not found: {p} (sweeps need local checkpoint folders; "
            "paths are relative to the sweep file)"
        )
    return p.resolve()
