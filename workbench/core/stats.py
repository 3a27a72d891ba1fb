"""Small statistics used across analyses: the Wilson interval for rates, and the one agreement
statistic (Pearson r, top-k recall, largest error) by which every estimate meets exact values, and
t-intervals of a mean across seeds."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(rate, low, high) with the Wilson score interval: honest near 0 and 1, where backdoor rates
    live and the normal approximation gives impossible bounds."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp so the interval always contains the observed rate (rounding at k=0 or k=n)
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def agreement(a: Tensor, b: Tensor, k: int = 10) -> dict[str, float]:
    """How well estimates `a` reproduce exact effects `b` (flat): Pearson r, top-k recall (k
    capped at the number of entries), the count and the largest error."""
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    k = min(k, a.numel())
    if k == 0:
        return {"pearson": r, "top0_recall": float("nan"), "n": 0, "max_abs_err": float("nan")}
    top_a = set(a.abs().topk(k).indices.tolist())
    top_b = set(b.abs().topk(k).indices.tolist())
    return {"pearson": r, f"top{k}_recall": len(top_a & top_b) / k, "n": int(a.numel()),
            "max_abs_err": float((a - b).abs().max())}


# two-sided 95% Student-t quantiles by degrees of freedom (scipy is not a dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    if df <= 0:
        return math.nan
    keys = sorted(_T95)
    for k in keys:
        if df <= k:
            return _T95[k]
    return 1.96


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): a 95% t-interval across seeds; NaN bounds with fewer than two values."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = t95(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half
