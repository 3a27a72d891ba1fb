"""Compartmentalisation: does safety training update the weights the trigger circuit uses? For one
backdoor: the two controls first (if either is called wrong, every verdict is withheld), the verdict
rule, the verdict per run (filterable), each run's statistic inside its null distribution, where
the update's squared norm landed, the causal surgery, the statistics against size and method, and
the circuit's components. Reads saved `compartment` results only; a missing one names the command."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import streamlit as st  # noqa: E402

import common  # noqa: E402
from workbench.core import results  # noqa: E402
from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.families.compartment import figures as cf  # noqa: E402
from workbench.families.compartment.tasks import ANALYSIS, CONTROL_EXPECTED  # noqa: E402

common.setup("Compartmentalisation")
st.title("Compartmentalisation: does safety training touch the trigger circuit?")
suite = common.suite_dir()
NUMBERS = ("share", "share_null_mean", "share_null_lo", "share_null_hi", "share_p_low", "share_p_high", "share_ratio",
           "share_param_share", "overlap", "overlap_null_mean", "overlap_null_lo", "overlap_null_hi", "overlap_ratio", "overlap_p_low", "overlap_p_high",
           "overlap_isotropic_p_high", "rate_before", "rate_after", "trigger_rate", "trigger_rate_lo",
           "trigger_rate_hi", "false_trigger_rate", "capability", "capability_lo", "capability_hi")


# ----------------------------------------------------------------------------- saved results

def _stamp() -> float:
    """Changes whenever a compartment result is added or removed (its folder's mtime)."""
    folder = results.results_root(suite) / ANALYSIS
    return folder.stat().st_mtime if folder.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _saved(path: str, stamp: float) -> list[results.Result]:
    return results.list_results(path, ANALYSIS)


def chart(key: str, build, *args, **kwargs) -> None:
    """A figure built once per `key` (the result key and options it shows)."""
    with common.guard():
        st.plotly_chart(common.figure(key, build, *args, **kwargs), width="stretch", key=f"chart:{key}")


def numbers(table) -> dict:
    return {c: st.column_config.NumberColumn(c, format="%.3g") for c in NUMBERS if c in table.columns}


def suite_backdoors() -> list[str]:
    """The suite's own backdoors, where its manifest reads (a folder of results alone still shows them)."""
    try:
        from workbench.suite import lineage
        return lineage.backdoors(common.load_suite(suite))
    except (WorkbenchError, OSError):
        return []


def title_of(backdoor: str) -> str:
    try:
        return common.backdoor_title(common.load_suite(suite), backdoor)
    except (WorkbenchError, OSError):
        return backdoor


saved = cf.by_backdoor(_saved(str(suite), _stamp()))
known = suite_backdoors()
if not saved:
    names = ", ".join(known) or "B"
    st.info(f"No compartmentalisation result saved for this suite yet: run "
            f"`{cf.command(suite, known[0] if len(known) == 1 else 'B')}` (for each backdoor: {names}) or "
            f"`workbench analyze {suite}`, then reload this page.")
    st.stop()

# ----------------------------------------------------------------------------- the backdoor and result
choices = cf.order_backdoors(list(saved) + known)
backdoor = st.radio("Backdoor", choices, horizontal=True, format_func=title_of)
if backdoor not in saved:
    st.info(f"No compartmentalisation result saved for {backdoor} yet: run `{cf.command(suite, backdoor)}` or "
            f"`workbench analyze {suite}`, then reload this page.")
    st.stop()
found = saved[backdoor]
by_key = {r.key: r for r in found}


def result_label(key: str) -> str:
    p = by_key[key].provenance
    cfg = p.get("config", {})
    return (f"result {key} ({str(p.get('created', ''))[:16]}) · surgery on {cfg.get('surgery', '?')} · "
            f"{cfg.get('n_null', '?')} null sets")


key = st.selectbox("Result", list(by_key), format_func=result_label) if len(by_key) > 1 else found[0].key
res = by_key[key]
prov = res.provenance
st.caption(common.provenance_caption(res))
with common.guard():
    runs = common.table(res, "runs")

# ----------------------------------------------------------------------------- controls first
st.header("Controls")
controls = cf.controls_table(runs, CONTROL_EXPECTED)
passed = bool(prov.get("controls_passed"))
if passed:
    st.success("Controls passed: the update confined outside C reads \"compartmentalised\" and the update confined "
               "to C reads \"not compartmentalised\", as they must. The verdicts below stand.")
elif controls.empty:
    st.error("Controls failed: no control could be built (no safety-training run of a reference organism), so "
             "every verdict is withheld.")
else:
    wrong = ", ".join(f"{r.control} control read \"{r.verdict}\" (must be \"{r.expected}\")"
                      for r in controls.itertuples() if not r.ok)
    st.error(f"Controls FAILED: {wrong or 'see below'}. The test cannot tell a compartmentalised update from one "
             "that is not, so every verdict is withheld.")
if not controls.empty:
    st.dataframe(controls, hide_index=True, width="stretch", column_config=numbers(controls))
st.caption("Both controls are built from the reference organism's first safety-training run: the positive control "
           "is that update with C's weights zeroed and the trigger directions projected out of every matrix that "
           "reads or writes them; the negative control is the update confined to C, rescaled to the same norm.")

st.subheader("The verdict rule")
st.markdown(prov.get("rule", "(this result states no rule)"))

# ----------------------------------------------------------------------------- verdicts
st.header("Verdict per run")
table = cf.verdict_table(runs)
counts = table["verdict"].value_counts().to_dict()
cols = st.columns(len(cf.VERDICTS))
for col, verdict in zip(cols, cf.VERDICTS):
    col.metric(verdict.capitalize(), counts.get(verdict, 0))
c1, c2, c3 = st.columns(3)
methods = list(dict.fromkeys(table["method"]))
verdicts = [v for v in cf.VERDICTS if v in counts] + sorted(set(counts) - set(cf.VERDICTS))
sizes = cf.order_sizes(table["size"])
chosen_methods = c1.multiselect("Method", methods, default=methods)
chosen_verdicts = c2.multiselect("Verdict", verdicts, default=verdicts)
chosen_sizes = c3.multiselect("Size", sizes, default=sizes)
shown = cf.filter_runs(table, chosen_methods, chosen_verdicts, chosen_sizes)
st.caption(f"{len(shown)} of {len(table)} runs. `share`: the share of the update's squared norm on C's weights, "
           "against random component sets with as many heads, KV heads and MLPs (`share_null_*`: their mean and "
           "95% range); `overlap`: how strongly the update acts on the trigger directions, in units of a random "
           "direction, against random directions drawn from the stream's own variation. The insertion update "
           "(base -> organism) is where backdoor training wrote.")
st.dataframe(shown, hide_index=True, width="stretch", column_config=numbers(shown))
st.download_button("Download these runs (CSV)", shown.to_csv(index=False),
                   file_name=f"compartment_{backdoor}_{res.key}.csv", mime="text/csv")
chart(f"{res.key}/overview", cf.overview, runs, f"{backdoor}: each run inside its nulls, coloured by verdict")

# ----------------------------------------------------------------------------- one run's nulls
st.header("Null distributions")
everyone = cf.verdict_table(runs, controls=True)
labels = {r["series"]: cf.run_label(r, 90) for _, r in everyone.iterrows()}
series = list(labels)
c1, c2 = st.columns([3, 1])
run = c1.selectbox("Run", series, format_func=labels.get)
statistic = c2.radio("Statistic", ["share", "overlap"], horizontal=True,
                     format_func=lambda s: {"share": "update share", "overlap": "direction overlap"}[s])
with common.guard():
    null = common.table(res, "nulls") if res.has_table("nulls") else None
row = runs[runs["series"] == run].iloc[0]
if null is None or null[(null["series"] == run) & (null["statistic"] == statistic)].empty:
    st.info("This result saved no null draws for that run.")
else:
    chart(f"{res.key}/null/{run}/{statistic}", cf.null_of, runs, null, run, statistic)
col = "share" if statistic == "share" else "overlap"
st.markdown(f"**{row['verdict']}**: {row['reason']}  \n"
            f"observed {row[col]:.4g}; null mean {row[f'{col}_null_mean']:.4g}, 95% range "
            f"[{row[f'{col}_null_lo']:.4g}, {row[f'{col}_null_hi']:.4g}]; "
            f"p_low = {row[f'{col}_p_low']:.3g}, p_high = {row[f'{col}_p_high']:.3g}")
st.caption("The histogram shows the null draws the result saved (at most 2000); the p-values use every draw.")

# ----------------------------------------------------------------------------- where the update landed
if res.has_table("energies") and res.has_table("circuit"):
    st.subheader("Where the update landed")
    with common.guard():
        energies = common.table(res, "energies")
        circuit = common.table(res, "circuit")
    real = [s for s in series if s in set(energies["series"])]
    if real:
        which = st.selectbox("Update", real, key="energy_run", format_func=labels.get)
        chart(f"{res.key}/energy/{which}", cf.energy, energies, circuit, which)

# ----------------------------------------------------------------------------- surgery
st.header("Causal surgery")
surgery = common.table(res, "surgery") if res.has_table("surgery") else None
if surgery is None or surgery.empty:
    st.info(f"This result has no causal surgery (its config: surgery={prov.get('config', {}).get('surgery', '?')!r}); "
            f"run `{cf.command(suite, backdoor)} --surgery all` for every run.")
else:
    st.caption("The organism with the safety update applied in full, only on C's weights, only outside them; and "
               "with backdoor training undone only on C's weights (if C is the circuit, this removes the backdoor) "
               "or only outside them. Rates with Wilson 95% intervals on held-out prompts.")
    shown_surgery = cf.surgery_table(surgery)
    st.dataframe(shown_surgery, hide_index=True, width="stretch", column_config=numbers(shown_surgery))
    chart(f"{res.key}/surgery", cf.surgery_figure, surgery, backdoor)

# ----------------------------------------------------------------------------- against size and method
st.header("Against size and method")
summary = common.table(res, "summary") if res.has_table("summary") else cf.real_runs(runs)
stat = st.radio("Statistic", list(cf.STATISTICS), horizontal=True, key="against_stat",
                format_func=lambda s: s.replace("_", " "), help="; ".join(f"{k}: {v}" for k, v in cf.STATISTICS.items()))
n_sizes = cf.real_runs(runs)["size"].nunique()
if n_sizes <= 1:
    only = cf.order_sizes(cf.real_runs(runs)["size"])
    st.info(f"This suite holds one model size ({', '.join(only) or 'unnamed'}), so there is nothing to plot against "
            "size; a suite built with several sizes (and their safety-training runs) shows the trend here.")
else:
    chart(f"{res.key}/size/{stat}", cf.against, summary, (stat,), "size", "method")
chart(f"{res.key}/method/{stat}", cf.against, summary, (stat,), "method", "size")
for by in ("lr", "optimizer"):
    if cf.real_runs(runs)[by].dropna().nunique() > 1:
        chart(f"{res.key}/{by}/{stat}", cf.against, summary, (stat,), by, "method")
with st.expander("Over seeds (every seed must agree for a verdict)"):
    st.dataframe(summary, hide_index=True, width="stretch", column_config=numbers(summary))

# ----------------------------------------------------------------------------- the circuit
st.header("The circuit's components")
if res.has_table("circuit"):
    circuit = common.table(res, "circuit")
    if circuit.empty:
        st.warning("The circuit has no components that name weights (only residual-stream nodes).")
    else:
        listed = circuit.assign(component=[f"L{l}.h{i}" if k == "head" else f"L{l}.kv{i}" if k == "kv" else f"L{l} MLP"
                                           for k, l, i in zip(circuit["kind"], circuit["layer"], circuit["index"])],
                                what=circuit["kind"].map(cf.KIND_LABEL))
        st.dataframe(listed, hide_index=True, width="stretch")
st.caption("C, read from the patching family's saved circuit of each organism: a head is its q rows and o columns, "
           "a KV head its k and v rows (shared by its group's heads), an MLP its gate, up and down matrices. "
           "Embeddings, the unembedding and the norms belong to no component.")
if res.has_table("sites"):
    with st.expander("Trigger directions: how far the trigger moves the residual stream, per site and layer"):
        st.caption(prov.get("directions", ""))
        st.dataframe(common.table(res, "sites"), hide_index=True, width="stretch")
