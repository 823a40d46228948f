"""Task definitions: data files, prompt template, target field, metric."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Integer, UserError, pydantic_message, read_yaml, resolve
from .hashing import SHA256, hash_file

SPLITS = ("validation", "test")
ROW_FORMATS = (".jsonl", ".csv")


class TaskSpec(BaseModel):
    """One task of a recipe's `tasks:` mapping. Paths are resolved against the recipe's folder."""

    model_config = ConfigDict(extra="forbid")

    validation: str | None = None  # unlabelled rows are enough for merging
    test: str | None = None  # labelled rows, for eval
    prompt: str = Field(
        ..., description='template with {field} placeholders, e.g. "Review: {text}"'
    )
    target: str | None = None  # field holding the reference answer
    metric: Literal["accuracy", "rouge1"] = "accuracy"
    max_new_tokens: Integer = Field(16, ge=1, le=4096)
    # content hash per split file, checked before the rows are used (divmerge writes these into
    # the output's divmerge_recipe.yaml)
    sha256: dict[Literal["validation", "test"], Annotated[str, Field(pattern=SHA256)]] | None = None


# ---------------------------------------------------------------------------------------------
# Paths

_VAR = re.compile(r"\$(?:(\w+)|\{(\w+)\})")
ZOO_VAR = "DIVMERGE_ZOO"  # recipes/ name the demo zoo's files under it


def expand_path(ref: str, where: str) -> str:
    """`~` and $VAR / ${VAR} expanded in a path; an unset variable is an error naming it rather
    than a path that does not exist."""
    for m in _VAR.finditer(ref):
        name = m.group(1) or m.group(2)
        if name not in os.environ:
            hint = (
                "; `divmerge demo --zoo-only` builds the demo zoo and prints the line to export"
                if name == ZOO_VAR
                else ""
            )
            raise UserError(f"{where}: {ref}: the environment variable {name} is not set{hint}")
    return os.path.expanduser(os.path.expandvars(ref))


# ---------------------------------------------------------------------------------------------
# Loading the `tasks:` mapping


def load_tasks(raw: dict | str | None, base_dir: Path, where: str) -> dict[str, TaskSpec]:
    """Validate a recipe's `tasks:` value: an inline mapping, or a YAML file path (relative to base_dir).

    `where` names the file holding `raw` (e.g. "recipe.yaml") for error messages. The
    `validation`/`test` paths are made absolute against the folder of the file that names them.
    """
    if raw is None:
        return {}
    prefix = "tasks."
    if isinstance(raw, str):
        path = tasks_path(raw, base_dir, where)
        if not path.is_file():
            raise UserError(f"{where}: tasks: file not found: {path}")
        raw = read_yaml(path, "tasks")  # as recipes: syntax, encoding and size errors name it
        where, base_dir, prefix = str(path), path.parent, ""
        if raw is None:
            raise UserError(
                f"{where}: the file is empty; expected a mapping of task name -> fields"
            )
    if not isinstance(raw, dict):
        got, at = type(raw).__name__, prefix.rstrip(".") or "top level"
        raise UserError(f"{where}: {at}: expected a mapping of task name -> fields, got {got}")
    return {
        str(name): _task_spec(str(name), fields, Path(base_dir), where, prefix)
        for name, fields in raw.items()
    }


def tasks_path(raw: str, base_dir: Path, where: str) -> Path:
    """The tasks file a recipe's `tasks:` string names (relative to base_dir)."""
    path = Path(expand_path(raw, f"{where}: tasks"))
    return path if path.is_absolute() else Path(base_dir) / path


def task_files(raw: dict | str | None, base_dir: Path, where: str) -> list[Path]:
    """Every file a `tasks:` value reads: the tasks file it names, and each task's data files."""
    specs = load_tasks(raw, base_dir, where)
    files = [tasks_path(raw, base_dir, where)] if isinstance(raw, str) else []
    return files + [Path(p) for s in specs.values() for p in (s.validation, s.test) if p]


def _task_spec(name: str, fields: object, base_dir: Path, where: str, prefix: str) -> TaskSpec:
    loc = f"{where}: {prefix}{name}"
    if not name.strip():
        raise UserError(f"{where}: {prefix}: a task name is empty")
    if not isinstance(fields, dict):
        raise UserError(f"{loc}: expected a mapping of fields ({', '.join(TaskSpec.model_fields)})")
    try:
        spec = TaskSpec.model_validate(fields)
    except ValidationError as e:
        raise UserError(
            f"{loc}.{pydantic_message(e, lambda _: list(TaskSpec.model_fields))}"
        ) from None
    _check_template(spec.prompt, f"{loc}.prompt")
    # Paths are relative to the file that names them, so a recipe folder can be moved as a whole.
    updates = {
        split: str(resolve(base_dir / expand_path(p, f"{loc}.{split}"), f"{loc}.{split}:"))
        for split in SPLITS
        if (p := getattr(spec, split)) is not None
    }
    return spec.model_copy(update=updates)


def _check_template(template: str, loc: str) -> None:
    """Templates are str.format_map strings with named fields only; literal braces are {{ }}."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(
            f"{loc}: bad template ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    for f in names:
        if f == "" or f[0].isdigit():
            raise UserError(f"{loc}: placeholders must name a field, e.g. {{text}}; got {{{f}}}")


# ---------------------------------------------------------------------------------------------
# Rows


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; values are strings (JSON non-strings as written in JSON)."""
    suffix = path.suffix.lower()
    if suffix not in ROW_FORMATS:
        raise UserError(
            f"{path}: unknown data format '{suffix}'; use one of {', '.join(ROW_FORMATS)}"
        )
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    try:
        yield from _iter_jsonl(path) if suffix == ".jsonl" else _iter_csv(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                got = type(obj).__name__
                raise UserError(f"{path}:{i}: each line must be a JSON object, got {got}")
            yield i, {str(k): _as_str(v) for k, v in obj.items()}


def _as_str(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or None in row.values():
                raise UserError(
                    f"{path}:{reader.line_num}: row has {'more' if None in row else 'fewer'} "
                    f"fields than the header ({', '.join(reader.fieldnames or [])})"
                )
            yield reader.line_num, dict(row)


def load_rows(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """All rows of a .jsonl or .csv file, or a seeded random subset of `limit` rows.

    The subset keeps file order, and a larger limit with the same seed contains a smaller one
    (task-level and layer-level runs with 200 / 400 samples share their first draws).
    """
    path = Path(path)
    rows = [row for _, row in _iter_rows(path)]
    if not rows:
        raise UserError(f"{path}: no rows (empty data file)")
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise UserError(f"{path}: the number of samples must be >= 1, got {limit}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


class _Row(dict):
    def __missing__(self, key: str) -> str:
        raise _MissingField(key)


class _MissingField(KeyError):
    pass


def render_prompt(task_name: str, spec: TaskSpec, row: dict) -> str:
    """The task's prompt for one row (str.format_map: "{text}" is the row's `text` field)."""
    try:
        return spec.prompt.format_map(_Row(row))
    except _MissingField as e:
        fields = ", ".join(sorted(row)) or "(none)"
        raise UserError(
            f"task '{task_name}': prompt placeholder {{{e.args[0]}}} is not a field of the row; "
            f"fields: {fields}"
        ) from None
    except (ValueError, IndexError, AttributeError) as e:
        raise UserError(f"task '{task_name}': cannot render the prompt ({e})") from None


def check_task(name: str, spec: TaskSpec, split: Literal["validation", "test"]) -> None:
    """Cheap checks before heavy work: the split's file exists, has rows, and every row renders.

    For the test split, every row must also hold the `target` field.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = getattr(spec, split)
    if path is None:
        raise UserError(f"task '{name}': no `{split}` file given (tasks.{name}.{split})")
    if split == "test" and spec.target is None:
        raise UserError(
            f"task '{name}': `target` (the field holding the answer) is needed for eval"
        )
    want = (spec.sha256 or {}).get(split)
    if want and Path(path).is_file() and (got := hash_file(path)) != want:
        raise UserError(
            f"task '{name}': {path} has sha256 {got[:16]}..., tasks.{name}.sha256.{split} expects "
            f"{want[:16]}... (the file changed since the recipe was written; remove the hash to "
            "use it as it is)"
        )
    n = 0
    for line, row in _iter_rows(Path(path)):
        n += 1
        try:
            render_prompt(name, spec, row)
        except UserError as e:
            raise UserError(f"{path}:{line}: {e}") from None
        if split == "test" and spec.target not in row:
            fields = ", ".join(sorted(row))
            raise UserError(
                f"{path}:{line}: task '{name}': no target field '{spec.target}'; fields: {fields}"
            )
    if n == 0:
        raise UserError(f"{path}: no rows (empty data file)")
