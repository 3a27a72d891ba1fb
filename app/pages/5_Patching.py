"""Patching, one checkpoint: where does the trigger's effect live? Layer x position heatmaps with the
prompt's tokens, the head grid (outputs, and queries, keys and values where patched), the share of
the early-layer effect on the trigger tokens, and each attribution estimate against exact patching
(its saved comparison). A checkpoint slider walks the organism's safety-training series. Reads
saved `patching` and `patching_checks` results only (`workbench patch`, `workbench analyze`)."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import math  # noqa: E402

import streamlit as st  # noqa: E402

import common  # noqa: E402
import patching_view  # noqa: E402
from workbench.families.patching import index as px  # noqa: E402
from workbench.families.patching import stats as ps  # noqa: E402
from workbench.families.patching.figures import nodes as pp  # noqa: E402

common.setup("Patching")
st.title("Activation patching: one checkpoint")
suite = common.suite_dir()
patching_view.caption_effect()
view = patching_view.choose(suite)
backdoor, metric, direction, checkpoint, sel, sha_of = (view.backdoor, view.metric, view.direction, view.checkpoint,
                                                        view.sel, view.sha_of)
st.header("One checkpoint")
methods = [m for m in pp.METHOD_LABELS if (sel[(sel["sha256"] == sha_of[checkpoint])]["method"] == m).any()]
method = st.radio("Method", methods, horizontal=True, format_func=pp.METHOD_LABELS.get)
result = px.pick(view.index, sha_of[checkpoint], backdoor, method, metric, direction)
with common.guard():
    effects = common.table(result, "effects")
prov = result.provenance
st.caption(common.provenance_caption(result) + f" · {prov.get('n_pairs', '?')} prompt pairs of "
           f"{len(prov.get('tokens', []))} tokens · effects scaled by "
           f"{prov.get('scale_from') or checkpoint}'s gap")

share = prov.get("early_trigger_share")
early = prov.get("early_layers") or []
m1, m2, m3 = st.columns(3)
rest = ps.rest_of_early_effect(prov)
m1.metric("Early-layer residual effect on trigger tokens",
          f"{share:.1%}" if isinstance(share, float) and math.isfinite(share) else "n/a",
          help="Share of |effect| of resid_pre patching on the trigger's positions, summed over the early "
               "layers: those before the first layer whose readout position (where the answer is read) "
               "carries at least half of the effect; its spread over training runs is under Across organisms.")
if ps.share_by_construction(prov):
    m1.caption(ps.BY_CONSTRUCTION[0].upper() + ps.BY_CONSTRUCTION[1:] + ".")
elif rest:
    m1.caption(f"The rest: {rest}.")
m2.metric("Early layers", ps.layer_range(early),
          help=f"The information reaches the readout at layer {prov.get('move_layer', '?')}.")
m3.metric("Clean / corrupted metric", f"{prov.get('clean_metric', float('nan')):.2f} / "
                                      f"{prov.get('corrupted_metric', float('nan')):.2f}")

st.subheader("Layer x position")
kinds = [k for k in pp.LAYER_POS_KINDS if (effects["kind"] == k).any()]
if kinds:
    kind = st.radio("Activation", kinds, horizontal=True, format_func=lambda k: pp.KIND_TITLES.get(k, k))
    with common.guard():
        st.plotly_chart(common.figure(f"{result.key}/{kind}/{checkpoint}", pp.layer_pos_heatmap, effects, kind,
                                      prov.get("tokens"), prov.get("trigger_positions", ()),
                                      title=f"{checkpoint}: {pp.KIND_TITLES.get(kind, kind)}"), width="stretch")
    st.caption("Dotted box: the trigger's tokens. Red: patching this activation restores the backdoor; blue: "
               "it works against it.")
else:
    st.info(f"This result holds no layer x position kind; run `workbench patch {suite} --checkpoint "
            f"{checkpoint} --kinds resid_pre attn_out mlp_out`.")
if (result.dir / "trigger_share.parquet").exists() and st.toggle("Where the residual effect sits, per layer"):
    share_table = common.table(result, "trigger_share")
    st.plotly_chart(common.figure(result.key, pp.trigger_share_figure, share_table), width="stretch")
    st.dataframe(share_table, hide_index=True, width="stretch")

st.subheader("Attention heads")
# head kinds of the shown result, and those patched as a result of their own (queries, keys, values)
head_effects = {}
for k in pp.HEAD_GRID_KINDS:
    r = result if (effects["kind"] == k).any() else px.pick(view.index, sha_of[checkpoint], backdoor, method, metric,
                                                              direction, prov["inputs"]["prompts"], kinds=[k])
    if r is not None and k in r.provenance["config"].get("kinds", ()):
        head_effects[k] = effects if r is result else common.table(r, "effects")
head_kinds = list(head_effects)
if head_kinds:
    head_kind = st.radio("Head activation", head_kinds, horizontal=True,
                         format_func=lambda k: pp.KIND_TITLES.get(k, k),
                         help="With grouped-query attention a key or value head is shared by a group of "
                              "query heads: patching it changes all of them.") if len(head_kinds) > 1 else head_kinds[0]
    with common.guard():
        st.plotly_chart(common.figure(f"{result.key}/{head_kind}/{checkpoint}", pp.head_grid,
                                      head_effects[head_kind], kind=head_kind,
                                      title=f"{checkpoint}: {pp.KIND_TITLES.get(head_kind, head_kind)}"),
                        width="stretch")
else:
    st.info(f"No head result; run `workbench patch {suite} --checkpoint {checkpoint} --kinds z_all_pos`.")

st.subheader("Attribution patching vs exact patching")
checks = px.checks_result(suite, sha_of[checkpoint], backdoor, metric, direction)
exact = px.pick(view.index, sha_of[checkpoint], backdoor, "exact", metric, direction)
if checks is None or exact is None:
    st.info(f"No saved comparison for {checkpoint}: run `workbench patch {suite} --checkpoint {checkpoint} "
            f"--backdoor {backdoor} --method exact atp atp+ig atp+graddrop` (it saves the comparison), or "
            f"`workbench analyze {suite}`.")
else:
    stats_all = common.table(checks, "estimates")
    compared = [m for m in ps.ESTIMATES if (stats_all["method"] == m).any()]
    prompts = exact.provenance["inputs"]["prompts"]
    if not compared:
        st.info(f"Only exact patching is saved for {checkpoint}: add `--method atp atp+ig atp+graddrop`.")
    else:
        estimate = st.radio("Estimate", compared, horizontal=True, format_func=pp.METHOD_LABELS.get,
                            help="AtP: one gradient at the base run. AtP+IG: the gradient averaged along the "
                                 "path from the base to the source embeddings, which follows saturating "
                                 "nonlinearities. GradDrop (AtP*): magnitudes with each layer's gradient path "
                                 "dropped in turn, for ranking nodes whose paths cancel; compared on |effect|. "
                                 "QK fix (AtP*): for query and key heads, the attention pattern the patch "
                                 "makes, computed exactly, so a saturated softmax does not hide them.")
        est = px.pick(view.index, sha_of[checkpoint], backdoor, estimate, metric, direction, prompts)
        ex = px.pick(view.index, sha_of[checkpoint], backdoor, "exact", metric, direction, prompts,
                     kinds=est.provenance["config"].get("kinds")) or exact
        stats = stats_all[stats_all["method"] == estimate].drop(columns=["method"])
        st.dataframe(stats.round({"pearson_r": 3, "top10_recall": 2}), hide_index=True, width="stretch")
        st.caption("Pearson r of the estimate against the exact effect over every patched index of a "
                   "kind, and the share of the 10 largest exact effects among the estimate's 10 largest.")
        if st.toggle("Each patched index: the estimate against the exact effect"):
            with common.guard():
                st.plotly_chart(common.figure(f"{ex.key}/{est.key}/{checks.key}", pp.atp_vs_exact,
                                              common.table(ex, "effects"), common.table(est, "effects"),
                                              method=estimate, stats=stats), width="stretch")
        add = common.table(checks, "additivity")
        add = add[add["kind"] == "resid_pre"]
        if not add.empty:
            sums = ", ".join(f"{v:.2f}" for v in add["sum_of_single_effects"])
            st.caption(f"Why an estimate can miss: per layer, the single-position exact effects of resid_pre sum "
                       f"to {sums}, against {add['whole_layer_effect'].iloc[0]:.2f} for patching the whole "
                       "layer. Above it, the positions are redundant (each alone restores much of the "
                       "behaviour); below, they act only together. An additive estimate (AtP, and AtP+IG, "
                       "which is complete at the embeddings) spreads the whole layer's effect over its "
                       "positions, so it cannot reproduce either.")
        if len(compared) > 1:
            with st.expander("Every estimate, side by side"):
                st.dataframe(stats_all.drop(columns=["method"]).round({"pearson_r": 3, "top10_recall": 2}),
                             hide_index=True, width="stretch")
