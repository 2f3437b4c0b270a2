"""The import graph of the config and the routing package is a tree: no cycle through them.

Every import statement counts, also one inside a function or under ``if TYPE_CHECKING`` (a lazy import hides a
cycle, it does not remove it). Importing ``a.b.c`` also runs package ``a.b``'s ``__init__``, except the root
``moefy`` and the importer's own packages.
"""
import ast
import pathlib

import moefy

ROOT = pathlib.Path(moefy.__file__).resolve().parent.parent
TREE = ("moefy.config", "moefy.routing")  # no cycle may pass through these


def module_graph():
    """``{module: set of moefy modules it imports}`` from the source of every moefy module."""
    modules = {}
    for path in (ROOT / "moefy").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        package, edges = name if is_package else name.rsplit(".", 1)[0], set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                found = [mod] + [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            else:
                continue
            for target in found:
                while target.startswith("moefy.") and target:  # the module, then the packages above it
                    if target in modules and target != name and not name.startswith(target + "."):
                        edges.add(target)
                    target = target.rsplit(".", 1)[0]
        graph[name] = edges
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_known_edges():
    graph = module_graph()
    assert "moefy.config" in graph["moefy.routing.select"]          # routing reads the config
    assert "moefy.routing.select" in graph["moefy.routing.record"]  # a TYPE_CHECKING import counts
    assert "moefy.routing" in graph["moefy.block"]                  # importing a submodule runs its package
    assert not any(m.startswith("moefy.routing") for m in graph["moefy.config"])


def test_no_cycle_through_the_config_or_the_routing_package():
    through = [c for c in cycles(module_graph()) if any(m.startswith(TREE) for m in c)]
    assert through == []


def test_the_config_names_every_aux_loss_in_order():
    from moefy.config import AUX_LOSS_NAMES
    from moefy.routing.losses import AUX_LOSSES
    assert tuple(AUX_LOSSES) == AUX_LOSS_NAMES
