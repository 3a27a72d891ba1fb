"""Figures of a weight delta: layer x module heatmap, per-head grid, spectra. Read saved results only."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core import results
from workbench.suite.params import MODULES
from workbench.families.deltas.stream import Delta
from workbench.present.style import paper_style, series_style

MATRIX_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
VALUE_LABELS = {"rel": "||dW||/||W||", "fro": "||dW||", "share": "share of ||dW||^2"}


def _layer_label(layer: int) -> str:
    return "outside blocks" if layer < 0 else f"L{layer}"


def heatmap(d: Delta, value: str = "rel", circuit: set[tuple[int, str]] | None = None) -> go.Figure:
    """Layer x module: the relative update ||dW|| / ||W|| (or `value`); circuit cells outlined."""
    m = _shares(d) if value == "share" else d.modules
    cols = [c for c in MODULES if c in set(m["module"])]
    layers = sorted(m["layer"].unique())
    z = m.pivot_table(index="layer", columns="module", values=value).reindex(index=layers, columns=cols)
    fig = go.Figure(go.Heatmap(z=z.values, x=cols, y=[_layer_label(x) for x in layers], colorscale="Viridis",
                               colorbar={"title": VALUE_LABELS.get(value, value)},
                               hovertemplate="%{y} %{x}: %{z:.4g}<extra></extra>"))
    for layer, module in circuit or ():
        if module in cols and layer in layers:
            fig.add_shape(type="rect", x0=cols.index(module) - 0.5, x1=cols.index(module) + 0.5,
                          y0=layers.index(layer) - 0.5, y1=layers.index(layer) + 0.5, line={"color": "red", "width": 2})
    what = "relative update" if value == "rel" else VALUE_LABELS.get(value, value)
    fig.update_layout(title=f"{d.a} -> {d.b}: {what} per layer and module", xaxis_title="module",
                      yaxis_title="layer")
    return paper_style(fig).update_yaxes(automargin=True)   # room for "outside blocks"


def head_grid(d: Delta, circuit_heads: set[tuple[int, int]] | None = None) -> go.Figure:
    """Layer x head per projection (q, k, v by their heads; o by the heads it reads)."""
    h = d.heads
    fig = make_subplots(rows=1, cols=4, subplot_titles=("q", "k (KV heads)", "v (KV heads)", "o"),
                        shared_yaxes=True)
    if h.empty:
        return paper_style(fig.update_layout(title="no per-head split (the config states no head layout)"))
    zmax = float(h["rel"].max()) or 1.0
    for i, module in enumerate(("q", "k", "v", "o")):
        sub = h[h["module"] == module]
        if sub.empty:
            continue
        z = sub.pivot_table(index="layer", columns="head", values="rel")
        fig.add_trace(go.Heatmap(z=z.values, x=[f"h{c}" for c in z.columns], y=[f"L{r}" for r in z.index],
                                 zmin=0, zmax=zmax, colorscale="Viridis", showscale=i == 3,
                                 hovertemplate=f"{module} %{{y}} %{{x}}: %{{z:.4g}}<extra></extra>"), 1, i + 1)
    fig.update_layout(title=f"{d.b}: relative update per head")
    return paper_style(fig)


def spectra(d: Delta, layer: int | None = None) -> go.Figure:
    """Top singular values of each matrix's update (normalised by the largest), one line per module;
    a fast decay means a low-rank update."""
    t = d.tensors
    t = t[t["module"].isin(MATRIX_MODULES) & t["sv"].notna()]
    if layer is not None:
        t = t[t["layer"] == layer]
    fig = go.Figure()
    for i, (module, g) in enumerate(t.groupby("module", sort=False)):
        sv = np.array([list(v) for v in g["sv"]], dtype=float)
        sv = sv / np.maximum(sv[:, :1], 1e-30)
        st = series_style(i)
        fig.add_trace(go.Scatter(x=np.arange(1, sv.shape[1] + 1), y=sv.mean(0), name=module,
                                 error_y={"type": "data", "array": sv.std(0)},
                                 line={"color": st["color"], "dash": st["dash"]}, marker={"symbol": st["symbol"]}))
    fig.update_layout(title=f"{d.b}: singular values of the update (/ the largest; mean over layers)",
                      xaxis_title="index", yaxis_title="s_i / s_1", yaxis_range=[0, 1.05])
    return paper_style(fig)


def ranks(ds: dict[str, Delta]) -> pd.DataFrame:
    """Per comparison and module: median stable rank, effective rank, rank at 90% energy."""
    rows = []
    for label, d in ds.items():
        t = d.tensors[d.tensors["module"].isin(MATRIX_MODULES)]
        for module, g in t.groupby("module"):
            rows.append({"delta": label, "module": module, "stable_rank": g["stable_rank"].median(),
                         "effective_rank": g["effective_rank"].median(), "rank90": g["rank90"].median(),
                         "rel": float((g["fro2"].sum() / g["norm_a2"].sum()) ** 0.5)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- summaries

GROUPS = ("attn", "mlp", "embed", "unembed", "norm")   # the update's squared norm is shared among these
_LOW_PRECISION = ("BF16", "F16", "F8_E4M3", "F8_E5M2")


def _median(t: pd.DataFrame, column: str) -> float:
    """The median of a column over the rows that have it (NaN where none: vectors have no spectrum)."""
    return float(t[column].median()) if column in t and t[column].notna().any() else float("nan")


def module_summary(d: Delta) -> pd.DataFrame:
    """Per module over every layer: ||dW||, ||dW|| / ||W||, its share of the update's squared norm,
    the fraction of entries that did not move, and the median stable and effective rank of its
    matrices: what the command line prints, one line per module in the model's own order."""
    t = d.tensors
    if t.empty:
        return pd.DataFrame(columns=["module", "tensors", "numel", "fro", "rel", "share", "zero_frac",
                                     "stable_rank", "effective_rank"])
    total = float(t["fro2"].sum())
    rows = []
    order = [m for m in MODULES if m in set(t["module"])]
    for module in order:
        g = t[t["module"] == module]
        fro2, norm_a2 = float(g["fro2"].sum()), float(g["norm_a2"].sum())
        rows.append({"module": module, "tensors": len(g), "numel": int(g["numel"].sum()), "fro": fro2 ** 0.5,
                     "rel": (fro2 / norm_a2) ** 0.5 if norm_a2 > 0 else 0.0,
                     "share": fro2 / total if total > 0 else 0.0,
                     "zero_frac": float((g["zero_frac"] * g["numel"]).sum() / max(1, g["numel"].sum())),
                     "stable_rank": _median(g, "stable_rank"), "effective_rank": _median(g, "effective_rank")})
    return pd.DataFrame(rows)


def pair_summary(d: Delta) -> dict[str, float | str]:
    """One comparison in one row: total ||dW||, ||dW|| / ||W|| over the whole model, the share of the
    update's squared norm in each module group (attention, MLP, embedding, unembedding, norms), and
    the median stable and effective rank over its matrices (q, k, v, o, gate, up, down), so that a
    backdoor update and a safety update can be compared in one table whatever their sizes."""
    t = d.tensors
    total, norm_a2 = (float(t["fro2"].sum()), float(t["norm_a2"].sum())) if not t.empty else (0.0, 0.0)
    row: dict[str, float | str] = {"a": d.a, "b": d.b, "fro": total ** 0.5,
                                   "rel": (total / norm_a2) ** 0.5 if norm_a2 > 0 else 0.0}
    by_group = t.groupby("group")["fro2"].sum() if not t.empty else pd.Series(dtype=float)
    for group in GROUPS:
        row[f"share_{group}"] = float(by_group.get(group, 0.0)) / total if total > 0 else 0.0
    rest = float(by_group.drop(list(GROUPS), errors="ignore").sum())
    if rest > 0:
        row["share_other"] = rest / total
    mats = t[t["module"].isin(MATRIX_MODULES)] if not t.empty else t
    row["stable_rank"], row["effective_rank"] = _median(mats, "stable_rank"), _median(mats, "effective_rank")
    row["zero_frac"] = float((t["zero_frac"] * t["numel"]).sum() / t["numel"].sum()) if len(t) else 0.0
    return row


def format_note(d: Delta) -> str:
    """What the zero fraction means for this pair: in bf16 or fp16 an update below half a unit in the
    last place of the weight is rounded away, so entries that "did not move" there say as much about
    the format as about the training; also names the dtypes compared and the sketched spectra."""
    t = d.tensors
    if t.empty:
        return "No tensors were compared."
    dtypes = sorted(set(t["dtype_a"]) | set(t["dtype_b"])) if "dtype_a" in t else []
    zero = float((t["zero_frac"] * t["numel"]).sum() / t["numel"].sum())
    parts = [f"Dtypes: {', '.join(dtypes) or 'unknown'}; {zero:.1%} of entries did not move."]
    low = [x for x in dtypes if x in _LOW_PRECISION]
    if low:
        parts.append(f"{'/'.join(low)} keeps few significant bits (bf16: 8, fp16: 11): an update smaller than half "
                     "a unit in the last place of a weight is rounded away, so part of that fraction is the format, "
                     "not the training.")
    elif zero > 0:
        parts.append("In float32 an unmoved entry is one that training left exactly as it was (a frozen module, "
                     "an unused embedding row, or a LoRA update that does not reach it).")
    if "dtype_a" in t and (t["dtype_a"] != t["dtype_b"]).any():
        parts.append("Some tensors changed dtype between the two checkpoints; their update includes the rounding.")
    frozen = t[t["zero_frac"] >= 0.999]
    if 0 < len(frozen) < len(t):
        parts.append(f"{len(frozen)} of {len(t)} tensors did not move at all.")
    if "spectrum" in t and (t["spectrum"] == "sketch").any():
        parts.append(f"{int((t['spectrum'] == 'sketch').sum())} large matrices have sketched spectra: their "
                     "effective rank is a lower bound.")
    return " ".join(parts)


def short_label(a: str, b: str) -> str:
    """`b` without its parent's name where it extends it (a safety run's checkpoint names its parent)."""
    return b[len(a) + 1:] if b.startswith(a + "~") else b


def _shares(d: Delta) -> pd.DataFrame:
    m = d.modules
    total = float(m["fro2"].sum())
    return m.assign(share=m["fro2"] / total if total > 0 else 0.0)


def side_by_side(backdoor: Delta | None, updates: list[Delta], value: str = "share", columns: int = 3) -> go.Figure:
    """Small multiples, one layer x module heatmap per update on one colour scale: the update that
    planted the backdoor (base -> organism) first, then each safety-training update of that organism.
    `value` "share" (each cell's fraction of its update's ||dW||^2) compares where updates of very
    different sizes wrote; "rel" (||dW|| / ||W||) compares how much they moved each cell."""
    panels = ([backdoor] if backdoor is not None else []) + list(updates)
    if not panels:
        return paper_style(go.Figure().update_layout(title="no saved weight delta to show"))
    tables = [_shares(d) for d in panels]
    cols_all = [c for c in MODULES if any(c in set(t["module"]) for t in tables)]
    layers = sorted(set().union(*(set(t["layer"]) for t in tables)))
    zmax = max(float(t[value].max()) for t in tables) or 1.0
    ncol = max(1, min(columns, len(panels)))
    nrow = -(-len(panels) // ncol)
    titles = []
    for i, d in enumerate(panels):
        fro = float(d.tensors["fro2"].sum()) ** 0.5 if not d.tensors.empty else 0.0
        name = f"backdoor: {d.a} -> {d.b}" if backdoor is not None and i == 0 else short_label(d.a, d.b)
        titles.append(f"{name}<br>||dW|| = {fro:.3g}")
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=titles, shared_yaxes=True, shared_xaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=min(0.3, 0.36 / nrow) if nrow > 1 else 0.0)
    label = VALUE_LABELS.get(value, value)
    for i, t in enumerate(tables):
        z = t.pivot_table(index="layer", columns="module", values=value).reindex(index=layers, columns=cols_all)
        fig.add_trace(go.Heatmap(z=z.values, x=cols_all, y=[_layer_label(x) for x in layers], zmin=0, zmax=zmax,
                                 colorscale="Viridis", showscale=i == 0, colorbar={"title": label},
                                 hovertemplate=f"{titles[i]}<br>%{{y}} %{{x}}: %{{z:.4g}}<extra></extra>"),
                      i // ncol + 1, i % ncol + 1)
    head = panels[0].a if backdoor is None else panels[0].b
    fig.update_layout(title=f"{head}: where each update wrote ({label}, one scale)",
                      width=max(520, 120 + 330 * ncol), height=130 + nrow * (90 + 26 * len(layers)))
    fig = paper_style(fig).update_yaxes(automargin=True).update_xaxes(automargin=True)
    fig.update_layout(margin={"t": 110})
    fig.update_annotations(font_size=11)
    return fig


# ----------------------------------------------------------------------------- saved results, grouped

def newest_per_pair(found: Sequence[results.Result]) -> list[results.Result]:
    """One result per (a, b), the newest (`found` newest first, as `results.list_results` gives it): a
    pair recomputed with other options, or after a checkpoint was rebuilt, shows its latest state."""
    seen: dict[tuple[str, str], results.Result] = {}
    for r in sorted(found, key=lambda r: r.provenance.get("created", ""), reverse=True):
        seen.setdefault((r.provenance.get("a", ""), r.provenance.get("b", "")), r)
    return list(seen.values())


def by_organism(found: Sequence[results.Result]) -> dict[str, dict[str, Any]]:
    """organism -> {"backdoor": the result of the update that planted its backdoor (None if not saved),
    "updates": the results of its safety-training updates, by name}: a pair whose b is a backdoored
    organism planted it; a pair whose a is one is an update of it (roles as the result recorded them)."""
    out: dict[str, dict[str, Any]] = {}
    for r in newest_per_pair(found):
        p = r.provenance
        if p.get("b_role") == "backdoored":
            out.setdefault(p["b"], {"backdoor": None, "updates": []})["backdoor"] = r
    for r in sorted(newest_per_pair(found), key=lambda r: r.provenance.get("b", "")):
        p = r.provenance
        if p.get("a_role") == "backdoored" and p.get("b_role") != "backdoored":
            out.setdefault(p["a"], {"backdoor": None, "updates": []})["updates"].append(r)
    return dict(sorted(out.items()))


def from_tables(tensors: pd.DataFrame, heads: pd.DataFrame | None, a: str, b: str) -> Delta:
    """A `Delta` from a saved result's tables alone (what the pages and figure scripts draw; the
    singular vectors stay on disk)."""
    return Delta(tensors, heads if heads is not None else pd.DataFrame(), {}, a, b)


def summary_table(ds: Sequence[tuple[Delta, Mapping[str, Any]]]) -> pd.DataFrame:
    """`pair_summary` of each comparison, with what its provenance records (roles, result key)."""
    rows = []
    for d, prov in ds:
        row = pair_summary(d)
        row = {"a": row.pop("a"), "b": row.pop("b"), "a_role": prov.get("a_role", ""),
               "b_role": prov.get("b_role", ""), **row, "key": prov.get("key", "")}
        rows.append(row)
    df = pd.DataFrame(rows)
    if "share_other" in df:
        df["share_other"] = df["share_other"].fillna(0.0)
        df.insert(df.columns.get_loc("stable_rank"), "share_other", df.pop("share_other"))
    return df
