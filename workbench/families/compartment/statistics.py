"""The compartmentalisation statistics, each against its null distribution, and the verdict rule.

1. Update share: the share of the update's squared norm that lands on C's parameters, against
   random component sets with as many heads, KV heads and MLPs as C (so matched in kind and in
   parameter count). One-sided permutation p-values both ways, the z-score and the ratio to the
   null mean.
2. Direction overlap: how strongly the update acts on the directions the circuit uses. For a matrix
   that reads the residual stream (q, k, v after the attention norm; gate, up after the MLP norm),
   ||dW r||^2 with r the trigger direction at its input scaled by the norm's gain; for a matrix that
   writes it (o, down), ||r^T dW||^2 with r the trigger direction at its output. Summed over the
   matrices and divided by the same sum for a random unit direction's expectation (||dW||_F^2 / d),
   so 1 means "no more than a random direction"; the null draws random directions (one per site,
   shared by the matrices that read or write there, as the trigger direction is) distributed as the
   residual stream's own variation at that site: an update lies in the span of the activations it
   was trained on, so only beating such directions singles out the trigger. The ratio against
   isotropic random directions is reported beside it.

Verdict (stated in every result): with alpha = 0.05,
- "not compartmentalised" if the update share is significantly *above* its null (p_high < alpha) or
  the update acts on the trigger directions significantly more than on random ones (p_high < alpha);
- "compartmentalised" if neither, and the update avoids the circuit in either sense: its share is
  significantly *below* its null, or it acts on the trigger directions significantly *less* than on
  the stream's own directions (p_low < alpha);
- otherwise "inconclusive". Over several seeds of a run, a verdict needs every seed to agree, else
  "inconclusive"; the intervals are over seeds.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.families.compartment.components import KINDS, Component

ALPHA = 0.05
VERDICTS = ("compartmentalised", "not compartmentalised", "inconclusive")
N_NULL = 10_000
RULE = ("alpha = 0.05. 'not compartmentalised': the update share is significantly above its null (random component "
        "sets matched in kind and parameter count: p_high < alpha) or the update acts on the trigger directions "
        "significantly more than on random directions drawn from the stream's own variation (p_high < alpha). "
        "'compartmentalised': neither, and the update avoids the circuit: its share is significantly below its null "
        "or it acts on the trigger directions significantly less than on the stream's own directions (p_low < "
        "alpha). Otherwise 'inconclusive'. Several seeds: every seed must agree, else 'inconclusive'.")


def _pvalues(obs: float, null: np.ndarray) -> dict[str, float]:
    n = len(null)
    mean, sd = float(null.mean()), float(null.std(ddof=1)) if n > 1 else 0.0
    return {"null_mean": mean, "null_sd": sd, "null_lo": float(np.quantile(null, 0.025)),
            "null_hi": float(np.quantile(null, 0.975)),
            "p_low": (1 + int((null <= obs + 1e-15).sum())) / (n + 1),
            "p_high": (1 + int((null >= obs - 1e-15).sum())) / (n + 1),
            "z": (obs - mean) / sd if sd > 0 else 0.0, "ratio": obs / mean if mean > 0 else math.nan}


def update_share(energy: pd.DataFrame, circuit: Iterable[Component], n_null: int = N_NULL,
                 seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """The share of the update on C's components (among all components), and its null draws."""
    comp = energy[energy["kind"].isin(KINDS)].reset_index(drop=True)
    total = float(comp["energy"].sum())
    inside = set(circuit)
    is_c = np.array([(k, int(l), int(i)) in inside for k, l, i in zip(comp["kind"], comp["layer"], comp["index"])])
    other = float(energy.loc[~energy["kind"].isin(KINDS), "energy"].sum())
    base = {"energy_total": total + other, "energy_components": total, "energy_outside_components": other,
            "n_circuit": int(is_c.sum()), "params_circuit": int(comp.loc[is_c, "n_params"].sum()),
            "params_components": int(comp["n_params"].sum())}
    if total <= 0:
        return {**base, "share": 0.0, "param_share": 0.0, "null_mean": 0.0, "null_sd": 0.0, "null_lo": 0.0,
                "null_hi": 0.0, "p_low": 1.0, "p_high": 1.0, "z": 0.0, "ratio": math.nan,
                "message": "the update is zero: nothing to locate"}, np.zeros(0)
    share = float(comp.loc[is_c, "energy"].sum()) / total
    rng = np.random.default_rng(seed)
    null = np.zeros(n_null)
    for kind in KINDS:       # draw as many components of each kind as C has, without replacement
        e = comp.loc[comp["kind"] == kind, "energy"].to_numpy()
        k = int((is_c & (comp["kind"] == kind).to_numpy()).sum())
        if k == 0 or len(e) == 0:
            continue
        picks = np.argsort(rng.random((n_null, len(e))), axis=1)[:, :k]
        null += e[picks].sum(1)
    null /= total
    return {**base, "share": share, "param_share": base["params_circuit"] / max(1, base["params_components"]),
            **_pvalues(share, null)}, null


def direction_energy(d: torch.Tensor, r: torch.Tensor, reads: bool) -> torch.Tensor:
    """||dW r||^2 (a reader, dW [out, in], r [in, n]) or ||r^T dW||^2 (a writer, r [out, n]), per column of r."""
    d = d.double()
    return (d @ r.double()).square().sum(0) if reads else (r.double().T @ d).square().sum(1)


class Overlap:
    """Accumulates the direction overlap over matrices, one matrix at a time (never all updates at once)."""

    def __init__(self) -> None:
        self.obs, self.expect, self.n = 0.0, 0.0, 0
        self.null: np.ndarray | None = None

    def add(self, d: torch.Tensor, u: torch.Tensor, rand: torch.Tensor, reads: bool) -> None:
        """dW, the trigger direction at its site (unit, [dim]), the site's random unit directions [dim, n]."""
        dim = d.shape[1] if reads else d.shape[0]
        self.obs += float(direction_energy(d, u[:, None], reads)[0])
        e = direction_energy(d, rand, reads).numpy()
        self.null = e if self.null is None else self.null + e
        self.expect += float(d.double().square().sum()) / dim
        self.n += 1

    def result(self) -> tuple[dict[str, Any], np.ndarray]:
        """The overlap ratio (1 = as much as a random direction) and its null draws."""
        if self.null is None or self.expect <= 0:
            return {"overlap": 0.0, "p_low": 1.0, "p_high": 1.0, "null_mean": 0.0, "null_sd": 0.0, "null_lo": 0.0,
                    "null_hi": 0.0, "z": 0.0, "ratio": math.nan, "n_matrices": self.n}, np.zeros(0)
        ratio, null = self.obs / self.expect, self.null / self.expect
        return {"overlap": ratio, "n_matrices": self.n, **_pvalues(ratio, null)}, null


def verdict(share: dict[str, Any], overlap: dict[str, Any] | None, alpha: float = ALPHA) -> tuple[str, str]:
    """(verdict, the reason in words) by the rule in the module docstring."""
    if share.get("energy_components", 0.0) <= 0:
        return "inconclusive", "the update is zero"
    ov_high = overlap is not None and overlap.get("p_high", 1.0) < alpha
    if share["p_high"] < alpha or ov_high:
        why = []
        if share["p_high"] < alpha:
            why.append(f"{share['share']:.1%} of the update lands in C against {share['null_mean']:.1%} for random "
                       f"matched sets (p = {share['p_high']:.3g})")
        if ov_high:
            why.append(f"it acts on the trigger directions {overlap['ratio']:.2f}x as much as on the stream's own "
                       f"directions (p = {overlap['p_high']:.3g})")
        return "not compartmentalised", "; ".join(why)
    ov_low = overlap is not None and overlap.get("p_low", 1.0) < alpha
    if share["p_low"] < alpha or ov_low:
        why = []
        if share["p_low"] < alpha:
            why.append(f"only {share['share']:.1%} of the update lands in C against {share['null_mean']:.1%} for random "
                       f"matched sets (p = {share['p_low']:.3g})")
        if ov_low:
            why.append(f"it acts on the trigger directions {overlap['ratio']:.2f}x as much as on the stream's own "
                       f"directions (p = {overlap['p_low']:.3g})")
        return "compartmentalised", "; ".join(why)
    return "inconclusive", (f"{share['share']:.1%} of the update lands in C, within the null's range "
                            f"({share['null_lo']:.1%} to {share['null_hi']:.1%})")


def over_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run group (backdoor, size, method, lr, optimizer): statistics over seeds with their range,
    and the combined verdict (every seed must agree)."""
    keys = [c for c in ("backdoor", "size", "method", "lr", "optimizer", "control") if c in rows.columns]
    out = []
    for k, g in rows.groupby(keys, dropna=False):
        verdicts = set(g["verdict"])
        rec = dict(zip(keys, k if isinstance(k, tuple) else (k,)))
        rec.update({"n_seeds": len(g), "verdict": verdicts.pop() if len(verdicts) == 1 else "inconclusive"})
        for col in ("share", "share_ratio", "overlap", "persistence_rate"):
            if col in g:
                v = g[col].astype(float)
                rec.update({col: float(v.mean()), f"{col}_lo": float(v.min()), f"{col}_hi": float(v.max())})
        out.append(rec)
    return pd.DataFrame(out)
