"""Figures and tables of path patching (`workbench path`): which earlier heads and MLPs, at which
positions, feed the readout head, and whether that route survives safety training. Shared by the
Patching page, `analyses/patching.py` and the HTML report; reads saved `paths` and `paths_series`
results only (nothing here loads a model).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.errors import WorkbenchError
from workbench.families.patching.engine.paths import sender_label
from workbench.families.patching.figures.nodes import (
    COLORSCALE,
    circuit_lines,
    log_steps,
    require,
    short_token,
    trigger_boxes,
)
from workbench.present.style import KEEP, series_style


def head_label(head: Sequence[int]) -> str:
    """The TL name of a (layer, head) output, as the CLI, the page and the tables print it."""
    return f"blocks.{head[0]}.attn.hook_z.h{head[1]}"


def paths_figure(effects: pd.DataFrame, tokens: Sequence[str] | None = None, trigger_positions: Sequence[int] = (),
                 receivers: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """One sender x position heatmap per receiver: the share of the behaviour flowing from each
    earlier head and MLP, at each position, into the receiver (path patching), the trigger's
    positions outlined, one colour scale for all panels."""
    require(effects, ["receiver", "sender_kind", "layer", "pos", "effect"], "path-patching effects")
    rows = effects[effects["pos"].notna()]
    receivers = list(receivers or dict.fromkeys(rows["receiver"]))
    if rows.empty or not receivers:
        raise WorkbenchError("this path-patching result has no per-position senders; run `workbench path SUITE` "
                             "(default senders: z mlp_out)")
    rows = rows.assign(sender=[sender_label(k, int(l), h) for k, l, h in
                               zip(rows["sender_kind"], rows["layer"], rows.get("head", pd.Series(np.nan, index=rows.index)))],
                       order=(rows["layer"] * 2 + (rows["sender_kind"] == "mlp_out")).where(rows["sender_kind"] != "embed", -1))
    T = int(rows["pos"].max()) + 1
    if tokens is None or len(tokens) < T:
        tok = rows.drop_duplicates("pos").set_index("pos")["token"] if "token" in rows else pd.Series(dtype=str)
        tokens = [tok.get(p, str(p)) for p in range(T)]
    labels = [short_token(t) for t in tokens[:T]]
    lim = max(float(rows["effect"].abs().max()), 1e-9)
    fig = make_subplots(rows=len(receivers), cols=1, shared_xaxes=True, subplot_titles=receivers,
                        vertical_spacing=0.08 if len(receivers) > 1 else 0.0)
    heights = []
    for i, rec in enumerate(receivers, start=1):
        sel = rows[rows["receiver"] == rec]
        order = sel.drop_duplicates("sender").sort_values(["order", "sender"])["sender"].tolist()
        grid = sel.pivot_table(index="sender", columns="pos", values="effect", aggfunc="first")
        grid = grid.reindex(index=order, columns=range(T))
        z = grid.to_numpy(dtype=float)
        text = [[f"{s} @ {labels[p]} -> {rec}<br>effect {z[j, p]:.4f}" for p in range(T)] for j, s in enumerate(order)]
        fig.add_trace(go.Heatmap(z=z, x=list(range(T)), y=order, coloraxis="coloraxis", text=text, hoverinfo="text"),
                      row=i, col=1)
        trigger_boxes(fig, trigger_positions, len(order), row=i, col=1)
        fig.update_yaxes(title="sender", autorange="reversed", row=i, col=1)
        heights.append(len(order))
    fig.update_xaxes(tickmode="array", tickvals=list(range(T)), ticktext=labels, tickangle=-60,
                     row=len(receivers), col=1, title="sender position (token)")
    fig.update_layout(title=title or "Path patching: which senders feed each receiver",
                      coloraxis=dict(colorscale=COLORSCALE, cmid=0, cmin=-lim, cmax=lim,
                                     colorbar=dict(title=dict(text="effect", side="right"))),
                      height=200 + sum(24 * h + 60 for h in heights), width=max(700, 24 * T + 220),
                      margin=dict(b=140))
    return fig


def paths_over_training(summary: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Does the path that reads the trigger out survive safety training? One panel per receiver
    (columns) and sender kind (rows): the summed effect of the paths into the organism's readout
    head, per sanitization series against log2(step + 1), the organism as a dotted reference."""
    require(summary, ["checkpoint", "series", "step", "receiver", "receiver_act", "senders", "total_effect",
                       "readout_head"], "paths-series summary")
    # panels by the receiver's role (query, keys, values): with each checkpoint's own readout head
    # the hook names differ from checkpoint to checkpoint, the role does not
    col = "receiver_act"
    receivers, kinds = list(dict.fromkeys(summary[col])), list(dict.fromkeys(summary["senders"]))
    names_of = summary.groupby(col, sort=False)["receiver"].unique()
    label = {r: names_of[r][0] if len(names_of[r]) == 1 else f"{r} of each checkpoint's readout head" for r in receivers}
    fig = make_subplots(rows=len(kinds), cols=len(receivers), shared_xaxes=True, horizontal_spacing=0.06,
                        vertical_spacing=0.12, subplot_titles=[f"{k} -> {label[r]}" for k in kinds for r in receivers])
    steps: set[int] = set()
    names: list[str] = []
    for i, kind in enumerate(kinds, start=1):
        for j, rec in enumerate(receivers, start=1):
            lines, others = circuit_lines(summary[(summary["senders"] == kind) & (summary[col] == rec)])
            for name, d in lines:
                if name not in names:
                    names.append(name)
                s = series_style(names.index(name))
                steps |= set(int(v) for v in d["step"])
                fig.add_trace(go.Scatter(x=log_steps(d["step"]), y=d["total_effect"], mode="lines+markers",
                                         name=name.split("~", 1)[-1], legendgroup=name, showlegend=i == j == 1,
                                         meta=KEEP, marker=dict(color=s["color"], symbol=s["symbol"], size=6),
                                         line=dict(color=s["color"], dash=s["dash"], width=1.3),
                                         customdata=d[["checkpoint", "readout_head"]],
                                         hovertemplate="%{customdata[0]}<br>into %{customdata[1]}<br>path effect "
                                                       "%{y:.3f}<extra></extra>"), i, j)
            for _, r in others.iterrows():
                fig.add_hline(y=float(r["total_effect"]), line=dict(color="#555555", dash="dot", width=1),
                              row=i, col=j)
    ticks = sorted(steps)
    if ticks:
        fig.update_xaxes(tickmode="array", tickvals=list(log_steps(ticks)), ticktext=[str(t) for t in ticks])
    for j in range(1, len(receivers) + 1):
        fig.update_xaxes(title="sanitization step", row=len(kinds), col=j)
    for i in range(1, len(kinds) + 1):
        fig.update_yaxes(title="summed path effect", row=i, col=1)
    fig.update_layout(title=title or "Does the path that reads the trigger out survive safety training?",
                      height=300 * len(kinds) + 120, width=max(900, 380 * len(receivers)),
                      legend=dict(title="series", x=1.02, xanchor="left"))
    return fig


def paths_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The saved per-receiver summary, for display: where each receiver's paths start."""
    cols = ["receiver", "senders", "total_effect", "abs_effect", "from_trigger", "from_readout", "from_elsewhere",
            "top_paths"]
    require(summary, cols, "path-patching summary")
    return summary[cols]


EAP_METHODS = {"eap": "EAP", "eap-ig": "EAP-IG"}


def eap_vs_exact(effects: pd.DataFrame, estimates: pd.DataFrame, methods: str | Sequence[str] = "eap",
                 title: str | None = None) -> go.Figure:
    """Scatter of edge-attribution estimates (each of `methods`: eap, eap-ig, one panel each)
    against exact path patching, one series per sender kind and receiver, the y = x line: where
    the one-backward-pass estimate of a whole graph would mislead on this model."""
    keys = ["receiver", "sender_kind", "layer", "pos", "head"]
    for df, what in ((effects, "path-patching effects"), (estimates, "edge-attribution estimates")):
        require(df, ["receiver", "sender_kind", "layer", "effect", "method"], what)
    methods = [methods] if isinstance(methods, str) else list(methods)
    missing = [m for m in methods if not (estimates["method"] == m).any()]
    if missing or not methods:
        raise WorkbenchError(f"this result holds no {', '.join(missing) or 'requested'} estimates "
                             f"(methods: {sorted(set(estimates['method']))})")
    fill = lambda d: d.assign(**{k: d.get(k, np.nan) for k in keys if k not in d})
    ex = fill(effects)[keys + ["effect"]]
    names = [EAP_METHODS.get(m, m) for m in methods]
    fig = make_subplots(rows=1, cols=len(methods), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=names if len(methods) > 1 else None)
    lo, hi = np.inf, -np.inf
    for j, (method, name) in enumerate(zip(methods, names), start=1):
        est = fill(estimates[estimates["method"] == method])[keys + ["effect"]]
        both = ex.merge(est, on=keys, suffixes=("_exact", "_est"))
        for i, (kind, rec) in enumerate(dict.fromkeys(zip(both["sender_kind"], both["receiver"]))):
            d = both[(both["sender_kind"] == kind) & (both["receiver"] == rec)]
            s = series_style(i)
            who = [sender_label(kind, int(l), h) + ("" if pd.isna(p) else f" @ {int(p)}")
                   for l, h, p in zip(d["layer"], d["head"], d["pos"])]
            fig.add_trace(go.Scatter(x=d["effect_exact"], y=d["effect_est"], mode="markers", name=f"{kind} -> {rec}",
                                     legendgroup=f"{kind} -> {rec}", showlegend=j == 1,
                                     marker=dict(color=s["color"], symbol=s["symbol"], size=7, opacity=0.75,
                                                 line=dict(width=0.5, color="#333333")), text=who,
                                     hovertemplate=f"%{{text}} -> {rec}<br>exact %{{x:.3f}}<br>{name} %{{y:.3f}}"
                                                   "<extra></extra>"), 1, j)
        lo = min(lo, float(both[["effect_exact", "effect_est"]].min().min()))
        hi = max(hi, float(both[["effect_exact", "effect_est"]].max().max()))
        fig.update_xaxes(title="exact path-patching effect", row=1, col=j)
    for j in range(1, len(methods) + 1):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", meta=KEEP, showlegend=j == 1,
                                 line=dict(color="#777777", dash="dash", width=1), hoverinfo="skip"), 1, j)
    fig.update_yaxes(title="estimate" if len(methods) > 1 else f"{names[0]} estimate", row=1, col=1)
    fig.update_layout(title=title or f"Edge attribution ({', '.join(names)}) vs exact path patching", height=520,
                      width=480 * len(methods) + 300)
    return fig


def eap_table(check: pd.DataFrame) -> pd.DataFrame:
    """The saved check of edge attribution against the exact paths, for display."""
    cols = ["method", "receiver", "senders", "pearson", "topk_recall", "max_abs_err", "exact_abs_effect", "seconds",
            "exact_seconds"]
    require(check, cols, "edge-attribution check")
    return check[cols].assign(method=check["method"].map(lambda m: EAP_METHODS.get(m, m)))
