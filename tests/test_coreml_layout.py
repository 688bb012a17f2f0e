"""The module layout of mlx_zeta.converters.coreml, read from the source (no coremltools needed):
graph <- passes, ops <- lower (driver) <- export <- stateful, with no import cycle and no
module importing another's private names; the driver's re-exports are the graph module's objects."""

import ast
from pathlib import Path

import mlx_zeta.converters.coreml as coreml

PACKAGE = Path(coreml.__file__).parent


def relative_imports() -> dict:
    """``{module: {(imported module, imported name or None)}}`` for every ``from . import`` /
    ``from .x import y`` in the package, at any depth (imports inside functions included)."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for alias in node.names:
                    edges.add((node.module, alias.name) if node.module else (alias.name, None))
        found[path.stem] = edges
    return found


def find_cycle(graph: dict):
    """One cycle of ``graph`` ({node: set of nodes}) as a list, or None (depth-first search)."""
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            return path[path.index(node):] + [node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one():
    """The checker itself: the old layout (lower -> ops -> lower) is a cycle, a chain is not."""
    assert find_cycle({"lower": {"ops", "passes"}, "ops": {"lower"}, "passes": {"lower"}}) == ["lower", "ops", "lower"]
    assert find_cycle({"lower": {"ops", "graph"}, "ops": {"graph"}, "graph": set()}) is None


def test_no_import_cycle_and_the_layers():
    imports = relative_imports()
    modules = {m for m in imports if m != "__init__"}
    graph = {m: {target for target, _ in imports[m] if target in modules} for m in modules}
    assert find_cycle(graph) is None
    assert graph["graph"] == set()  # the bottom: types, emitter table, context
    assert graph["passes"] == {"graph"} and graph["ops"] == {"graph"}
    assert graph["lower"] == {"graph", "passes", "ops"}


def test_no_private_names_across_modules():
    private = sorted((m, target, name) for m, edges in relative_imports().items()
                     for target, name in edges if name is not None and name.startswith("_"))
    assert private == []


def test_driver_reexports_are_the_graph_objects():
    from mlx_zeta.converters.coreml import graph, lower
    from mlx_zeta.converters.coreml.lower import EMITTERS, MASK_FILL, LoweringError, register_emitter

    assert EMITTERS is graph.EMITTERS and register_emitter is graph.register_emitter
    assert LoweringError is graph.LoweringError and MASK_FILL == graph.MASK_FILL == -1.0e4
    assert lower.Node is graph.Node and lower.Graph is graph.Graph and coreml.EMITTERS is graph.EMITTERS
    assert {"Matmul", "Softmax", "SDPA", "DynamicSliceUpdate"} <= set(EMITTERS)  # ops registered on import
