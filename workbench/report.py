"""`workbench figures`: run every paper-figure script in `analyses/`, then write one offline HTML
report of everything the suite's saved results show. Nothing here computes an analysis.

The report's sections come from the registry: the suite's lineage and checkpoints, then each
registered analysis's `sections()` (an analysis whose family shows it under another one's section
names that one in `shown_by`), so a new analysis appears without editing this module.

Each script's outputs and the report are fingerprinted (the script's source, the keys of the saved
results it reads, the manifest and the workbench's own source): a rerun with nothing changed finds
every fingerprint in `FIGURES/.stamps/` with its files present, and redoes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from workbench import catalog
from workbench.core.analysis import Section
from workbench.core.errors import WorkbenchError
from workbench.core.files import sha256_json, write_json
from workbench.core.results import results_root
from workbench.present.style import html_report, one_browser
from workbench.suite.figures import lineage_figure
from workbench.suite.manifest import MANIFEST, load_suite

ANALYSES_DIR = Path(__file__).resolve().parent.parent / "analyses"
PACKAGE_DIR = Path(__file__).resolve().parent
STAMPS = ".stamps"


def sections(suite_dir: Path) -> list[Section]:
    """The report: the suite itself, then every registered analysis's own sections."""
    frame = load_suite(suite_dir).to_frame()
    out: list[Section] = [("Suite lineage", lineage_figure(frame)), ("Checkpoints", frame.drop(columns=["path"]))]
    for analysis in catalog.in_order():
        if not analysis.shown_by:
            out += analysis.sections(suite_dir)
    return out


def analysis_scripts() -> list[Path]:
    return sorted(p for p in ANALYSES_DIR.glob("*.py") if not p.name.startswith("_"))


def code_hash() -> str:
    """The workbench's own source: a figure drawn by other code is another figure."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(p.relative_to(PACKAGE_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def result_keys(suite_dir: Path, analyses: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The keys of every saved result (of `analyses`, default all), by analysis: what a figure shows."""
    root = results_root(suite_dir)
    names = analyses if analyses is not None else sorted(p.name for p in root.glob("*") if p.is_dir())
    return {a: sorted(d.name for d in (root / a).glob("*") if (d / "provenance.json").exists()) for a in names}


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(f"analyses.{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fresh(stamp: Path, fingerprint: str) -> bool:
    """The stamp holds this fingerprint and every file it lists is still there."""
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("fingerprint") == fingerprint and all(Path(p).exists() for p in saved.get("outputs", []))


def run_analysis(script: Path, suite_dir: Path, out: Path, formats: Sequence[str], common: dict,
                 force: bool = False) -> tuple[list[Path], bool]:
    """(the files a paper-figure script wrote, whether it ran): skipped when its stamp is fresh."""
    module = _load(script)
    reads = getattr(module, "READS", None)
    fingerprint = sha256_json({**common, "script": script.read_text(), "formats": list(formats),
                               "results": result_keys(suite_dir, reads)})
    stamp = out / STAMPS / f"{script.stem}.json"
    if not force and _fresh(stamp, fingerprint):
        return [Path(p) for p in json.loads(stamp.read_text())["outputs"]], False
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = module.main([str(suite_dir), "--out", str(out), "--formats", *formats])
    printed = buf.getvalue()
    sys.stdout.write(printed)
    if code:
        raise WorkbenchError(f"{script.name} failed (exit {code}); its message is above")
    outputs = [line.strip() for line in printed.splitlines() if line.strip() and Path(line.strip()).exists()]
    write_json(stamp, {"fingerprint": fingerprint, "outputs": outputs})
    return [Path(p) for p in outputs], True


def write_figures(suite: str | Path, out: str | Path | None = None, formats: Sequence[str] = ("pdf", "svg", "png"),
                  force: bool = False) -> list[Path]:
    """Paper figures and tables from every analysis script (each prints what it wrote), plus
    `report.html`, whose path is returned; what is up to date is not redrawn (`force`: redraw)."""
    suite_dir = Path(suite)
    load_suite(suite_dir)
    out = Path(out) if out else suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    common = {"code": code_hash(), "manifest": (suite_dir / MANIFEST).read_text()}
    with one_browser() if formats else contextlib.nullcontext():   # one Chromium for every script
        for script in analysis_scripts():
            _, ran = run_analysis(script, suite_dir, out, formats, common, force)
            if not ran:
                print(f"{script.name}: up to date (its results and code are unchanged)")
    report = out / "report.html"
    fingerprint = sha256_json({**common, "results": result_keys(suite_dir), "plugins": sorted(catalog.analyses())})
    stamp = out / STAMPS / "report.json"
    if force or not _fresh(stamp, fingerprint):
        html_report(sections(suite_dir), report, title=f"Workbench report: {suite_dir.name}")
        write_json(stamp, {"fingerprint": fingerprint, "outputs": [str(report)]})
    return [report]
