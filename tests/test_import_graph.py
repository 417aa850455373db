"""The package's import graph, built from the source with ``ast``: no cycles, imports at the top.

Every import between the package's own modules (including ones written inside functions) is an
edge. The graph must be acyclic, and an import of a package module written inside a function (or
class body) is only allowed where ``IN_FUNCTION_ALLOWED`` names it with a reason: in-function
imports hide cycles and make the layering invisible.
"""
from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

PACKAGE = "debias_export"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# (importing module, imported module) -> why it cannot sit at the top of the file; fnmatch patterns.
IN_FUNCTION_ALLOWED: dict[tuple[str, str], str] = {
    ("debias_export.cli.*", "*"): "a command imports its implementation (torch, transformers) when it runs, so "
                                  "`debias-export COMMAND --help` starts in well under a second (benchmarks/cli_startup.py)",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "templates" not in p.parts}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an import of ``name`` loads (a name inside a module maps to the module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported package module, written inside a function/class, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        out.append((target, nested, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for alias in child.names:
                    target = _resolve(f"{prefix}.{alias.name}", modules) or _resolve(prefix, modules)
                    if target:
                        out.append((target, nested, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def build_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges (each module -> the package modules it imports, plus its parent packages) and in-function imports."""
    modules = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    nested: list[tuple[str, str, int]] = []
    for mod, path in modules.items():
        for target, inside, line in imports(mod, path, modules):
            if target == mod:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
            if inside:
                nested.append((mod, target, line))
    return graph, nested


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def _allowed(mod: str, target: str) -> bool:
    return any(fnmatch.fnmatchcase(mod, m) and fnmatch.fnmatchcase(target, t) for m, t in IN_FUNCTION_ALLOWED)


def test_the_package_import_graph_has_no_cycles():
    graph, _ = build_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_imports_between_package_modules_sit_at_the_top():
    _, nested = build_graph()
    bad = [f"{mod}:{line} imports {target}" for mod, target, line in nested if not _allowed(mod, target)]
    assert not bad, f"{len(bad)} in-function imports of package modules (move them to the top):\n" + "\n".join(bad)


def test_the_allow_list_matches_real_modules():
    modules = package_modules()
    for (mod, target), why in IN_FUNCTION_ALLOWED.items():
        assert any(fnmatch.fnmatchcase(m, mod) for m in modules), mod
        assert target == "*" or any(fnmatch.fnmatchcase(m, target) for m in modules), target
        assert why.strip()


def test_the_graph_builder_sees_cycles_and_nested_imports(tmp_path, monkeypatch):
    """The checker itself: a two-module cycle through an in-function import is found."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph, nested = build_graph()
    assert find_cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]
    assert nested == [(f"{PACKAGE}.b", f"{PACKAGE}.a", 2)]


# The layers of docs/ARCHITECTURE.md, bottom first: a module may import its own layer or any layer below.
LAYERS = [("core", "runtime"), ("adapters",), ("data",), ("sae",), ("capture",), ("analysis",), ("edits",), ("export",),
          ("eval", "bench"), ("workflow",), ("cli",)]


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` of a module (None for the package's own ``__init__``, which only re-exports lazily)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def test_every_import_points_down_the_layers():
    graph, _ = build_graph()
    up = [f"{mod} -> {dep}" for mod, deps in sorted(graph.items()) for dep in sorted(deps)
          if layer_of(mod) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(mod)]
    same = [f"{mod} -> {dep}" for mod, deps in sorted(graph.items()) for dep in sorted(deps)
            if layer_of(mod) is not None and layer_of(mod) == layer_of(dep) and mod.split(".")[1] != dep.split(".")[1]]
    assert not up, "imports pointing up the layers:\n" + "\n".join(up)
    assert not same, "imports between sibling packages of one layer:\n" + "\n".join(same)


def test_every_package_module_has_a_layer():
    assert all(layer_of(m) is not None for m in package_modules() if m != PACKAGE)
