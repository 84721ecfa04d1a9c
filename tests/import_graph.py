"""The import graph of the project's packages, read from their sources with ``ast`` (no import runs).

Used by ``tests/test_imports.py``. An edge ``a -> b`` is any ``import`` statement in module ``a``
(at module level, inside a function or under ``if TYPE_CHECKING``: a cycle through a lazy import
is still a cycle of the design) that names module ``b`` of the scanned packages:

* ``import p.q.r`` -> ``p.q.r`` (not its parents: the package ``p`` is already being set up when
  ``p.q`` runs, so a package and its submodules are no cycle by themselves);
* ``from p import n`` -> ``p.n`` where that is a module, else ``p`` (the name is defined in
  ``p/__init__.py``: a submodule that takes a name from its own package's ``__init__``, which
  imports the submodule, is a cycle);
* relative imports are resolved against the importing module (its own package for an ``__init__``).

Names outside the scanned packages (torch, numpy, the standard library) are not nodes. Imports by
a string at run time (``importlib.import_module``: ``bkn``'s lazy names, :mod:`bkn._moved`) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` under ``root/<package>`` (``__init__`` is the package)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _base(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not level:
        return target or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([target] if target else []))


def graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over the modules of ``packages`` under ``root``."""
    found = modules(root, packages)
    edges: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, path, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in found else base)
            edges[name].update(t for t in targets if t in found and t != name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, each as one cycle through it
    (``[a, b, ..., a]``), sorted; empty when the graph is acyclic (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return sorted(_cycle_through(edges, c) for c in components)


def _cycle_through(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle inside a strongly connected ``component``, from its first module (breadth-first back to it)."""
    start = min(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges[node] & component):
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]  # start, ..., node, start
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle in the strongly connected component {sorted(component)}")
