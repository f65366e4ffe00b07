"""The package's rooms look only down: among its subpackages and top-level modules (`train`, `model`, `data`,
`eval`, `plan`, `bench`, `convert`, `outputs`, `artifacts`, ...), no two import each other, directly or around a
longer loop, counting the imports made inside functions too. A loop is an upward import in any ordering of the
rooms, which is what a local import used to hide (artifacts <-> train, data <-> eval, plan <-> bench)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mellama_jax"


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])  # mellama_jax.train.loop -> mellama_jax.train


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def room_imports() -> dict[str, dict[str, str]]:
    """room -> {room it imports: one module and line that does it}, every import statement counted."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and _room(target) != _room(name):
                    graph.setdefault(_room(name), {}).setdefault(_room(target), f"{name}:{node.lineno}")
    return graph


def find_loop(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One import loop among the rooms, as the rooms around it, or None."""
    state = {}  # room -> "open" while on the path, "done" after

    def visit(room, path):
        state[room] = "open"
        for nxt in graph.get(room, {}):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[room] = "done"
        return None

    for room in list(graph):
        if room not in state:
            found = visit(room, [room])
            if found:
                return found
    return None


def test_find_loop_by_hand():
    assert find_loop({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) is None
    assert find_loop({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]


def test_no_room_imports_a_room_that_imports_it():
    graph = room_imports()
    assert {"mellama_jax.train", "mellama_jax.model", "mellama_jax.outputs"} <= set(graph) | {
        r for targets in graph.values() for r in targets
    }  # the walk sees the package
    loop = find_loop(graph)
    where = [graph[a][b] for a, b in zip(loop, loop[1:])] if loop else []
    assert loop is None, f"import loop {' -> '.join(loop)} (at {', '.join(where)})"


def test_functions_fit_on_a_screen_and_cli_is_a_registry():
    """No function of the package runs over 50 lines (docstring included), and cli.py stays the registry of
    commands and `main` (under 200 lines): what a command does lives in commands/ and the rooms."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not long, long
    assert len((PACKAGE / "cli.py").read_text().splitlines()) < 200
