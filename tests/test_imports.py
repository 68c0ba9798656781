"""fugue's modules import each other without cycles (pure: the source is parsed, nothing imported).

Every import counts, at the top of a module or inside a function: a
function-level import hides an edge from the reader but not from this test.
"""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "fugue")


def modules():
    """{dotted name: path} of every module of the fugue package."""
    out = {}
    for dirpath, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def imports_of(name, path, known):
    """The fugue modules that module `name` imports, anywhere in its source."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from . import x` imports the module fugue.x; `from .x import y` imports fugue.x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # fugue.adapters.base.X -> fugue.adapters.base
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(edges):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # name -> "open" while on the path, "done" after
    path = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    edges = graph()
    # A few edges every version of fugue has: the test would pass vacuously without them.
    assert "fugue.protocol" in edges["fugue.master"]
    assert "fugue.errors" in edges["fugue"]
    assert "fugue.adapters.base" in edges["fugue.worker"]
    assert "fugue.worker" in edges["fugue"]  # a function-level import


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
