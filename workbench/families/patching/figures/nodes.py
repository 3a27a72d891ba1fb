"""Figures and tables of activation patching and circuits, shared by the Patching page, the paper
script (`analyses/patching.py`) and the HTML report, so all three show the same thing.

Inputs are saved results only: `patching` (table `effects`: one row per patched index, with hook
name, layer, position/token, head, raw value and normalised effect; table `trigger_share`; the
provenance holds the prompt's tokens and the trigger's positions) and `circuit` (tables `summary`,
`effects`, `circuits`, `curves`). Nothing here loads a model or patches anything.

Effects are normalised so 0 = the untriggered run and 1 = the triggered run of the backdoored
organism (`PatchResult.effect`); heatmaps use a diverging scale centred on 0. Sanitization steps
are log-spaced (0, 1, 2, 4, ...), so circuit-over-training curves are drawn against log2(step + 1)
with the real step numbers as tick labels, like the persistence figures.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.errors import WorkbenchError
from workbench.families.patching.stats import (
    ESTIMATES,
    agreement_table,
    paired,
    require,
)
from workbench.present.style import KEEP, series_style
from workbench.suite.lineage import parse_name

LAYER_POS_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KIND_TITLES = {"resid_pre": "residual stream before each block (resid_pre)",
               "resid_mid": "residual stream after attention (resid_mid)",
               "resid_post": "residual stream after each block (resid_post)",
               "attn_out": "attention output (attn_out)", "mlp_out": "MLP output (mlp_out)",
               "z": "attention heads per position (hook_z)", "z_all_pos": "attention heads, all positions (hook_z)",
               **{f"{a}{sfx}": f"{name} heads{where} (hook_{a})" for a, name in
                  (("q", "query"), ("k", "key/value-group key"), ("v", "key/value-group value"))
                  for sfx, where in (("", " per position"), ("_all_pos", ", all positions"))}}
# head kinds patched over all positions, as the head grid shows them: outputs, then queries, keys, values
HEAD_GRID_KINDS = ("z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos")
METHOD_LABELS = {"exact": "exact patching", "atp": "attribution patching (AtP)",
                 "atp+ig": "AtP with integrated gradients", "atp+graddrop": "AtP* GradDrop (magnitudes)",
                 "atp+qk": "AtP* QK fix (query and key heads)",
                 "tl": "TransformerLens reference", "nnsight": "exact, through nnsight"}
COLORSCALE = "RdBu_r"  # red = restores the backdoor, blue = works against it; readable in greyscale by sign of text


# ----------------------------------------------------------------------------- reading results


def localisation_figure(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """One stacked bar per organism: its early-layer residual effect split into the share on the
    trigger's tokens, on the readout position, and elsewhere (the positions the trigger's
    information was copied to on the way)."""
    require(table, ["checkpoint", "on_trigger", "on_readout", "elsewhere", "early_layers"], "localisation")
    fig = go.Figure()
    labels = [f"{c} (layers {l})" for c, l in zip(table["checkpoint"], table["early_layers"])]
    for i, (col, name) in enumerate((("on_trigger", "on the trigger tokens"), ("on_readout", "on the readout"),
                                     ("elsewhere", "elsewhere"))):
        s = series_style(i)
        fig.add_trace(go.Bar(y=labels, x=table[col], name=name, orientation="h", marker_color=s["color"],
                             marker_pattern_shape=["", "/", "."][i],
                             hovertemplate=f"%{{y}}: %{{x:.1%}} {name}<extra></extra>"))
    fig.update_xaxes(title="share of the early-layer |effect| (resid_pre)", range=[0, 1.02], dtick=0.2,
                     tickformat=".0%")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "Where each organism's early-layer residual effect sits", barmode="stack",
                      height=max(280, 130 + 34 * len(table)), width=720,
                      legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom", "traceorder": "normal"})
    return fig


# ----------------------------------------------------------------------------- patching figures

def short_token(label: str) -> str:
    """'12:▁What' -> '12 What' (visible spaces, newlines, no SentencePiece marker)."""
    pos, _, tok = str(label).partition(":")
    tok = tok.replace("▁", " ").replace("\n", "⏎").strip() or "␣"
    return f"{pos} {tok}"


def trigger_boxes(fig: go.Figure, positions: Sequence[int], n_rows: float, row: int | None = None,
                   col: int | None = None) -> None:
    """Outline the trigger's positions (contiguous runs) on a layer x position heatmap."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    for r in runs:
        fig.add_shape(type="rect", x0=r[0] - 0.5, x1=r[-1] + 0.5, y0=-0.5, y1=n_rows - 0.5,
                      line=dict(color="black", width=1.5, dash="dot"), fillcolor="rgba(0,0,0,0)",
                      row=row, col=col)


def layer_pos_heatmap(effects: pd.DataFrame, kind: str = "resid_pre", tokens: Sequence[str] | None = None,
                      trigger_positions: Sequence[int] = (), title: str | None = None,
                      zmax: float | None = None) -> go.Figure:
    """Layer x position heatmap of the normalised effect of patching `kind`, the prompt's tokens on
    the x axis and the trigger's positions outlined."""
    require(effects, ["kind", "layer", "pos", "effect"], "patching effects")
    rows = effects[effects["kind"] == kind]
    if rows.empty:
        raise WorkbenchError(f"this patching result has no {kind!r} rows; it holds {sorted(effects['kind'].unique())} "
                             f"(run `workbench patch SUITE --kinds {kind}`)")
    grid = rows.pivot_table(index="layer", columns="pos", values="effect", aggfunc="first").sort_index()
    grid = grid.reindex(columns=range(int(rows["pos"].max()) + 1))
    T = grid.shape[1]
    if tokens is None or len(tokens) < T:
        tok = rows.drop_duplicates("pos").set_index("pos")["token"] if "token" in rows else pd.Series(dtype=str)
        tokens = [tok.get(p, str(p)) for p in range(T)]
    labels = [short_token(t) for t in tokens[:T]]
    z = grid.to_numpy(dtype=float)
    lim = zmax or max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0, 1e-9)
    hook = rows.drop_duplicates("layer").set_index("layer")["hook"] if "hook" in rows else None
    text = [[f"{hook[l] if hook is not None else l} @ {labels[p]}<br>effect {z[i, p]:.3f}"
             for p in range(T)] for i, l in enumerate(grid.index)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(T)), y=list(grid.index), colorscale=COLORSCALE, zmid=0,
                               zmin=-lim, zmax=lim, text=text, hoverinfo="text",
                               colorbar=dict(title=dict(text="effect", side="right"))))
    trigger_boxes(fig, trigger_positions, len(grid.index))
    fig.update_xaxes(tickmode="array", tickvals=list(range(T)), ticktext=labels, tickangle=-60,
                     title="position (token)")
    fig.update_yaxes(title="layer", tickmode="array", tickvals=list(grid.index), autorange=True)
    fig.update_layout(title=title or f"Patching {KIND_TITLES.get(kind, kind)}", height=260 + 28 * len(grid.index),
                      width=max(700, 24 * T + 200), margin=dict(b=140))
    return fig


def head_grid(effects: pd.DataFrame, title: str | None = None, kind: str = "z_all_pos") -> go.Figure:
    """Layer x head heatmap of the effect of patching each head over all positions (its output,
    `z_all_pos`, or its query/key/value; key and value heads are the shared grouped-query ones),
    each cell labelled with its value."""
    require(effects, ["kind", "layer", "head", "effect"], "patching effects")
    rows = effects[effects["kind"] == kind]
    if rows.empty:
        raise WorkbenchError(f"this patching result has no head rows (kind {kind}); run "
                             f"`workbench patch SUITE --kinds {kind}`")
    grid = rows.pivot_table(index="layer", columns="head", values="effect", aggfunc="first").sort_index()
    z = grid.to_numpy(dtype=float)
    lim = max(float(np.nanmax(np.abs(z))), 1e-9)
    fig = go.Figure(go.Heatmap(z=z, x=[f"h{int(h)}" for h in grid.columns], y=list(grid.index),
                               colorscale=COLORSCALE, zmid=0, zmin=-lim, zmax=lim,
                               text=[[f"{v:.2f}" for v in r] for r in z], texttemplate="%{text}",
                               hovertemplate="layer %{y}, head %{x}: effect %{z:.3f}<extra></extra>",
                               colorbar=dict(title=dict(text="effect", side="right"))))
    fig.update_xaxes(title="head")
    fig.update_yaxes(title="layer", tickmode="array", tickvals=list(grid.index))
    fig.update_layout(title=title or f"Attention heads: {KIND_TITLES.get(kind, kind)}",
                      height=220 + 45 * len(grid.index), width=max(420, 80 * len(grid.columns) + 220))
    return fig


def atp_vs_exact(exact: pd.DataFrame, atp: pd.DataFrame, kinds: Sequence[str] | None = None,
                 method: str = "atp", stats: pd.DataFrame | None = None) -> go.Figure:
    """Scatter of an attribution estimate against exact patching, one series per kind (labelled with
    its r from `stats`, the saved `patching_checks` rows, or computed here), and the y = x line."""
    name = ESTIMATES.get(method, method)
    both, kinds = paired(exact, atp, kinds, method)
    stats = agreement_table(both, kinds, method) if stats is None else stats.set_index("kind").reindex(kinds).reset_index()
    fig = go.Figure()
    lo = float(both[["effect_exact", "effect_atp"]].min().min())
    hi = float(both[["effect_exact", "effect_atp"]].max().max())
    for i, (kind, r) in enumerate(zip(kinds, stats["pearson_r"])):
        d = both[both["kind"] == kind]
        s = series_style(i)
        fig.add_trace(go.Scatter(x=d["effect_exact"], y=d["effect_atp"], mode="markers", name=f"{kind} (r = {r:.2f})",
                                 legendgroup=kind,
                                 marker=dict(color=s["color"], symbol=s["symbol"], size=7, opacity=0.75,
                                             line=dict(width=0.5, color="#333333")),
                                 hovertemplate=f"{kind}<br>exact %{{x:.3f}}<br>{name} %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", meta=KEEP,
                             line=dict(color="#777777", dash="dash", width=1), hoverinfo="skip"))
    absolute = method.endswith("graddrop")
    fig.update_xaxes(title="|exact patching effect|" if absolute else "exact patching effect")
    fig.update_yaxes(title=f"{name} score" if absolute else f"{name} estimate")
    fig.update_layout(title=f"Attribution patching ({name}) vs exact patching", height=520, width=640)
    return fig


def trigger_share_figure(share: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per layer: the share of |effect| on the trigger's positions and on the readout position(s);
    early layers (before the information reaches the readout) shaded."""
    require(share, ["layer", "trigger_share", "readout_share", "early"], "trigger share")
    fig = go.Figure()
    for i, (col, name) in enumerate((("trigger_share", "on the trigger tokens"),
                                     ("readout_share", "on the readout position"))):
        s = series_style(i)
        fig.add_trace(go.Bar(x=share["layer"], y=share[col], name=name, marker_color=s["color"],
                             marker_pattern_shape="" if i == 0 else "/",
                             hovertemplate=f"layer %{{x}}: %{{y:.1%}} {name}<extra></extra>"))
    early = share.loc[share["early"].astype(bool), "layer"]
    if len(early):
        fig.add_vrect(x0=float(early.min()) - 0.5, x1=float(early.max()) + 0.5, fillcolor="#DDDDDD", opacity=0.4,
                      line_width=0, layer="below", annotation_text="early layers", annotation_position="top left")
    fig.update_xaxes(title="layer (resid_pre)", tickmode="array", tickvals=list(share["layer"]))
    fig.update_yaxes(title="share of |effect|", range=[0, 1.05], tickformat=".0%")
    fig.update_layout(title=title or "Where the residual effect sits, per layer", barmode="group", height=360,
                      width=620)
    return fig


# ----------------------------------------------------------------------------- circuit figures

def log_steps(steps: Any) -> np.ndarray:
    return np.log2(np.asarray(steps, dtype=float) + 1.0)


def circuit_lines(summary: pd.DataFrame) -> tuple[list[tuple[str, pd.DataFrame]], pd.DataFrame]:
    """(per sanitization series: its rows by step) and the other checkpoints (organisms, bases)."""
    require(summary, ["checkpoint", "total_effect"], "circuit summary")
    if "series" not in summary or "step" not in summary:
        return [], summary
    san = summary["checkpoint"].map(lambda n: bool(parse_name(n)) and "@step" in n)
    lines = [(s, d.sort_values("step")) for s, d in summary[san].groupby("series", sort=True)]
    return lines, summary[~san]


def circuit_over_training(summary: pd.DataFrame, effects: pd.DataFrame | None = None,
                          circuits: pd.DataFrame | None = None, series: str | None = None,
                          n_components: int = 8, title: str | None = None) -> go.Figure:
    """Does the circuit survive safety training? Three panels along the series: the total effect
    (the backdoor's gap, relative to the organism's), the overlap of the top-k components with the
    organism's, and the effect of each of the organism's top circuit components. With sanitization
    series the x axis is the step (log2(step + 1)); otherwise the checkpoints in order."""
    lines, others = circuit_lines(summary)
    overlap = next((c for c in summary.columns if c.startswith("top") and c.endswith("_overlap")), None)
    has_comp = effects is not None and circuits is not None and len(circuits) and "node" in circuits
    n_rows = 3 if has_comp else 2
    titles = ["total effect (1 = the organism's backdoor)", "overlap with the organism's components",
              "effect of the organism's circuit components"][:n_rows]
    fig = make_subplots(rows=n_rows, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles)
    stepwise = bool(lines)
    if stepwise:
        steps: set[int] = set()
        for i, (name, d) in enumerate(lines):
            s = series_style(i)
            short = name.split("~", 1)[-1]
            steps |= set(int(v) for v in d["step"])
            common = dict(x=log_steps(d["step"]), mode="lines+markers", legendgroup=name, meta=KEEP,
                          marker=dict(color=s["color"], symbol=s["symbol"], size=7),
                          line=dict(color=s["color"], dash=s["dash"], width=1.5),
                          customdata=d["checkpoint"])
            fig.add_trace(go.Scatter(y=d["total_effect"], name=short, **common,
                                     hovertemplate="%{customdata}<br>total effect %{y:.3f}<extra></extra>"), 1, 1)
            if overlap:
                fig.add_trace(go.Scatter(y=d[overlap], name=short, showlegend=False, **common,
                                         hovertemplate="%{customdata}<br>overlap %{y:.2f}<extra></extra>"), 2, 1)
        for _, r in others.iterrows():  # the organism (and any other checkpoint) as a reference line
            fig.add_hline(y=float(r["total_effect"]), line=dict(color="#555555", dash="dot", width=1),
                          annotation_text=str(r["checkpoint"]), annotation_position="top left", row=1, col=1)
        ticks = sorted(steps)
        fig.update_xaxes(tickmode="array", tickvals=list(log_steps(ticks)), ticktext=[str(t) for t in ticks])
        fig.update_xaxes(title="sanitization step", row=n_rows, col=1)
    else:
        x = list(summary["checkpoint"])
        s = series_style(0)
        common = dict(x=x, mode="lines+markers", meta=KEEP, marker=dict(color=s["color"], size=8),
                      line=dict(color=s["color"], width=1.5), showlegend=False)
        fig.add_trace(go.Scatter(y=summary["total_effect"], name="total effect", **common), 1, 1)
        if overlap:
            fig.add_trace(go.Scatter(y=summary[overlap], name=overlap.replace("_", " "), **common), 2, 1)
        fig.update_xaxes(title="checkpoint", row=n_rows, col=1)
    if has_comp:
        ref = str(summary["checkpoint"].iloc[0])
        comp = circuits[circuits["checkpoint"] == ref].sort_values("effect", ascending=False)["node"].head(n_components)
        sel = effects[effects["node"].isin(list(comp))]
        keep = {c for c, _ in (lines if stepwise else [])}
        if stepwise:
            chosen = series if series in keep else lines[0][0]
            order = dict(zip(*[dict(lines)[chosen][c] for c in ("checkpoint", "step")]))
            sel = sel[sel["checkpoint"].isin(order)]
        for i, node in enumerate(comp):
            d = sel[sel["node"] == node]
            s = series_style(i + 1)
            xs = log_steps([order[c] for c in d["checkpoint"]]) if stepwise else list(d["checkpoint"])
            if stepwise:
                idx = np.argsort(xs)
                d, xs = d.iloc[idx], xs[idx]
            fig.add_trace(go.Scatter(x=xs, y=d["effect"], mode="lines+markers", name=node, legendgroup=f"c{node}",
                                     meta=KEEP, marker=dict(color=s["color"], symbol=s["symbol"], size=6),
                                     line=dict(color=s["color"], dash=s["dash"], width=1.2),
                                     legend="legend2", customdata=d["checkpoint"],
                                     hovertemplate=f"{node}<br>%{{customdata}}<br>effect %{{y:.3f}}<extra></extra>"),
                          3, 1)
        if stepwise:
            fig.layout.annotations[2].text += f" ({chosen.split('~', 1)[-1]})"
    fig.update_yaxes(title="total effect", row=1, col=1)
    fig.update_yaxes(title="top-k overlap", range=[-0.05, 1.05], row=2, col=1)
    if has_comp:
        fig.update_yaxes(title="effect", row=3, col=1)
    legends = dict(legend=dict(y=1.0, yanchor="top", x=1.02, xanchor="left", title="series"))
    if has_comp:
        legends["legend2"] = dict(y=0.3, yanchor="top", x=1.02, xanchor="left", title="component",
                                  font=dict(size=10))
    fig.update_layout(title=title or "Does the circuit survive safety training?", height=260 * n_rows + 80,
                      width=1000, **legends)
    return fig


def circuit_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The circuit summary as a paper table: one row per checkpoint."""
    require(summary, ["checkpoint", "total_effect", "circuit_size", "faithfulness"], "circuit summary")
    overlap = next((c for c in summary.columns if c.startswith("top") and c.endswith("_overlap")), None)
    out = pd.DataFrame({"checkpoint": summary["checkpoint"],
                        "step": summary["step"] if "step" in summary else 0,
                        "total effect": summary["total_effect"].round(3),
                        "circuit size": summary["circuit_size"],
                        "faithfulness": summary["faithfulness"].round(3)})
    if overlap:
        out[overlap.replace("_", " ").replace("top", "top-")] = summary[overlap].round(2)
    if "circuit_effect_in_reference" in summary:
        out["effect of organism's circuit"] = summary["circuit_effect_in_reference"].round(3)
    return out


# ----------------------------------------------------------------------------- the HTML report


