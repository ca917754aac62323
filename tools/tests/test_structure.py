"""The shape of the project's source (vitbench and the three method packages), read with ``ast``: no import cycle
between modules (imports inside functions included), no function over 80 lines, no private name used from another
module, and every import inside a function says why it is deferred."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SOURCES = [ROOT / "shared" / "src", *sorted((ROOT / "packages").glob("*/src"))]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of every package's ``src``."""
    out = {}
    for src in SOURCES:
        for path in src.rglob("*.py"):
            parts = path.relative_to(src).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def imports(name: str) -> list[tuple[str, tuple[str, ...], ast.AST]]:
    """``(module, names taken from it, node)`` of every import of a project module in ``name``; ``from pkg import
    sub`` counts as importing the submodule ``pkg.sub``."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, (), node) if sub in MODULES else (target, (alias.name,), node))
        elif isinstance(node, ast.Import):
            out += [(alias.name, (), node) for alias in node.names]
    return [(t, names, node) for t, names, node in out if t in MODULES]


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` importing its own parent is no edge)."""
    return {name: {t for t, _, _ in imports(name) if t != name and not name.startswith(t + ".")} for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_package_is_read():
    assert {"vitbench", "ats", "lfvit", "liferegress", "ats.video", "ats.video.patch", "vitbench.cli"} <= set(MODULES)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_functions_are_at_most_80_lines():
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in TREES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_from_another_module():
    used = []
    for name, tree in TREES.items():
        found = imports(name)
        used += [f"{name}: {t}.{n}" for t, names, _ in found for n in names if private(n) and t != name]
        module_aliases = {alias.asname or alias.name.rpartition(".")[2] for t, names, node in found if not names
                          for alias in node.names if t.endswith(alias.name)}
        used += [f"{name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                 and node.value.id in module_aliases and private(node.attr)]
    assert used == []


def function_imports(name: str) -> list[tuple[int, str]]:
    """``(line, text)`` of the imports inside functions of module ``name``."""
    lines = MODULES[name].read_text().splitlines()
    return [(node.lineno, lines[node.lineno - 1].strip())
            for fn in ast.walk(TREES[name]) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]


def explained(lines: list[str], line: int) -> bool:
    """Whether the import on ``line`` (1-based) has a comment: its own, or one above its group of imports."""
    if "#" in lines[line - 1]:
        return True
    above = line - 2
    while above >= 0 and (not lines[above].strip() or lines[above].strip().startswith(("import ", "from "))):
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_inside_functions_say_why(name):
    lines = MODULES[name].read_text().splitlines()
    assert [f"{name}:{line} {text}" for line, text in function_imports(name) if not explained(lines, line)] == []
