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


# ----- the public API and the thin command ---------------------------------------------------------

PUBLIC_NAMES = ("Bundle", "Decisions", "GuardScores", "Report", "BuildConfig", "UserError")
# What badexpert/build.py may import: argument parsing and printing, the API it calls, and BuildConfig
# for its defaults (BuildConfig() shows them in --help; built with values, it would be config assembly).
THIN_COMMAND_IMPORTS = ("__future__", "argparse", "dataclasses", "pathlib", "badexpert.common", "badexpert",
                        "defense.guard_bundle", "defense.build")


def public_exports() -> dict[str, str]:
    """defense/__init__.py's ``_PUBLIC``: each public name and the module that defines it."""
    tree = ast.parse((REPO / "defense" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and "_PUBLIC" in ast.unparse(node).split("=")[0]:
            return ast.literal_eval(node.value)
    raise AssertionError("defense/__init__.py has no _PUBLIC")


def definition(module: str, name: str) -> ast.ClassDef | ast.FunctionDef | None:
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    return next((node for node in ast.parse(path.read_text()).body
                 if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name), None)


def test_the_public_names_are_exported_with_docstrings_and_listed_in_the_readme():
    exports = public_exports()
    assert tuple(exports) == PUBLIC_NAMES
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From Python"):readme.index("\n## ", readme.index("## From Python") + 1)]
    for name, module in exports.items():
        node = definition(module, name)
        assert node is not None, f"{module} defines no {name}"
        assert ast.get_docstring(node), f"{module}.{name} has no docstring"
        assert f"`{name}`" in section, f"the README's 'From Python' does not list {name}"
        if isinstance(node, ast.ClassDef):  # and each public method and property of a public class
            undocumented = [item.name for item in node.body if isinstance(item, ast.FunctionDef)
                            and not item.name.startswith("_") and not ast.get_docstring(item)]
            assert not undocumented, f"{name}: no docstring on {', '.join(undocumented)}"


def test_the_build_command_holds_argument_parsing_and_printing_only():
    """No model loading, checks or config assembly in badexpert/build.py: Bundle.build does them."""
    path = REPO / "badexpert" / "build.py"
    imported = imported_names(path, "badexpert.build")
    allowed = [name for name in imported
               if any(name == prefix or name.startswith(prefix + ".") for prefix in THIN_COMMAND_IMPORTS)]
    assert sorted(set(imported) - set(allowed)) == []
    tree = ast.parse(path.read_text())
    raises = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise)]
    assert not raises, f"badexpert/build.py raises errors itself (lines {raises}): checks belong in defense/"
    calls = [(node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", ""), node)
             for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assembled = [node.lineno for name, node in calls if name == "BuildConfig" and (node.args or node.keywords)]
    assert not assembled, f"badexpert/build.py assembles a BuildConfig (lines {assembled}): Bundle.build does"
    assert not {name for name, _ in calls if name.startswith(("load_", "check_", "resolve_"))}


def test_the_console_script_runs_the_command_package():
    pyproject = (REPO / "pyproject.toml").read_text()  # read as text: tomllib is Python 3.11+
    assert '\nbadexpert = "badexpert.main:main"\n' in pyproject
    assert 'include = ["defense*", "service*", "badexpert*"]' in pyproject
    tree = ast.parse((REPO / "badexpert" / "main.py").read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    assert (REPO / "badexpert" / "__main__.py").is_file()  # python -m badexpert
