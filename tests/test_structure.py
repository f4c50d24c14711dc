"""The shape of the code: no function over 100 lines, no class over 300, no file over 600, and no
import cycle between oodfast's modules, counting imports inside functions too (a lazy import that
closes a loop is still a loop of concerns)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"oodfast": ROOT / "oodfast", "oodfast.kernels": ROOT / "kernels", "oodfast.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    # oodfast/ holds no kernels/ or cli/ folder; the mapping above gives every file one name
    return found


def test_no_function_class_or_file_is_too_long() -> None:
    too_long = []
    for name, path in modules().items():
        src = path.read_text()
        if src.count("\n") > 600:
            too_long.append(f"{path.relative_to(ROOT)}: {src.count(chr(10))} lines (> 600)")
        for node in ast.walk(ast.parse(src)):
            limit = 100 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else (
                300 if isinstance(node, ast.ClassDef) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines (> {limit})")
    assert not too_long, "split these by concern:\n" + "\n".join(too_long)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of concerns: drop child -> parent edges
    graph = {n: {t for t in deps if not n.startswith(t + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
