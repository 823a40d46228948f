"""The package's import graph, read with `ast` (function-level and TYPE_CHECKING imports included):
no cycle among divmerge_cli's modules, and no module imports another's private names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "divmerge_cli"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.with_suffix("").relative_to(root.parent).parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(root: Path = PACKAGE) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """module -> {imported package module: [(line, name imported from it)]}, every import
    statement anywhere in the module (inside functions and `if TYPE_CHECKING:` too)."""
    mods = _modules(root)
    graph: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, list[tuple[int, str]]] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(up + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                pairs = [
                    (f"{source}.{a.name}", "") if f"{source}.{a.name}" in mods else (source, a.name)
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                pairs = [(a.name, "") for a in node.names]
            else:
                continue
            for target, imported in pairs:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, []).append((node.lineno, imported))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _describe(graph: dict, cycle: list[str]) -> str:
    return "; ".join(
        f"{a} -> {b} (line {graph[a][b][0][0]})" for a in cycle for b in graph[a] if b in cycle
    )


def test_no_import_cycle_among_the_package_modules():
    graph = imports()
    assert {"divmerge_cli.cli", "divmerge_cli.merge", "divmerge_cli.lora"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(graph, c) for c in found)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{m} imports {name} from {source} (line {line})"
        for m, edges in imports().items()
        for source, names in edges.items()
        for line, name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, private


def test_the_checker_sees_function_level_and_type_checking_imports(tmp_path):
    """A cycle hidden in a function body or under TYPE_CHECKING is still a cycle, and a private
    name imported from a sibling is seen."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from .c import _hidden\n    return _hidden\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n_hidden = 1\n"
    )
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = imports(pkg)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph["pkg.b"]["pkg.c"] == [(2, "_hidden")]
    assert graph["pkg.d"] == {"pkg.a": [(1, "")]}
    (pkg / "c.py").write_text("_hidden = 1\n")
    assert cycles(imports(pkg)) == []


def readme_floors(readme: Path = PACKAGE.parent / "README.md") -> dict[str, int]:
    """module -> floor, from README's "How the code is laid out" (`floor N  what:  modules`)."""
    floors, floor = {}, None
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^ {4}floor (\d+) +[^:]+: +(.+)$", line)
        more = re.match(r"^ {20,}(\S.*)$", line) if floor is not None else None
        if not (m or more):
            floor = None
            continue
        floor = int(m.group(1)) if m else floor
        for module in (m or more).group(m.lastindex if m else 1).split():
            assert module not in floors, f"README lists {module} on two floors"
            floors[module] = floor
    return floors


def _short(module: str) -> str:
    """divmerge_cli.sweep.run -> sweep (a subpackage is one entry), divmerge_cli.merge -> merge."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_readme_floors_list_every_module_and_every_import_points_down():
    floors = readme_floors()
    graph = imports()
    modules = {_short(m) for m in graph} - {""}
    assert set(floors) == modules, (
        f"README floors miss {sorted(modules - set(floors))}, "
        f"list unknown {sorted(set(floors) - modules)}"
    )
    up = [
        f"{m} (floor {floors[_short(m)]}) imports {t} (floor {floors[_short(t)]}, line {lines[0][0]})"
        for m, edges in graph.items()
        if _short(m)
        for t, lines in edges.items()
        if _short(t) and floors[_short(t)] > floors[_short(m)]
    ]
    assert not up, up


def test_a_data_free_merge_loads_neither_transformers_nor_the_scorers():
    """Importing what `run` needs for a data-free merge stays light: transformers' models, the
    eval scorers (rouge, nltk) and DTensor cost seconds per merge (mergekit imports in ~5 s)."""
    code = (
        "import sys, divmerge_cli.cli, divmerge_cli.merge, divmerge_cli.recipe;"
        "print(sorted(m for m in ('transformers', 'rouge_score', 'nltk', 'peft',"
        " 'torch.distributed.tensor', 'divmerge_cli.hf', 'divmerge_cli.evaluate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_without_eval_imports_no_scorer(tmp_path, toy):
    """`divmerge run` of a data-free recipe, in a fresh process: the merge is written and
    neither transformers' models nor the eval scorers were imported on the way."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {toy / 'base'}\n"
        f"models:\n  - model: {toy / 'sent'}\n  - model: {toy / 'rev'}\n"
    )
    code = (
        "import sys, runpy; sys.argv = ['divmerge', 'run', sys.argv[1], '-o', sys.argv[2], '-q'];"
        "import divmerge_cli.cli as c\ntry:\n    c.command()\nexcept SystemExit as e:\n    assert not e.code, e\n"
        "print(sorted(m for m in ('transformers', 'rouge_score', 'nltk', 'divmerge_cli.evaluate',"
        " 'divmerge_cli.report', 'divmerge_cli.hf') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(recipe), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert out.stdout.strip().splitlines()[-1] == "[]"
