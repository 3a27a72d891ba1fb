"""Paper figures and table for the behavioural evaluation of a suite.

    python analyses/behaviour.py SUITE [--out DIR] [--decoding greedy] [--formats pdf svg png]

Reads the newest saved `behaviour` result of SUITE (never recomputes it: run
`workbench eval behaviour SUITE` first) and writes, into SUITE/figures/ or --out:

- behaviour_overview.{pdf,svg,png}   trigger / false-trigger / clean accuracy per checkpoint
- near_trigger.{pdf,svg,png}         generalisation to never-trained near-triggers
- capability.{pdf,svg,png}           clean accuracy per task kind and clean loss
- behaviour_headline.{csv,tex}       the headline rates with 95% Wilson intervals
- behaviour_provenance.json          which result (key, creation time, inputs) the figures show
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.core.files import write_json
from workbench.core.results import latest

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = ("behaviour",)
from workbench.evaluation import plots
from workbench.present import style as figures


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/behaviour.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--decoding", default="greedy", help="greedy or sampled (default greedy)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def run(suite: Path, out: Path | None, decoding: str, formats: list[str]) -> list[Path]:
    """Write every output; return their paths. Raises WorkbenchError with what to do."""
    result = latest(suite, "behaviour")
    if result is None:
        raise WorkbenchError(f"no behaviour result in {suite}; run `workbench eval behaviour "
                             f"{suite}` first")
    metrics = result.table("metrics")
    if decoding not in plots.decodings(metrics):
        raise WorkbenchError(f"the behaviour result has no {decoding!r} decoding; it holds "
                             f"{plots.decodings(metrics)} (pass --decoding)")
    out = out or suite / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    to_export = []
    builders = {"behaviour_overview": plots.behaviour_overview, "near_trigger": plots.near_trigger,
                "capability": plots.capability}
    for stem, build in builders.items():
        try:
            fig = build(metrics, decoding)
        except WorkbenchError as e:  # e.g. no near-trigger rows: skip that figure, say so
            print(f"skipped {stem}: {e}", file=sys.stderr)
            continue
        to_export.append((figures.paper_style(fig), out / stem))
    written += figures.export_many(to_export, formats)  # one browser start for all figures
    table = plots.headline(metrics, decoding)
    written += figures.table_outputs(table, out / "behaviour_headline",
                                     display=plots.format_headline(table))
    prov = {"analysis": "behaviour", "key": result.key, "created": result.provenance.get("created"),
            "inputs": result.provenance.get("inputs"), "decoding": decoding}
    prov_path = out / "behaviour_provenance.json"
    write_json(prov_path, prov)
    return written + [prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.decoding, args.formats))


if __name__ == "__main__":
    sys.exit(main())
