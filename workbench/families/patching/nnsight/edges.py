"""Edge attribution patching through nnsight: `engine.edges.eap`'s estimates, computed on the
HF model by one trace and one backward pass, so a graph of a model only an NDIF server holds
comes back as a few numbers per edge and no activation leaves the server.

The trace holds the source prompts, the base prompts and, for EAP-IG, one group of base rows per
interpolation step (input embeddings on the line from the base to the source prompt). The loss
weights every gradient row as `engine.edges.eap` weights its runs (1/N per pair, 1/N/steps on
an interpolation row, 0 on the plain base rows under IG), so the rows' gradients summed over
groups are the local estimate's. A receiver's input gradient is built on the server from the
projection's gradient: a query/key/value head from its projection's output (before the rotary
embedding, so no transposed rotation is needed) through the projection's rows of that head and
the input norm's Jacobian at the layer's input; an MLP's from the MLP's input through the
post-attention norm's Jacobian; the output's from the last layer's output. Senders' changes are
read where `nnsight.patching` reads them (head outputs at `o_proj`'s input, MLP outputs; the
token embeddings at the embedding's output). The Jacobians are an RMSNorm's and separate [out, in]
projections': Llama, Mistral and Qwen2 (whose q/k/v biases enter only the activations read), not
GPT-2 (`architectures.SUPPORT`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from workbench.core.errors import ConfigError
from workbench.families.patching.engine.attribution import ig_alphas
from workbench.families.patching.engine.edges import requests
from workbench.families.patching.engine.exact import PatchResult
from workbench.families.patching.engine.paths import receiver_positions, sender_axes
from workbench.families.patching.nnsight.patching import (
    check_lm,
    heads_of,
    prompts_of,
    readout_ids,
)
from workbench.interp.pairs import PairBatch
from workbench.suite import architectures

_ORDER = ("resid_pre", "q", "k", "v", "z", "resid_mid", "mlp_in", "mlp_out", "resid_post")  # run order in a layer


def _site(lm: Any, what: str, layer: int) -> tuple[Any, str, int | None]:
    """(envoy, attr, item) of a read: `architectures.site`'s sites plus the MLP's input."""
    m = architectures.modules_of(lm)
    if what == "mlp_in":
        return architectures.get(architectures.block(lm, layer, m), m.mlp), "input", None
    return architectures.site(lm, what, layer, m)


def eap(lm: Any, batch: PairBatch, receivers: Sequence[Any], senders: Sequence[str] = ("z", "mlp_out"),
        metric: str = "logit_diff", direction: str = "denoising", ig_steps: int = 0, remote: bool | str = False,
        scale: float | None = None, reachable_only: bool = False) -> dict[str, dict[str, PatchResult]]:
    """EAP (EAP-IG with `ig_steps`) of the direct paths from every sender of each kind into each
    receiver, through nnsight: equal to `engine.edges.eap` on the same model and pairs, and
    runnable remotely (`remote=True`, or "local" to run nnsight's serialised form here).
    `reachable_only` as there."""
    t0 = time.perf_counter()
    L, H, e = check_lm(lm, "edges")
    if ig_steps < 0:
        raise ConfigError(f"ig_steps must be >= 0 (0: plain EAP), not {ig_steps}")
    todo = requests(lm, receivers, senders, reachable_only)
    rs = [r for r, _ in todo]
    base_t, src_t = prompts_of(batch, [], metric, direction)
    N, T = base_t.shape
    KV = heads_of(lm, "k")
    G = 1 + ig_steps                                           # gradient groups: base, then each IG step
    tokens = torch.cat([src_t] + [base_t] * G)
    ids = readout_ids(metric, batch, torch.arange(len(tokens)) % N)
    logit_diff = metric == "logit_diff"
    weight = torch.cat([torch.zeros(N), torch.full((N,), 0.0 if ig_steps else 1.0 / N),
                        torch.full((N * ig_steps,), 1.0 / N / max(ig_steps, 1))])
    alpha = torch.tensor(ig_alphas(ig_steps)).repeat_interleave(N)[:, None, None]
    # what the body reads, in run order: sender values (z, mlp_out), receiver inputs' values and gradients
    n_send = {s: max(sender_axes(s, r, T, H)[1][0] for r in rs) for s in senders}
    need = set()
    for r in rs:
        if r.act in ("q", "k", "v"):
            need |= {(r.layer, "resid_pre"), (r.layer, r.act)}
        elif r.act == "mlp_in":
            need |= {(r.layer, "resid_mid"), (r.layer, "mlp_in")}
        else:
            need.add((L - 1, "resid_post"))
    for s, n in n_send.items():
        if s != "embed":
            need |= {(l, "z" if s.startswith("z") else "mlp_out") for l in range(n)}
    reads = sorted(need, key=lambda la: (la[0], _ORDER.index(la[1])))
    at = {la: i for i, la in enumerate(reads)}
    sites = [_site(lm, a, l) for l, a in reads]
    # per receiver: (kind code, layer, heads, position mask, index of the value read, of the gradient read)
    width = {"q": H, "k": KV, "v": KV}
    plan = []
    for r in rs:
        mask = receiver_positions(r, T, torch.device("cpu")).float()[:, None]
        if r.act in ("q", "k", "v"):
            heads = list(r.heads) if r.heads is not None else list(range(width[r.act]))
            plan.append(("qkv"[("q", "k", "v").index(r.act)], r.layer, heads, mask, at[r.layer, "resid_pre"],
                         at[r.layer, r.act]))
        elif r.act == "mlp_in":
            plan.append(("m", r.layer, [], mask, at[r.layer, "resid_mid"], at[r.layer, "mlp_in"]))
        else:
            plan.append(("f", L - 1, [], mask, -1, at[L - 1, "resid_post"]))
    zs = [at[l, "z"] for l in range(max(n_send.get("z", 0), n_send.get("z_all_pos", 0)))]
    ms = [at[l, "mlp_out"] for l in range(n_send.get("mlp_out", 0))]
    want_embed = "embed" in senders
    mods = architectures.modules_of(lm)
    if mods.norm != "rms" or mods.transposed or mods.fused_qkv:
        raise ConfigError("nnsight edge attribution builds receivers' gradients through an RMSNorm and separate "
                          f"[out, in] q/k/v projections, which this {type(lm).__name__} does not have")
    dims = architectures.dims_of(lm)
    eps, d = dims["eps"], dims["d_model"]
    blocks = [architectures.block(lm, l, mods) for l in range(L)]
    attn_o = [architectures.get(b, mods.o_proj) for b in blocks]
    projs = [[architectures.get(b, p) for p in mods.qkv] for b in blocks]
    ln1s, ln2s = ([architectures.get(b, path) for b in blocks] for path in (mods.ln1, mods.ln2))
    embed, head = architectures.get(lm, mods.embed), architectures.get(lm, mods.unembed)
    # built-ins, torch and envoys only in the body, and no comment lines in it (see nnsight_patching)
    with lm.trace(tokens, remote=remote):
        emb = embed.output.requires_grad_(True)
        de = (emb[:N] - emb[N:2 * N]).detach().float()
        if ig_steps:
            e_src, e_base = emb[:N].repeat(ig_steps, 1, 1), emb[N:2 * N].repeat(ig_steps, 1, 1)
            interp = e_base + alpha.to(emb.device, emb.dtype) * (e_src - e_base)
            embed.output = torch.cat([emb[:2 * N], interp])
        xs = []
        for envoy, attr, item in sites:
            x = getattr(envoy, attr)
            xs.append(x if item is None else x[item])
        logits = head.output[:, -ids.shape[1]:].float()
        picked = logits.gather(-1, ids.to(logits.device))
        score = picked[:, 0, 0] - picked[:, 0, 1] if logit_diff else (picked[:, :, 0] - logits.logsumexp(-1)).sum(-1)
        metrics = score[:2 * N].detach().save()
        with (score * weight.to(score.device)).sum().backward():
            grads = [None] * len(xs)
            for i in range(len(xs) - 1, -1, -1):
                if any(p[5] == i for p in plan):
                    grads[i] = xs[i].grad
            dz = [(xs[i][:N] - xs[i][N:2 * N]).detach().float().reshape(N, T, H, e) for i in zs]
            dm = [(xs[i][:N] - xs[i][N:2 * N]).detach().float() for i in ms]
            wo = [attn_o[l].weight.float().reshape(d, H, e) for l in range(len(zs))]
            out = []
            for code, l, heads, mask, vi, gi in plan:
                g = grads[gi][N:].float()
                if code in "qkv":
                    proj = projs[l]["qkv".index(code)].weight.float()
                    hw = proj.reshape(-1, e, d)[heads]
                    g = torch.einsum("nthe,hed->ntd", g.reshape(g.shape[0], T, -1, e)[:, :, heads], hw)
                    nw = ln1s[l].weight.float()
                if code == "m":
                    nw = ln2s[l].weight.float()
                if code != "f":
                    x = xs[vi][N:].detach().float()
                    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                    u = nw * g
                    g = u * inv - x * (x * u).sum(-1, keepdim=True) * inv.pow(3) / d
                g = (g * mask.to(g.device)).reshape(G, N, T, d).sum(0)
                out.append(torch.stack([(z * torch.einsum("ntd,dhe->nthe", g, w)).sum(-1).sum(0) for z, w in zip(dz, wo)])
                           .reshape(-1) if dz else g.new_zeros(0))
                out.append(torch.stack([(m * g).sum(-1).sum(0) for m in dm]).reshape(-1) if dm else g.new_zeros(0))
                out.append((de * g).sum(-1).sum(0) if want_embed else g.new_zeros(0))
            flat = torch.cat(out).save()
    flat = getattr(flat, "value", flat).detach().double().cpu()
    metrics = getattr(metrics, "value", metrics).double().cpu()
    src_m, base_m = float(metrics[:N].mean()), float(metrics[N:].mean())
    clean_m, corr_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    method = "eap-ig" if ig_steps else "eap"
    result: dict[str, dict[str, PatchResult]] = {}
    offset = 0
    for r, kinds in todo:
        parts = {}
        for key, n in (("z", len(zs) * T * H), ("mlp_out", len(ms) * T), ("embed", T if want_embed else 0)):
            parts[key] = flat[offset:offset + n]
            offset += n
        for s in kinds:
            dims, shape, names = sender_axes(s, r, T, H)
            if s.startswith("z"):
                est = parts["z"].view(len(zs), T, H)[:shape[0]]
                est = est.sum(1) if s == "z_all_pos" else est
            elif s == "embed":
                est = parts["embed"].view(1, T)
            else:
                est = parts["mlp_out"].view(len(ms), T)[:shape[0]]
            prov = {"kind": s, "receiver": r.label, "receiver_act": r.act, "receiver_layer": r.layer, "freeze": "all",
                    "metric": metric, "direction": direction, "method": method, "backend": "nnsight",
                    "ig_steps": ig_steps, "n_pairs": N, "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor,
                    "remote": remote, "seconds": time.perf_counter() - t0}
            result.setdefault(r.label, {})[s] = PatchResult(s, (base_m + est).float(), dims, names,
                                                            batch.token_labels(metric), clean_m, corr_m, direction,
                                                            method, scale, prov)
    return result
