"""The package's import graph, built from the source with :mod:`ast`, obeys the layering of
``docs/design.md#layers``:

    core <- solvers <- guidance <- samplers <- testbed <- pipelines <- run <- cli

(a module may import its own layer and the layers to its left; the package root ``diffsample``
sits above ``cli``). Every ``import`` / ``from ... import`` statement counts, function-local and
``TYPE_CHECKING`` ones included, absolute and relative; so does a string that names a package module
for a lazy import (a registry target ``"diffsample.solvers.euler:Euler"``, an ``import_module``
argument), after folding ``+`` of module-level string constants. ``benchmarks/`` and ``tests/`` are
outside the graph.

Checked:

* no cycle between modules;
* no upward edge between layers;
* no use of another module's private name: ``from x import _name``, ``x._name`` on an imported
  module, or ``obj._name`` where ``_name`` is defined elsewhere in the package and not in the
  module that uses it; a private module (``_common.py``) may be imported only from inside its own
  package (sub-packages included).

Each failure message lists the offending edges as ``importer -> imported`` with file and line.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffsample"
LAYERS = ("core", "solvers", "guidance", "samplers", "testbed", "pipelines", "run", "cli")
OUTSIDE = {"tests", "benchmarks", "notebooks", "docs", "build", "dist"}
TOP = len(LAYERS)  # the package root's own rank: above every layer


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


@dataclass(frozen=True)
class Private:
    module: str
    name: str
    owner: str  # module(s) that define the name, or the imported module
    where: str

    def __str__(self) -> str:
        return f"{self.module} uses {self.name} of {self.owner} ({self.where})"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (outside folders excluded)."""
    files: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in OUTSIDE or any(p.startswith(".") or p.endswith(".egg-info") or p == "__pycache__"
                                          for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join([PACKAGE, *parts])] = path
    return files


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def resolve(module: str, files: dict[str, Path], node: ast.ImportFrom) -> str:
    """Absolute name of the module a ``from`` statement in ``module`` imports from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package(module, files):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def own(name: str) -> bool:
    return name.startswith(PACKAGE + ".") or name == PACKAGE


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_module_owner(target: str) -> str | None:
    """The package a private module (``a.b._common``) belongs to, or ``None`` if ``target`` is public."""
    parts = target.split(".")
    for k, part in enumerate(parts):
        if private(part):
            return ".".join(parts[:k])
    return None


def defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines: functions, classes, arguments, assigned names and attributes it
    assigns on ``self`` / ``cls`` (``self._cache = ...``), at any depth."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


STRING_TARGET = re.compile(r"(diffsample(?:\.[A-Za-z_]\w*)+)(?::[A-Za-z_]\w*)?")


def module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (for folding ``NAME + "..."``)."""
    out: dict[str, str] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            out[node.targets[0].id] = node.value.value
    return out


def fold(node: ast.AST, constants: dict[str, str], module: str) -> str | None:
    """The text of a string expression made of constants, module-level string names, ``__name__`` and
    ``+`` / f-strings of those; ``None`` when it is anything else."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.Name):
        return module if node.id == "__name__" else constants.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = fold(node.left, constants, module), fold(node.right, constants, module)
        return left + right if left is not None and right is not None else None
    if isinstance(node, ast.JoinedStr):
        parts = [fold(v.value if isinstance(v, ast.FormattedValue) else v, constants, module) for v in node.values]
        return "".join(parts) if all(p is not None for p in parts) else None
    return None


def string_target(text: str | None, files: dict[str, Path]) -> str | None:
    """The package module a string such as ``"diffsample.solvers.euler:Euler"`` names (its longest
    prefix that is a module), or ``None``."""
    match = STRING_TARGET.fullmatch(text or "")
    if match is None:
        return None
    parts = match.group(1).split(".")
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in files:
            return ".".join(parts[:k])
    return None


def scan(module: str, tree: ast.Module, rel: str, files: dict[str, Path],
         definers: dict[str, set[str]]) -> tuple[list[Edge], list[Private]]:
    """The import edges of one module (every statement, at any depth) and its uses of private names
    defined elsewhere in the package (``definers``: name -> modules defining it)."""
    edges: list[Edge] = []
    uses: list[Private] = []
    mine = defined_names(tree)
    imported_modules: dict[str, str] = {}  # local alias -> module, for ``alias._name``

    def add(target: str, line: int) -> None:
        if own(target) and Edge(module, target, f"{rel}:{line}") not in edges:
            edges.append(Edge(module, target, f"{rel}:{line}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
                local = alias.asname or alias.name.split(".")[0]
                imported_modules[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, files, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in files else base, node.lineno)
                if sub in files:
                    imported_modules[alias.asname or alias.name] = sub
                elif own(base) and private(alias.name):
                    uses.append(Private(module, alias.name, base, f"{rel}:{node.lineno}"))
    constants = module_constants(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.BinOp, ast.JoinedStr)):
            target = string_target(fold(node, constants, module), files)
            if target is not None and target != module:
                add(target, node.lineno)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            continue
        if isinstance(base, ast.Name) and base.id in imported_modules:
            if own(imported_modules[base.id]):
                uses.append(Private(module, node.attr, imported_modules[base.id], f"{rel}:{node.lineno}"))
            continue
        others = definers.get(node.attr, set()) - {module}
        if node.attr not in mine and others:
            uses.append(Private(module, node.attr, " / ".join(sorted(others)), f"{rel}:{node.lineno}"))
    return edges, uses


@lru_cache(maxsize=1)
def analyse() -> tuple[tuple[Edge, ...], tuple[Private, ...], tuple[str, ...]]:
    """``(edges, private-name uses, folders not assigned to a layer)`` of the whole package."""
    files = module_files()
    definers: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        for name in defined_names(parsed(path)):
            definers[name].add(module)
    edges: list[Edge] = []
    uses: list[Private] = []
    for module, path in files.items():
        e, u = scan(module, parsed(path), str(path.relative_to(ROOT)), files, definers)
        edges += e
        uses += u
    unassigned = sorted({m.split(".")[1] for m in files if rank(m) < 0})

    def at(item: Edge | Private) -> tuple[str, int]:
        path, _, line = item.where.rpartition(":")
        return path, int(line)

    return tuple(sorted(edges, key=at)), tuple(sorted(uses, key=at)), tuple(unassigned)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    item = stack.pop()
                    on_stack.discard(item)
                    component.append(item)
                    if item == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    out.append(sorted(component))
    return out


# ---- the checker itself: it must see what it claims to see -------------------------------------


def test_graph_covers_the_package():
    files = module_files()
    edges, _, _ = analyse()
    for layer in LAYERS:
        assert f"{PACKAGE}.{layer}" in files, f"layer package {layer!r} not found under {ROOT}"
    assert not any(m.split(".")[1] in OUTSIDE for m in files if "." in m)
    assert len(files) > 50 and len(edges) > 100, (len(files), len(edges))
    pairs = {(e.source, e.target) for e in edges}
    assert ("diffsample.solvers.euler", "diffsample.solvers.solver") in pairs
    assert ("diffsample.solvers", "diffsample.solvers.euler") in pairs


SAMPLE = """
import diffsample.solvers.solver as solver_mod
from diffsample.guidance import _common
from ..term import Cond, _hidden
from . import twist

PREFIX = "diffsample.core."
TARGET = PREFIX + "registry:Registry"                  # a lazy registry target


def f(obj, shim):
    from diffsample.run.models import load_model  # function-local
    shim._solver_obj = 1                           # writes another module's private attribute
    solver_mod._helper()                           # private name of an imported module
    return twist._draw, obj._mine


class K:
    def __init__(self):
        self._mine = 0
"""


def test_checker_sees_every_kind_of_import_and_private_use():
    files = {m: ROOT / "x.py" for m in ("diffsample.guidance.jeffrey.sample", "diffsample.guidance.jeffrey.twist",
                                        "diffsample.guidance.term", "diffsample.guidance._common",
                                        "diffsample.solvers.solver", "diffsample.run.models",
                                        "diffsample.core.registry")}
    definers = {"_solver_obj": {"diffsample.pipelines.scheduler_shim"}, "_mine": {"diffsample.other"}}
    edges, uses = scan("diffsample.guidance.jeffrey.sample", ast.parse(SAMPLE), "sample.py", files, definers)
    assert {e.target for e in edges} == {"diffsample.solvers.solver", "diffsample.guidance._common",
                                         "diffsample.guidance.term", "diffsample.guidance.jeffrey.twist",
                                         "diffsample.run.models", "diffsample.core.registry"}
    assert sorted(u.name for u in uses) == ["_draw", "_helper", "_hidden", "_solver_obj"]


def test_checker_detects_cycles_and_relative_imports():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"a"}}) == [["a"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
    files = {"diffsample.guidance": ROOT / "guidance/__init__.py", "diffsample.guidance.jeffrey.twist":
             ROOT / "guidance/jeffrey/twist.py", "diffsample.guidance.jeffrey": ROOT / "guidance/jeffrey/__init__.py"}
    rel = ast.parse("from ..term import Cond").body[0]
    assert resolve("diffsample.guidance.jeffrey.twist", files, rel) == "diffsample.guidance.term"
    rel = ast.parse("from .twist import X").body[0]
    assert resolve("diffsample.guidance.jeffrey", files, rel) == "diffsample.guidance.jeffrey.twist"
    assert private_module_owner("diffsample.guidance._common") == "diffsample.guidance"
    assert private_module_owner("diffsample.guidance.term") is None


# ---- the rules ------------------------------------------------------------------------------------


def test_every_package_folder_has_a_layer():
    _, _, unassigned = analyse()
    assert not unassigned, (f"folders {list(unassigned)} hold package modules but belong to no layer; add them "
                            f"to LAYERS here and to docs/design.md#layers")


def test_no_import_cycles():
    edges, _, _ = analyse()
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    cycles = strongly_connected(graph)
    lines = []
    for component in cycles:
        inside = set(component)
        lines.append("cycle: " + ", ".join(component))
        lines += [f"    {e}" for e in edges if e.source in inside and e.target in inside]
    assert not cycles, "import cycles between modules:\n" + "\n".join(lines)


def test_layers_import_downward_only():
    edges, _, _ = analyse()
    upward = [e for e in edges if rank(e.target) > rank(e.source)]
    assert not upward, (
        "upward imports (layers: " + " <- ".join(LAYERS) + " <- diffsample root):\n"
        + "\n".join(f"    {e}" for e in upward)
    )


def test_private_modules_stay_in_their_package():
    edges, _, _ = analyse()
    bad = []
    for e in edges:
        owner = private_module_owner(e.target)
        if owner is not None and not (e.source == owner or e.source.startswith(owner + ".")):
            bad.append(e)
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(f"    {e}" for e in bad)


def test_no_private_names_of_other_modules():
    _, uses, _ = analyse()
    assert not uses, "private names used outside the module that defines them:\n" + "\n".join(
        f"    {u}" for u in uses)
