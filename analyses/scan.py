"""Paper figures and tables for the blind backdoor scan: each scanned checkpoint's verdict, the
candidates of each scan, and the scan benchmark per detector.

    python analyses/scan.py SUITE [--out DIR] [--formats pdf svg png]

Reads the newest saved `scan` result of each (checkpoint, base) and the newest `scan_bench` result.
It computes nothing: `make scan` saves the default scans, `workbench scan SUITE CHECKPOINT` any
other, `make scan-bench` the benchmark; a suite with neither writes nothing (exit 0). Writes, into
SUITE/figures/ or --out:

- scan_verdicts.{pdf,svg,png}           every scan's score (best candidate's held-out z), by verdict
- scan_<checkpoint>_candidates.{...}    one scan's ranked candidates (which detectors, which fire)
- scan_summary.{csv,tex}                per scan: verdict, score, the top candidate, its behaviour
- scan_bench.{pdf,svg,png}, scan_bench.{csv,tex}   the benchmark: AUROC and top-5 recovery per
                                        detector and combined; per organism, its verdict and recovery
- scan_provenance.json                  which results (keys, creation times) the outputs show
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from workbench.core.files import write_json
from workbench.core.results import list_results
from workbench.families.scan import figures as sf
from workbench.families.scan.tasks import ANALYSIS, latest_scans, report
from workbench.present import style as figures

BENCH = "scan_bench"
READS = (ANALYSIS, BENCH)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/scan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS), help="figure formats (default pdf svg png)")
    return p


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def run(suite_dir: Path, out: Path | None, formats: list[str]) -> list[Path]:
    scans = latest_scans(suite_dir)
    benches = list_results(suite_dir, BENCH)
    if scans.empty and not benches:
        print(f"scan: no scan or scan benchmark saved in {suite_dir}; nothing to draw (run `make scan` or "
              f"`workbench scan {suite_dir} CHECKPOINT --auto-base`)", file=sys.stderr)
        return []
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    to_export, written, prov = [], [], {"analysis": "scan", "scans": {}, "bench": None}
    if not scans.empty:
        to_export.append((sf.verdicts(scans), out / "scan_verdicts"))
        rows = []
        by_key = {r.key: r for r in list_results(suite_dir, ANALYSIS)}
        for s in scans.itertuples():
            rep = report(by_key[s.key])
            top = rep.candidates.iloc[0] if len(rep.candidates) else None
            rows.append({"checkpoint": s.checkpoint, "base": s.base, "verdict": s.verdict, "score": s.score,
                         "top candidate": "" if top is None else f"{top['text']!r} ({top['where']} {top['position']})",
                         "behaviour": "" if top is None else top["behaviour"], "seconds": s.seconds})
            if len(rep.candidates):
                to_export.append((sf.candidates(rep.candidates), out / f"scan_{slug(s.checkpoint)}_candidates"))
            prov["scans"][f"{s.checkpoint} vs {s.base}"] = {"key": s.key, "created": s.created}
        written += figures.table_outputs(pd.DataFrame(rows), out / "scan_summary")
    if benches:
        b = benches[0]
        to_export.append((sf.per_detector(b.provenance.get("metrics", {})), out / "scan_bench"))
        table = b.table("checkpoints")
        cols = [c for c in ("checkpoint", "family", "behaviour", "trigger", "verdict", "score", "trigger_rate", "top1",
                            "top5", "top_candidate") if c in table]
        written += figures.table_outputs(table, out / "scan_bench", display=table[cols])
        prov["bench"] = {"key": b.key, "created": b.provenance.get("created"), "metrics": b.provenance.get("metrics")}
    written = figures.export_many(to_export, formats) + written
    prov_path = out / "scan_provenance.json"
    write_json(prov_path, prov)
    return written + [prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.formats))


if __name__ == "__main__":
    sys.exit(main())
