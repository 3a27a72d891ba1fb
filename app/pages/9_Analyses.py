"""Analyses: every registered analysis without a page of its own, shown as it saved its results.

An analysis family added to the workbench (docs/add-an-analysis.md) appears here without editing
the app: the page asks the registry for the analyses and draws each one's `sections()` (the same
figures, tables and text the HTML report shows). Reads saved results only.
"""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import streamlit as st  # noqa: E402

import common  # noqa: E402
from workbench import catalog  # noqa: E402

# families with pages of their own (Behaviour, Persistence, Patching, Features)
OWN_PAGES = ("behaviour", "safety", "patching", "features", "deltas", "compartment", "scan")

common.setup("Analyses")
st.title("Analyses")
suite = common.suite_dir()
shown = [a for a in catalog.analyses().values() if a.family not in OWN_PAGES and not a.shown_by]
if not shown:
    st.info("Every registered analysis has a page of its own. A new analysis family (docs/add-an-analysis.md) "
            "appears here once registered.")
    st.stop()
names = [a.name for a in shown]
wanted = st.query_params.get("analysis")             # ?analysis=NAME links straight to one
name = st.radio("Analysis", names, horizontal=True, index=names.index(wanted) if wanted in names else 0,
                format_func=lambda n: catalog.get(n).title or n)
analysis = catalog.get(name)
if analysis.__doc__:
    st.caption(" ".join(analysis.__doc__.split()))
with common.guard():
    sections = analysis.sections(suite)
if not sections:
    st.info(f"No saved {name} result for this suite yet. Run `workbench run {name} {suite}` (or `workbench analyze "
            f"{suite}`) and reload.")
for title, content in sections:
    st.subheader(title)
    if isinstance(content, go.Figure):
        st.plotly_chart(content, width="stretch")
    elif isinstance(content, pd.DataFrame):
        st.dataframe(content, hide_index=True, width="stretch")
    else:
        st.markdown(str(content))
