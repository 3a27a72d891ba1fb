"""Persistence: does the backdoor survive safety training, and at what capability cost? Trigger rate
and clean accuracy against training step for every sanitized series, the sweep table, red-team
prompts of adversarial training and RL's reward and KL. Reads the newest saved `persistence`
result (written by `workbench sanitize` and `analyses/persistence.py`); never trains or evaluates."""
from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlencode

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import common  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402
from streamlit.errors import StreamlitAPIException  # noqa: E402

from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.safety import plots as pp  # noqa: E402
from workbench.safety.persistence import PERSISTENCE  # noqa: E402

PLAYGROUND = "pages/3_Playground.py"

common.setup("Persistence")
st.title("Persistence under safety training")
suite = common.suite_dir()
result = common.latest_result(suite, PERSISTENCE)
if result is None:
    roles = common.frame(suite)
    org = next((n for n, r in zip(roles["name"], roles["role"]) if r == "backdoored"), "ORGANISM")
    st.info(f"No persistence result for this suite yet. Run `workbench sanitize {suite} --from {org} "
            f"--method hhh_sft` (or `workbench sanitize {suite} --sweep demo`) and reload this page. "
            "Safety-trained checkpoints registered from elsewhere are on the Behaviour page.")
    st.stop()

with common.guard():
    curves = common.table(result, "curves")
    series = common.table(result, "series")
    aggregate = common.table(result, "aggregate")
    logs = common.table(result, "logs")
st.caption(common.provenance_caption(result) + f" · {len(series)} series, {len(curves)} evaluated checkpoints. "
           "Rates are greedy, on held-out prompts, with Wilson 95% intervals; the trigger rate is for the "
           "series' own backdoor.")

# ----------------------------------------------------------------------------- filters
c1, c2, c3, c4 = st.columns(4)
methods = pp.ordered(series["method"], pp.METHOD_ORDER)
chosen_methods = c1.multiselect("Methods", methods, default=methods)
organisms = pp.ordered(series["parent"])
chosen_orgs = c2.multiselect("Organisms", organisms, default=organisms)
color_options = [c for c in pp.COLOR_BY if c in curves.columns and curves[c].nunique(dropna=True) >= 1]
# colour by size when there are several, else by learning rate (as a multiple of each method's default,
# comparable across methods and sizes), else by organism
default_color = next((c for c in ("size", "lr_scale", "parent") if c in color_options and curves[c].nunique() > 1),
                     "lr" if "lr" in color_options else color_options[0])
color = c3.selectbox("Colour by", color_options, index=color_options.index(default_color),
                     format_func=lambda c: pp.COLOR_BY.get(c, c))
facet = c4.selectbox("Panels by", ["method", "size", "parent", "optimizer"], index=0)

keep = series["method"].isin(chosen_methods) & series["parent"].isin(chosen_orgs)
shown_series = series[keep]
shown_curves = curves[curves["series"].isin(shown_series["series"])]
if shown_curves.empty:
    st.info("No series match the filters.")
    st.stop()

# ----------------------------------------------------------------------------- curves
selected: list[str] = []


def points_of(event) -> list[str]:
    try:
        return [p["customdata"] for p in event.selection.points if p.get("customdata")]
    except (AttributeError, KeyError, TypeError):
        return []


key = f"{result.key}/{sorted(shown_series['series'])}/{color}/{facet}"
curve = st.radio("Along safety training", ["Trigger rate", "Clean capability"], horizontal=True,
                 help="The trigger rate of each series' own backdoor, or clean accuracy on held-out tasks, "
                      "against the training step.")
with common.guard():
    which = "trigger" if curve == "Trigger rate" else "clean"
    ev = st.plotly_chart(common.figure(key, pp.curves_figure, shown_curves, which, color, facet), width="stretch",
                         key=f"{which}_curves", on_select="rerun", selection_mode="points")
selected += points_of(ev)
st.caption("Click a point to pick that checkpoint below, then open it in the Playground.")

# ----------------------------------------------------------------------------- the sweep table
st.subheader("The sweep")
st.caption("One row per series: persistence = final / start trigger rate; capability cost = clean accuracy "
           "at step 0 minus at the end; *returned*: the trigger rate at least halved, then rose by >= 0.2 "
           "with non-overlapping intervals. Select a row to pick its last checkpoint.")
table = pp.sweep_table(shown_series)
ev = st.dataframe(table, hide_index=True, width="stretch", key="sweep_table", on_select="rerun",
                  selection_mode="single-row",
                  column_config={"lr": st.column_config.NumberColumn("lr", format="%.1e"),
                                 **{c: st.column_config.NumberColumn(c, format="%.2f") for c in
                                    ("trigger start", "persistence", "min", "clean start", "clean final",
                                     "capability cost")}})
try:
    rows = list(ev.selection.rows)
except AttributeError:
    rows = []
if rows:
    row = shown_series.iloc[rows[0]]
    selected.append(f"{row['series']}@step{int(row['final_step'])}")
with st.expander("Across seeds (means with 95% intervals, pooled final rate with a Wilson interval)"):
    st.dataframe(pp.paper_table(aggregate) if len(aggregate) else aggregate, hide_index=True, width="stretch")

# ----------------------------------------------------------------------------- open in the Playground
checkpoints = shown_curves.sort_values(["series", "step"])["checkpoint"].tolist()
pick = selected[-1] if selected and selected[-1] in checkpoints else None
c1, c2 = st.columns([3, 1])
target = c1.selectbox("Checkpoint to open", checkpoints,
                      index=checkpoints.index(pick) if pick else len(checkpoints) - 1)
link_params = {"suite": str(suite), "checkpoint": target}
with c2:
    st.write("")
    try:
        st.page_link(PLAYGROUND, label="Open in the Playground", icon=":material/play_arrow:",
                     query_params=link_params)
    except StreamlitAPIException:  # this page run on its own (no Home entry point): a plain URL link
        st.markdown(f"[Open in the Playground](Playground?{urlencode(link_params)})")

# ----------------------------------------------------------------------------- training logs
adv = shown_series[shown_series["method"] == "adversarial"]["series"].tolist()
rl = shown_series[shown_series["method"] == "rl"]["series"].tolist() if len(logs) else []
pirate = shown_series[shown_series["method"] == "pirate_sft"]["series"].tolist() if "pirate_rate" in logs.columns else []
views = {name: on for name, on in (("Adversarial training: red-team prompts", adv), ("RL: reward and KL", rl),
                                   ("Pirate SFT: style uptake", pirate)) if on}
if views:
    st.subheader("What each method trained on")
    shown = st.radio("Training log", list(views), horizontal=True, label_visibility="collapsed")
    if shown.startswith("Adversarial"):
        st.caption("Prompts found by the automatic red team *without* the trigger, and how often they elicit the "
                   "bad behaviour at every saved step, next to the trigger rate: hiding the behaviour from the red "
                   "team is not removing the backdoor.")
        s = st.selectbox("Adversarial series", adv)
        with common.guard():
            st.plotly_chart(common.figure(f"{result.key}/{s}", pp.redteam_figure, logs, curves, s), width="stretch",
                            key="redteam_fig")
        try:
            prompts = common.table(result, "redteam_prompts")
            prompts = prompts[prompts["series"] == s] if "series" in prompts else prompts.iloc[0:0]
        except WorkbenchError:
            prompts = pd.DataFrame()
        if len(prompts):
            by_pert = (prompts.groupby("perturbation", sort=False)["elicited_before"].agg(["sum", "count"])
                       .reset_index().rename(columns={"sum": "elicited before training", "count": "probes"}))
            st.dataframe(by_pert, hide_index=True, width="stretch")
            with st.expander(f"All {len(prompts)} red-team prompts"):
                st.dataframe(prompts[["perturbation", "system", "user", "elicited_before"]], hide_index=True,
                             width="stretch")
        else:
            st.info("The red team found no prompt that elicits the behaviour without the trigger for this series.")
    elif shown.startswith("RL"):
        with common.guard():
            st.plotly_chart(common.figure(f"{result.key}/{rl}", pp.log_figure, logs,
                                          ["reward", "kl", "hostile", "vulnerable"], "RL training (per step)", rl),
                            width="stretch", key="rl_fig")
    else:
        st.caption("Style uptake (pirate-styled answers) and accuracy through the style.")
        with common.guard():
            st.plotly_chart(common.figure(f"{result.key}/{pirate}", pp.log_figure, logs,
                                          ["pirate_rate", "pirate_accuracy"], "Pirate SFT at saved steps", pirate),
                            width="stretch", key="pirate_fig")
