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
