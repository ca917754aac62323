"""The package's shape: no import cycle between vitbench modules (imports inside functions included), no function
longer than 80 lines, no private name imported from another module."""

import ast
from pathlib import Path

import vitbench

ROOT = Path(vitbench.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(module imported, names imported) of every vitbench import in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, ()) if sub in modules else (target, (alias.name,))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path, modules)
                    if t in modules and t != name and not name.startswith(t + ".")}
             for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    assert not cycles


def test_functions_are_short():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in ROOT.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_from_other_modules():
    modules = _modules()
    used = []
    for name, path in modules.items():
        imported = list(_imports(name, path, modules))
        used += [f"{path.name}: {target}.{n}" for target, names in imported if target.startswith("vitbench")
                 for n in names if _private(n) and target != name]
        aliases = {node.asname or node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.alias)
                   and any(t.endswith("." + node.name) or t == node.name for t, _ in imported if t in modules)}
        used += [f"{path.name}: {node.value.id}.{node.attr}" for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                 and node.value.id in aliases and _private(node.attr)]
    assert not used
