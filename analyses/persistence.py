"""Paper figures and tables for backdoor persistence under safety training.

    python analyses/persistence.py SUITE [--out DIR] [--formats pdf svg png]

Reads the newest saved `persistence` result of SUITE (curves, per-series summary with the return
rule, aggregate across seeds; `workbench sanitize SUITE ...` saves it after evaluating the series,
`workbench analyze SUITE` too). It computes nothing. Writes, into SUITE/figures/ or --out:

- persistence_curves.{pdf,svg,png}     trigger rate against step per method and backdoor, by size
- persistence_variants.{pdf,svg,png}   the same by variant (plain / CoT / distilled), primary size
- capability_curves.{pdf,svg,png}      clean accuracy against step per method and backdoor, by size
- lr_tradeoff.{pdf,svg,png}            learning rate vs final trigger rate and capability cost (HHH SFT)
- backdoor_return.{pdf,svg,png}        share of series whose backdoor came back after a dip
- insertion_optimizers.{pdf,svg,png}   HHH SFT's curves by the backdoor's insertion optimizer (AdamW,
                                       SOAP, Muon), where the suite holds more than one
- removal.{pdf,svg,png}                full fine-tuning vs LoRA safety training, where both were run
- pirate_return.{pdf,svg,png}          the return test (pirate SFT, then normal speech), where run
- pirate_return.csv                    its verdicts, one row per organism seed
- persistence_table.{csv,tex}          per setting, across seeds: final rate, persistence, cost, return
- persistence_series.csv               one row per series
- persistence_provenance.json          which results (keys, creation times) the outputs show

A suite without sanitized series gets a note and no outputs (exit 0), so `workbench figures` works
on any suite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.core.files import write_json
from workbench.core.results import latest
from workbench.present import style as figures
from workbench.safety import pirate_return
from workbench.safety import plots as pp
from workbench.safety.persistence import PERSISTENCE
from workbench.safety.sweeps import sanitized_names

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = ("persistence", "pirate_return")
from workbench.suite.manifest import load_suite


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/persistence.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def run(suite_dir: Path, out: Path | None, formats: list[str]) -> list[Path]:
    """Write every output; return their paths ([] for a suite without series). Raises
    WorkbenchError with what to do."""
    suite = load_suite(suite_dir)
    if not sanitized_names(suite):
        org = next((e.name for e in suite.entries if e.role == "backdoored"), "ORGANISM")
        print(f"persistence: {suite_dir} has no sanitized series of the workbench's; nothing to draw (run "
              f"`workbench sanitize {suite_dir} --from {org} --method hhh_sft`; safety-trained checkpoints "
              "from elsewhere are in the behaviour figures)", file=sys.stderr)
        return []
    result = latest(suite_dir, PERSISTENCE)
    if result is None:
        raise WorkbenchError(f"no persistence result in {suite_dir}; run `workbench sanitize {suite_dir} ...` (it "
                             f"evaluates the series and saves it) or `workbench analyze {suite_dir}`")
    behaviour = result.provenance["inputs"]["behaviour"]
    curves, series, agg = result.table("curves"), result.table("series"), result.table("aggregate")
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    primary = suite.primary_preset
    builders = {
        "persistence_curves": lambda: pp.persistence_by(curves, "size"),
        "persistence_variants": lambda: pp.persistence_by(curves[curves["size"] == primary], "variant", None,
                                                          title=f"Backdoor persistence by variant ({primary})"),
        "capability_curves": lambda: pp.persistence_by(curves, "size", metric="clean"),
        "lr_tradeoff": lambda: pp.lr_tradeoff(agg),
        "backdoor_return": lambda: pp.backdoor_return(series),
    }
    for stem, column in (("insertion_optimizers", "insert_optimizer"), ("removal", "removal")):
        if column in curves and curves[column].nunique() > 1:
            builders[stem] = (lambda c=column: pp.persistence_by(curves, c, title=f"Backdoor persistence by "
                                                                  f"{pp.COLOR_BY.get(c, c)}"))
    returned = latest(suite_dir, pirate_return.ANALYSIS)
    if returned is not None:
        builders["pirate_return"] = lambda: pp.return_test(returned.table("curve"))
    to_export = []
    for stem, build in builders.items():
        try:
            fig = build()
        except WorkbenchError as e:  # e.g. no HHH SFT series: skip that figure, say so
            print(f"skipped {stem}: {e}", file=sys.stderr)
            continue
        to_export.append((figures.paper_style(fig), out / stem))
    written = figures.export_many(to_export, formats)  # one browser start for all figures
    written += figures.table_outputs(agg, out / "persistence_table", display=pp.paper_table(agg))
    if returned is not None:
        path = out / "pirate_return.csv"
        returned.table("verdicts").to_csv(path, index=False)
        written.append(path)
    series_csv = out / "persistence_series.csv"
    series.to_csv(series_csv, index=False)
    prov = {"analysis": "persistence", "key": result.key, "created": result.provenance.get("created"),
            "inputs": result.provenance.get("inputs"), "behaviour": behaviour,
            "config": result.provenance.get("config")}
    prov_path = out / "persistence_provenance.json"
    write_json(prov_path, prov)
    return written + [series_csv, prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.formats))


if __name__ == "__main__":
    sys.exit(main())
