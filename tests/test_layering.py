"""The house reads downward: who may import whom, and no import circles.

This test is the README's architecture table made executable (the table states exactly these rules):

* ``scheduler`` imports neither ``sim`` nor ``testbed`` (nor simpy, torch, boto3, hydra, ...; no clock:
  ``tests/scheduler/test_purity.py``).
* ``sim`` never imports ``testbed``.
* inside ``testbed``, each subpackage imports only the ones ``MAY_IMPORT`` lists; ``wire``, ``objectstore``,
  ``client`` and ``engine`` never import ``sim``.
* what ``harness`` takes from ``sim`` is free of SimPy (experiment definitions, not the model);
  ``validation`` is the one part of the testbed that runs the SimPy model.
* no two modules import each other, directly or around a circle -- counting every import, also those inside
  functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("scheduler", "sim", "testbed")

# testbed subpackage -> the testbed subpackages it may import (itself included).
MAY_IMPORT = {
    "wire": {"wire"},
    "client": {"wire", "client"},
    # The S3-proxy store is itself an S3 client of the service behind it.
    "objectstore": {"wire", "client", "objectstore"},
    "engine": {"wire", "client", "engine"},
    "harness": {"wire", "client", "objectstore", "engine", "harness"},
    "bench": {"wire", "client", "objectstore", "engine", "harness", "bench"},
    "validation": {"wire", "client", "objectstore", "engine", "harness", "validation"},
    "__main__": {"harness"},
}
NO_SIM = ("wire", "objectstore", "client", "engine")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (``from a import b`` counts ``a.b`` when that is
    a module of its own, else ``a``)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _top(mod: str) -> str:
    return mod.split(".")[0]


def _sub(mod: str) -> str:
    """``testbed.client.core`` -> ``client``; ``testbed`` and ``testbed.__main__`` -> ``__main__``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__main__"


def test_scheduler_imports_neither_sim_nor_testbed(graph):
    bad = [(m, t) for m, ts in graph.items() if _top(m) == "scheduler" for t in ts if _top(t) != "scheduler"]
    assert not bad, f"scheduler must stay the bottom layer: {bad}"


def test_sim_never_imports_testbed(graph):
    bad = [(m, t) for m, ts in graph.items() if _top(m) == "sim" for t in ts if _top(t) == "testbed"]
    assert not bad, bad


def test_testbed_subpackages_import_only_what_the_table_allows(graph):
    bad = []
    for m, ts in graph.items():
        if _top(m) != "testbed":
            continue
        allowed = MAY_IMPORT[_sub(m)]
        for t in ts:
            if _top(t) == "testbed" and t != "testbed" and _sub(t) not in allowed:
                bad.append((m, t))
            if _top(t) == "sim" and _sub(m) in NO_SIM:
                bad.append((m, t))
    assert not bad, f"imports against the architecture table: {bad}"


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_harness_takes_only_simpy_free_parts_of_sim(graph):
    simpy_users = {m for m, p in _modules().items() if _top(m) == "sim" and "import simpy" in p.read_text()}
    bad = []
    for m, ts in graph.items():
        if _top(m) == "testbed" and _sub(m) == "harness":
            for t in ts:
                if _top(t) == "sim" and (_reaches(graph, t) & simpy_users):
                    bad.append((m, t, sorted(_reaches(graph, t) & simpy_users)))
    assert not bad, f"the harness pulls SimPy in through: {bad}"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other around a loop (strongly connected, more than one)."""
    return [sorted(c) for c in {frozenset(_reaches(graph, m) & {n for n in graph if m in _reaches(graph, n)})
                                for m in graph} if len(c) > 1]  # fmt: skip


def test_no_import_cycles(graph):
    assert not _circles(graph), f"import circles: {_circles(graph)}"
    graphlib.TopologicalSorter(graph).prepare()


def test_the_checker_sees_a_planted_cycle_and_a_forbidden_import(tmp_path):
    """The rules above are only as good as the import reader: it must see these."""
    known = {"testbed.wire.a", "testbed.wire.b", "sim.runner"}
    src = {
        "testbed.wire.a": "from testbed.wire import b\n",
        "testbed.wire.b": "def f():\n    from testbed.wire.a import x\n    import sim.runner\n",
    }
    g = {}
    for n, code in src.items():
        p = tmp_path / (n.rsplit(".", 1)[1] + ".py")
        p.write_text(code)
        g[n] = _imports(n, p, known)
    assert g["testbed.wire.a"] == {"testbed.wire.b"}
    assert g["testbed.wire.b"] == {"testbed.wire.a", "sim.runner"}
    assert _circles(g) == [["testbed.wire.a", "testbed.wire.b"]]
