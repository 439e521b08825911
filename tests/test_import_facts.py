"""The architecture's import rules, read from the source (``ast``), not from a running interpreter:

* no import circle between files of ``megacore/`` (a package's ``__init__`` re-exporting its own
  modules does not count: it is the package's face, not a file another imports for a concept);
* the one-device model (``models/``, ``layers/``, ``kernels/``) imports nothing from the parallel,
  pipeline, training, distributed, checkpoint or precision side, nor the composition root.

Function-local imports count: a circle bridged inside a function is still a circle.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SIDE = ("megacore.models", "megacore.layers", "megacore.kernels")
UPPER_SIDE = ("megacore.parallel", "megacore.pipeline", "megacore.training", "megacore.distributed",
              "megacore.checkpoint", "megacore.precision", "megacore.optim", "megacore.compose")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "megacore")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _edges(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the megacore modules (files, not packages) it imports anywhere in its source."""
    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                target = resolve(n) if n.startswith("megacore") else None
                if target and target != mod and not mods[target].endswith("__init__.py"):
                    edges[mod].add(target)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_files():
    circles = _circles(_edges(_modules()))
    assert not circles, f"import circles (each a set of files importing each other): {circles}"


def test_the_model_imports_nothing_from_the_parallel_side():
    reaching_up = sorted(f"{m} -> {t}" for m, targets in _edges(_modules()).items() if m.startswith(MODEL_SIDE)
                         for t in targets if t.startswith(UPPER_SIDE))
    assert not reaching_up, reaching_up
