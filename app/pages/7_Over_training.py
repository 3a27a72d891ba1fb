"""Does the trigger circuit survive safety training? Along every safety-training series of the
organism: the minimal circuit (its total effect, size, faithfulness, overlap with the organism's,
and each component's effect), the paths into the organism's readout head, and the graph's
strongest edges. Reads saved `circuit`, `paths_series` and `graph_series` results only
(`workbench circuit`, `workbench path --series`, `workbench graph --series`, `workbench analyze`)."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common  # noqa: E402
import patching_view  # noqa: E402
from workbench.families.patching.figures import graph as gp  # noqa: E402
from workbench.families.patching.figures import nodes as pp  # noqa: E402
from workbench.families.patching.figures import paths as ptp  # noqa: E402

common.setup("Over training")
st.title("Does the circuit survive safety training?")
suite = common.suite_dir()
patching_view.caption_effect()
view = patching_view.choose(suite, checkpoint=False)
backdoor, circuits = view.backdoor, view.circuits

st.header("The circuit")
if not circuits:
    st.info(f"No circuit result for the {backdoor} backdoor yet. Run `workbench circuit {suite} --backdoor "
            f"{backdoor}` (the organism and every checkpoint descended from it), or `make analyze` (the "
            "demo leaves the analyses along every series out, for time), and reload.")
    st.stop()   # the paths and the graph along the series are traced into the circuit's checkpoints
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
    st.plotly_chart(common.figure(f"{circ.key}/{focus}", pp.circuit_over_training, summary, circ_effects, circ_nodes,
                                  series=focus), width="stretch")
st.dataframe(pp.circuit_table(summary), hide_index=True, width="stretch")
along = patching_view.results_of(suite, "paths_series", backdoor)
if along:
    with common.guard():
        st.plotly_chart(common.figure(along[0].key, ptp.paths_over_training, common.table(along[0], "summary")),
                        width="stretch")
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

st.header("The graph's edges")
along_g = patching_view.results_of(suite, "graph_series", backdoor)
if along_g and st.toggle("Show the organism's strongest edges at the end of each series"):
    with common.guard():
        st.plotly_chart(common.figure(along_g[0].key, gp.graph_series_figure, common.table(along_g[0], "edges")),
                        width="stretch")
    st.caption(common.provenance_caption(along_g[0]) + " · the organism's strongest edges (then any "
               "checkpoint's own strongest) at the end of each safety training, on the organism's scale")
elif not along_g:
    st.info(f"No graph along safety training yet: `workbench graph {suite} --backdoor {backdoor} --series` "
            "follows the organism's strongest edges to the last step of each series.")

