"""The package's shape (issue 13): imports run one way, rooms stay small, and every retry is the retry module's.

These read the source as text (``ast``), so they hold for code no test happens to import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rwatch"
MAX_LINES = 400          # "about 400": a room a newcomer reads in one sitting
MAX_WATCHER_LINES = 300  # the class Watcher itself


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every rwatch module ``name`` imports, wherever the import stands: at the top, inside a function, under
    ``TYPE_CHECKING``. ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    return {t for t in targets if t in known and t != name and t != "rwatch"}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_passes_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_count_wherever_they_stand(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rwatch.x import y\n"
                      "def f():\n    import rwatch.z\n    from . import w\n")
    assert imports_of("rwatch.m", source, {"rwatch.x", "rwatch.z", "rwatch.w"}) == {"rwatch.x", "rwatch.z",
                                                                                    "rwatch.w"}


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_outside_the_simulator_passes_about_400_lines() -> None:
    big = {
        name: n for name, path in modules().items()
        if not name.startswith("rwatch.sim.") and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_watcher_class_stays_under_about_300_lines() -> None:
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "Watcher":
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= MAX_WATCHER_LINES, f"Watcher is {size} lines in {path}"
                return
    raise AssertionError("no class Watcher in the package")


def test_every_module_opens_with_a_sentence_saying_what_it_is() -> None:
    bare = [name for name, path in modules().items()
            if path.read_text().strip() and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not bare, f"modules without a docstring: {bare}"


def test_no_retry_loop_outside_the_retry_module() -> None:
    """A ``while True`` is a retry unless a comment on its line or the line above says what ends it."""
    loose: list[str] = []
    for name, path in modules().items():
        if name == "rwatch.retry":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*while True:", line):
                said = "#" in line or lines[i - 1].strip().startswith("#")
                if not said:
                    loose.append(f"{path.relative_to(PACKAGE)}:{i + 1}")
    assert not loose, f"while True without a comment saying what ends it (retries belong in retry.py): {loose}"


def readme_tree() -> set[str]:
    """The paths README's "The code" section lists, relative to src/rwatch (a tree indented two spaces a level)."""
    text = (PACKAGE.parents[1] / "README.md").read_text()
    block = re.search(r"### The code\n.*?```\nsrc/rwatch/\n(.*?)```", text, re.S)
    assert block, "README.md lost its code tree under '### The code'"
    listed: set[str] = set()
    stack: list[str] = []
    for line in block.group(1).splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        stack[depth:] = [name.rstrip("/")]
        if not name.endswith("/"):
            listed.add("/".join(stack))
    return listed


def test_readmes_code_tree_is_the_package() -> None:
    listed = readme_tree()
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    missing = {f for f in files if f not in listed and not f.endswith("__init__.py")}
    gone = {f for f in listed if f not in files}
    assert not missing, f"modules README's 'The code' does not list: {sorted(missing)}"
    assert not gone, f"README's 'The code' lists modules that do not exist: {sorted(gone)}"
