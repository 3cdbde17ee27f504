"""The shape of the house: the library never imports its entry points, and no two modules import each other.

Every import counts, the ones inside functions included (a function-local import is still a dependency, and
hiding one inside a function is how circles used to creep in).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_shards", "pretrain", "eval", "launch")
LIBRARY = ("common", "data_shards", "pretrain", "eval")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use the absolute module path"
            base = node.module or ""
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a name inside a module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        # a package's __init__ is imported by its submodules implicitly; it is not an edge of the design
        graph[name] = {dep for dep in imports_of(path, modules) if dep != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: components with more than one module are import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_library_never_imports_the_entry_points():
    graph = import_graph()
    offenders = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] in LIBRARY
        for dep in deps
        if dep.split(".")[0] == "launch"
    )
    assert offenders == [], "the library must not import launch/:\n" + "\n".join(offenders)


def test_common_imports_no_other_project_package():
    graph = import_graph()
    offenders = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == "common"
        for dep in deps
        if dep.split(".")[0] != "common"
    )
    assert offenders == [], "\n".join(offenders)


def test_no_import_circles():
    circles = strongly_connected(import_graph())
    assert circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_circles_and_launch_imports(tmp_path):
    """The graph code itself: a planted circle and a planted launch import are found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from launch.pretrain import main\n")
    assert imports_of(source, {"launch.pretrain": source, "launch": source}) == {"launch.pretrain"}
