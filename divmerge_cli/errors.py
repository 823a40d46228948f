from typing import Annotated

from pydantic import BeforeValidator


class UserError(Exception):
    """Bad input from the user. The CLI prints it on one line and exits with code 2.

    The message names the file, field or tensor at fault and what would be valid.
    """


class GateFailed(Exception):
    """A quality gate failed after every output was written. The CLI prints one line per failed
    gate and exits with code 3."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _not_bool(v: object) -> object:
    if isinstance(v, bool):  # pydantic's lax mode reads true as 1: `density: true` meant 1.0
        raise ValueError("true/false is not a number; give a number")
    return v


# Numbers in user files: what pydantic's lax mode reads as numbers (1, 0.5, "0.5"), except a
# boolean. Switches (normalize, rescale) take true/false; no number field does.
Number = Annotated[float, BeforeValidator(_not_bool)]
Integer = Annotated[int, BeforeValidator(_not_bool)]


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest valid choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def misspelling_of(word: str, choices) -> str:
    """' (did you mean X?)' only when `word` is X misspelt: the same once case, '-' and ' ' are
    read as '_', or one edit away (two for names of 8 characters or more; an edit is an insertion,
    a deletion, a substitution or a swap of neighbours). A name that merely looks like X, as a
    different algorithm's name can (della_linear, dare_linear), gets no suggestion."""

    def norm(s: str) -> str:
        return s.lower().replace("-", "_").replace(" ", "_")

    w = norm(word)
    for c in choices:
        if norm(c) == w or _edits(w, norm(c)) <= (2 if len(c) >= 8 else 1):
            return f" (did you mean '{c}'?)"
    return ""


def _edits(a: str, b: str) -> int:
    """Edit distance with swaps of neighbours (optimal string alignment)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def resolve(path, what: str):
    """Path(path).resolve(), with a symlink loop reported as the user's error naming `what`."""
    from pathlib import Path

    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise UserError(f"{what} {path}: cannot be resolved ({e})") from None


def read_yaml(path, what: str, several: str = ""):
    """A user's YAML file, parsed; a missing file, a syntax error, text that is not UTF-8,
    several documents (`several` says what those would mean) or aliases that expand to a huge
    document (an "alias bomb") are a UserError naming it."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if "another document" in str(getattr(e, "problem", "")):  # a --- after the first one
            raise UserError(
                f"{path}: a {what} file is one YAML document, this one holds several (the second "
                f"starts at line {mark.line + 1})" + (f"; {several}" if several else "")
            ) from None
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    # Aliases are shared, not copied, when parsed; validating or writing the data back copies
    # them. A file written out by hand is about as large as its text, so a bound well above that
    # refuses only documents whose aliases multiply (or refer to themselves).
    limit = 10 * len(text) + 1_000_000
    if expanded_size(data, limit) > limit:
        raise UserError(
            f"{path}: its aliases (*name) expand to more than {limit:,} values and characters; "
            "write the values out instead of nesting aliases"
        )
    return data


# Parts of a pydantic error location that name a branch of a union, not a field: dropped so that
# `models[0].parameters.weight` reads as the user wrote it.
_UNION_TAGS = {"float", "int", "str", "bool", "list[float]", "list[FilterValue]", "dict[str,any]"}


def _is_union_tag(part) -> bool:
    import re

    return isinstance(part, str) and (
        bool(re.fullmatch(r"[\w-]+\[.*\]", part))
        or part in _UNION_TAGS
        or part.startswith("function-")
    )


def field_path(loc: tuple) -> str:
    """`models[0].parameters.weight` from ("models", 0, "parameters", "weight"); a key that would
    not read as one (a line break, brackets) is quoted: `['a\\nb']`."""
    import re

    out = ""
    for part in loc:
        if isinstance(part, int) or not re.fullmatch(r"[\w.-]+", str(part)):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def pydantic_message(err, fields_at, unsupported: dict[str, str] | None = None) -> str:
    """`field: what is wrong` for the first error of a pydantic ValidationError.

    `fields_at(parent_loc)` lists the valid keys under a location, for an unknown key's spelling
    hint; `unsupported` maps top-level keys we recognise but refuse to the advice to give.
    """
    errors = err.errors()
    # an unknown key explains a "missing" one next to it (modle vs model): report it first
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    # the first part is a field, and an unknown key is the last, however the user spelled them
    head, inner, tail = e["loc"][:1], list(e["loc"][1:]), []
    if e["type"] == "extra_forbidden" and inner:
        tail = [inner.pop()]
    loc = (*head, *(p for p in inner if not _is_union_tag(p)), *tail)
    where = field_path(loc)
    if e["type"] == "extra_forbidden":
        key, parent = str(loc[-1]), loc[:-1]
        if not parent and key in (unsupported or {}):
            return f"{where}: not supported by divmerge yet ({unsupported[key]})"
        fields = fields_at(parent)
        return f"{where}: unknown key{suggest(key, fields)}; valid keys: {', '.join(fields)}"
    if e["type"] == "missing":
        return f"{where}: required field is missing"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and e["type"] != "value_error":
        return f"{where}: {msg} (got {e['input']!r})"
    return f"{where}: {msg}"


def expanded_size(data, limit: int) -> int:
    """How big `data` is with every alias expanded: values plus string characters. A shared
    (aliased) container is sized once and counted at each use, so the cost is that of the file,
    not of its expansion; data that contains itself counts as larger than `limit`."""

    def own(x) -> int:
        return 1 + (len(x) if isinstance(x, str | bytes) else 0)

    def children(x) -> list:
        return [*x.keys(), *x.values()] if isinstance(x, dict) else list(x)

    sizes: dict[int, int] = {}  # id of a finished container -> its expanded size
    started: set[int] = set()  # containers whose children are being sized
    stack: list[tuple[object, bool]] = [(data, False)]
    while stack:
        x, finish = stack.pop()
        if not isinstance(x, dict | list | tuple | set) or (not finish and id(x) in sizes):
            continue
        if finish:
            kids = children(x)
            total = 1 + sum(sizes[id(c)] if id(c) in sizes else own(c) for c in kids)
            sizes[id(x)] = total
            started.discard(id(x))
            if total > limit:
                return total
        elif id(x) in started:  # x is inside itself: its expansion never ends
            return limit + 1
        else:
            started.add(id(x))
            stack.append((x, True))
            stack.extend((c, False) for c in children(x))
    return sizes.get(id(data), own(data))
