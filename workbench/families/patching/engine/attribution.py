"""Attribution patching (AtP): every node's patching effect from 2 forward passes and 1 backward.

For a node with activation a, patching the source value into the base run changes the metric by
about (a_src - a_base) · dM/da, the gradient taken on the base run (Nanda 2023). The estimate is
exact for a linear model and fails where the network is not: saturated attention softmaxes and
paths that cancel. `compare` measures how far it is from exact patching (Pearson r, top-k recall),
so a result is never trusted unchecked.

GradDrop (Kramár et al. 2024, part of AtP*): cancellation between a node's direct and indirect
paths can hide an important node. Re-estimating with the gradient through each layer's
attention/MLP dropped in turn, and averaging the magnitudes, exposes it; the score is a magnitude
for ranking, not a signed effect. AtP*'s other correction, the QK fix (`_qk_fix`), applies to query
and key nodes: the attention pattern their patch produces is computed exactly, and only its
effect from there on is linearised, so a saturated softmax no longer hides them. For every other
node (residual, output, head output z, value) the node's own difference is taken exactly from the
two runs, and the fix changes nothing.

Results are `PatchResult`s (values = base metric + estimate) with the same hook names, shapes
and normalisation as exact patching, so any plot or circuit code takes either.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import einops
import torch
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.core.stats import agreement
from workbench.families.patching.engine.exact import (
    HEAD_ACTS,
    PatchResult,
    acts_for,
    forward,
    get_kind,
    prepare,
)
from workbench.interp.decoder import (
    Weights,
    attention_pattern,
    attention_scores,
    weights,
)
from workbench.interp.hooks import HOOK_KINDS
from workbench.interp.metrics import Metric, make_metric, oriented
from workbench.interp.pairs import PairBatch
from workbench.suite import architectures

DEFAULT_KINDS = ("resid_pre", "attn_out", "mlp_out", "z", "z_all_pos")


def _acts(kinds: Sequence[str]) -> list[str]:
    out = []
    for k in kinds:
        act = get_kind(k).act
        if act not in out:
            out.append(act)
    return out


def grad_run(W: Weights, tokens: Tensor, m: Metric, acts: Sequence[str],
              drop_layer: int | None = None, embed: Tensor | None = None,
              values: dict[str, list[Tensor]] | None = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    # asking for "pattern" gradients computes attention explicitly (the fused kernel has no pattern)
    """Forward with the named activations kept in the graph, then dM/da for each of them.

    `drop_layer`: the attention and MLP of that layer see a detached residual, so no gradient flows
    back through them (GradDrop); the skip connection still carries it. `values`: filled with the
    activations themselves (detached), for callers that linearise around this run (edge
    attribution with integrated gradients)."""
    store: dict[str, list[Tensor]] = {a: [] for a in acts}
    want_resid = "resid_pre" in store or "resid_post" in store

    def hook(kind: str, l: int, a: Tensor) -> Tensor:
        if kind in store or (want_resid and kind in ("resid_pre", "resid_post")):
            if not a.requires_grad:  # below a dropped layer's cut: a leaf of its own
                a = a.detach().requires_grad_(True)
            a.retain_grad()
            if kind in store:
                store[kind].append(a)
            if kind == "resid_post" and l == W.n_layers - 1 and "resid_pre" in store:
                store["resid_pre"].append(a)
        return a

    with torch.enable_grad():
        x0 = (W.embed[tokens] if embed is None else embed).detach().requires_grad_(True)
        contrib, _ = forward(W, tokens, m, hook, embed=x0, drop_layer=drop_layer, pattern="pattern" in store)
        contrib.sum(1).mean().backward()
    grads = {a: [t.grad if t.grad is not None else torch.zeros_like(t) for t in v] for a, v in store.items()}
    if values is not None:
        values.update({a: [t.detach() for t in v] for a, v in store.items()})
    return contrib.detach(), grads


def _estimates(kind: str, W: Weights, diff: dict[str, Tensor], grads: dict[str, list[Tensor]]) -> Tensor:
    K = get_kind(kind)
    L = W.n_layers
    if K.act in HEAD_ACTS:
        g = torch.stack(grads[K.act])                                         # [L, n, pos, head, d_head]
        prod = (diff[K.act] * g).sum(-1)                                      # [L, n, pos, head]
        if "pos" in K.dims:
            return einops.reduce(prod, "l n p h -> l p h", "sum")
        return einops.reduce(prod, "l n p h -> l h", "sum")
    if K.act == "resid_post":
        g = torch.stack(grads["resid_pre"][1:L + 1])
        d = diff["resid_pre"][1:L + 1]
    else:
        g = torch.stack(grads[K.act][:L])
        d = diff[K.act][:L]
    return einops.reduce(d * g, "l n p d -> l p", "sum")


def ig_embeddings(W: Weights, base_t: Tensor, src_t: Tensor, steps: int) -> list[Tensor]:
    """Input embeddings at the midpoints of `steps` equal segments of the line from the base to
    the source prompt: where integrated gradients (AtP+IG, EAP-IG) take their gradients."""
    e_base, e_src = W.embed[base_t], W.embed[src_t]
    return [e_base + a * (e_src - e_base) for a in ig_alphas(steps)]


def ig_alphas(steps: int) -> list[float]:
    """The midpoint rule's interpolation weights (0: the base prompt, 1: the source)."""
    return [(i + 0.5) / steps for i in range(steps)]


def qk_kinds(kinds: Sequence[str]) -> list[str]:
    """The kinds the QK fix changes: those patching a query or a key."""
    return [k for k in kinds if get_kind(k).act in ("q", "k")]


def _qk_fix(kind: str, W: Weights, base: dict[str, Tensor], src: dict[str, Tensor],
            g_pattern: Sequence[Tensor]) -> Tensor:
    """AtP*'s QK fix for a query or key node: the attention pattern the patch produces, computed
    exactly (softmax and all), and only its effect beyond the pattern linearised: sum of
    (A_patched - A) * dM/dA. Plain AtP linearises through the softmax, which a saturated pattern
    (one key taking nearly all the weight) makes nearly flat: the patch that moves the weight to
    another key looks like nothing. One layer at a time, so memory holds one layer's patterns.

    A key at position p swapped in changes one score per query row; the row's other weights scale
    by Z/Z' = 1 / (1 - a + a exp(s' - s)), a = the row's weight on p, in log space so a saturated
    row (a -> 1) stays finite. Whole-position kinds swap every query (or key) of the head at once."""
    K = get_kind(kind)
    L, G = W.n_layers, W.n_heads // W.n_kv
    by_pos = "pos" in K.dims
    out = []
    for l in range(L):
        qb, kb, gA = base["q"][l], base["k"][l], g_pattern[l]                   # [n, T, H|KV, e], [n, H, T, T]
        S = attention_scores(W, qb, kb)
        A = S.softmax(-1)
        if K.act == "q" or not by_pos:
            qn, kn = (src["q"][l], kb) if K.act == "q" else (qb, src["k"][l])
            dA = attention_pattern(W, qn, kn) - A                                # every row (q) or every key (k) swapped
            if K.act == "q":
                est = einops.reduce(dA * gA, "n h i j -> i h" if by_pos else "n h i j -> h", "sum")
            else:
                est = einops.reduce(dA * gA, "n (g r) i j -> g", "sum", r=G)
        else:                                                                  # one key position p at a time, all p at once
            s_new = attention_scores(W, qb, src["k"][l])                         # [n, H, i, p]: query i on the swapped key p
            la_new = A.log() + (s_new - S).nan_to_num(0.0)                     # log(a e^{s'-s}); masked: -inf
            log_c = -torch.logaddexp(torch.log1p(-A.clamp(max=1.0)), la_new)
            c, a_new = log_c.exp(), (la_new + log_c).exp()
            row = (A * gA).sum(-1, keepdim=True)                                 # sum_j A_ij g_ij
            contrib = (c - 1) * (row - A * gA) + (a_new - A) * gA
            causal = torch.ones_like(A[0, 0], dtype=torch.bool).tril()
            contrib = torch.where(causal, contrib.nan_to_num(0.0), torch.zeros_like(contrib))
            est = einops.reduce(contrib, "n (g r) i p -> p g", "sum", r=G)
        out.append(est)
    return torch.stack(out)


def atp(model: Any, batch: PairBatch, kinds: Sequence[str] = DEFAULT_KINDS, metric: str = "logit_diff",
        direction: str = "denoising", graddrop: bool = False, ig_steps: int = 0, qk_fix: bool = False,
        scale: float | None = None, cache: Any = None, checkpoint_sha: str | None = None) -> dict[str, PatchResult]:
    """AtP estimates for every index of each kind (one gradient pass shared by all kinds).

    `graddrop=True` adds, per kind, a `<kind>:graddrop` result: the AtP* GradDrop magnitude
    (mean over layers of |estimate with that layer's gradient dropped|), for ranking nodes.
    `ig_steps=s` adds `<kind>:ig`: the gradient averaged over s runs whose input embeddings lie on
    the straight line from the base to the source prompt (midpoint rule; integrated gradients as in
    EAP-IG), which follows a saturating nonlinearity instead of reading its slope at one end.
    `qk_fix=True` adds `<kind>:qk`: AtP* with its QK fix (`_qk_fix`) for query and key nodes; for
    every other kind the fix changes nothing, so that result equals plain AtP.
    `cache`/`checkpoint_sha`: the two forward runs come through the activation cache (the same
    entry exact patching of the default kinds uses); the gradient pass is always computed.
    """
    architectures.check_engine(model, "attribution patching (atp, the batched engine)")
    if ig_steps < 0:
        raise ConfigError(f"ig_steps must be >= 0 (0: no integrated gradients), not {ig_steps}")
    t0 = time.perf_counter()
    W = weights(model)
    m = make_metric(batch, metric, model)
    base_t, src_t = oriented(batch, m.name, direction)
    dev = W.embed.device
    acts = _acts(kinds)
    cache_acts = sorted({"resid_pre" if a == "resid_post" else a for a in acts})
    # both forward runs in one pass, through the cache; with the default kinds this is exactly the
    # entry `exact_all` reads, so AtP after exact patching (or a rerun) computes no forward again
    qk = qk_kinds(kinds) if qk_fix else []
    runs = prepare(model, batch, m, acts=acts_for(kinds) if cache else sorted(set(cache_acts) | ({"q"} if qk else set())),
                   cache=cache, checkpoint_sha=checkpoint_sha)
    clean_contrib, clean, corr = runs.clean_contrib, runs.clean, runs.corrupted
    src_contrib, src, base = (clean_contrib, clean, corr) if direction == "denoising" else \
        (runs.corrupted_contrib, corr, clean)
    grad_acts = ["resid_pre" if a == "resid_post" else a for a in acts]
    base_contrib, grads = grad_run(W, base_t.to(dev), m, sorted(set(grad_acts) | ({"pattern"} if qk else set())))
    diff = {a: src[a] - base[a] for a in cache_acts}
    base_m, src_m = float(base_contrib.sum(1).mean()), float(src_contrib.sum(1).mean())
    clean_m, corr_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    tokens = batch.token_labels(m.name)
    out: dict[str, PatchResult] = {}
    prov = {"metric": m.name, "direction": direction, "n_pairs": len(batch), "prompt_sha256": batch.sha256(),
            "backdoor": batch.backdoor, "activation_cache": runs.cache}
    for kind in kinds:
        K = get_kind(kind)
        names = [HOOK_KINDS[K.hook].format(l=l) for l in range(W.n_layers)]
        est = _estimates(kind, W, diff, grads).detach().float().cpu()
        out[kind] = PatchResult(kind, base_m + est, K.dims, names, tokens, clean_m, corr_m, direction, "atp",
                                scale, {**prov, "kind": kind, "method": "atp", "seconds": time.perf_counter() - t0})
    if qk_fix:
        for kind in kinds:
            est = _qk_fix(kind, W, base, src, grads["pattern"]).detach().float().cpu() if kind in qk else None
            r = out[kind]
            out[f"{kind}:qk"] = PatchResult(kind, r.values if est is None else base_m + est, r.dims, r.hook_names,
                                            tokens, clean_m, corr_m, direction, "atp+qk", scale,
                                            {**prov, "kind": kind, "method": "atp+qk",
                                             "seconds": time.perf_counter() - t0})
    if ig_steps > 0:
        runs = [grad_run(W, base_t.to(dev), m, sorted(set(grad_acts)), embed=e)[1]
                for e in ig_embeddings(W, base_t.to(dev), src_t.to(dev), ig_steps)]
        mean = {a: [torch.stack([r[a][j] for r in runs]).mean(0) for j in range(len(runs[0][a]))] for a in runs[0]}
        for kind in kinds:
            K = get_kind(kind)
            est = _estimates(kind, W, diff, mean).detach().float().cpu()
            out[f"{kind}:ig"] = PatchResult(kind, base_m + est, K.dims, out[kind].hook_names, tokens, clean_m, corr_m,
                                            direction, "atp+ig", scale,
                                            {**prov, "kind": kind, "method": "atp+ig", "ig_steps": ig_steps,
                                             "seconds": time.perf_counter() - t0})
    if graddrop:
        per_layer = [grad_run(W, base_t.to(dev), m, sorted(set(grad_acts)), drop_layer=l)[1]
                     for l in range(W.n_layers)]
        for kind in kinds:
            K = get_kind(kind)
            mags = torch.stack([_estimates(kind, W, diff, g).abs() for g in per_layer]).sum(0)
            mags = (mags / max(W.n_layers - 1, 1)).detach().float().cpu()
            out[f"{kind}:graddrop"] = PatchResult(kind, base_m + mags, K.dims, out[kind].hook_names, tokens,
                                                  clean_m, corr_m, direction, "atp+graddrop", scale,
                                                  {**prov, "kind": kind, "method": "atp+graddrop",
                                                   "seconds": time.perf_counter() - t0})
    return out


def compare(estimate: PatchResult, exact: PatchResult, k: int = 10, absolute: bool | None = None) -> dict[str, float]:
    """How well `estimate` (AtP) reproduces `exact`: Pearson r of the effects, and top-k recall
    (the share of the k largest |exact| effects among the k largest |estimated| ones).

    `absolute` compares magnitudes (default: for GradDrop scores, which carry no sign)."""
    if tuple(estimate.values.shape) != tuple(exact.values.shape) or estimate.kind != exact.kind:
        raise ConfigError(f"cannot compare {estimate.kind} {tuple(estimate.values.shape)} with "
                          f"{exact.kind} {tuple(exact.values.shape)}: patch the same kind on the same batch")
    absolute = estimate.method.endswith("graddrop") if absolute is None else absolute
    a = (estimate.values - estimate.corrupted_metric if estimate.direction == "denoising"
         else estimate.clean_metric - estimate.values).flatten().double()
    b = (exact.values - exact.corrupted_metric if exact.direction == "denoising"
         else exact.clean_metric - exact.values).flatten().double()
    if absolute:
        a, b = a.abs(), b.abs()
    return agreement(a, b, k)


