"""fugue's modules import each other without cycles (pure: the source is parsed, nothing imported).

Every import counts, at the top of a module or inside a function: a
function-level import hides an edge from the reader but not from this test.
"""

import ast
import os
import re

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
    tree = ast.parse(open(path).read(), path)
    # The body of `if __name__ == "__main__":` runs only in a module started with
    # python -m, which is then the module __main__, not `name`: its imports are
    # not edges of `name` (fugue.router's imports fugue.routed, which imports fugue.router).
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    for node in ast.walk(tree):
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


def _is_main_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


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
    assert "fugue.routed" not in edges["fugue.router"]  # only under if __name__ == "__main__"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# -- the module map at the top of fugue/__init__.py ---------------------------------------------

def declared_tiers():
    """[(tier name, [module names])] from the map in fugue/__init__.py's docstring."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, "__init__.py")).read()))
    tiers = []
    listing = False  # on a tier's line, or the lines that carry on its list of modules
    for line in doc.splitlines():
        m = re.match(r"  tier ([a-z ]+):\s+(.+)$", line)
        if m:
            tiers.append((m.group(1), m.group(2).split()))
        elif listing and re.match(r" {20}\S", line):
            tiers[-1][1].extend(line.split())
        listing = bool(m) or (listing and re.match(r" {20}\S", line) is not None)
    return tiers


def tier_of():
    out = {}
    for i, (_, names) in enumerate(declared_tiers()):
        for name in names:
            out["fugue" if name == "fugue" else f"fugue.{name}"] = i
    return out


def test_the_map_names_every_module_once():
    tiers = declared_tiers()
    assert [name for name, _ in tiers] == ["pure", "mechanisms", "machines", "processes", "entry points"]
    listed = [name for _, names in tiers for name in names]
    assert len(listed) == len(set(listed)), "a module is in two tiers"
    modules = {name for name in graph() if not name.startswith("fugue.adapters")}
    assert set(tier_of()) == modules


def test_imports_point_up_the_map():
    tiers, edges = tier_of(), graph()
    wrong = [f"{a} ({tiers[a]}) imports {b} ({tiers[b]})" for a in tiers for b in edges[a]
             if b in tiers and tiers[b] > tiers[a]]
    assert wrong == []


def test_adapters_import_only_adapters_and_the_two_first_tiers():
    tiers, edges = tier_of(), graph()
    for name, targets in edges.items():
        if name.startswith("fugue.adapters"):
            assert all(t.startswith("fugue.adapters") or tiers[t] <= 1 for t in targets), (name, targets)


def test_fuguectl_and_the_worker_never_import_the_master_side():
    edges = graph()
    master_side = {"fugue.master", "fugue.pool", "fugue.rollout", "fugue.shell", "fugue.control",
                   "fugue.router", "fugue.appmasters", "fugue.run"}
    assert not edges["fugue.worker"] & (master_side | {"fugue.upgrade"})
    assert "fugue.master" not in edges["fugue.ctl"]


def test_fugue_7_names_every_module_in_its_tier():
    page = open(os.path.join(ROOT, "man", "fugue.7")).read()
    section = page.split(".SH MODULES", 1)[1].split(".SH ", 1)[0].replace("\\fB", "").replace("\\fR", "")
    for tier, names in declared_tiers():
        text = section.split(f".B {tier}\n", 1)[1].split(".TP", 1)[0]
        for name in names:
            assert re.search(rf"(^|[^\w]){re.escape('package' if name == 'fugue' else name)}([^\w]|$)", text), (tier, name)


def test_fugue_7_names_every_adapter_module():
    page = open(os.path.join(ROOT, "man", "fugue.7")).read()
    section = page.split(".SH MODULES", 1)[1].split(".SH ", 1)[0]
    text = section.split(".B adapters\n", 1)[1].split(".TP", 1)[0]
    for name in sorted(os.listdir(os.path.join(ROOT, "fugue", "adapters"))):
        if name.endswith(".py") and name != "__init__.py":
            assert re.search(rf"(^|[^\w]){re.escape(name[:-3])}([^\w]|$)", text), name
