"""The registered `deltas` analysis: the update between two checkpoints of a suite, saved.

`workbench analyze` computes, for every organism, base -> backdoored ("where did backdoor training
write?") and, for every safety-training run, backdoored -> its last checkpoint (what the safety
update changed); any other pair is one command (`workbench deltas A B --suite S`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.core import results
from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ConfigError
from workbench.families.deltas.statistics import EXACT_MAX
from workbench.families.deltas.stream import Delta, compare
from workbench.suite import lineage
from workbench.suite.tensors import suite_weights

ANALYSIS = "deltas"


@dataclass(frozen=True)
class DeltasConfig:
    a: str = ""                 # the checkpoint before (default: b's parent)
    b: str = ""                 # the checkpoint after
    top_k: int = 8              # singular values (and, for o and down, directions) kept per matrix
    exact_max: int = EXACT_MAX  # matrices up to this many entries get an exact SVD; larger ones a sketch
    block_mb: int = 4           # float32 megabytes per block read (blocks that stay in cache are faster)


def pairs(suite: Any) -> list[tuple[str, str]]:
    """The pairs `workbench analyze` compares: parent -> organism for every backdoored organism with a
    parent, and organism -> last step of every safety-training series."""
    out = []
    for e in suite.entries:
        if e.role == "backdoored" and e.parent is not None:
            out.append((e.parent, e.name))
    for _, row in lineage.list_series(suite).iterrows():
        last = lineage.series(suite, row["series"])[-1].name
        if row["parent"] in suite.names:
            out.append((row["parent"], last))
    return out


def load_delta(res: results.Result, vectors: bool = True) -> Delta:
    """A saved comparison; `vectors=False` leaves the singular vectors on disk (tables only)."""
    prov = res.provenance
    return Delta(res.table("tensors"), res.table("heads") if res.has_table("heads") else pd.DataFrame(),
                 res.tensors() if vectors and prov.get("tensors") else {}, prov.get("a", "?"), prov.get("b", "?"))


@register
class Deltas(Analysis):
    """Per tensor, per layer x module and per head: the update's norms, cosine with the weight, the
    fraction of entries that did not move, and its spectrum; the top directions that attention-output
    and MLP-down updates write into the residual stream."""

    name = ANALYSIS
    version = 1
    Config = DeltasConfig
    title = "Weight deltas"
    family = "deltas"

    def plan(self, suite: Any, cfg: DeltasConfig, **_: Any) -> Plan:
        if not cfg.b:
            raise ConfigError("name the checkpoint after the update (b=...); a defaults to its parent")
        b = cfg.b
        a = cfg.a or suite.entry(b).parent
        if a is None:
            raise ConfigError(f"{b!r} has no parent in the suite; name the checkpoint to compare it with (a=...)")
        if a == b:
            raise ConfigError(f"a and b are both {a!r}; name two checkpoints")
        if cfg.top_k < 1 or cfg.block_mb < 1:
            raise ConfigError(f"top_k and block_mb must be positive (got {cfg.top_k}, {cfg.block_mb})")
        return Plan({"a": suite.sha256(a), "b": suite.sha256(b)}, config=replace(cfg, a=a))

    def compute(self, suite: Any, cfg: DeltasConfig, plan: Plan, progress: bool = True, **_: Any) -> Output:
        d = compare(suite_weights(suite, cfg.a), suite_weights(suite, cfg.b), top_k=cfg.top_k,
                    exact_max=cfg.exact_max, block_bytes=cfg.block_mb << 20, progress=progress)
        return Output({"tensors": d.tensors, "heads": d.heads, "modules": d.modules},
                      {"a": cfg.a, "b": cfg.b, "message": d.message,
                       "a_role": suite.entry(cfg.a).role, "b_role": suite.entry(cfg.b).role},
                      tensors=d.vectors, value=d)

    def load(self, result: results.Result) -> Delta:
        return load_delta(result)

    def default_configs(self, suite: Any) -> list[DeltasConfig]:
        return [DeltasConfig(a=a, b=b) for a, b in pairs(suite)]

    def sections(self, suite_dir: Path) -> list[Section]:
        from workbench.families.deltas import figures
        out: list[Section] = []
        for res in results.list_results(suite_dir, self.name):
            d = load_delta(res, vectors=False)
            out.append((f"{d.a} -> {d.b}", d.message))
            out.append((f"{d.b}: relative update per layer and module", figures.heatmap(d)))
        return out
