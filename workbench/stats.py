"""Small statistics used across analyses."""
from __future__ import annotations

import math

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
