"""Overview: every checkpoint in the suite, where it came from, and whether it can be trusted
(weight hash, TransformerLens/HF parity), read from the manifest."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import common  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from workbench.suite.figures import lineage_figure  # noqa: E402

COLUMNS = ["name", "role", "parent", "method", "step", "preset", "seed", "n_params",
           "parity_max_abs_diff", "sha256"]


def folder_mb(p: Path) -> float | None:
    """Disk size of a checkpoint folder in MB (None when the folder is not there)."""
    if not p.exists():
        return None
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


common.setup("Overview")
st.title("Suite overview")
suite = common.suite_dir()
with common.guard():
    suite_obj = common.load_suite(suite)
    frame = common.frame(suite)

shown = frame[[c for c in COLUMNS if c in frame.columns]].copy()
if "sha256" in shown.columns:
    shown["sha256"] = shown["sha256"].map(common.short_sha)
with common.guard():
    shown["size_mb"] = [folder_mb(suite_obj.dir(n)) for n in frame["name"]]

st.caption(f"`{suite}` · {len(frame)} checkpoints. The sha256 is of `model.safetensors`; parity is "
           "the largest |log-probability difference| between the TransformerLens bridge and HF on a probe batch.")
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={"sha256": st.column_config.TextColumn("sha256 (short)"),
                            "n_params": st.column_config.NumberColumn("params", format="%d"),
                            "parity_max_abs_diff": st.column_config.NumberColumn(
                                "parity max |Δ|", format="%.1e"),
                            "size_mb": st.column_config.NumberColumn("size (MB)", format="%.2f")})

st.subheader("Lineage")
with common.guard():
    st.plotly_chart(lineage_figure(frame), width="stretch")

st.subheader("Sizes")
cols = st.columns(3)
if "n_params" in frame.columns and len(frame):
    n = pd.to_numeric(frame["n_params"], errors="coerce")
    cols[0].metric("Parameters per checkpoint", f"{int(n.max()):,}" if n.notna().any() else "?")
if shown["size_mb"].notna().any():
    cols[1].metric("Suite on disk (MB)", f"{pd.to_numeric(shown['size_mb']).sum():.1f}")
if "parity_max_abs_diff" in frame.columns and len(frame):
    worst = pd.to_numeric(frame["parity_max_abs_diff"], errors="coerce").max()
    cols[2].metric("Worst parity |Δ|", "?" if pd.isna(worst) else f"{worst:.1e}")
