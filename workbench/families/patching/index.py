"""Finding the family's saved results: which `patching`, `circuit`, `paths` and `graph` results a
suite holds, and the best one for a checkpoint. Reads provenance only (never loads a model)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from workbench.core.results import Result, list_results


def patching_index(suite_dir: str | Path) -> pd.DataFrame:
    """One row per saved `patching` result (newest first): which checkpoint (name and weight hash),
    backdoor, method, metric, direction and kinds, plus the criterion quantity. Reads provenance only."""
    rows = []
    for r in list_results(suite_dir, "patching"):
        p, cfg = r.provenance, r.provenance.get("config", {})
        rows.append({"key": r.key, "checkpoint": p.get("checkpoint"), "sha256": p.get("inputs", {}).get("checkpoint"),
                     "backdoor": cfg.get("backdoor"), "method": cfg.get("method"), "metric": cfg.get("metric"),
                     "direction": cfg.get("direction"), "kinds": tuple(cfg.get("kinds", ())),
                     "n_kinds": len(cfg.get("kinds", ())), "n_pairs": p.get("n_pairs"),
                     "prompts": p.get("inputs", {}).get("prompts"), "created": p.get("created", ""),
                     "early_trigger_share": p.get("early_trigger_share"), "result": r})
    cols = ["key", "checkpoint", "sha256", "backdoor", "method", "metric", "direction", "kinds", "n_kinds", "n_pairs",
            "prompts", "created", "early_trigger_share", "result"]
    return pd.DataFrame(rows, columns=cols)


def pick(index: pd.DataFrame, sha256: str, backdoor: str, method: str, metric: str | None = None,
         direction: str | None = None, prompts: str | None = None,
         kinds: Sequence[str] | None = None) -> Result | None:
    """The best saved result for a checkpoint (by weight hash: a sanitization series' step 0 shares
    its parent's): the one with the most kinds, newest first among equals. `kinds`: prefer results
    that hold all of them (an exact result to compare a query/key/value estimate with must hold
    those kinds, not only the default ones)."""
    sel = index[(index["sha256"] == sha256) & (index["backdoor"] == backdoor) & (index["method"] == method)]
    if kinds is not None and (cover := sel["kinds"].map(lambda ks: set(kinds) <= set(ks))).any():
        sel = sel[cover]
    if metric is not None:
        sel = sel[sel["metric"] == metric]
    if direction is not None:
        sel = sel[sel["direction"] == direction]
    if prompts is not None and (sel["prompts"] == prompts).any():
        sel = sel[sel["prompts"] == prompts]
    if sel.empty:
        return None
    return sel.sort_values(["n_kinds", "created"], ascending=False).iloc[0]["result"]


def circuit_results(suite_dir: str | Path, backdoor: str | None = None) -> list[Result]:
    """Saved `circuit` results (newest first), optionally of one backdoor."""
    return [r for r in list_results(suite_dir, "circuit")
            if backdoor is None or r.provenance.get("config", {}).get("backdoor") == backdoor]


def paths_results(suite_dir: str | Path, sha256: str | None = None, backdoor: str | None = None,
                  metric: str | None = None, direction: str | None = None) -> list[Result]:
    """Saved `paths` results (newest first), optionally of one checkpoint (by weight hash), backdoor,
    metric and direction; those traced into the readout head (the default receivers) first."""
    out = []
    for r in list_results(suite_dir, "paths"):
        p, cfg = r.provenance, r.provenance.get("config", {})
        if ((sha256 is None or p.get("inputs", {}).get("checkpoint") == sha256)
                and (backdoor is None or cfg.get("backdoor") == backdoor)
                and (metric is None or cfg.get("metric") == metric)
                and (direction is None or cfg.get("direction") == direction)):
            out.append(r)
    return sorted(out, key=lambda r: r.provenance.get("readout_head") is None)


def paths_series_results(suite_dir: str | Path, backdoor: str | None = None) -> list[Result]:
    """Saved `paths_series` results (newest first), optionally of one backdoor."""
    return [r for r in list_results(suite_dir, "paths_series")
            if backdoor is None or r.provenance.get("config", {}).get("backdoor") == backdoor]


def graph_results(suite_dir: str | Path, sha256: str | None = None, backdoor: str | None = None) -> list[Result]:
    """Saved `graph` results, optionally of one checkpoint (by weight hash) and backdoor: whole graphs
    first, then by the share of receivers patched exactly, newest first within each."""
    found = [r for r in list_results(suite_dir, "graph")
             if (sha256 is None or r.provenance.get("inputs", {}).get("checkpoint") == sha256)
             and (backdoor is None or r.provenance.get("config", {}).get("backdoor") == backdoor)]
    return sorted(found, key=lambda r: -float(r.provenance.get("exact_share", 1.0)))


def graph_series_results(suite_dir: str | Path, backdoor: str | None = None) -> list[Result]:
    """Saved `graph_series` results (newest first), optionally of one backdoor."""
    return [r for r in list_results(suite_dir, "graph_series")
            if backdoor is None or r.provenance.get("config", {}).get("backdoor") == backdoor]


def _newest(suite_dir: str | Path, analysis: str, **match: object) -> Result | None:
    """The newest saved result of `analysis` whose config (or provenance) matches `match`."""
    for r in list_results(suite_dir, analysis):
        p = r.provenance
        if all(p.get("config", {}).get(k, p.get(k)) == v for k, v in match.items()):
            return r
    return None


def checks_result(suite_dir: str | Path, sha256: str, backdoor: str, metric: str = "logit_diff",
                  direction: str = "denoising") -> Result | None:
    """The newest saved `patching_checks` of a checkpoint (by weight hash)."""
    for r in list_results(suite_dir, "patching_checks"):
        p = r.provenance
        if (p.get("checkpoint_sha256") == sha256 and p["config"].get("backdoor") == backdoor
                and p["config"].get("metric") == metric and p["config"].get("direction") == direction):
            return r
    return None


def localisation_result(suite_dir: str | Path, backdoor: str, metric: str = "logit_diff",
                        direction: str = "denoising") -> Result | None:
    """The newest saved `localisation` of a backdoor."""
    return _newest(suite_dir, "localisation", backdoor=backdoor, metric=metric, direction=direction)
