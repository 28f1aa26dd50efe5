"""The layering docs/architecture.md describes, checked on the source: no import cycles (function-level and
typing-only imports included) and no module using another module's private names.

`python tests/test_architecture.py` prints the figures: cycles, private-name uses, the longest functions.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vmm", "pytest_boxlite")

# Private names of third-party code the project uses on purpose, each documented where it is used and pinned in
# pyproject.toml to a tested version range.
ALLOWED_FOREIGN = {
    ("pytest_boxlite.relay", "_register"),
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def modules() -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            found[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return found


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports(module: Module, known: dict[str, Module]) -> set[str]:
    """The project modules `module` imports anywhere in its body (the deepest module each import names)."""
    targets = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module.name:
                targets.add(name)
    return targets


def cycles(known: dict[str, Module]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    graph = {name: imports(module, known) for name, module in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in sorted(graph[name]):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_names(module: Module) -> set[str]:
    """Private names a module defines: functions, classes, assignments, attributes set on anything."""
    names = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
    return {name for name in names if _private(name)}


def private_uses(known: dict[str, Module]) -> list[tuple[str, int, str]]:
    """(module, line, name) for each use of a private name the module does not define itself: an attribute
    `x._name` on anything but self/cls, or `from m import _name` of another project module."""
    defined = {name: _own_names(module) for name, module in known.items()}
    uses = []
    for name, module in known.items():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node) in known:
                uses += [(name, node.lineno, alias.name) for alias in node.names if _private(alias.name)]
            elif (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined[name]
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                  and (name, node.attr) not in ALLOWED_FOREIGN):
                uses.append((name, node.lineno, node.attr))
    return sorted(uses)


def longest_functions(known: dict[str, Module], count: int = 10) -> list[tuple[int, str]]:
    lengths = []
    for name, module in known.items():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(lengths, reverse=True)[:count]


def test_no_import_cycles() -> None:
    assert cycles(modules()) == []


def test_no_module_uses_another_modules_private_names() -> None:
    assert private_uses(modules()) == []


if __name__ == "__main__":
    known = modules()
    found = cycles(known)
    print(f"import cycles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
    uses = private_uses(known)
    print(f"uses of another module's private names: {len(uses)}")
    for module, line, attr in uses:
        print(f"  {module}:{line} {attr}")
    print("longest functions (lines):")
    for length, where in longest_functions(known):
        print(f"  {length:4d} {where}")
    sys.exit(1 if found or uses else 0)
