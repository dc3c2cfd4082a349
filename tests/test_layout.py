"""The package layout, checked from the code's own imports: stages import one way, no cycles, readable sizes.

common <- data <- models <- training <- inference <- serve / evals / interop <- terminal <- demo <- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zaizai"
# A module may import from its own stage and the stages before it, never from a later or a sibling one.
RANK = {"common": 0, "data": 1, "models": 2, "training": 3, "inference": 4, "serve": 5, "evals": 5, "interop": 5,
        "terminal": 6, "demo": 7, "cli_args": 7, "cli": 8, "__main__": 9}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, Path]:
    """Dotted name (``zaizai.data.corpus``) -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of zaizai code in a module, at any depth
    (imports inside functions count: they are edges all the same)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "zaizai" or target.startswith("zaizai."):
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("zaizai")]
    return found


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root package (version, lazy public API)


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import really reaches: ``from zaizai.data import batches`` reaches zaizai.data.batches."""
    reached = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return reached or [target]


def test_stages_import_one_way():
    known = modules()
    wrong = []
    for name, path in known.items():
        here = stage(name)
        if here is None:
            continue  # zaizai/__init__.py: the public API, importing lazily from the stages
        for target, names, line in imports(name, path):
            for reached in resolve(target, names, known):
                there = stage(reached)
                if there is None:
                    if names != ["__version__"]:
                        wrong.append(f"{path.name}:{line} imports {names} from the root package")
                    continue
                same = there == here
                if not same and not RANK[there] < RANK[here]:
                    wrong.append(f"{name}:{line} imports {reached} (stage {there} is not before {here})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_from_another_stage():
    known = modules()
    wrong = [f"{name}:{line} imports {n} from {target}"
             for name, path in known.items()
             for target, names, line in imports(name, path)
             for n in names if n.startswith("_") and n != "__version__" and stage(target) != stage(name)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {name: {r for target, names, _ in imports(name, path) for r in resolve(target, names, known)
                    if r in known and r != name and not name.startswith(r + ".")}  # a module's own package: its __init__
             for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt])
                            if nxt in trail else f"import cycle: {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_modules_and_functions_are_readable_sizes():
    too_long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            too_long.append(f"{name}: {n} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


def test_the_layout_test_sees_the_package():
    """The checks above are only worth something if they find the modules and their imports."""
    known = modules()
    assert {"zaizai.cli", "zaizai.models.gpt", "zaizai.data.corpus", "zaizai.inference.generate"} <= set(known)
    edges = imports("zaizai.inference.generate", known["zaizai.inference.generate"])
    assert any(t == "zaizai.inference.sampling" for t, _, _ in edges)
