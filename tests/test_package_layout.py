"""The package's shape, read from its source with `ast`: no import cycle between its modules, no project import
hidden inside a function, nothing imported from the offline writers (data_prep) or the config files (configs),
and only thin command-line entries beside configuration.py at the top of the package."""

import ast
import os

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "mvlp_jax")
ENTRIES = {"__init__", "configuration", "main", "evaluate", "export", "aot", "visualize"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[name] = ast.parse(open(path).read(), path)
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name lives in (a module, or a package's __init__)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node, f"{node.module}.{a.name}") for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in MODULES.items():
        targets = {_resolve(t) for _, t in _imports(tree) if t.startswith("mvlp_jax")}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (depth-first search with an explicit path)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_no_project_import_hides_inside_a_function():
    hidden = [
        f"{name}:{node.lineno} {target}"
        for name, tree in MODULES.items()
        for node, target in _imports(tree)
        if target.startswith(("mvlp_jax", "data_prep", "configs")) and node.col_offset > 0
    ]
    assert not hidden, hidden


def test_the_package_never_imports_the_offline_writers_or_the_config_files():
    found = [
        f"{name}:{node.lineno} {target}"
        for name, tree in MODULES.items()
        for node, target in _imports(tree)
        if target.split(".")[0] in ("data_prep", "configs")
    ]
    assert not found, found


def test_the_top_of_the_package_holds_only_entries_and_the_config_table():
    top = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")}
    assert top == ENTRIES, top ^ ENTRIES
    for entry in ENTRIES - {"__init__", "configuration"}:
        assert len(open(os.path.join(PACKAGE, f"{entry}.py")).read().splitlines()) <= 8, entry


def test_config_files_import_only_the_package():
    for file in os.listdir(os.path.join(REPO, "configs")):
        if file.endswith(".py"):
            tree = ast.parse(open(os.path.join(REPO, "configs", file)).read())
            project = {t.split(".")[0] for _, t in _imports(tree)} - {"os", "ml_collections", "__future__"}
            assert project <= {"mvlp_jax"}, (file, project)


def test_every_console_command_names_a_callable_and_runs():
    import importlib.util
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert {"mvlp-train", "mvlp-eval", "mvlp-export", "mvlp-aot", "mvlp-build-dataset", "mvlp-precompute"} <= set(
        scripts
    )
    for target in scripts.values():  # read, not imported: two binaries' absl flags cannot share a process
        module, _, function = target.partition(":")
        tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
        assert any(isinstance(n, ast.FunctionDef) and n.name == function for n in tree.body), target
    installed = os.path.join(os.path.dirname(sys.executable), "mvlp-eval")
    if os.path.exists(installed):  # an environment installed from this pyproject (make install)
        run = subprocess.run([installed, "--output_dir=/nonexistent"], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "--config" in run.stderr, run.stderr[-1000:]
