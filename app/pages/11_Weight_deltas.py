"""Weight deltas: where training wrote. For any saved pair of checkpoints (a -> b): the update's norm
relative to the weight per layer and module, per attention head, its spectrum and ranks, and the
update that planted an organism's backdoor next to each safety-training update of that organism.
Reads saved `deltas` results only: `workbench analyze SUITE` saves the default pairs and
`workbench deltas A B --suite SUITE` any other; this page never compares weights itself."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import streamlit as st  # noqa: E402

import common  # noqa: E402
from workbench.core import results  # noqa: E402
from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.families.deltas import figures as df  # noqa: E402
from workbench.families.deltas.tasks import ANALYSIS  # noqa: E402

common.setup("Weight deltas")
st.title("Weight deltas: where did training write?")
suite = common.suite_dir()
ANY_PAIR = f"`workbench deltas A B --suite {suite}`"


# ----------------------------------------------------------------------------- saved results

def _stamp() -> float:
    """Changes whenever a deltas result is added or removed (its folder's mtime)."""
    folder = results.results_root(suite) / ANALYSIS
    return folder.stat().st_mtime if folder.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _saved(path: str, stamp: float) -> list[results.Result]:
    return df.newest_per_pair(results.list_results(path, ANALYSIS))


def delta(res: results.Result) -> df.Delta:
    """A saved comparison from its tables (cached by result folder; the vectors stay on disk)."""
    heads = common.table(res, "heads") if res.has_table("heads") else None
    return df.from_tables(common.table(res, "tensors"), heads, res.provenance.get("a", "?"),
                          res.provenance.get("b", "?"))


def chart(key: str, build, *args, **kwargs) -> None:
    """A figure built once per `key` (the result keys and options it shows)."""
    with common.guard():
        st.plotly_chart(common.figure(key, build, *args, **kwargs), width="stretch", key=f"chart:{key}")


def stale(res: results.Result) -> list[str]:
    """The checkpoints of a result whose weights have changed since it was computed (where the
    manifest reads; a folder of results alone cannot say)."""
    try:
        s = common.load_suite(suite)
        inputs = res.provenance.get("inputs", {})
        return [res.provenance[k] for k in ("a", "b")
                if res.provenance.get(k) in s.names and inputs.get(k) not in (None, s.sha256(res.provenance[k]))]
    except (WorkbenchError, KeyError, OSError):
        return []


found = _saved(str(suite), _stamp())
if not found:
    st.info(f"No weight deltas saved for this suite yet: run `workbench analyze {suite}` (base -> each backdoored "
            f"organism, and each organism -> the last checkpoint of each of its safety-training runs) or "
            f"{ANY_PAIR} for any pair, then reload this page.")
    st.stop()

# ----------------------------------------------------------------------------- the pair
by_key = {r.key: r for r in found}


def pair_label(key: str) -> str:
    p = by_key[key].provenance
    roles = f" ({p.get('a_role', '?')} -> {p.get('b_role', '?')})" if p.get("a_role") else ""
    return f"{p.get('a', '?')} -> {p.get('b', '?')}{roles}"


order = sorted(by_key, key=lambda k: (by_key[k].provenance.get("b_role") != "backdoored", pair_label(k)))
chosen = st.selectbox("Pair (a -> b)", order, format_func=pair_label)
res = by_key[chosen]
st.caption(f"{len(found)} saved pairs. Any other pair: {ANY_PAIR} (this page only reads saved results). "
           + common.provenance_caption(res))
with common.guard():
    d = delta(res)
for name in stale(res):
    st.warning(f"The weights of {name} have changed since this result was computed: compare them again with "
               f"`workbench deltas {res.provenance['a']} {res.provenance['b']} --suite {suite}`.")

summary = df.pair_summary(d)
st.markdown(res.provenance.get("message") or d.message)
m = st.columns(5)
m[0].metric("||dW||", f"{summary['fro']:.4g}")
m[1].metric("||dW|| / ||W||", f"{summary['rel']:.3g}")
m[2].metric("attention share", f"{summary['share_attn']:.1%}", help="share of the update's squared norm")
m[3].metric("MLP share", f"{summary['share_mlp']:.1%}", help="share of the update's squared norm")
m[4].metric("median stable rank", f"{summary['stable_rank']:.3g}",
            help="||dW||_F^2 / s_1^2 over the attention and MLP matrices: near 1, a rank-one update")
st.caption(df.format_note(d))

# ----------------------------------------------------------------------------- layer x module
st.header("Per layer and module")
value = st.radio("Colour", ["rel", "share", "fro"], horizontal=True, format_func=lambda v: {
    "rel": "relative ||dW|| / ||W||", "share": "share of the update's ||dW||^2", "fro": "||dW||"}[v])
chart(f"{res.key}/heatmap/{value}", df.heatmap, d, value)
with st.expander("Per module over every layer"):
    st.dataframe(df.module_summary(d), hide_index=True, width="stretch")

# ----------------------------------------------------------------------------- heads
st.header("Per attention head")
if d.heads.empty:
    st.info("This result has no per-head split: the checkpoint's config states no head layout.")
else:
    st.caption("q rows and o columns by query head; with grouped-query attention k and v rows by KV head.")
    chart(f"{res.key}/heads", df.head_grid, d)

# ----------------------------------------------------------------------------- spectra and ranks
st.header("Spectra and ranks")
layers = sorted(int(x) for x in d.tensors.loc[d.tensors["module"].isin(df.MATRIX_MODULES), "layer"].unique())
if not layers:
    st.info("No matrix update to show a spectrum of.")
else:
    which = st.selectbox("Layer", ["mean over layers", *layers],
                         format_func=lambda x: x if isinstance(x, str) else f"L{x}")
    layer = None if isinstance(which, str) else int(which)
    chart(f"{res.key}/spectra/{layer}", df.spectra, d, layer)
    st.caption("Stable rank ||dW||_F^2 / s_1^2, effective rank (exp of the entropy of the normalised singular "
               "values) and the rank holding 90% of the update's energy, median over layers.")
    st.dataframe(df.ranks({pair_label(res.key): d}), hide_index=True, width="stretch")
with st.expander("Every tensor"):
    cols = [c for c in ("name", "layer", "module", "shape", "fro", "rel", "max_abs", "zero_frac", "cosine",
                        "stable_rank", "effective_rank", "rank90", "spectrum", "dtype_a", "dtype_b") if c in d.tensors]
    shown = d.tensors[cols].assign(shape=d.tensors["shape"].map(lambda s: "x".join(str(int(v)) for v in s)))
    st.dataframe(shown, hide_index=True, width="stretch")
    st.download_button("Download the per-tensor table (CSV)", shown.to_csv(index=False),
                       file_name=f"deltas_{res.key}_tensors.csv", mime="text/csv")

# ----------------------------------------------------------------------------- backdoor vs safety updates
st.header("The backdoor update beside each safety update")
groups = df.by_organism(found)
if not groups:
    st.info(f"No saved pair involves a backdoored organism; run `workbench analyze {suite}`.")
else:
    p = res.provenance
    here = p.get("b") if p.get("b") in groups and p.get("b_role") == "backdoored" else p.get("a")
    names = list(groups)
    organism = st.selectbox("Organism", names, index=names.index(here) if here in names else 0)
    g = groups[organism]
    if g["backdoor"] is None:
        st.info(f"The update that planted {organism}'s backdoor is not saved: run `workbench analyze {suite}` or "
                f"`workbench deltas PARENT {organism} --suite {suite}`.")
    if not g["updates"]:
        st.info(f"No safety-training update of {organism} is saved: train one (`workbench sanitize {suite} --from "
                f"{organism}`), then run `workbench analyze {suite}` or `workbench deltas {organism} CHECKPOINT "
                f"--suite {suite}`.")
    shown_res = ([g["backdoor"]] if g["backdoor"] is not None else []) + g["updates"]
    if shown_res:
        scale = st.radio("One colour scale for every panel", ["share", "rel"], horizontal=True,
                         format_func=lambda v: {"share": "share of each update's ||dW||^2 (where it wrote)",
                                                "rel": "relative ||dW|| / ||W|| (how much it moved)"}[v])
        with common.guard():
            backdoor = delta(g["backdoor"]) if g["backdoor"] is not None else None
            updates = [delta(r) for r in g["updates"]]
        keys = "+".join(r.key for r in shown_res)
        chart(f"{keys}/side/{scale}", df.side_by_side, backdoor, updates, scale)
        table = df.summary_table(list(zip(([backdoor] if backdoor else []) + updates,
                                          [r.provenance for r in shown_res])))
        st.dataframe(table.drop(columns=["key"]), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in table.columns
                                    if c.startswith("share_") or c in ("rel", "zero_frac")})
        st.dataframe(df.ranks({f"{x.a} -> {df.short_label(x.a, x.b)}": x for x in ([backdoor] if backdoor else [])
                               + updates}), hide_index=True, width="stretch")
