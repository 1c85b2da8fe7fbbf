"""The project's layout, read from the source with ``ast`` (nothing is imported):

- no import cycle among the project's modules (imports inside functions count too);
- ``defense`` (the offline job) imports neither ``service`` nor ``badexpert``; ``service`` does not
  import ``badexpert``: the command-line package sits above both halves;
- no file in ``defense/``, ``service/`` or ``badexpert/`` is over 350 lines, unless the first lines of its
  module docstring say why ("over 350 lines because ...").
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("defense", "service", "badexpert", "bench")
SIZE_CHECKED = ("defense", "service", "badexpert")
MAX_LINES = 350
REASON = "over 350 lines because"
FORBIDDEN = {"defense": ("service", "badexpert"), "service": ("badexpert",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
            if "__pycache__" not in path.parts}


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in the file names (``from a import b`` names ``a`` and
    ``a.b``), relative imports resolved, at any depth of the file."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_target(name: str, modules: set[str]) -> str | None:
    """The project module an imported name loads: the longest project module it starts with."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    modules = set(files)
    graph = {}
    for module, path in files.items():
        targets = {project_target(name, modules) for name in imported_names(path, module)}
        graph[module] = {target for target in targets if target is not None and target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def top_package(module: str) -> str:
    return module.split(".")[0]


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_walk_sees_imports_inside_functions():
    graph = import_graph()
    assert "defense.bundle" in graph["badexpert.demo"]  # imported inside run_demo only
    assert "badexpert.main" in graph["badexpert.__main__"]


def test_no_import_cycle_among_the_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_defense_imports_neither_service_nor_cli_and_service_does_not_import_cli():
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   for target in targets if top_package(target) in FORBIDDEN.get(top_package(module), ()))
    assert not wrong, "; ".join(wrong)


def test_no_long_file_without_a_reason_in_its_opening_docstring():
    long_files = []
    for package in SIZE_CHECKED:
        for path in sorted((REPO / package).rglob("*.py")):
            lines = path.read_text().count("\n")
            if lines <= MAX_LINES:
                continue
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            opening = " ".join(docstring.splitlines()[:5])
            if REASON not in opening:
                long_files.append(f"{path.relative_to(REPO)} ({lines} lines)")
    assert not long_files, (f"over {MAX_LINES} lines with no reason ('{REASON} ...') in the first lines of the "
                            f"module docstring: {', '.join(long_files)}")
