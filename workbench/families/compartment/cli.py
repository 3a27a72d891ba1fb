"""`workbench compartment SUITE [--backdoor B] [--series ...]`: the compartmentalisation test, printed."""
from __future__ import annotations

import argparse
from typing import Any

SHOWN = ["series", "size", "control", "share", "share_null_mean", "share_p_low", "share_p_high", "overlap_ratio",
         "overlap_p_low", "overlap_p_high", "verdict"]


def _compartment(a: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.core.analysis import registered
    from workbench.core.options import config_from
    from workbench.suite.manifest import load_suite

    analysis = registered()["compartment"]
    suite = load_suite(a.suite)
    computed, res, _ = analysis.produce(suite, config_from(analysis, a), reuse=not a.recompute, progress=not a.quiet)
    runs = res.table("runs")
    with pd.option_context("display.width", 240, "display.max_rows", 100, "display.max_colwidth", 56,
                           "display.precision", 3):
        print(runs[[c for c in SHOWN if c in runs]].to_string(index=False))
        if res.has_table("surgery") and len(res.table("surgery")):
            s = res.table("surgery")
            print("-- causal surgery")
            print(s[["series", "variant", "trigger_rate", "trigger_rate_lo", "trigger_rate_hi", "capability"]]
                  .to_string(index=False))
    gate = "passed" if res.provenance.get("controls_passed") else "FAILED: verdicts withheld"
    print(f"controls: {gate}")
    print(f"rule: {res.provenance.get('rule', '')}")
    print(f"compartment: {'computed' if computed else 'found'} {res.key} ({res.dir})")
    return 0


def add_commands(sub: Any) -> None:
    from workbench.core.analysis import registered
    from workbench.core.options import add_options
    from workbench.families.compartment import tasks  # noqa: F401  (registers the analysis)

    help_ = ("the compartmentalisation test: for every safety-training run of a backdoor's organisms, the share of "
             "the update on the trigger circuit's weights and its overlap with the trigger directions, each against "
             "a null; causal surgery; a verdict per run, after two controls")
    p = sub.add_parser("compartment", help=help_, description=help_)
    p.add_argument("suite")
    add_options(p, registered()["compartment"])
    p.add_argument("--recompute", action="store_true", help="recompute even where a saved result has the same key")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_compartment)
