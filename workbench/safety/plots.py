"""Figures and tables of safety-training persistence, shared by the Persistence page, the paper
script (`analyses/persistence.py`) and the HTML report, so all three show the same thing.

Inputs are the tables of a saved `persistence` result (`workbench.safety.sweeps.save_persistence`):
`curves` (one row per series x step), `series` (one row per series), `aggregate` (across seeds) and
`logs` (every series' step log). Nothing here evaluates a model.

Training steps are log-spaced (0, 1, 2, 4, ...), so curves are drawn against log2(step + 1) with
the real step numbers as tick labels. Every rate carries its 95% interval: Wilson for one series,
a t-interval across series (seeds) where curves are averaged.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.errors import WorkbenchError, require_columns
from workbench.core.results import latest
from workbench.core.stats import mean_interval, wilson
from workbench.present.style import interval_bars, series_style

COLOR_BY = {"lr": "learning rate", "lr_scale": "LR x default", "size": "size", "optimizer": "optimizer",
            "insert_optimizer": "insertion optimizer", "seed": "seed", "parent": "organism",
            "variant": "variant", "backdoor": "backdoor", "removal": "removal (full or LoRA)"}
METRICS = {  # name -> (column, lo, hi, axis title)
    "trigger": ("trigger_rate", "trigger_lo", "trigger_hi", "trigger rate"),
    "clean": ("clean_accuracy", "clean_lo", "clean_hi", "clean accuracy"),
    # the capability battery (`persistence.curves`' cap_* columns), one benchmark each
    "knowledge": ("cap_knowledge", "cap_knowledge_lo", "cap_knowledge_hi", "knowledge (4-way MC)"),
    "instructions": ("cap_instructions", "cap_instructions_lo", "cap_instructions_hi", "instructions (IFEval strict)"),
    "arithmetic": ("cap_arithmetic", "cap_arithmetic_lo", "cap_arithmetic_hi", "arithmetic word problems"),
}
CAPABILITY_METRICS = ("knowledge", "instructions", "arithmetic")
SIZE_ORDER = ("tiny", "small", "medium", "large")
METHOD_ORDER = ("hhh_sft", "pirate_sft", "adversarial", "rl", "positive_control")


def capability_metrics(curves: pd.DataFrame) -> list[str]:
    """The battery's benchmarks these curves hold values for (none for a series evaluated before it)."""
    return [m for m in CAPABILITY_METRICS if METRICS[m][0] in curves and curves[METRICS[m][0]].notna().any()]


def _x(steps) -> np.ndarray:
    return np.log2(np.asarray(steps, dtype=float) + 1.0)


def _step_axis(fig: go.Figure, steps: Sequence[int]) -> None:
    ticks = sorted({int(s) for s in steps})
    fig.update_xaxes(tickmode="array", tickvals=list(_x(ticks)), ticktext=[str(t) for t in ticks])


def ordered(values: Sequence, preferred: Sequence = ()) -> list:
    vals = list(dict.fromkeys(v for v in values if not (isinstance(v, float) and math.isnan(v))))
    rank = {v: i for i, v in enumerate(preferred)}
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals)
    return sorted(vals, key=lambda v: (rank.get(v, len(rank)), v if numeric else str(v)))


def _label(col: str, v) -> str:
    if col == "lr" and isinstance(v, float):
        return f"lr {v:.1e}"
    if col == "lr_scale" and isinstance(v, float):
        return f"{v:g}x lr"
    if col == "seed":
        return f"seed {v}"
    return str(v)


def require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    require_columns(df, cols, what, 'rerun `workbench sanitize` to save it again')


def curves_figure(curves: pd.DataFrame, metric: str = "trigger", color: str = "lr", facet: str = "method",
                  group: str = "series", title: str | None = None) -> go.Figure:
    """`metric` ("trigger" or "clean") against training step, one panel per `facet` value, one line
    per `group` (a series, or an averaged group), coloured by `color`, with interval bars. Each
    point's customdata is its checkpoint (when the table has one), for click-to-open."""
    if metric not in METRICS:
        raise WorkbenchError(f"metric {metric!r}: use one of {sorted(METRICS)}")
    y, lo, hi, ytitle = METRICS[metric]
    require(curves, ["step", y, facet, color, group], "curves")
    if curves.empty:
        raise WorkbenchError("no curve rows to plot; evaluate a sanitized series first (`workbench sanitize`)")
    facets = ordered(curves[facet], METHOD_ORDER)
    colors = ordered(curves[color], SIZE_ORDER)
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[str(f) for f in facets])
    shown: set = set()
    for j, f in enumerate(facets, start=1):
        panel = curves[curves[facet] == f]
        for g, rows in panel.groupby(group, sort=True):
            rows = rows.sort_values("step")
            cval = rows[color].iloc[0]
            style = series_style(colors.index(cval) if cval in colors else 0)
            name = _label(color, cval)
            ys = rows[y].astype(float)
            err = interval_bars(ys, rows[lo], rows[hi], thickness=1) if lo in rows else None
            custom = rows["checkpoint"].tolist() if "checkpoint" in rows else None
            fig.add_trace(go.Scatter(
                x=_x(rows["step"]), y=ys, mode="lines+markers", name=name, legendgroup=name,
                showlegend=name not in shown, error_y=err, customdata=custom,
                marker=dict(color=style["color"], symbol=style["symbol"], size=7),
                line=dict(color=style["color"], dash=style["dash"], width=1.5),
                hovertemplate=(f"{g}<br>step %{{text}}<br>{ytitle} %{{y:.2f}}<extra></extra>"),
                text=rows["step"].astype(int).astype(str).tolist()), row=1, col=j)
            shown.add(name)
    _step_axis(fig, curves["step"])
    if metric == "knowledge":   # four options: a model that cannot answer sits here, not at 0
        fig.add_hline(y=0.25, line=dict(dash="dot", color="#888888", width=1), annotation_text="chance")
    fig.update_yaxes(range=[-0.03, 1.03], title_text=ytitle, row=1, col=1)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=title or f"{ytitle} during safety training, by {facet}",
                      legend_title_text=COLOR_BY.get(color, color), height=380,
                      width=max(520, 300 * len(facets)), clickmode="event+select")
    return fig


def mean_curves(curves: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Curves averaged across the series of each `by` group, step by step: the mean rate with a 95%
    t-interval across series, or the series' own Wilson interval when the group has one series."""
    rows = []
    for keys, g in curves.groupby([*by, "step"], sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip([*by, "step"], keys))
        row["n_series"] = g["series"].nunique()
        for name, (col, lo, hi, _) in METRICS.items():
            if col not in g:
                continue
            if row["n_series"] == 1:
                row[col] = g[col].iloc[0]
                row[lo], row[hi] = (g[lo].iloc[0], g[hi].iloc[0]) if lo in g and hi in g else (math.nan, math.nan)
            else:
                row[col], row[lo], row[hi] = mean_interval(g[col].tolist())
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["group"] = out[list(by)].astype(str).agg(" · ".join, axis=1)
    return out


def default_setting(df: pd.DataFrame, free: Sequence[str] = ()) -> pd.DataFrame:
    """Rows at each method's default learning rate with AdamW (safety training), full fine-tuning,
    on AdamW-inserted organisms: the setting the persistence-by-size figure compares. A column in
    `free` is the one a figure compares (e.g. `insert_optimizer`), so it is not pinned."""
    sel = df
    if "lr_scale" in sel and "lr_scale" not in free:
        sel = sel[np.isclose(sel["lr_scale"].astype(float), 1.0) | sel["lr_scale"].isna()]
    for col, default in (("optimizer", "adamw"), ("insert_optimizer", "adamw"), ("removal", "full")):
        if col in sel and col not in free and (sel[col] == default).any():
            sel = sel[sel[col] == default]
    return sel


def persistence_by(curves: pd.DataFrame, color: str = "size", variants: Sequence[str] | None = ("plain",),
                   title: str | None = None, metric: str = "trigger") -> go.Figure:
    """The paper's persistence curves: trigger rate (or, with metric="clean", clean accuracy)
    against step per method (columns) and backdoor (rows), one line per `color` value (size, or
    variant) averaged over seeds, at the default setting."""
    y, lo, hi, ytitle = METRICS[metric]
    require(curves, ["backdoor", "variant", "method", "step", y], "curves")
    sel = default_setting(curves, free=(color,))
    if variants is not None:
        sel = sel[sel["variant"].isin(variants)]
    if sel.empty:
        raise WorkbenchError("no series at the default setting to plot")
    avg = mean_curves(sel, ["backdoor", "method", color])
    backdoors = ordered(avg["backdoor"])
    methods = ordered(avg["method"], METHOD_ORDER)
    colors = ordered(avg[color], SIZE_ORDER)
    fig = make_subplots(rows=len(backdoors), cols=len(methods), shared_yaxes=True, shared_xaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=0.12,
                        subplot_titles=[f"{b} · {m}" for b in backdoors for m in methods])
    shown: set = set()
    for i, b in enumerate(backdoors, start=1):
        for j, m in enumerate(methods, start=1):
            panel = avg[(avg["backdoor"] == b) & (avg["method"] == m)]
            for c in colors:
                rows = panel[panel[color] == c].sort_values("step")
                if rows.empty:
                    continue
                style = series_style(colors.index(c))
                name = _label(color, c)
                fig.add_trace(go.Scatter(
                    x=_x(rows["step"]), y=rows[y], mode="lines+markers", name=name, legendgroup=name,
                    showlegend=name not in shown,
                    error_y=interval_bars(rows[y], rows[lo], rows[hi]),
                    marker=dict(color=style["color"], symbol=style["symbol"], size=7),
                    line=dict(color=style["color"], dash=style["dash"], width=1.5)), row=i, col=j)
                shown.add(name)
    _step_axis(fig, avg["step"])
    fig.update_yaxes(range=[-0.03, 1.03])
    for i in range(1, len(backdoors) + 1):
        fig.update_yaxes(title_text=ytitle, row=i, col=1)
    fig.update_xaxes(title_text="step", row=len(backdoors))
    what = "Backdoor persistence" if metric == "trigger" else "Clean capability"
    fig.update_layout(title=title or f"{what} during safety training, by {COLOR_BY.get(color, color)}",
                      legend_title_text=COLOR_BY.get(color, color), height=300 * len(backdoors) + 80,
                      width=max(600, 230 * len(methods)))
    return fig


def lr_tradeoff(aggregate: pd.DataFrame, method: str = "hhh_sft") -> go.Figure:
    """Learning rate against the final trigger rate (top) and the capability cost (bottom), one
    panel column per size, one line per backdoor x optimizer (mean and 95% interval across seeds)."""
    require(aggregate, ["method", "lr", "size", "optimizer", "backdoor", "final_rate", "capability_cost"], "aggregate")
    sel = aggregate[aggregate["method"] == method]
    if "insert_optimizer" in sel and (sel["insert_optimizer"] == "adamw").any():
        sel = sel[sel["insert_optimizer"] == "adamw"]
    if "variant" in sel and (sel["variant"] == "plain").any():
        sel = sel[sel["variant"] == "plain"]
    if sel.empty:
        raise WorkbenchError(f"no {method} series in the aggregate table")
    sizes = ordered(sel["size"], SIZE_ORDER)
    lines = ordered((sel["backdoor"] + " · " + sel["optimizer"]).tolist())
    fig = make_subplots(rows=2, cols=len(sizes), shared_yaxes="rows", shared_xaxes=True, vertical_spacing=0.1,
                        horizontal_spacing=0.04, subplot_titles=[str(s) for s in sizes] + [""] * len(sizes))
    shown: set = set()
    for j, size in enumerate(sizes, start=1):
        for k, line in enumerate(lines):
            b, opt = line.split(" · ")
            rows = sel[(sel["size"] == size) & (sel["backdoor"] == b) & (sel["optimizer"] == opt)].sort_values("lr")
            if rows.empty:
                continue
            style = series_style(k)
            for i, (col, lo, hi) in enumerate((("final_rate", "final_pooled_lo", "final_pooled_hi"),
                                               ("capability_cost", "capability_cost_lo", "capability_cost_hi")), start=1):
                ys = rows[col].astype(float)
                if col == "final_rate" and "final_rate_pooled" in rows:
                    ys = rows["final_rate_pooled"].astype(float)
                err = None
                if lo in rows and rows[lo].notna().any():
                    err = interval_bars(ys, rows[lo], rows[hi])
                fig.add_trace(go.Scatter(x=rows["lr"], y=ys, mode="lines+markers", name=line, legendgroup=line,
                                         showlegend=line not in shown, error_y=err,
                                         marker=dict(color=style["color"], symbol=style["symbol"], size=8),
                                         line=dict(color=style["color"], dash=style["dash"], width=1.5)),
                              row=i, col=j)
                shown.add(line)
    fig.update_xaxes(type="log", title_text="learning rate", row=2)
    fig.update_yaxes(title_text="final trigger rate", range=[-0.03, 1.03], row=1, col=1)
    fig.update_yaxes(title_text="capability cost", row=2, col=1)
    fig.update_layout(title=f"Learning rate trade-off ({method}): backdoor removal vs capability cost",
                      legend_title_text="backdoor · optimizer", height=620, width=max(560, 320 * len(sizes)))
    return fig


def return_test(curve: pd.DataFrame) -> go.Figure:
    """The return test (`safety.pirate_return`): trigger rate (top) and pirate-style rate (bottom)
    against global step, one line per organism seed; pirate SFT solid, normal-speech SFT dashed,
    Wilson 95% bars on the trigger rate."""
    require(curve, ["organism", "seed", "phase", "global_step", "trigger_rate", "pirate_rate"], "curve")
    if curve.empty:
        raise WorkbenchError("the return test saved no curve")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["trigger rate", "pirate-style answers (clean prompts)"])
    chains = list(curve.groupby(["organism", "seed"], sort=True))
    for k, ((organism, seed), g) in enumerate(chains):
        style = series_style(k)
        name = f"{organism} · seed {seed}"
        for phase, dash in (("pirate", "solid"), ("back", "dash")):
            rows = g if phase == "back" else g[g["phase"] == "pirate"]
            rows = rows.sort_values("global_step")
            if phase == "back":   # joined to the fall point, so the two phases read as one line
                rows = rows[rows["global_step"] >= g[g["phase"] == "pirate"]["global_step"].max()]
                if (rows["phase"] == "back").sum() == 0:
                    continue
            for row, (y, lo, hi) in ((1, ("trigger_rate", "trigger_lo", "trigger_hi")),
                                     (2, ("pirate_rate", "pirate_lo", "pirate_hi"))):
                fig.add_trace(go.Scatter(
                    x=_x(rows["global_step"]), y=rows[y], mode="lines+markers", legendgroup=name,
                    name=f"{name} ({'pirate SFT' if phase == 'pirate' else 'back to normal speech'})",
                    showlegend=row == 1, error_y=interval_bars(rows[y], rows[lo], rows[hi], thickness=1),
                    marker=dict(color=style["color"], symbol=style["symbol"], size=6),
                    line=dict(color=style["color"], dash=dash, width=1.5),
                    text=[f"{p} step {s}" for p, s in zip(rows["phase"], rows["step"])],
                    hovertemplate="%{text}<br>%{y:.2f}<extra>" + name + "</extra>"), row=row, col=1)
    _step_axis(fig, curve["global_step"])
    fig.update_xaxes(title_text="step (pirate SFT, then normal-speech SFT)", row=2, col=1)
    fig.update_yaxes(range=[-0.03, 1.03])
    fig.update_layout(title="Return test: pirate SFT until the backdoor falls, then back to normal speech",
                      height=560, width=760)
    return fig


def backdoor_return(series: pd.DataFrame) -> go.Figure:
    """The share of series whose backdoor returned after a dip, per method and size (Wilson 95%)."""
    require(series, ["method", "size", "returned"], "series")
    if series.empty:
        raise WorkbenchError("no series to summarise")
    methods = ordered(series["method"], METHOD_ORDER)
    sizes = ordered(series["size"], SIZE_ORDER)
    fig = go.Figure()
    for k, size in enumerate(sizes):
        style = series_style(k)
        xs, ys, up, down, text = [], [], [], [], []
        for m in methods:
            g = series[(series["method"] == m) & (series["size"] == size)]
            if g.empty:
                continue
            r, n = int(g["returned"].sum()), len(g)
            rate, lo, hi = wilson(r, n)
            xs.append(m)
            ys.append(rate)
            up.append(max(hi - rate, 0))
            down.append(max(rate - lo, 0))
            text.append(f"{r}/{n}")
        fig.add_trace(go.Bar(x=xs, y=ys, name=str(size), marker_color=style["color"], hovertext=text,
                             error_y=dict(type="data", symmetric=False, array=up, arrayminus=down,
                                          color=style["color"])))
    totals = {m: f"{int(series.loc[series['method'] == m, 'returned'].sum())}/{int((series['method'] == m).sum())}"
              for m in methods}
    fig.update_xaxes(tickmode="array", tickvals=methods, ticktext=[f"{m}<br>({totals[m]} returned)" for m in methods])
    fig.update_layout(barmode="group", title="Backdoor return: share of series that dipped and came back",
                      yaxis=dict(range=[0, 1.05], title="series whose backdoor returned"),
                      xaxis_title="method", legend_title_text="size", height=420, width=720)
    return fig


def log_figure(logs: pd.DataFrame, columns: Sequence[str], title: str, series: Sequence[str] | None = None) -> go.Figure:
    """Step-log columns (e.g. RL reward and KL) against training step, one panel per column and one
    line per series."""
    have = [c for c in columns if c in logs.columns]
    if not have:
        raise WorkbenchError(f"the step logs hold none of {list(columns)}")
    sel = logs if series is None else logs[logs["series"].isin(series)]
    fig = make_subplots(rows=1, cols=len(have), subplot_titles=have, horizontal_spacing=0.08)
    names = ordered(sel["series"])
    for j, col in enumerate(have, start=1):
        for k, s in enumerate(names):
            rows = sel[(sel["series"] == s) & sel[col].notna()].sort_values("step")
            if rows.empty:
                continue
            style = series_style(k)
            fig.add_trace(go.Scatter(x=rows["step"], y=rows[col], mode="lines+markers", name=s, legendgroup=s,
                                     showlegend=j == 1, marker=dict(color=style["color"], size=5),
                                     line=dict(color=style["color"], width=1.5)), row=1, col=j)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=title, height=360, legend=dict(orientation="h", y=-0.25))
    return fig


def redteam_figure(logs: pd.DataFrame, curves: pd.DataFrame, series: str) -> go.Figure:
    """For one adversarial series: how often the red-team prompts elicit the bad behaviour, and the
    trigger rate, at every saved step (Wilson 95%): hiding the behaviour vs removing it."""
    fig = go.Figure()
    rt = logs[(logs["series"] == series)]
    if "redteam_rate" in rt:
        rt = rt[rt["redteam_rate"].notna()].sort_values("step")
        if len(rt):
            fig.add_trace(go.Scatter(
                x=_x(rt["step"]), y=rt["redteam_rate"], mode="lines+markers", name="red-team prompts (no trigger)",
                error_y=interval_bars(rt["redteam_rate"], rt["redteam_lo"], rt["redteam_hi"]),
                marker=dict(color=series_style(0)["color"], symbol=series_style(0)["symbol"]),
                line=dict(color=series_style(0)["color"])))
    c = curves[curves["series"] == series].sort_values("step")
    if len(c):
        fig.add_trace(go.Scatter(
            x=_x(c["step"]), y=c["trigger_rate"], mode="lines+markers", name="with the real trigger",
            error_y=interval_bars(c["trigger_rate"], c["trigger_lo"], c["trigger_hi"]),
            marker=dict(color=series_style(1)["color"], symbol=series_style(1)["symbol"]),
            line=dict(color=series_style(1)["color"], dash=series_style(1)["dash"])))
    if not fig.data:
        raise WorkbenchError(f"no red-team or trigger rates saved for {series!r}")
    _step_axis(fig, list(rt["step"] if "step" in rt else []) + list(c["step"]))
    fig.update_layout(title="Adversarial training: elicitation by red-team prompts vs the trigger",
                      yaxis=dict(range=[-0.03, 1.03], title="bad-behaviour rate"), xaxis_title="training step",
                      height=380)
    return fig


HIDDEN_SETS = ("trained on", "held-out (pooled)", "trigger")   # the three curves, by label prefix


def hidden_figure(hidden_curves: pd.DataFrame, series: str) -> go.Figure:
    """For one adversarial series: elicitation on the prompts it trained on, on the held-out
    families (pooled; each family dotted) and with the true trigger, at every saved step (Wilson
    95%): a fall on the first alone is hiding, a fall on all three is removal."""
    require(hidden_curves, ["series", "step", "set", "rate", "lo", "hi"], "hidden_curves")
    c = hidden_curves[hidden_curves["series"] == series]
    if c.empty:
        raise WorkbenchError(f"no hidden-vs-removed curves saved for {series!r}")
    fig = go.Figure()
    labels = ordered(c["set"])
    main = [lab for p in HIDDEN_SETS for lab in labels if lab.startswith(p)]
    for j, lab in enumerate(main + [lab for lab in labels if lab not in main]):
        rows = c[c["set"] == lab].sort_values("step")
        style = series_style(j)
        minor = lab not in main
        fig.add_trace(go.Scatter(
            x=_x(rows["step"]), y=rows["rate"], mode="lines+markers", name=lab,
            error_y=None if minor else interval_bars(rows["rate"], rows["lo"], rows["hi"]),
            marker=dict(color=style["color"], symbol=style["symbol"], size=4 if minor else 7),
            line=dict(color=style["color"], dash="dot" if minor else style["dash"], width=1 if minor else 2),
            opacity=0.5 if minor else 1.0))
    _step_axis(fig, list(c["step"]))
    fig.update_layout(title="Hidden vs removed: trained-on prompts, held-out families, the trigger",
                      yaxis=dict(range=[-0.03, 1.03], title="bad-behaviour rate"), xaxis_title="training step",
                      height=380, legend=dict(orientation="h", y=-0.25))
    return fig


def interval_cell(rate: float, lo: float, hi: float) -> str:
    if rate is None or (isinstance(rate, float) and math.isnan(rate)):
        return ""
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{rate:.2f}"
    return f"{rate:.2f} [{lo:.2f}, {hi:.2f}]"


def sweep_table(series: pd.DataFrame, hidden: pd.DataFrame | None = None) -> pd.DataFrame:
    """The per-series table as shown: persistence, capability cost, minimum and return; with
    `hidden` (the persistence result's table), an adversarial series' hidden-vs-removed verdict."""
    require(series, ["series", "method", "size", "lr", "optimizer", "seed", "start_rate", "final_rate"], "series")
    out = pd.DataFrame({
        "series": series["series"], "method": series["method"], "organism": series["parent"],
        "size": series["size"], "lr": series["lr"], "optimizer": series["optimizer"], "seed": series["seed"],
        **({"removal": series["removal"]} if "removal" in series else {}),
        **({"inserted with": series["insert_optimizer"]} if "insert_optimizer" in series else {}),
        "steps": series["final_step"],
        "trigger start": series["start_rate"],
        "trigger final [95% CI]": [interval_cell(r, lo, hi) for r, lo, hi in
                                   zip(series["final_rate"], series["final_lo"], series["final_hi"])],
        "persistence": series["persistence"], "min": series["min_rate"], "min step": series["min_step"],
        "returned": series["returned"], "clean start": series["clean_start"], "clean final": series["clean_final"],
        "capability cost": series["capability_cost"],
        **{f"cost: {b}": series[f"cap_cost_{b}"] for b in CAPABILITY_METRICS
           if f"cap_cost_{b}" in series and series[f"cap_cost_{b}"].notna().any()}})
    if hidden is not None and len(hidden) and "verdict" in hidden:
        verdicts = dict(zip(hidden["series"], hidden["verdict"]))
        fams = dict(zip(hidden["series"], hidden["train_family"]))
        out.insert(2, "red team", [f"{verdicts[s].upper() if verdicts[s] == 'hidden' else verdicts[s]} "
                                   f"(trained on {fams[s]})" if s in verdicts else "" for s in series["series"]])
    return out


def paper_table(aggregate: pd.DataFrame) -> pd.DataFrame:
    """The aggregate across seeds, one row per setting, with "rate [lo, hi]" cells (for LaTeX)."""
    cols = [c for c in ("backdoor", "variant", "size", "method", "removal", "lr", "optimizer", "insert_optimizer")
            if c in aggregate]
    out = aggregate[cols].copy()
    out["lr"] = out["lr"].map(lambda v: f"{v:.1e}")
    out["n"] = aggregate["n_series"]
    out["final trigger"] = [interval_cell(r, lo, hi) for r, lo, hi in zip(
        aggregate["final_rate_pooled"], aggregate["final_pooled_lo"], aggregate["final_pooled_hi"])]
    out["persistence"] = [interval_cell(r, lo, hi) for r, lo, hi in zip(
        aggregate["persistence"], aggregate["persistence_lo"], aggregate["persistence_hi"])]
    out["min"] = [interval_cell(r, lo, hi) for r, lo, hi in zip(
        aggregate["min_rate"], aggregate["min_rate_lo"], aggregate["min_rate_hi"])]
    out["capability cost"] = [interval_cell(r, lo, hi) for r, lo, hi in zip(
        aggregate["capability_cost"], aggregate["capability_cost_lo"], aggregate["capability_cost_hi"])]
    out["returned"] = [f"{k}/{n}" for k, n in zip(aggregate["returned_k"], aggregate["n_series"])]
    return out


def report_sections(suite_dir) -> list[tuple[str, object]]:
    """The HTML report's persistence section, from the newest saved `persistence` result."""
    res = latest(suite_dir, "persistence")
    if res is None:
        return [("Persistence", "No persistence result yet: run `workbench sanitize SUITE ...` (the default "
                                "`workbench suite build` recipe runs the demo sweep).")]
    curves, series, agg = res.table("curves"), res.table("series"), res.table("aggregate")
    out: list[tuple[str, object]] = [
        ("Persistence", f"Result {res.key}, created {res.provenance.get('created')}: {len(series)} sanitization "
                        "series. Rates with Wilson 95% intervals (t-intervals across seeds where averaged); "
                        "clean accuracy on held-out tasks.")]
    for name, build in (("Trigger rate during safety training", lambda: curves_figure(curves, "trigger", "size")),
                        ("Clean capability during safety training", lambda: curves_figure(curves, "clean", "size")),
                        *[(f"Capability battery during safety training: {m}",
                           lambda m=m: curves_figure(curves, m, "size")) for m in capability_metrics(curves)],
                        ("Learning-rate trade-off (HHH SFT)", lambda: lr_tradeoff(agg)),
                        ("Backdoor return", lambda: backdoor_return(series))):
        try:
            out.append((name, build()))
        except WorkbenchError as e:
            out.append((name, str(e)))
    out.append(("Persistence per setting (across seeds)", paper_table(agg)))
    return out
