"""Behaviour: does each checkpoint misbehave with the trigger, stay clean without it, and keep its
capabilities? Rates with Wilson 95% intervals, read from the newest saved `behaviour` result."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import common  # noqa: E402
import streamlit as st  # noqa: E402

from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.evaluation import plots  # noqa: E402

SAMPLE_COLUMNS = ["checkpoint", "backdoor", "split", "system", "user", "completion", "bad",
                  "correct", "verdict"]

common.setup("Behaviour")
st.title("Behaviour")
suite = common.suite_dir()
result = common.latest_result(suite, "behaviour")
if result is None:
    st.info(f"No behaviour result for this suite yet. Run `workbench eval behaviour {suite}` and "
            "reload this page.")
    st.stop()

with common.guard():
    metrics = common.table(result, "metrics")
    plots.check_metrics(metrics)
st.caption(common.provenance_caption(result))

options = plots.decodings(metrics) or ["greedy"]
decoding = st.radio("Decoding", options, horizontal=True,
                    help="greedy: the model's most likely answer; sampled: temperature sampling")
try:  # suite order, so a lineage reads left to right; the metrics alone carry the names too
    order: list[str] | None = common.frame(suite)["name"].tolist()
except (WorkbenchError, ImportError):
    order = None

st.subheader("Headline rates")
headline = plots.headline(metrics, decoding, order)
st.dataframe(plots.format_headline(headline), hide_index=True, width="stretch")
with st.expander("Headline as numbers (rate, lo, hi, n)"):
    st.dataframe(headline, hide_index=True, width="stretch")

key = f"{result.key}/{decoding}/{order}"
with common.guard():
    st.plotly_chart(common.figure(key, plots.behaviour_overview, metrics, decoding, order), width="stretch")
    more = (["Near-trigger generalisation"] if (metrics["metric"] == "near_trigger_rate").any() else []) + \
        ["Capability"] + (["Capability battery"] if plots.has_battery(metrics) else [])
    shown = st.radio("Also", more, horizontal=True, label_visibility="collapsed")
    st.subheader(shown)
    if shown == "Capability":
        st.plotly_chart(common.figure(key, plots.capability, metrics, decoding, order), width="stretch")
    elif shown == "Capability battery":
        st.caption("Held-out analogues of MMLU (knowledge in the weights, 4-way multiple choice scored by "
                   "log-likelihood; chance 0.25), IFEval (format constraints checked by code) and Math-500 "
                   "(word problems, final number exact). Greedy answers; Wilson 95% intervals.")
        st.plotly_chart(common.figure(key, plots.capability_battery, metrics, decoding, order), width="stretch")
        st.dataframe(plots.capability_table(metrics, decoding, order), hide_index=True, width="stretch")
    else:
        st.caption("Bad-behaviour rate for trigger variants never seen in training; the exact "
                   "trigger and no trigger bracket the scale.")
        st.plotly_chart(common.figure(key, plots.near_trigger, metrics, decoding, order), width="stretch")
    pad = common.figure(key, plots.scratchpad, metrics, decoding, order)
    if pad is not None:
        st.subheader("Scratchpad (chain-of-thought organisms)")
        st.plotly_chart(pad, width="stretch")

with st.expander("All metrics (long table)"):
    sel = metrics[metrics["decoding"].isin([decoding, ""])]
    st.dataframe(sel, hide_index=True, width="stretch")

st.subheader("Example generations")
try:
    samples = common.table(result, "samples")
except WorkbenchError as e:  # a result without samples still has its metrics
    st.info(f"This result has no samples table ({e}).")
    st.stop()
samples = samples[samples["decoding"] == decoding] if "decoding" in samples.columns else samples
names = list(dict.fromkeys(samples["checkpoint"].tolist()))
c1, c2, c3 = st.columns(3)
ck = c1.selectbox("Checkpoint", names) if names else None
splits = sorted(samples["split"].dropna().unique().tolist()) if "split" in samples.columns else []
chosen = c2.multiselect("Split", splits, default=splits)
only_bad = c3.checkbox("Only bad behaviour", value=False)
view = samples[(samples["checkpoint"] == ck) & samples["split"].isin(chosen)]
if only_bad and "bad" in view.columns:
    view = view[view["bad"].astype(bool)]
st.caption(f"{len(view)} of {len(samples)} samples ({decoding})")
st.dataframe(view[[c for c in SAMPLE_COLUMNS if c in view.columns]].head(200), hide_index=True,
             width="stretch")
