class UserError(Exception):
    """Bad input from the user. The CLI prints it on one line and exits with code 2.

    The message names the file, field or tensor at fault and what would be valid.
    """


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest valid choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_yaml(path, what: str):
    """A user's YAML file, parsed; a missing file or a syntax error is a UserError naming it."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', e)})") from None


# Parts of a pydantic error location that name a branch of a union, not a field: dropped so that
# `models[0].parameters.weight` reads as the user wrote it.
_UNION_TAGS = {"float", "int", "str", "bool", "list[float]", "list[FilterValue]", "dict[str,any]"}


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in _UNION_TAGS or part.startswith("function-")
    )


def field_path(loc: tuple) -> str:
    """`models[0].parameters.weight` from ("models", 0, "parameters", "weight")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def pydantic_message(err, fields_at, unsupported: dict[str, str] | None = None) -> str:
    """`field: what is wrong` for the first error of a pydantic ValidationError.

    `fields_at(parent_loc)` lists the valid keys under a location, for an unknown key's spelling
    hint; `unsupported` maps top-level keys we recognise but refuse to the advice to give.
    """
    errors = err.errors()
    # an unknown key explains a "missing" one next to it (modle vs model): report it first
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in e["loc"] if not _is_union_tag(p))
    where = field_path(loc)
    if e["type"] == "extra_forbidden":
        key, parent = str(loc[-1]), loc[:-1]
        if not parent and key in (unsupported or {}):
            return f"{where}: not supported by divmerge; {unsupported[key]}"
        fields = fields_at(parent)
        return f"{where}: unknown key{suggest(key, fields)}; valid keys: {', '.join(fields)}"
    if e["type"] == "missing":
        return f"{where}: required field is missing"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and e["type"] != "value_error":
        return f"{where}: {msg} (got {e['input']!r})"
    return f"{where}: {msg}"
