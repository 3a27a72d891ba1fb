"""`workbench figures`: run every paper-figure script in `analyses/`, then write one offline HTML
report of everything the suite's saved results show.

The report is assembled from a registry of section builders (one per analysis), each of which
reads saved results and returns titled figures/tables; an analysis with no saved result simply
contributes nothing. Nothing here computes an analysis.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Sequence


from workbench.evaluation import plots
from workbench.core.errors import ConfigError, WorkbenchError
from workbench.present.style import html_report
from workbench.core.results import latest
from workbench.suite.manifest import load_suite

ANALYSES_DIR = Path(__file__).resolve().parent.parent / "analyses"
Section = tuple[str, object]
SECTIONS: dict[str, Callable[[Path], list[Section]]] = {}


def register_section(name: str, build: Callable[[Path], list[Section]]) -> None:
    if name in SECTIONS:
        raise ConfigError(f"report section {name!r} is already registered")
    SECTIONS[name] = build


def _suite_sections(suite_dir: Path) -> list[Section]:
    frame = load_suite(suite_dir).to_frame()
    return [("Suite lineage", plots.lineage(frame)), ("Checkpoints", frame.drop(columns=["path"]))]


def _behaviour_sections(suite_dir: Path) -> list[Section]:
    res = latest(suite_dir, "behaviour")
    if res is None:
        return [("Behaviour", "No behaviour result yet: run `workbench eval behaviour SUITE`.")]
    m = res.table("metrics")
    out: list[Section] = [
        ("Behaviour", f"Result {res.key}, created {res.provenance.get('created')}; rates with Wilson 95% "
                      "intervals on held-out prompts."),
        ("Trigger and false-trigger rates", plots.behaviour_overview(m)),
        ("Near-trigger generalisation", plots.near_trigger(m)),
        ("Clean capability", plots.capability(m)),
        ("Headline numbers (greedy)", plots.format_headline(plots.headline(m))),
    ]
    return out


def _persistence_sections(suite_dir: Path) -> list[Section]:
    from workbench.safety.plots import report_sections
    return report_sections(suite_dir)


register_section("suite", _suite_sections)
register_section("behaviour", _behaviour_sections)
register_section("persistence", _persistence_sections)


def _patching_sections(suite_dir: Path) -> list[Section]:
    from workbench.families.patching.figures.nodes import report_sections
    return report_sections(suite_dir)


register_section("patching", _patching_sections)


def analysis_scripts() -> list[Path]:
    return sorted(p for p in ANALYSES_DIR.glob("*.py") if not p.name.startswith("_"))


def run_analysis(script: Path, suite_dir: Path, out: Path, formats: Sequence[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"analyses.{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(suite_dir), "--out", str(out), "--formats", *formats])
    if code:
        raise WorkbenchError(f"{script.name} failed (exit {code}); its message is above")


def write_figures(suite: str | Path, out: str | Path | None = None,
                  formats: Sequence[str] = ("pdf", "svg", "png")) -> list[Path]:
    """Paper figures and tables from every analysis script (each prints what it wrote), plus
    `report.html`, whose path is returned."""
    suite_dir = Path(suite)
    load_suite(suite_dir)
    out = Path(out) if out else suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for script in analysis_scripts():
        run_analysis(script, suite_dir, out, formats)
    sections: list[Section] = []
    for build in SECTIONS.values():
        sections += build(suite_dir)
    return [html_report(sections, out / "report.html", title=f"Workbench report: {suite_dir.name}")]
