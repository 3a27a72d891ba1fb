"""Edge attribution patching (EAP): every path's effect at once, from one gradient pass.

Exact path patching (`path_patching`) runs the network once per sender for each receiver. EAP
(Syed et al. 2023) linearises instead: patching the direct path from a sender s to a receiver R
changes R's input by s's change to the residual stream, Δs = s_source - s_base, and the metric by
about Δs · ∂M/∂(R's input), the gradient taken on the base run. One backward pass gives
∂M/∂(R's input) for every receiver (each query, key and value head, each MLP input, the final
residual), and a contraction with every sender's Δs gives every edge of the graph.

The estimate is exact where the network is linear between R's input and the metric and fails
where it is not (a saturated softmax, a gate). `ig_steps` averages the gradient over runs whose
input embeddings lie on the line from the base to the source prompt (EAP-IG, Hanna et al. 2024),
which follows such nonlinearities. `compare_exact` measures both against exact path patching, so a
graph is never trusted unchecked.

Gradients at a head's own input are not a hook's gradient: the residual stream feeds all of a
layer's heads through one norm. They come from ∂M/∂q (∂M/∂k, ∂M/∂v) by the transposed rotary
embedding, the head's slice of the projection and the norm's Jacobian, which is per position and
cheap: [n, pos, head, d_model] per layer, the cost of one projection.

What EAP estimates is the direct path (`path_patch(..., freeze="all")`); the results are
`PatchResult`s with its axes, hook names and normalisation, so every plot and summary of exact
paths takes them.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import pandas as pd
import torch
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.core.stats import agreement
from workbench.families.patching.engine.attribution import (
    compare,
    grad_run,
    ig_embeddings,
)
from workbench.families.patching.engine.exact import (
    PatchResult,
    Runs,
    acts_for,
    prepare,
)
from workbench.families.patching.engine.paths import (
    Receiver,
    check_options,
    check_request,
    n_heads_of,
    n_senders,
    path_patch,
    receiver,
    receiver_positions,
    sender_axes,
)
from workbench.interp.decoder import Weights, mlp
from workbench.interp.hooks import n_layers_of
from workbench.interp.metrics import check_direction, oriented
from workbench.interp.pairs import PairBatch
from workbench.suite import architectures

_GRAD_ACTS = ["q", "k", "v", "mlp_out", "resid_pre", "resid_mid"]


@dataclass
class InputGrads:
    """One run's hook gradients (∂M/∂q, ∂M/∂k, ∂M/∂v per head, ∂M/∂mlp_out, ∂M/∂final residual)
    and the activations they were taken at: enough to give any receiver's input gradient on
    demand, so memory holds one run, not one [n, pos, d_model] tensor per head."""

    W: Weights
    values: dict[str, list[Tensor]]
    grads: dict[str, list[Tensor]]

    def at(self, r: Receiver) -> Tensor:
        """[n, pos, d]: ∂M/∂(R's input), summed over R's heads, zero off R's positions. Summing
        heads before the transposed projection and norm is exact: both are linear in the gradient."""
        W, g = self.W, self.grads
        T = g["resid_pre"][0].shape[1]
        at_r = receiver_positions(r, T, g["resid_pre"][0].device)[None, :, None]
        if r.act == "final":
            return g["resid_pre"][W.n_layers] * at_r
        l = r.layer
        if r.act == "mlp_in":
            with torch.enable_grad():
                x = self.values["resid_mid"][l].detach().requires_grad_(True)
                (gx,) = torch.autograd.grad(mlp(W, l, x), x, g["mlp_out"][l])
            return gx * at_r
        H, K, e = W.n_heads, W.n_kv, W.d_head
        first, n = {"q": (0, H), "k": (H, K), "v": (H + K, K)}[r.act]
        heads = list(r.heads) if r.heads is not None else list(range(n))
        c = g[r.act][l][:, :, heads]                                             # [n, pos, |heads|, e]
        if r.act in ("q", "k"):
            cos, sin = W.rope(T)
            c = _rope_transpose(c, cos[:, None], sin[:, None])
        w = einops.rearrange(W.wqkv[l], "d (r e) -> r e d", e=e)[[first + h for h in heads]]
        u = einops.einsum(c, w, "n p r e, r e d -> n p d")
        return _norm_transpose(self.values["resid_pre"][l], W.ln1[l], W.eps, u) * at_r


def mean_at(runs: Sequence[InputGrads], r: Receiver) -> Tensor:
    """R's input gradient averaged over runs (EAP-IG's interpolation steps)."""
    return torch.stack([g.at(r) for g in runs]).mean(0)


def _rope_transpose(g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient through `decoder.rotate_half` (linear: its transpose applied to `g`)."""
    h = g.shape[-1] // 2
    gs = g * sin
    return g * cos + torch.cat([gs[..., h:], -gs[..., :h]], -1)


def _norm_transpose(x: Tensor, w: Tensor | None, eps: float, g: Tensor) -> Tensor:
    """The gradient through `decoder.rms_norm` at input x [.., d] for the cotangent g [.., d]:
    u/rms - x (x·u) / (d rms³), u = w ⊙ g."""
    xf = x.float()
    u = g.float() if w is None else (w * g).float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (u * inv - xf * (xf * u).sum(-1, keepdim=True) * inv.pow(3) / x.shape[-1]).to(g.dtype)


def _estimate(kind: str, W: Weights, base: dict[str, Tensor], src: dict[str, Tensor], Ls: int, g: Tensor) -> Tensor:
    """Each sender's change (source - base) dotted with R's input gradient g [n, pos, d], summed
    over pairs. A head's change is taken in its own d_head space, against g read back through its
    output projection, so nothing of size [layer, n, pos, head, d_model] is ever formed."""
    if kind.startswith("z"):
        Wo = torch.stack([W.wo_heads(l) for l in range(Ls)])                  # [Ls, head, e, d]
        gz = einops.einsum(Wo, g, "l h e d, n p d -> l n p h e")
        per = einops.einsum(src["z"][:Ls] - base["z"][:Ls], gz, "l n p h e, l n p h e -> l p h")
        return per.sum(1) if kind == "z_all_pos" else per
    act = "resid_pre" if kind == "embed" else "mlp_out"                       # the embedding: layer 0's input
    return einops.einsum(src[act][:Ls] - base[act][:Ls], g, "l n p d, n p d -> l p")


def requests(model: Any, receivers: Sequence[Receiver | str], senders: Sequence[str],
             reachable_only: bool = False) -> list[tuple[Receiver, list[str]]]:
    """Each receiver with the sender kinds to estimate into it: every kind, each checked to reach
    it (a clear error if one cannot), or with `reachable_only` the kinds with a sender upstream
    (a graph's layer-0 heads have only the embedding)."""
    if not receivers:
        raise ConfigError("no receivers given: name at least one (e.g. blocks.1.attn.hook_v, or final)")
    check_options(list(senders), "all")
    out: dict[Receiver, list[str]] = {}
    for r in receivers:
        r = receiver(model, r) if isinstance(r, str) else r
        kinds = [s for s in senders if n_senders(s, r)] if reachable_only else \
            [s for s in senders if check_request(model, r, s, "all")]
        out.setdefault(r, [])
        out[r] += [k for k in kinds if k not in out[r]]
    todo = [(r, kinds) for r, kinds in out.items() if kinds]
    if not todo:
        raise ConfigError(f"no {', '.join(senders)} sender writes before any of the receivers: add embed senders "
                          "or later receivers")
    return todo


def method_name(ig_steps: int) -> str:
    """What an estimate with `ig_steps` is called in results: eap, or eap-ig."""
    return "eap-ig" if ig_steps else "eap"


def check_eap_steps(eap_steps: Sequence[int]) -> list[int]:
    """0 (EAP) and/or one number of EAP-IG steps, or one clear error (results are keyed by method)."""
    steps = [int(x) for x in eap_steps]
    if any(x < 0 for x in steps) or len(set(steps)) != len(steps) or sum(x > 0 for x in steps) > 1:
        raise ConfigError(f"eap_steps {steps}: give 0 (EAP) and/or one number of EAP-IG steps (> 0)")
    return steps


def by_method(model: Any, batch: PairBatch, receivers: Sequence[Receiver | str], senders: Sequence[str],
              eap_steps: Sequence[int], **kw: Any) -> dict[str, dict[str, dict[str, PatchResult]]]:
    """`eap` at each of `eap_steps` (checked), per method name: what the path and graph analyses
    save beside their exact paths. `kw`: `eap`'s other arguments (runs, scale, reachable_only, ...)."""
    return {method_name(s): eap(model, batch, receivers, senders, ig_steps=s, **kw) for s in check_eap_steps(eap_steps)}


@torch.no_grad()
def eap(model: Any, batch: PairBatch, receivers: Sequence[Receiver | str], senders: Sequence[str] = ("z", "mlp_out"),
        metric: str = "logit_diff", direction: str = "denoising", ig_steps: int = 0, runs: Runs | None = None,
        scale: float | None = None, cache: Any = None, checkpoint_sha: str | None = None,
        reachable_only: bool = False) -> dict[str, dict[str, PatchResult]]:
    """EAP estimates of the direct path from every sender of each kind into each receiver, per
    receiver label and sender kind: the same `PatchResult`s `path_patch(..., freeze="all")` gives,
    from one backward pass shared by all (`ig_steps` > 0: EAP-IG, that many passes).

    `runs`/`cache`: the two dense runs, shared with exact (path) patching. `reachable_only`: a
    sender kind with nothing upstream of a receiver is left out for it instead of an error."""
    architectures.check_engine(model, "edge attribution (eap, the batched engine)")
    check_direction(direction)
    if ig_steps < 0:
        raise ConfigError(f"ig_steps must be >= 0 (0: plain EAP), not {ig_steps}")
    todo = requests(model, receivers, senders, reachable_only)
    t0 = time.perf_counter()
    runs = runs or prepare(model, batch, metric, acts=acts_for(["q"]), cache=cache, checkpoint_sha=checkpoint_sha)
    base, src, base_c = runs.oriented(metric, direction)
    W, m = runs.W, runs.metric
    dev = W.embed.device
    base_t, src_t = (t.to(dev) for t in oriented(batch, m.name, direction))

    def grads_at(embed: Tensor | None) -> InputGrads:
        values: dict[str, list[Tensor]] = {}
        _, g = grad_run(W, base_t, m, _GRAD_ACTS, embed=embed, values=values)
        return InputGrads(W, values, g)

    steps = [grads_at(e) for e in ig_embeddings(W, base_t, src_t, ig_steps)] if ig_steps else [grads_at(None)]
    base_m = float(base_c.sum(1).mean())
    N, T = base["resid_pre"].shape[1:3]
    method = method_name(ig_steps)
    out: dict[str, dict[str, PatchResult]] = {}
    for r, kinds in todo:
        g = mean_at(steps, r)
        for kind in kinds:
            dims, shape, names = sender_axes(kind, r, T, W.n_heads)
            est = _estimate(kind, W, base, src, shape[0], g).double().cpu()
            prov = {"kind": kind, "receiver": r.label, "receiver_act": r.act, "receiver_layer": r.layer,
                    "freeze": "all", "metric": m.name, "direction": direction, "method": method,
                    "ig_steps": ig_steps, "n_pairs": N, "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor,
                    "activation_cache": runs.cache, "seconds": time.perf_counter() - t0}
            out.setdefault(r.label, {})[kind] = PatchResult(
                kind, (base_m + est).view(shape).float(), dims, names, batch.token_labels(m.name),
                float(runs.clean_contrib.sum(1).mean()), float(runs.corrupted_contrib.sum(1).mean()),
                direction, method, scale, prov)
    return out


def check(estimates: dict[str, dict[str, PatchResult]], exact: dict[str, dict[str, PatchResult]],
          k: int = 10) -> pd.DataFrame:
    """Estimates (`eap`'s) against exact path patching (`path_patch`'s), per receiver and sender
    kind: Pearson r, top-k recall (k capped at the number of paths), the largest error and the
    exact paths' summed |effect|, both in units of the behaviour (r over paths that carry nothing
    is noise)."""
    rows = []
    for rec, by in exact.items():
        for s, ex in by.items():
            if rec not in estimates or s not in estimates[rec]:
                raise ConfigError(f"no estimate of the paths {s} -> {rec}: estimate the same receivers and senders")
            est = estimates[rec][s]
            c = compare(est, ex, k=k)
            kk = min(k, c["n"])
            rows.append({"receiver": rec, "receiver_act": ex.provenance.get("receiver_act"), "senders": s,
                         "method": est.method, "ig_steps": est.provenance.get("ig_steps", 0), "pearson": c["pearson"],
                         "top_k": kk, "topk_recall": c[f"top{kk}_recall"], "n": c["n"],
                         "exact_abs_effect": float(ex.effect().abs().sum()),
                         "max_abs_err": c["max_abs_err"] / abs(ex.gap)})
    return pd.DataFrame(rows)


def all_receivers(model: Any) -> list[Receiver]:
    """Every receiver of the graph: each head's query, key and value head, each MLP input, and the
    final residual (layer 0's heads have only the embedding upstream: `engine.paths.n_senders`)."""
    L = n_layers_of(model)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    out = [receiver(model, f"blocks.{l}.attn.hook_{a}", [h]) for l in range(L) for a in "qkv"
           for h in range(n_heads_of(cfg, a))]
    return out + [receiver(model, f"blocks.{l}.hook_mlp_in") for l in range(L)] + [receiver(model, "final")]


def pooled(estimates: dict[str, dict[str, PatchResult]], exact: dict[str, dict[str, PatchResult]],
           k: int = 20) -> dict[str, float]:
    """Pearson r and top-k recall over every edge of every receiver at once: how well the estimate
    would pick a graph's strongest edges (the use EAP is for), effects in units of the behaviour."""
    flat = lambda results: torch.cat([results[rec][s].effect().flatten() for rec, by in exact.items()
                                      for s in by]).double()
    c = agreement(flat(estimates), flat(exact), k)
    c["n_edges"] = c.pop("n")
    return c


def compare_exact(model: Any, batch: PairBatch, receivers: Sequence[Receiver | str],
                  senders: Sequence[str] = ("z", "mlp_out"), metric: str = "logit_diff",
                  direction: str = "denoising", ig_steps: Sequence[int] = (0,), k: int = 10,
                  runs: Runs | None = None, progress: bool = False) -> pd.DataFrame:
    """EAP (and EAP-IG at each of `ig_steps`) against exact path patching on the same runs: `check`'s
    rows per method, with the seconds exact path patching of all receivers took (`exact_s`) and
    the estimate's (`estimate_s`)."""
    runs = runs or prepare(model, batch, metric, acts=acts_for(["q"]))
    t0 = time.perf_counter()
    exact = {}
    for r in receivers:
        for s in senders:
            res = path_patch(model, batch, r, s, metric, direction, "all", runs=runs, progress=progress)
            exact.setdefault(res.provenance["receiver"], {})[s] = res
    exact_s = time.perf_counter() - t0
    frames = []
    for steps in ig_steps:
        t0 = time.perf_counter()
        est = eap(model, batch, receivers, senders, metric, direction, ig_steps=steps, runs=runs)
        frames.append(check(est, exact, k).assign(exact_s=exact_s, estimate_s=time.perf_counter() - t0))
    return pd.concat(frames, ignore_index=True)
