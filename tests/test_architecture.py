"""The architecture as tests: the stages are layers (the import contract in pyproject.toml, checked
with import-linter), no module imports another in a cycle, no module grows past 800 lines, the
registry holds every analysis once, and importing the package changes nothing in the process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 800


def test_the_import_contract_holds() -> None:
    """Layers (each stage imports only those below it), families independent of each other and of
    safety, organisms and the CLI (they meet through saved results)."""
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe), "--no-cache", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") >= 4, out.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_module_imports_another_in_a_cycle() -> None:
    graph = grimp.build_graph("workbench", exclude_type_checking_imports=True, cache_dir=None)
    assert _cycles(graph) == []
    # the checker finds a cycle when there is one
    toy = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        toy.add_import(importer=a, imported=b)
    assert _cycles(toy) == [["p.a", "p.b", "p.c"]]


def test_no_module_is_over_800_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "workbench").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (a module past {MAX_LINES} lines is two concepts): {long}"


def test_every_analysis_is_registered_once_under_its_name() -> None:
    from workbench import catalog
    found = catalog.analyses()
    assert {"behaviour", "behaviour_checkpoint", "behaviour_series", "persistence", "patching", "patching_checks",
            "localisation", "circuit", "paths", "paths_series", "graph", "graph_series"} <= set(found)
    for name, analysis in found.items():
        assert analysis.name == name and analysis.version >= 1 and analysis.title
        assert analysis.shown_by in ("", *found), (name, analysis.shown_by)
        assert set(analysis.requires) <= set(found), (name, analysis.requires)
    order = [a.name for a in catalog.in_order()]
    for a in found.values():   # `workbench analyze` runs what an analysis reads before it
        assert all(order.index(r) < order.index(a.name) for r in a.requires), a.name


def test_importing_the_package_has_no_side_effects() -> None:
    code = ("import os, torch; before = (torch.get_num_threads(), dict(os.environ)); import workbench as wb; "
            "assert (torch.get_num_threads(), dict(os.environ)) == before; "
            "missing = [n for n in wb.__all__ if not hasattr(wb, n)]; assert not missing, missing; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("namespace", ["world", "organisms", "suite", "safety", "evaluation", "interp", "patching"])
def test_each_stage_is_a_namespace_with_a_docstring(namespace: str) -> None:
    import workbench as wb
    mod = getattr(wb, namespace)
    assert mod.__doc__ and len(mod.__doc__.split()) > 10
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"wb.{namespace}.{name}"
