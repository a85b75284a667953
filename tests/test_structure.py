"""Imports point one way: the graph of ipa_rt's internal imports has no cycle.

Every module of ``ipa_rt/`` is parsed (nothing is imported) and every import counts, the ones inside functions
too: a lazy import still ties two modules together, it only hides the circle until some call runs it. Edges:

* ``import ipa_rt.a.b`` and ``from ipa_rt.a.b import name``: to ``ipa_rt.a.b`` (a package: its ``__init__.py``);
* ``from ipa_rt.a import b`` where ``b`` is a submodule: to ``ipa_rt.a.b``; any other name: to ``ipa_rt.a``;
* relative imports resolved against the importing module's package;
* importing ``ipa_rt.a.b`` from outside package ``ipa_rt.a`` also runs ``ipa_rt/a/__init__.py``, so that is an
  edge too (not for the top package ``ipa_rt``, which every module is inside).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "ipa_rt"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, path: Path, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` written in ``module`` (file ``path``)."""
    if level == 0:
        return target or ""
    base = module.split(".")
    # One dot is the package the module is in: for a package's __init__ that is the package itself.
    drop = level - 1 if path.name == "__init__.py" else level
    base = base[: len(base) - drop]
    return ".".join([*base, target] if target else base)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The internal modules that ``module`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                named.add(sub if sub in modules else target)
    out: set[str] = set()
    for name in named:
        if name not in modules:  # not ours (torch, diffusers, ...), or a name the package does not hold
            continue
        out.add(name)
        parts = name.split(".")
        for i in range(2, len(parts)):  # the parent packages' __init__ run first, unless we are inside them
            parent = ".".join(parts[:i])
            if not (module == parent or module.startswith(parent + ".")):
                out.add(parent)
    out.discard(module)
    return out


@functools.cache  # parsed once per session: two tests read it
def import_graph() -> dict[str, set[str]]:
    """``{module: the internal modules it imports}`` for every module of the package (do not mutate)."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, iterative: no recursion limit)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        colour[start] = grey
        path, stack = [start], [sorted(graph[start])]
        while stack:
            if not stack[-1]:
                colour[path.pop()] = black
                stack.pop()
                continue
            nxt = stack[-1].pop(0)
            if colour.get(nxt) == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(sorted(graph[nxt]))
    return None


def test_the_graph_sees_every_kind_of_import():
    """A cycle-free answer means something only if the walk finds modules, packages and each kind of edge."""
    graph = import_graph()
    assert {"ipa_rt", "ipa_rt.cli", "ipa_rt.export", "ipa_rt.export.build", "ipa_rt.kernels.tuning"} <= set(graph)
    assert "ipa_rt.export.build" in graph["ipa_rt.pipeline"]  # a lazy, function-level import
    assert "ipa_rt.cli.generate" in graph["ipa_rt.cli"]  # `from . import generate`: the submodule
    assert "ipa_rt.pipeline" in graph["ipa_rt"]  # a package's __init__ importing a module
    assert (
        "ipa_rt.export" in graph["ipa_rt.video.pipeline"]
    )  # `from .export.build import ...` runs export/__init__ first
    assert "ipa_rt.export" not in graph["ipa_rt.export.loader"]  # ... but not for a module inside that package
    assert sum(len(edges) for edges in graph.values()) > 100


def test_relative_imports_resolve_against_the_package():
    init, module = ROOT / "export" / "__init__.py", ROOT / "export" / "build.py"
    assert _resolve("ipa_rt.export.build", module, 1, "manifest") == "ipa_rt.export.manifest"
    assert _resolve("ipa_rt.export.build", module, 2, "pipeline") == "ipa_rt.pipeline"
    assert _resolve("ipa_rt.export.build", module, 1, None) == "ipa_rt.export"
    assert _resolve("ipa_rt.export", init, 1, "build") == "ipa_rt.export.build"
    assert _resolve("ipa_rt.export", init, 2, "errors") == "ipa_rt.errors"
    assert _resolve("ipa_rt.export", init, 0, "ipa_rt.video.pipeline") == "ipa_rt.video.pipeline"


def test_find_cycle():
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_two_packages_import_each_other():
    """The same, one level up: each subpackage of ipa_rt (and each top-level module) is one room, and no chain of
    imports leads from a room back into itself (runtime, adapters and kernels once did: lower rooms never read
    upper ones)."""
    rooms: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        room = ".".join(module.split(".")[:2])
        rooms.setdefault(room, set()).update(r for d in deps if (r := ".".join(d.split(".")[:2])) != room)
    assert {"ipa_rt.adapters", "ipa_rt.runtime", "ipa_rt.kernels"} <= set(rooms["ipa_rt.core"])
    cycle = find_cycle(rooms)
    assert cycle is None, "packages importing each other: " + " -> ".join(cycle or [])


@pytest.mark.slow
def test_submodule_imports_are_quiet():
    """A user importing a submodule first (``ipa_rt.export``, ``ipa_rt.video.pipeline``, ...) sees nothing from
    third-party libraries: diffusers' pipeline modules pull in transformers' image processors, which note on stderr that
    torchvision is missing (PIL is the path ipa_rt uses); ipa_rt imports them under ``hushed``. Fresh processes:
    in this one they are imported already."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "IPA_RT_VERBOSE"}
    for module in ("ipa_rt.export.openvino_engine", "ipa_rt.video.pipeline", "ipa_rt.core", "ipa_rt.flux"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (module, out.stderr)
