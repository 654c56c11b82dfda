"""The abfp modules import each other without cycles, and every one imports in a fresh interpreter.

The graph is read from the source (AST): every import statement at module level, including
those under ``if TYPE_CHECKING:`` or ``try:`` (a cycle that only type checkers see is still a
knot for a reader), and not imports inside functions (deliberately deferred). An edge goes to
the module named, resolved to a submodule when ``from pkg import name`` names one; the
implicit import of a parent package (``import a.b`` runs ``a/__init__``) is not an edge, or
every package that re-exports its submodules would be a cycle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import abfp

ROOT = Path(abfp.__file__).parent
PKG = "abfp"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _module_level(body: list[ast.stmt]):
    """Import nodes executed when the module is imported (not inside def/class bodies)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, field, []) or [])
            for h in getattr(node, "handlers", []):
                yield from _module_level(h.body)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree.body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:  # `import abfp.x.y` names a module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    colour: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in colour:
                found = visit(m)
                if found:
                    return found
        colour[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_resolves_relative_imports():
    g = import_graph()
    assert "abfp.config" in g["abfp.noise_keys"]
    assert "abfp.nn.convert" in g["abfp.nn"]


def test_abfp_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_interpreter():
    names = [m for m in _modules() if not m.endswith("__main__")]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('ok')" % names
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# The layers of docs/architecture.md: a module may import its own layer and those above it
# (smaller numbers), never one below. Keep this table and the document's in step.
LAYERS = {
    0: ("abfp.config", "abfp.noise_keys", "abfp.jsonio", "abfp.allocator"),
    1: ("abfp.numerics",),
    2: ("abfp.ops", "abfp.functional"),
    3: ("abfp.nn", "abfp.noise"),
    4: ("abfp.evaluate", "abfp.finetune", "abfp.precision", "abfp.tune", "abfp.explore", "abfp.energy",
        "abfp.metrics", "abfp.zoo", "abfp.outputs", "abfp.plotting", "abfp.journal"),
    5: ("abfp.cli", "abfp.cli_common", "abfp.__main__"),
}


def layer_of(module: str) -> int:
    """The layer of ``module`` (the package itself, which re-exports everything, is above all: 6)."""
    if module == PKG:
        return 6
    if module.endswith(".cli") or module == "abfp.cli_common":
        return 5  # the command lines of the tools (finetune/cli, precision/cli, ...)
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it to LAYERS and the document")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def test_layer_check_sees_a_downward_import():
    assert layer_violations({"abfp.ops.linear": {"abfp.nn.state"}, "abfp.nn.state": set()}) == [
        "abfp.ops.linear (layer 2) imports abfp.nn.state (layer 3)"]
    assert layer_violations({"abfp.nn.state": {"abfp.ops.site"}, "abfp.ops.site": set()}) == []


def test_modules_import_only_their_layer_and_those_above():
    """docs/architecture.md: description -> numerics -> products -> model conversion -> tools -> CLI."""
    graph = import_graph()
    assert layer_violations(graph) == []


ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def file_index_mismatches(doc: str, files: set[str]) -> list[str]:
    """What the file index of docs/architecture.md gets wrong: modules it does not list, and
    entries for files that do not exist (``- `pkg/mod.py`: ...`` lines under "Where each file is")."""
    index = doc.split("## Where each file is", 1)
    if len(index) < 2:
        return ["docs/architecture.md has no '## Where each file is' section"]
    listed = set(re.findall(r"^- `([\w/]+\.py)`:", index[1].split("\n## ", 1)[0], flags=re.M))
    return ([f"not in the index: {f}" for f in sorted(files - listed)]
            + [f"in the index but not in src/abfp: {f}" for f in sorted(listed - files)])


def test_file_index_check_sees_a_missing_and_a_stale_entry():
    doc = "# x\n## Where each file is\n- `a.py`: one.\n- `gone/b.py`: two.\n## Next\n- `c.py`: three.\n"
    assert file_index_mismatches(doc, {"a.py", "c.py"}) == [
        "not in the index: c.py", "in the index but not in src/abfp: gone/b.py"]


def test_architecture_map_lists_every_module():
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}
    assert file_index_mismatches(ARCHITECTURE.read_text(), files) == []
