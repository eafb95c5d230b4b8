"""The package's shape: no import cycle, no library module importing a command, modules short.

The imports are read from the source (module level and inside functions alike), not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bigbatch"
COMMANDS = {"bigbatch.cli", "bigbatch.eval_cli", "bigbatch.export", "bigbatch.plan.command",
            "bigbatch.bench.command", "bigbatch.demo_data", "bigbatch.__main__"}
DATA_TABLES = {"bigbatch.peer_flags", "bigbatch.zeroshot"}  # tables of names, not logic
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports (`from bigbatch import x` counts x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in known)
    return found


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def test_no_import_cycle_at_module_level():
    known = set(modules())
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                         type_ignores=[])
        graph[name] = set()
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[name].update(n for n in names if n in known and n != name)
        # a package's submodule imports the package's __init__ first: not a cycle of ideas
        graph[name] = {n for n in graph[name] if not name.startswith(n + ".")}

    def cycle_from(start, node, seen):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                if (path := cycle_from(start, nxt, seen)) is not None:
                    return [node, *path]
        return None

    for name in graph:
        assert cycle_from(name, name, {name}) is None, f"import cycle: {' -> '.join(cycle_from(name, name, {name}))}"


def test_library_modules_import_no_command():
    known = set(modules())
    for name, path in modules().items():
        if is_command(name):
            continue
        commands = sorted(n for n in imported(path, known) if is_command(n))
        assert not commands, f"library module {name} imports the command(s) {commands}"


def test_modules_are_short():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in DATA_TABLES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"
