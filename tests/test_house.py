"""The package reads as a house: no import circle between its modules, no folder of more than 25 modules, and
the library's own modules imported at the top of files (an import inside a function hides an arrow)."""
import ast
import pathlib

import pytest

import guided_swap

ROOT = pathlib.Path(guided_swap.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(module: str, node: ast.AST) -> list:
    """The library modules an import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
            if node.level else node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def arrows() -> dict:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for t in imported(module, node)}
    return graph


def test_no_import_circle():
    graph, state = arrows(), {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            pytest.fail("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_folder_holds_more_than_25_modules():
    for folder in {p.parent for p in MODULES.values()}:
        count = len(list(folder.glob("*.py")))
        assert count <= 25, f"{folder.relative_to(ROOT.parent)} holds {count} modules"


def test_the_library_s_own_modules_are_imported_at_the_top_of_files():
    inside = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{module}: {ast.unparse(node)}" for node in ast.walk(function)
                           if isinstance(node, (ast.Import, ast.ImportFrom)) and imported(module, node)]
    assert not inside, "imports inside functions: " + "; ".join(inside)
