"""A seeded fuzz test of the recipe and tasks loaders (issue 11): random mutations of the shipped
recipes and tasks file (types, deletions, renames, huge and non-finite numbers, aliases, bytes),
each run through `divmerge validate` (and, for some data-free ones, `run`) in-process. Every case
must exit 0 or 2, say an error in one line (after any one-line warnings), show no traceback, write
nothing outside its temporary folder, and finish within a time bound."""

from __future__ import annotations

import copy
import random
import signal
import time
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SOURCES = sorted(p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("sweep"))
CASES = 400
SEED = 11
SECONDS = 20  # per case; a case takes about 0.05 s on an idle core

VALUES = [
    None, True, False, 0, -1, 1, 3, 2**70, -(2**70), 10**400 // 10**300, 1e308, -1e308, 1e-320,
    float("nan"), float("inf"), float("-inf"), "", "x", "uniform", "full", "base", "union", "js",
    "task", "float64", "/", "..", "../../..", "$HOME", "$NOPE_UNSET/x", "${DIVMERGE_ZOO}", "~",
    "a\nb", "[/x]", "[red]", "é\u202e", "\t", "{text}", "{}", "{0}", "{{", "0" * 64, [], [1, 2],
    [float("nan")], {}, {"filter": "self_attn", "value": 0.5}, [{"filter": 3, "value": "x"}],
    {"validation": "nope.jsonl", "prompt": "{x}"},
]  # fmt: skip
KEYS = [
    "merge_method", "base_model", "base_model_sha256", "models", "model", "parameters", "task",
    "tasks", "sha256", "dtype", "out_dtype", "tokenizer_source", "slices", "tokenizer", "weight",
    "density", "lambda", "t", "init", "lr", "epochs", "top_k", "samples", "batch_size",
    "validation", "test", "prompt", "target", "metric", "max_new_tokens", "source", "_warnings",
    "[/b]", "a\nb", 7, None, True,
]  # fmt: skip
BYTES = [b"\xff", b"\xfe\xff", b"\x00", b"\t", b"{", b"}", b"[", b"]", b":", b"&a ", b"*a",
         b"!!python/object:os.system ", b"|", b">", b"%", b"@", b"`", b"'", b'"', b"\n", b"-",
         b"#", b"? ", b"<<: ", b"\r", b"\xe2\x80\xae", b"&x [1, 2]\n", b"!!binary "]  # fmt: skip


def _paths(obj, path=(), seen=None):
    """Every place in a document; an object met twice (an alias, maybe a cycle) is entered once."""
    seen = set() if seen is None else seen
    yield path
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.items())
    else:
        items = list(enumerate(obj)) if isinstance(obj, list) else []
    for k, v in items:
        yield from _paths(v, (*path, k), seen)


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _mutate(rng: random.Random, doc):
    """One structural mutation of a parsed YAML document (returns the new document)."""
    paths = list(_paths(doc))
    path = rng.choice(paths)
    kind = rng.choice(["value", "value", "number", "delete", "rename", "add", "alias", "wrap"])
    if kind in ("value", "number"):
        value = copy.deepcopy(rng.choice(VALUES if kind == "value" else VALUES[3:14]))
        if not path:
            return value
        _get(doc, path[:-1])[path[-1]] = value
    elif kind == "delete" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
    elif kind in ("rename", "add"):
        dicts = [p for p in paths if isinstance(_get(doc, p), dict)]
        if not dicts:
            return doc
        target = _get(doc, rng.choice(dicts))
        new = rng.choice(KEYS)
        if kind == "rename" and target:
            old = rng.choice(list(target))
            if isinstance(old, str) and len(old) > 2 and rng.random() < 0.5:
                i = rng.randrange(len(old))
                new = old[:i] + old[i + 1 :]  # a typo
            target[new] = target.pop(old)
        else:
            target[new] = copy.deepcopy(rng.choice(VALUES))
    elif kind == "alias" and len(paths) > 2:
        # the same object in two places: yaml.safe_dump writes an anchor and an alias
        src, dst = rng.sample(paths[1:], 2)
        if dst[: len(src)] != src and src[: len(dst)] != dst:
            _get(doc, dst[:-1])[dst[-1]] = _get(doc, src)
    elif kind == "wrap" and path:
        value = _get(doc, path)
        _get(doc, path[:-1])[path[-1]] = rng.choice([[value], {"value": value}, [value, value]])
    return doc


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    kind = rng.choice(["insert", "insert", "delete", "truncate", "duplicate"])
    if kind == "insert":
        return data[:i] + rng.choice(BYTES) + data[i:]
    if kind == "delete":
        return data[:i] + data[i + rng.randint(1, 20) :]
    if kind == "truncate":
        return data[:i]
    lines = data.splitlines(keepends=True)
    j = rng.randrange(len(lines))
    return b"".join(lines[: j + 1] + lines[j:])


def _case(rng: random.Random, folder: Path) -> tuple[list[str], Path]:
    """Write one mutated recipe (and maybe a mutated tasks file) into folder; return the command."""
    name = rng.choice(SOURCES)
    if name == "tasks.yaml":  # the tasks loader, through a recipe that names the mutated file
        target = folder / "tasks.yaml"
        recipe = yaml.safe_load((RECIPES / "adamerging.yaml").read_text())
        recipe["tasks"] = "tasks.yaml"
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    else:
        target = folder / "recipe.yaml"
    doc = yaml.safe_load((RECIPES / name).read_text())
    for _ in range(rng.randint(1, 3)):
        doc = _mutate(rng, doc)
    try:
        data = yaml.safe_dump(doc, sort_keys=False, allow_unicode=rng.random() < 0.5).encode()
    except yaml.YAMLError:
        data = b"merge_method: ties\n"
    if rng.random() < 0.35:
        data = _mutate_bytes(rng, data)
    target.write_bytes(data)
    cmd = ["validate", str(folder / "recipe.yaml")]
    if name != "tasks.yaml" and rng.random() < 0.1:
        cmd = ["run", str(folder / "recipe.yaml"), "-o", str(folder / "out")]
    return cmd, target


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


class _Slow(BaseException):  # not an Exception: main() must not turn it into an exit code
    pass


def _alarm(*_):
    raise _Slow


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX timers")
def test_mutated_recipes_and_tasks_exit_0_or_2_with_one_line(demo_root, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("DIVMERGE_ZOO", str(demo_root / "zoo"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a cache written by mistake lands here
    watched = [demo_root, RECIPES]
    before = [_tree(r) for r in watched]
    rng = random.Random(SEED)
    codes: dict[int, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(CASES):
            folder = tmp_path / f"case{i}"
            folder.mkdir()
            monkeypatch.chdir(folder)
            cmd, target = _case(rng, folder)
            written = {p.name for p in folder.iterdir()}
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, SECONDS)
            try:
                code, out, err = cli(*cmd)
            except _Slow:
                pytest.fail(f"case {i} took over {SECONDS} s: {target.read_bytes()[:2000]!r}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            took = time.perf_counter() - start
            what = f"case {i} ({' '.join(cmd[:1])}): {target.read_bytes()[:1500]!r}\n{err}"
            codes[code] = codes.get(code, 0) + 1
            assert code in (0, 2), what
            assert "Traceback" not in out + err, what
            # one line per message: warnings (ignored parameters), then at most one error
            lines = err.strip().splitlines()
            errors = [ln for ln in lines if not ln.startswith("warning: ")]
            assert errors == ([lines[-1]] if code == 2 else []), what
            assert code == 0 or lines[-1].startswith("error: "), what
            assert took < SECONDS, what
            after = {p.name for p in folder.iterdir()}
            assert after - written <= ({"out"} if code == 0 and cmd[0] == "run" else set()), what
    finally:
        signal.signal(signal.SIGALRM, old)
    assert [_tree(r) for r in watched] == before  # nothing written outside the case folders
    assert not (tmp_path / "home").exists()
    assert codes.get(0, 0) >= 10 and codes.get(2, 0) >= CASES // 2, codes  # both paths fuzzed
