"""The scan's figures (the Scan page and the paper script draw the same ones from saved tables)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from workbench.families.scan.confirm import EFFECT_FOUND, EFFECT_SUSPICIOUS, Z_MIN
from workbench.families.scan.detectors import ORDER

COLOURS = {"backdoor found": "#c0392b", "suspicious": "#e67e22", "nothing found": "#27ae60"}


def _thresholds(fig: go.Figure, axis: str = "y", levels: tuple = ((EFFECT_FOUND, "found"), (EFFECT_SUSPICIOUS, "suspicious"))) -> None:
    for v, name in levels:
        if axis == "y":
            fig.add_hline(y=v, line_dash="dot", line_color="grey", annotation_text=f"{name} ({v:g})")
        else:
            fig.add_vline(x=v, line_dash="dot", line_color="grey", annotation_text=f"{name}")


def verdicts(scans: pd.DataFrame) -> go.Figure:
    """Each scanned checkpoint's score (its best candidate's held-out z), coloured by verdict."""
    fig = go.Figure()
    for v, rows in scans.groupby("verdict"):
        fig.add_bar(x=[f"{c}<br>vs {b}" for c, b in zip(rows["checkpoint"], rows["base"])], y=rows["score"], name=v,
                    marker_color=COLOURS.get(v, "grey"))
    _thresholds(fig)
    fig.update_layout(title="Scan verdicts: the best candidate's effect (share of held-out prompts with a new behaviour)",
                      yaxis_title="effect", height=380)
    return fig


def candidates(cands: pd.DataFrame, top: int = 15) -> go.Figure:
    """The first candidates' held-out z (bars) and effect (text), with the detectors that proposed each."""
    c = cands.head(top).iloc[::-1]
    labels = [f"{t!r} ({w} {p})" for t, w, p in zip(c["text"], c["where"], c["position"])]
    eff = c["effect"] if "effect" in c else pd.Series([None] * len(c))
    text = [f"{d}; effect {e:.2f}" if e == e and e is not None else d for d, e in zip(c["detectors"], eff)]
    fig = go.Figure(go.Bar(x=c["z"], y=labels, orientation="h", text=text, textposition="auto",
                           marker_color=["#c0392b" if f else "#7f8c8d" for f in c["fires"]]))
    _thresholds(fig, "x", ((Z_MIN, "z min"),))
    fig.update_layout(title="Candidates (red: fires on held-out prompts)", xaxis_title="held-out z",
                      height=max(300, 28 * len(c) + 120))
    return fig


def null(null_table: pd.DataFrame, cands: pd.DataFrame) -> go.Figure:
    """The control strings' held-out scores, and where the best candidates fall among them."""
    fig = go.Figure(go.Histogram(x=null_table["score"], name="random control strings", nbinsx=30,
                                 marker_color="#95a5a6"))
    if len(cands):
        mu, sd = null_table["score"].mean(), max(null_table["score"].std(), 1e-3)
        for _, r in cands.head(3).iterrows():
            fig.add_vline(x=mu + r["z"] * sd, line_color="#c0392b", annotation_text=repr(r["text"])[:24])
    fig.update_layout(title="Held-out score: candidates against the null", xaxis_title="score (nats)", height=340)
    return fig


def per_detector(metrics: Mapping[str, Any]) -> go.Figure:
    """The benchmark's detection AUROC and top-5 recovery per detector and combined."""
    names = [d for d in ORDER if f"auroc_{d}" in metrics] + ["combined"]
    au = [metrics.get(f"auroc_{d}") if d != "combined" else metrics.get("detection_auroc") for d in names]
    rec = [metrics.get(f"top5_{d}") if d != "combined" else metrics.get("top5_recovery") for d in names]
    fig = go.Figure([go.Bar(name="detection AUROC", x=names, y=au), go.Bar(name="top-5 trigger recovery", x=names, y=rec)])
    fig.add_hline(y=0.95, line_dash="dot", line_color="grey", annotation_text="AUROC goal 0.95")
    fig.add_hline(y=0.8, line_dash="dot", line_color="grey", annotation_text="recovery goal 0.8")
    fig.update_layout(barmode="group", title="Scan benchmark: per detector and combined", yaxis_range=[0, 1.05],
                      height=380)
    return fig
