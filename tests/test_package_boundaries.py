"""The dependency direction is one way (`predictors`, `data` → `l2c`) and module imports form no cycle.

The graph is read from the source with `ast` (no import runs): an edge a → b for every `import b` / `from b import`
in module a, relative imports resolved. Imports under `if TYPE_CHECKING:` are left out (they never run); imports
inside functions count for the direction check (they still make the library depend on the application) but not
for cycles (they run after every module has loaded, which is why they are used to break one).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("l2c", "predictors", "data")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import that can run, relative names resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                found.append((name, top))
                found.extend((f"{name}.{alias.name}", top) for alias in child.names)  # `from pkg import module`
            inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, top and not inner)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


def import_graph() -> dict[str, list[tuple[str, bool]]]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = [(target, top) for target, top in _imports(path) if target in modules and target != name]
    return graph


def test_library_never_imports_the_application():
    upward = [
        f"{module} imports {target}"
        for module, edges in import_graph().items()
        if module.split(".")[0] == "l2c"
        for target, _ in edges
        if target.split(".")[0] in ("predictors", "data")
    ]
    assert upward == []


def test_module_level_imports_form_no_cycle():
    graph = {module: sorted({t for t, top in edges if top}) for module, edges in import_graph().items()}
    done: set[str] = set()
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in graph.get(module, []):
            walk(target, [*path, module])
        done.add(module)

    for module in graph:
        walk(module, [])
    assert cycles == []


def test_the_graph_sees_real_edges():
    """The reader must find the imports that are there, or the two checks above prove nothing."""
    graph = import_graph()
    assert ("l2c.runtime", True) in [(t, top) for t, top in graph["l2c.policies.base"]]
    assert any(t.startswith("l2c") for t, _ in graph["predictors.frozen_teacher"])
