"""The package's import graph is layered and acyclic (issue 10), checked on the source with `ast` (nothing runs).

Levels, low to high; a module may import its own level or below, never above:
    0 errors, quant, arch, guard, boundary   1 checkpoint, schema   2 training, api   3 fold   4 formats
    5 verify, eval   6 cli, demo
Lazy (function-level) imports count: they are dependencies all the same.  A cycle between modules fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "l4q_export"

LEVELS = {
    "errors": 0, "quant": 0, "arch": 0, "guard": 0, "boundary": 0, "checkpoint": 1, "schema": 1, "training": 2, "api": 2,
    "fold": 3, "formats": 4,
    "verify": 5, "eval": 5, "cli": 6, "demo": 6,
}

# Known exceptions: none.  Each entry would be (importer, imported) / a frozenset cycle; the test fails on a
# stale one, so an exception can only be added with the import it excuses.
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> set[str]:
    """The l4q_export modules `name` imports (a `from pkg import sub` that names a submodule counts as sub)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node)
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:  # `import l4q_export.x.y` of a non-module attribute
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t.startswith("l4q_export.") and t != name:
                out.add(t)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def level(module: str) -> int | None:
    parts = module.split(".")
    return LEVELS.get(parts[1]) if len(parts) > 1 else None


def upward_imports() -> set[tuple[str, str]]:
    bad = set()
    for a, deps in GRAPH.items():
        for b in deps:
            la, lb = level(a), level(b)
            if la is not None and lb is not None and lb > la:
                bad.add((a, b))
    return bad


def cycles() -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(frozenset(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_level():
    unlevelled = sorted(m for m in MODULES if m != "l4q_export" and level(m) is None)
    assert not unlevelled, f"add these top-level modules to LEVELS: {unlevelled}"


def test_the_walker_sees_known_edges():
    """Guard against a walker that silently finds nothing: these edges exist by design."""
    assert "l4q_export.training.methods.registry" in GRAPH["l4q_export.fold"] | {
        d for m in GRAPH["l4q_export.fold"] for d in GRAPH[m]
    }
    assert "l4q_export.quant.grids" in GRAPH["l4q_export.training.qalora"]
    assert "l4q_export.checkpoint" in GRAPH["l4q_export.training.trainer"]


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad - ALLOWED_UPWARD, f"upward imports: {sorted(bad - ALLOWED_UPWARD)}"
    assert not ALLOWED_UPWARD - bad, f"stale allowlist entries (delete them): {sorted(ALLOWED_UPWARD - bad)}"


def test_training_never_imports_formats():
    bad = [(a, b) for a, deps in GRAPH.items() for b in deps
           if a.startswith("l4q_export.training") and b.startswith("l4q_export.formats")]
    assert not bad, bad


def test_no_import_cycles():
    found = cycles()
    assert not found - ALLOWED_CYCLES, f"import cycles: {[sorted(c) for c in found - ALLOWED_CYCLES]}"
    assert not ALLOWED_CYCLES - found, f"stale allowlist entries (delete them): {[sorted(c) for c in ALLOWED_CYCLES - found]}"


def test_the_checks_fail_on_a_violation(monkeypatch):
    """The checks can fail: a training -> formats edge and a two-module cycle are both caught."""
    monkeypatch.setitem(GRAPH, "l4q_export.training.layer", GRAPH["l4q_export.training.layer"] | {"l4q_export.formats"})
    monkeypatch.setitem(GRAPH, "l4q_export.quant.core", GRAPH["l4q_export.quant.core"] | {"l4q_export.quant.grids"})
    assert ("l4q_export.training.layer", "l4q_export.formats") in upward_imports()
    assert any({"l4q_export.quant.core", "l4q_export.quant.grids"} <= c for c in cycles())
