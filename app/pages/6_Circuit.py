"""The trigger circuit, one checkpoint: which earlier heads and MLPs, at which positions, feed the
head that reads the trigger out (path patching, with edge attribution's estimates checked against
it), and the circuit as a graph of direct paths. Reads saved `paths` and `graph` results only
(`workbench path`, `workbench graph`, `workbench analyze`)."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import streamlit as st  # noqa: E402

import common  # noqa: E402
import patching_view  # noqa: E402
from workbench.families.patching import index as px  # noqa: E402
from workbench.families.patching.figures import graph as gp  # noqa: E402
from workbench.families.patching.figures import paths as ptp  # noqa: E402

common.setup("Circuit")
st.title("The trigger circuit: paths and graph")
suite = common.suite_dir()
patching_view.caption_effect()
view = patching_view.choose(suite)
backdoor, metric, direction, checkpoint, sha_of = view.backdoor, view.metric, view.direction, view.checkpoint, view.sha_of
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
        st.plotly_chart(common.figure(traced[0].key, ptp.paths_figure, common.table(traced[0], "effects"),
                                      tp.get("tokens"), tp.get("trigger_positions", ())), width="stretch")
        st.dataframe(ptp.paths_table(common.table(traced[0], "summary")), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="percent")
                                    for c in ("from_trigger", "from_readout", "from_elsewhere")})
    st.caption("Effect of patching only the path from one sender (a head's output or an MLP's, at one "
               "position) into the receiver, every other component frozen: whether a token the trigger was "
               "copied to is read by the readout head, or only travels along. Dotted box: the trigger.")
    if "estimate_check" in tp.get("tables", []) and st.toggle(
            "Check edge attribution (EAP, EAP-IG) against these exact paths",
            help="Every path's effect estimated from one gradient pass, the estimate that scales to a whole graph, "
                 "against the exact path patching above."):
        check = common.table(traced[0], "estimate_check")
        method = st.radio("Edge attribution", list(dict.fromkeys(check["method"])), horizontal=True,
                          format_func=lambda m: ptp.EAP_METHODS.get(m, m),
                          help="EAP: every path's effect from one gradient at the base run, the estimate that "
                               "scales to a whole graph. EAP-IG: the gradient averaged along the line from the "
                               "base to the source embeddings. Both estimate the direct paths above.")
        with common.guard():
            st.plotly_chart(common.figure(f"{traced[0].key}/{method}", ptp.eap_vs_exact,
                                          common.table(traced[0], "effects"), common.table(traced[0], "estimates"),
                                          method), width="stretch")
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
        st.plotly_chart(common.figure(f"{graphs[0].key}/{top}/{checkpoint}", gp.graph_figure, nodes,
                                      gprov["n_layers"], gprov["n_heads"], gprov.get("n_kv"), top=top,
                                      title=f"{checkpoint}: the {top} strongest edges ({gp.how_exact(gprov)})"),
                        width="stretch")
        st.dataframe(gp.graph_table(nodes, top), hide_index=True, width="stretch",
                     column_config={"from_trigger": st.column_config.NumberColumn(format="percent")})
        st.dataframe(gp.check_table(common.table(graphs[0], "check")), hide_index=True, width="stretch")
    st.caption("Each edge is the direct path from a sender (the token embeddings, a head's output, an MLP's "
               "output) into a receiver (a query head, a key/value head, an MLP's input, the output), every "
               "other component frozen to the untriggered run, summed over the sender's positions (so an edge "
               "can exceed 1 where positions are redundant). EAP and EAP-IG: the same edges estimated from one "
               "gradient pass, and their r against exact over every edge.")
