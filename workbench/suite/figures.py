"""The checkpoint lineage figure: who was trained from whom.

A suite holds a few organisms and many safety-training checkpoints (the demo suite: 42 in six
series). Drawn one leaf per checkpoint, the series' steps crowd one row and their labels run off
the page; so a series is one branch, labelled once (its method, learning rate, optimizer, seed),
with its steps as markers along it (hover names each checkpoint). Everything else is a tree node.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from workbench.core.errors import require_columns
from workbench.present.style import KEEP
from workbench.suite.lineage import parse_name

ROLE_STYLE: dict[str, dict[str, str]] = {
    "base": {"color": "#000000", "symbol": "circle"},
    "backdoored": {"color": "#D55E00", "symbol": "x"},
    "sanitized": {"color": "#009E73", "symbol": "diamond"},
    "external": {"color": "#0072B2", "symbol": "square"},
}
_OTHER_ROLE = {"color": "#999999", "symbol": "triangle-up"}
BRANCH = 0.85   # the length of a series' branch, in tree levels


def _parent(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def tree_layout(names: Sequence[str], parents: Sequence[str]) -> dict[str, tuple[float, int]]:
    """(x, depth) per node: leaves spaced one apart in depth-first order, parents centred over
    their children. Parents not in `names` make a node a root. Cycles are cut, not followed."""
    known = set(names)
    children: dict[str, list[str]] = {n: [] for n in names}
    roots = []
    for n, p in zip(names, parents):
        (children[p].append(n) if p in known and p != n else roots.append(n))
    pos: dict[str, tuple[float, int]] = {}
    next_x = [0.0]

    def place(n: str, depth: int) -> float:
        pos[n] = (0.0, depth)  # mark visited before recursing
        kids = [c for c in children[n] if c not in pos]
        xs = [place(c, depth + 1) for c in kids]
        if xs:
            x = (xs[0] + xs[-1]) / 2
        else:
            x, next_x[0] = next_x[0], next_x[0] + 1
        pos[n] = (x, depth)
        return x

    for r in roots:
        place(r, 0)
    for n in names:  # anything only reachable through a cycle
        if n not in pos:
            place(n, 0)
    return pos


def _series_label(series: str, parent: str) -> str:
    """'hhh_sft lr1e-3 adamw s0' for `PARENT~hhh_sft/lr1e-3/adamw/s0`."""
    rest = series[len(parent) + 1:] if parent and series.startswith(parent + "~") else series
    return rest.replace("/", " ")


def collapse_series(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(the frame with each series' steps replaced by one node named after the series, and each
    series' own rows by step). A checkpoint that is not a series step stays as it is."""
    names = frame["name"].astype(str)
    parsed = [parse_name(n) for n in names]
    in_series = [p is not None and p["step"] is not None for p in parsed]
    steps = frame[in_series].assign(_series=[p["series"] for p, s in zip(parsed, in_series) if s],
                                    _step=[p["step"] for p, s in zip(parsed, in_series) if s])
    series = {s: g.sort_values("_step") for s, g in steps.groupby("_series", sort=False)}
    nodes = frame[[not s for s in in_series]]
    heads = pd.DataFrame([{**g.iloc[0].to_dict(), "name": s, "role": "sanitized"} for s, g in series.items()],
                         columns=list(frame.columns) + ["_series", "_step"])
    return pd.concat([nodes, heads[list(frame.columns)]], ignore_index=True), series


def lineage_figure(suite_frame: pd.DataFrame) -> go.Figure:
    """The suite as a tree (nodes coloured and shaped by role), each sanitization series one
    branch with its steps along it."""
    require_columns(suite_frame, ["name", "role", "parent"], "suite", "pass Suite.to_frame()")
    frame, series = collapse_series(suite_frame)
    names = frame["name"].astype(str).tolist()
    parents = [_parent(p) for p in frame["parent"]]
    pos = tree_layout(names, parents)
    ex, ey = [], []
    for n, p in zip(names, parents):
        if p in pos and p != n:
            ex += [pos[p][0], pos[n][0], None]
            ey += [-pos[p][1], -pos[n][1], None]
    for s in series:  # each branch: from its first step down to its last
        x, d = pos[s]
        ex += [x, x, None]
        ey += [-d, -d - BRANCH, None]
    fig = go.Figure(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#888888", width=1.2),
                               hoverinfo="skip", showlegend=False, name="edges", meta=KEEP))
    frame = frame.assign(_parent=parents)
    for role in list(ROLE_STYLE) + sorted(set(frame["role"].astype(str)) - set(ROLE_STYLE)):
        rows = frame[(frame["role"].astype(str) == role) & ~frame["name"].isin(list(series))]
        xs, ys, labels, hover = [], [], [], []
        for r in rows.to_dict("records"):
            xs.append(pos[r["name"]][0])
            ys.append(-pos[r["name"]][1])
            labels.append(r["name"][len(r["_parent"]) + 1:] if r["_parent"] and r["name"].startswith(r["_parent"] + "/")
                          else r["name"])
            extra = "".join(f"<br>{k}: {r[k]}" for k in ("method", "step", "preset", "seed")
                            if k in r and r[k] is not None and str(r[k]) not in ("", "nan", "<NA>"))
            hover.append(f"<b>{r['name']}</b><br>role: {role}<br>parent: {r['_parent'] or '-'}{extra}")
        if role == "sanitized":     # the series' steps, along their branches
            for s, g in series.items():
                x, d = pos[s]
                top = max(float(g["_step"].max()), 1.0)
                for step, name in zip(g["_step"], g["name"]):
                    xs.append(x)
                    ys.append(-d - BRANCH * math.log2(1 + step) / math.log2(1 + top))
                    labels.append(_series_label(s, _parent(g["parent"].iloc[0])) if step == g["_step"].min() else "")
                    hover.append(f"<b>{name}</b><br>series: {s}<br>step: {step}")
        if not xs:
            continue
        style = ROLE_STYLE.get(role, _OTHER_ROLE)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers+text", name=role, text=labels, textposition="middle right",
            textfont=dict(size=10), hovertext=hover, hoverinfo="text", meta=KEEP,
            marker=dict(size=10 if role == "sanitized" else 14, color=style["color"], symbol=style["symbol"],
                        line=dict(width=1, color="white"))))
    depth = max((d for _, d in pos.values()), default=0) + (BRANCH if series else 0)
    width = max((x for x, _ in pos.values()), default=0)
    fig.update_xaxes(visible=False, range=[-0.8, width + 1.6])
    fig.update_yaxes(visible=False, range=[-depth - 0.4, 0.6])
    fig.update_layout(title="Checkpoint lineage", height=int(180 + 110 * (depth + 1)),
                      width=max(560, 170 + 170 * (width + 1)), plot_bgcolor="white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
                      margin=dict(l=20, r=20, t=80, b=20))
    return fig
