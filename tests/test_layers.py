"""The floors of the code, drawn from its imports: every module of ``losslab/``, ``data/``, ``models/``,
``evals/``, ``trainer/`` and ``scripts/`` parsed, imports inside functions included.

    losslab  <  data  <  models  <  evals  <  trainer  <  scripts

A module imports from its own floor or those below, never above (``models/checkpoint.py`` reads a checkpoint's
tokenizer with ``data.tokenizer``: data is below models; ``evals`` is handed what it needs from training as
arguments). No two packages import each other, no modules import each other in a cycle, DeepSpeed is imported
by ``trainer/engine.py`` alone, and reading, evaluating, converting and comparing checkpoints never loads it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.test_train import REPO, clean_env

FLOORS = {"losslab": 0, "data": 1, "models": 2, "evals": 3, "trainer": 4, "scripts": 5}


def modules() -> dict[str, Path]:
    out = {}
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path) -> list[str]:
    """Every module name an import statement of ``path`` (module ``name``) reads, at any depth of the code."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            out += [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name in module ``base``
    return out


def graph() -> dict[str, set[str]]:
    """module -> the modules of the checkout it imports (``from a.b import c``: ``a.b.c`` if it is a module,
    else ``a.b``). Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``; those arrows are
    left out, as a package's ``__init__`` importing its own modules is no cycle."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = set()
        for target in imported(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        edges[name] = found
    return edges


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_the_graph_is_drawn_from_every_package():
    edges = graph()
    assert {m.split(".")[0] for m in edges} == set(FLOORS)
    assert "data.tokenizer" in edges["models.checkpoint"]  # a top-level import
    assert "models.hf" in edges["trainer.init_from"]  # an import inside a function


def test_no_import_runs_up_a_floor():
    up = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets if floor(b) > floor(a))
    assert up == [], "imports from a lower floor up:\n" + "\n".join(up)


def test_no_two_packages_import_each_other():
    arrows = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            if a.split(".")[0] != b.split(".")[0]:
                arrows[a.split(".")[0]].add(b.split(".")[0])
    both = sorted((a, b) for a in arrows for b in arrows[a] if a in arrows.get(b, set()))
    assert both == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                    found.append(sorted(component))
    return found


def test_cycles_are_found():
    """The check itself: a cycle of three modules and one of two are found, a chain is not."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}, "f": {"a"}}
    assert sorted(cycles(edges)) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_deepspeed_is_imported_by_the_engine_alone():
    mods = modules()
    importers = sorted(
        name
        for name, path in mods.items()
        if floor(name) < FLOORS["scripts"] and any(t.split(".")[0] == "deepspeed" for t in imported(name, path))
    )
    assert importers == ["trainer.engine"]


def test_reading_evaluating_converting_and_comparing_load_no_deepspeed():
    compare = [m for m in ("evals.compare", "scripts.compare_runs") if m in modules()]
    assert compare, "no comparison code found"
    names = ["evals.runner", *compare, "models.hf", "models.checkpoint", "scripts.export_hf", "scripts.import_hf"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'deepspeed' not in sys.modules, name\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
