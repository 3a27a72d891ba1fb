"""Figures and tables of the trigger circuit's graph (`workbench graph`): the strongest node-level
edges drawn between the model's components, layer by layer. Shared by the Patching page,
`analyses/patching.py` and the HTML report; reads saved `graph` results only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.core.errors import WorkbenchError
from workbench.families.patching.figures.nodes import require, short_token
from workbench.present.style import KEEP

POSITIVE, NEGATIVE = "#b2182b", "#2166ac"  # an edge that carries the behaviour / one that works against it


def how_exact(prov: dict) -> str:
    """What a graph's effects are, for titles: all exact, or exact on some receivers only."""
    if float(prov.get("exact_share", 1.0)) == 1:
        return "exact path patching"
    n, of = len(prov.get("exact_receivers", [])), prov.get("n_receivers", "?")
    return f"exact path patching on {n} of {of} receivers, EAP-IG elsewhere"


def _place(node: str, n_heads: int, group: int) -> tuple[float, float]:
    """(x, y) of a node: x ticks twice a layer (heads after the layer's input, the MLP after them),
    the embedding first and the output last; heads by index, key/value heads just before their
    group's query heads, MLPs, the embedding and the output on a row below the heads."""
    if node == "embed":
        return 0.0, -1.5
    if node == "output":
        return float("inf"), -1.5
    layer = int(node[1:].split(".")[0].split(" ")[0])
    if node.endswith("MLP"):
        return 2.0 * layer + 2, -1.5
    head = int(node.rsplit(".", 1)[1].lstrip("hkv"))
    if ".kv" in node:
        return 2.0 * layer + 0.6, head * group + (group - 1) / 2
    return 2.0 * layer + 1, float(head)


def graph_figure(nodes: pd.DataFrame, n_layers: int, n_heads: int, n_kv: int | None = None, top: int = 24,
                 title: str | None = None) -> go.Figure:
    """The `top` node-level edges by |effect| (exact path patching, summed over positions), drawn
    between the model's components: width by |effect|, red where the path carries the behaviour,
    blue where it works against it; hover for the estimate, the position carrying most and the
    share on the trigger's tokens."""
    require(nodes, ["sender", "receiver_node", "receiver_input", "effect", "abs_effect", "top_token"], "graph edges")
    if nodes.empty:
        raise WorkbenchError("this graph result has no edges")
    group = n_heads // (n_kv or n_heads)
    sel = _strongest(nodes, top)
    end = 2.0 * n_layers + 1
    pos = lambda node: tuple(end if np.isinf(v) else v for v in _place(node, n_heads, group))
    lim = float(sel["effect"].abs().max()) or 1.0
    fig = go.Figure()
    for l in range(n_layers):  # every component, faint, so the graph's gaps show too
        fig.add_trace(go.Scatter(x=[2 * l + 1] * n_heads, y=list(range(n_heads)), mode="markers", meta=KEEP,
                                 marker=dict(size=9, color="#dddddd"), hoverinfo="skip", showlegend=False))
    mid_x, mid_y, hover = [], [], []
    for row in sel.itertuples():
        (x0, y0), (x1, y1) = pos(row.sender), pos(row.receiver_node)
        bend = 0.12 * (x1 - x0) + (0.35 if y0 == y1 else 0.0)       # skip connections arc over the row
        t = np.linspace(0, 1, 24)
        xs = x0 + (x1 - x0) * t
        ys = y0 + (y1 - y0) * t + bend * 4 * t * (1 - t)
        width = 1 + 9 * abs(row.effect) / lim
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=POSITIVE if row.effect >= 0 else NEGATIVE, width=width),
                                 opacity=0.75))
        mid_x.append(xs[12])
        mid_y.append(ys[12])
        est = "".join(f", {name} {getattr(row, col):+.3f}" for col, name in (("eap", "EAP"), ("eap_ig", "EAP-IG"))
                      if col in nodes and pd.notna(getattr(row, col, np.nan)))
        trig = "" if pd.isna(getattr(row, "from_trigger", np.nan)) else f"; {row.from_trigger:.0%} on the trigger"
        hover.append(f"{row.sender} → {row.receiver_node} ({row.receiver_input})<br>exact {row.effect:+.3f}{est}"
                     f"<br>most at {short_token(str(row.top_token))}{trig}")
    fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", marker=dict(size=8, color="rgba(0,0,0,0)"),
                             text=hover, hovertemplate="%{text}<extra></extra>", showlegend=False))
    shown = list(dict.fromkeys(list(sel["sender"]) + list(sel["receiver_node"])))
    for node in (n for n in shown if ".kv" in n):  # a key/value head feeds its group of query heads
        (x0, y0), layer, g = pos(node), int(node[1:].split(".")[0]), int(node.rsplit("kv", 1)[1])
        for h in range(g * group, (g + 1) * group):
            fig.add_trace(go.Scatter(x=[x0, 2 * layer + 1], y=[y0, h], mode="lines", hoverinfo="skip", meta=KEEP,
                                     showlegend=False, line=dict(color="#999999", width=1, dash="dot")))
    xy = [pos(n) for n in shown]
    fig.add_trace(go.Scatter(x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text", text=shown,
                             textposition="top center", meta=KEEP, showlegend=False, hoverinfo="text",
                             marker=dict(size=13, color="#ffffff", line=dict(width=1.5, color="#333333"),
                                         symbol=["diamond" if ".kv" in n else "square" if " MLP" in n or n in
                                                 ("embed", "output") else "circle" for n in shown])))
    for color, name in ((POSITIVE, "carries the behaviour"), (NEGATIVE, "works against it")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, line=dict(color=color, width=4)))
    ticks = [0.0] + [v for l in range(n_layers) for v in (2 * l + 1, 2 * l + 2)] + [end]
    labels = ["embed"] + [t for l in range(n_layers) for t in (f"L{l} heads", f"L{l} MLP")] + ["output"]
    fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=labels, range=[-0.6, end + 0.6], showgrid=False)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_heads)), ticktext=[f"h{h}" for h in range(n_heads)],
                     range=[-2.2, n_heads], showgrid=False, title="head (diamonds: key/value heads)")
    fig.update_layout(title=title or f"The trigger circuit: the {len(sel)} strongest edges (exact path patching)",
                      height=260 + 60 * n_heads, width=max(760, 130 * n_layers + 260),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def graph_table(nodes: pd.DataFrame, top: int = 24) -> pd.DataFrame:
    """The strongest node-level edges, for display (with `patched` where only some are exact)."""
    cols = ["sender", "receiver_node", "receiver_input", "effect", "eap", "eap_ig", "from_trigger", "top_token"]
    require(nodes, cols, "graph edges")
    if "patched" in nodes and not nodes["patched"].all():
        cols.append("patched")
    return _strongest(nodes, top)[cols]


def _strongest(nodes: pd.DataFrame, top: int) -> pd.DataFrame:
    """The `top` node-level edges by |net effect| (an edge whose positions cancel carries little)."""
    return nodes.loc[nodes["effect"].abs().nlargest(top).index]


def check_table(check: pd.DataFrame) -> pd.DataFrame:
    """The saved pooled check of each estimate against exact, over every edge."""
    require(check, ["method", "pearson", "n_edges", "max_abs_err"], "graph check")
    return check


def _column(series: str, step: int, reference: str) -> str:
    """A checkpoint's column: the reference by name, a sanitization step by its method and step."""
    if series == reference:
        return series
    method = series.split("~", 1)[-1].split("/", 1)[0]
    return f"{method} @{step}"


def graph_series_figure(edges: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Which edges survive safety training: edge x checkpoint heatmap of the exact effect (on the
    organism's scale), the organism's strongest edges first, then any checkpoint's own strongest
    that the organism's do not include (a route that grows)."""
    require(edges, ["checkpoint", "series", "step", "edge", "organism_top", "effect"], "graph-series edges")
    if edges.empty:
        raise WorkbenchError("this graph-series result has no edges")
    reference = str(edges["series"].iloc[0])
    cols = list(dict.fromkeys(_column(s, int(t), reference) for s, t in zip(edges["series"], edges["step"])))
    e = edges.assign(column=[_column(s, int(t), reference) for s, t in zip(edges["series"], edges["step"])])
    order = list(dict.fromkeys(list(e.loc[e["organism_top"], "edge"]) + list(e.loc[~e["organism_top"], "edge"])))
    grid = e.pivot_table(index="edge", columns="column", values="effect", aggfunc="first").reindex(index=order,
                                                                                                   columns=cols)
    z = grid.to_numpy(dtype=float)
    lim = max(float(np.nanmax(np.abs(z))), 1e-9)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=order, colorscale="RdBu", reversescale=True, zmid=0, zmin=-lim, zmax=lim,
                               text=np.round(z, 2), texttemplate="%{text}", hovertemplate="%{y}<br>%{x}<br>effect "
                               "%{z:.3f}<extra></extra>", colorbar=dict(title=dict(text="effect", side="right"))))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="checkpoint (organism, then the last step of each safety training)", tickangle=-30)
    fig.update_layout(title=title or "Which edges of the trigger circuit survive safety training?",
                      height=220 + 26 * len(order), width=max(700, 120 * len(cols) + 320), margin=dict(l=240))
    return fig
