"""The layering the code promises: the core imports no axis, no axis imports a benchmark, no import circle."""

import ast
from pathlib import Path

import splitdiff

ROOT = Path(splitdiff.__file__).resolve().parent
AXES = ("hybrid", "parallel", "users")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The splitdiff modules `name` imports (all of them, or only those imported when it loads)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("splitdiff")}


def test_the_core_imports_no_axis_and_no_axis_imports_bench():
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(name, path, top_level_only=False)
        if name.startswith("splitdiff.core"):
            assert not {m for m in imported if m.split(".")[1] in (*AXES, "serve", "bench", "train")}, name
        if name.split(".")[1:2] and name.split(".")[1] in AXES:
            assert not {m for m in imported if m.startswith("splitdiff.bench")}, name


def test_no_import_circle_among_modules_as_they_load():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
