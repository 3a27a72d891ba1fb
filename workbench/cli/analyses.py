"""`workbench analyze`, `workbench run` and `workbench results`: commands every registered analysis
gets without writing any CLI code of its own (its options come from its Config dataclass)."""
from __future__ import annotations

import argparse
import dataclasses
import time
import types
import typing
from typing import Any

import pandas as pd

from workbench import catalog
from workbench.core.analysis import Analysis
from workbench.core.options import add_options, config_from, options  # noqa: F401  (re-exported)
from workbench.core.results import list_results, results_root
from workbench.suite.manifest import load_suite

def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, [], {}))
    return str(value)


def _run_one(analysis: Analysis, suite: Any, cfg: Any, recompute: bool, progress: bool) -> tuple[str, Any]:
    """Run one config; (what happened: "found" or "computed", the saved Result)."""
    computed, res, _ = analysis.produce(suite, cfg, reuse=not recompute, progress=progress)
    return ("computed" if computed else "found"), res


def _analyze(a: argparse.Namespace) -> int:
    suite = load_suite(a.suite)
    chosen = catalog.in_order(a.only or None)
    skip = set(a.skip or ())
    t0 = time.perf_counter()
    counts = {"found": 0, "computed": 0}
    for analysis in chosen:
        if analysis.name in skip or (a.demo and not analysis.demo):
            continue
        for cfg in analysis.default_configs(suite):
            t = time.perf_counter()
            what, res = _run_one(analysis, suite, cfg, a.recompute, not a.quiet)
            counts[what] += 1
            if not a.quiet or what == "computed":
                print(f"{analysis.name:16s} {what:8s} {res.key}  {_describe(res.provenance.get('config', {}))[:90]}"
                      f"  ({time.perf_counter() - t:.1f} s)")
    print(f"analyze: {counts['computed']} computed, {counts['found']} found by key, "
          f"{time.perf_counter() - t0:.1f} s; results under {results_root(suite.root)}")
    return 0


def _run(a: argparse.Namespace) -> int:
    analysis = catalog.get(a.analysis)
    suite = load_suite(a.suite)
    what, res = _run_one(analysis, suite, config_from(analysis, a), a.recompute, not a.quiet)
    print(f"{analysis.name}: {what} {res.key} ({res.dir})")
    for t in res.provenance.get("tables", []):
        df = res.table(t)
        print(f"  {t}: {len(df)} rows x {len(df.columns)} columns ({', '.join(map(str, df.columns[:8]))}"
              f"{', ...' if len(df.columns) > 8 else ''})")
    return 0


def _results(a: argparse.Namespace) -> int:
    load_suite(a.suite)
    names = [a.analysis] if a.analysis else sorted(catalog.analyses())
    rows = []
    for name in names:
        if a.analysis:
            catalog.get(name)
        for r in list_results(a.suite, name):
            p = r.provenance
            rows.append({"analysis": name, "key": r.key, "version": p.get("version", ""),
                         "created": p.get("created", ""), "seconds": p.get("seconds"),
                         "config": _describe(p.get("config", {}))[:70]})
    if not rows:
        print("no saved results" + (f" of {a.analysis}" if a.analysis else "") + f" in {a.suite}")
        return 0
    with pd.option_context("display.width", 220, "display.max_colwidth", 70, "display.max_rows", 500):
        print(pd.DataFrame(rows).to_string(index=False))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    an = sub.add_parser("analyze", help="run every registered analysis's default jobs on a suite (what make demo "
                                        "runs); saved results are found by key, not recomputed")
    an.add_argument("suite")
    an.add_argument("--only", nargs="+", metavar="ANALYSIS", help="just these analyses (and in dependency order)")
    an.add_argument("--skip", nargs="+", metavar="ANALYSIS", help="leave these out")
    an.add_argument("--recompute", action="store_true", help="recompute even where a result of the same key exists")
    an.add_argument("--demo", action="store_true", help="only what `make demo` computes (leaves out the analyses "
                                                       "along every series: circuit, paths_series, graph_series)")
    an.add_argument("--quiet", action="store_true")
    an.set_defaults(func=_analyze)

    run = sub.add_parser("run", help="run one registered analysis with options from its config "
                                     "(`workbench run ANALYSIS --help` lists them)")
    rs = run.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, analysis in sorted(catalog.analyses().items()):
        if analysis.internal:
            continue
        p = rs.add_parser(name, help=analysis.title or name)
        p.add_argument("suite")
        add_options(p, analysis)
        p.add_argument("--recompute", action="store_true")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=_run)

    re_ = sub.add_parser("results", help="list saved results (every analysis, or one), newest first")
    re_.add_argument("suite")
    re_.add_argument("analysis", nargs="?", help="one analysis's results only")
    re_.set_defaults(func=_results)

