"""Exact and attribution patching through nnsight: `engine.exact.exact`'s and `engine.attribution.atp`'s
results, computed by interventions on the HF model itself, so the same call runs on a model that
only an NDIF server holds.

The batched engine (`patching`) rebuilds the decoder from its weights, which a model reached only
through a trace does not hand over. Here each trace holds the source prompts (the clean ones when
denoising) followed by many copies of the base prompts, stacked in the batch dimension. At every
layer that a copy patches, the copy takes the activation of its pair's source row *from the same
forward pass* (`torch.where` over a mask), so a trace sends token ids and small index masks and
returns a few numbers per row (the logits the metric reads and their log-normaliser); no
activation ever leaves the server. The trace body uses only torch operations on the values the
trace serves, which is what remote execution can run.

Attribution patching (`atp`) is one trace too: the source and base prompts together, one backward
from the base rows' metric, and each node's estimate (source - base activation) . gradient reduced
to one number per index on the server, as `engine.attribution.atp` computes it from the engine. AtP*'s
GradDrop and integrated gradients ride in the same trace as more groups of base rows: one per
layer with that layer's attention and MLP cut from the gradient (`torch.where` of a row mask
over the norm's output and its detached copy), and one per step whose input embeddings lie on the
path from the base to the source prompt; one backward serves them all, because rows do not
interact in a forward pass. AtP*'s QK fix is computed on the server in the same trace: each layer's
attention pattern, rebuilt from the q/k projections and the model's rotary tables, for the base
and for the patched queries or keys, against dM/dA = (z's gradient) . values.

Exact patching here is the reference-free twin of the engine: slower (every copy runs all layers
and positions, and the source prompts run once more per trace), but correct for every architecture
of `workbench.suite.architectures` (Llama, Mistral, Qwen2, GPT-2), whose module paths it reads from
there (`architectures.site`), including grouped-query attention (the head outputs are read at the
output projection's input, where the query heads are already separate) and GPT-2's fused q/k/v
projection (q, k and v are slices of its output). Tests hold it to the engine at 1e-4 on Llama and
to TransformerLens's own patching on the others (tests/test_architectures.py). What applies per
architecture (the QK fix needs rotary tables) is `architectures.check_nnsight`'s to say.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.errors import ConfigError
from workbench.families.patching.engine.attribution import (
    DEFAULT_KINDS,
    ig_alphas,
    qk_kinds,
)
from workbench.families.patching.engine.exact import (
    HEAD_ACTS,
    PatchResult,
    default_budget,
    get_kind,
    head_count,
)
from workbench.families.patching.engine.paths import (
    check_request,
    receiver_positions,
    sender_axes,
)
from workbench.interp.hooks import EXEC_ORDER, HOOK_KINDS, n_layers_of
from workbench.interp.metrics import oriented
from workbench.interp.pairs import PairBatch
from workbench.suite import architectures

# Bytes of patched rows one remote trace may hold when the caller does not say: the server's GPU
# is not this machine's, so its free memory cannot be asked; a fraction of one 80 GB accelerator.
REMOTE_BUDGET = 8 * 2**30


@dataclass(frozen=True)
class _Plan:
    """The patched variants of one call: (layer, pos, head) per variant, -1 where a dim is absent
    (pos for z_all_pos, head for the residual kinds); `noop` marks exact no-ops."""

    index: Tensor      # [V, 3]
    flat: Tensor       # [V] position of each variant in the flattened result
    noop: Tensor       # [V] bool
    shape: tuple[int, ...]


def check_lm(lm: Any, function: str = "exact") -> tuple[int, int, int]:
    """(layers, query heads, head dim) of an nnsight model whose architecture `function` (one of
    `architectures.NNSIGHT_FUNCTIONS`) applies to, or one clear error."""
    cfg = getattr(lm, "config", None)
    if cfg is None or not hasattr(lm, "trace"):
        raise ConfigError(f"nnsight patching needs an nnsight LanguageModel over an HF causal LM of a supported "
                          f"architecture ({', '.join(sorted(architectures.SUPPORT))}); got {type(lm).__name__}: load "
                          "one with workbench.nnsight_model(suite, name) or workbench.loading.nnsight_remote(repo_id)")
    architectures.check_nnsight(architectures.model_type_of(lm), function)
    architectures.modules_of(lm)
    d = architectures.dims_of(lm)
    return d["n_layers"], d["n_heads"], d["d_head"]


def heads_of(lm: Any, act: str) -> int:
    """Heads on `act`'s axis in an nnsight model (`engine.exact.head_count`): o_proj's input and the
    q projection carry the query heads, the k/v projections the shared key/value heads."""
    d = architectures.dims_of(lm)
    return head_count(act, d["n_heads"], d["n_kv"])


def prompts_of(batch: PairBatch, kinds: Sequence[str], metric: str, direction: str,
               lm: Any = None) -> tuple[Tensor, Tensor]:
    """(base, source) token tensors of a call (`metrics.oriented`), after every argument is checked
    (an unknown metric by `batch.inputs`; with `lm`, kinds its architecture does not have)."""
    for k in kinds:
        get_kind(k)
    if lm is not None:
        architectures.check_kinds(architectures.model_type_of(lm), kinds)
    return oriented(batch, metric, direction)


def _select(name: str, given: Sequence[int] | None, n: int) -> list[int]:
    if given is None:
        return list(range(n))
    sel = sorted({int(x) for x in given})
    bad = [x for x in sel if not 0 <= x < n]
    if bad or not sel:
        raise ConfigError(f"{name} {bad or list(given)} out of range: valid {name} are 0..{n - 1}")
    return sel


def _plan(kind: str, L: int, T: int, H: int, first_diff: int, layers: Sequence[int] | None,
          positions: Sequence[int] | None, heads: Sequence[int] | None) -> _Plan:
    K = get_kind(kind)
    ls = _select("layers", layers, L)
    ps = _select("positions", positions, T) if "pos" in K.dims else [-1]
    hs = _select("heads", heads, H) if "head" in K.dims else [-1]
    index = torch.cartesian_prod(torch.tensor(ls), torch.tensor(ps), torch.tensor(hs)).view(-1, 3)
    shape = (L,) + tuple(T if d == "pos" else H for d in K.dims[1:])
    cols = [0] + [1 if d == "pos" else 2 for d in K.dims[1:]]
    flat = torch.zeros(len(index), dtype=torch.long)
    for c, size in zip(cols, shape):
        flat = flat * size + index[:, c]
    # before the first position where any pair's prompts differ, source and base agree bit for bit
    noop = (index[:, 1] >= 0) & (index[:, 1] < first_diff)
    return _Plan(index, flat, noop, shape)


def readout_ids(metric: str, batch: PairBatch, pair: Tensor) -> Tensor:
    """Token ids whose logits the metric reads, per row ([rows, k, m]): the bad and the good answer
    at the last position (logit_diff), or the continuation's tokens (logprob)."""
    if metric == "logit_diff":
        return torch.stack([batch.bad, batch.good], -1)[pair][:, None, :].long()
    return batch.continuation[pair][:, :, None].long()


def _score(metric: str, picked: Tensor, lse: Tensor) -> Tensor:
    """Per-row metric from the picked logits ([rows, k, m]) and their log-normaliser ([rows, k])."""
    if metric == "logit_diff":
        return (picked[:, 0, 0] - picked[:, 0, 1]).double()
    return (picked[:, :, 0] - lse).double().sum(-1)


def _trace(lm: Any, tokens: Tensor, ids: Tensor, act: str | None = None, masks: dict[int, Tensor] | None = None,
           src_row: Tensor | None = None, d_head: int = 1, remote: bool | str = False) -> tuple[Tensor, Tensor]:
    """One forward over `tokens`; at each layer of `masks`, rows where the mask is set take
    `src_row`'s activation `act` from this same pass. Returns the logits at `ids` and the
    log-normaliser of the last `ids.shape[1]` positions."""
    edits = {(layer, act): [(mask, src_row)] for layer, mask in (masks or {}).items()}
    return _trace_edits(lm, tokens, ids, edits, d_head, remote)


def _trace_edits(lm: Any, tokens: Tensor, ids: Tensor, edits: dict[tuple[int, str], list[tuple[Tensor, Tensor]]],
                 d_head: int, remote: bool | str = False) -> tuple[Tensor, Tensor]:
    """One forward over `tokens` with, at each (layer, activation) of `edits`, rows where a mask
    ([rows, pos, heads or 1]) is set taking the activation of their `from_row` in this same pass,
    later edits of a site over earlier ones, all read from the site's unedited value."""
    k = int(ids.shape[1])
    order = sorted(edits, key=lambda la: (la[0], EXEC_ORDER.index(la[1])))  # nnsight serves sites in run order
    mods = architectures.modules_of(lm)
    plan = [(*architectures.site(lm, a, layer, mods), d_head if a in HEAD_ACTS else 1, edits[layer, a])
            for layer, a in order]
    head = architectures.get(lm, mods.unembed)
    with torch.no_grad(), lm.trace(tokens, remote=remote):  # built-ins, torch and envoys only: see architectures.site
        for envoy, attr, item, width, steps in plan:
            x = getattr(envoy, attr)
            x = x if item is None else x[item]
            y = x
            for mask, rows in steps:
                y = torch.where(mask.to(x.device).repeat_interleave(width, dim=-1), x[rows.to(x.device)], y)
            x[:] = y
        logits = head.output[:, -k:].float()
        picked = logits.gather(-1, ids.to(logits.device)).save()
        lse = logits.logsumexp(-1).save()
    return getattr(picked, "value", picked).cpu(), getattr(lse, "value", lse).cpu()


def _row_bytes(lm: Any, T: int, k: int) -> float:
    """Peak bytes one batch row needs in a no-grad forward: a few residual-width and MLP-width
    tensors per position, one layer's attention scores, and the metric's logits."""
    cfg, dims = lm.config, architectures.dims_of(lm)
    d, f, h = dims["d_model"], dims["d_mlp"], dims["n_heads"]
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    size = torch.finfo(dtype if isinstance(dtype, torch.dtype) else torch.float32).bits // 8
    return size * T * (8 * d + 3 * f + 2 * h * T) + 8 * k * dims["vocab"]


def metric_values(lm: Any, batch: PairBatch, metric: str = "logit_diff",
                  remote: bool | str = False) -> tuple[float, float]:
    """(clean, corrupted) metric of an nnsight model on `batch`: the two ends of the normalisation."""
    check_lm(lm)
    corr_t, clean_t = prompts_of(batch, [], metric, "denoising")
    N = len(batch)
    pair = torch.arange(2 * N) % N
    picked, lse = _trace(lm, torch.cat([clean_t, corr_t]), readout_ids(metric, batch, pair), remote=remote)
    s = _score(metric, picked, lse)
    return float(s[:N].mean()), float(s[N:].mean())


def exact(lm: Any, batch: PairBatch, kind: str = "resid_pre", metric: str = "logit_diff",
          direction: str = "denoising", layers: Sequence[int] | None = None,
          positions: Sequence[int] | None = None, heads: Sequence[int] | None = None,
          remote: bool | str = False, memory_bytes: float | None = None, variants_per_trace: int | None = None,
          scale: float | None = None, progress: bool = True,
          metrics: tuple[float, float] | None = None) -> PatchResult:
    """Exact patching of `kind` through nnsight interventions: equal to `engine.exact.exact` (and so
    to TransformerLens's helpers) on the same model and pairs.

    `layers`/`positions`/`heads` restrict the patched indices (the others are NaN in the result),
    which is how a remote run on a large model is kept to the layers in question. Each trace holds
    as many variants as `memory_bytes` (default: the device's budget) allows, or
    `variants_per_trace`. `remote=True` runs every trace on the server that hosts `lm` (with
    `REMOTE_BUDGET` unless `memory_bytes` says otherwise); `remote="local"` is nnsight's simulation
    of that, serialising each trace as for the server and running it here.
    `metrics`: the (clean, corrupted) metric if already known (`metric_values`), saving a trace.
    """
    t0 = time.perf_counter()
    (L, _, d_head), (base_t, src_t) = check_lm(lm), prompts_of(batch, [kind], metric, direction, lm)
    K = get_kind(kind)
    N, T = base_t.shape
    diff = batch.diff_positions
    plan = _plan(kind, L, T, heads_of(lm, K.act), diff[0] if diff else T, layers, positions, heads)

    clean_m, corr_m = metrics or metric_values(lm, batch, metric, remote=remote)
    base_m = corr_m if direction == "denoising" else clean_m
    out = torch.full((int(torch.tensor(plan.shape).prod()),), float("nan"), dtype=torch.float64)
    out[plan.flat[plan.noop]] = base_m
    todo = torch.nonzero(~plan.noop).flatten()
    k = int(readout_ids(metric, batch, torch.zeros(1, dtype=torch.long)).shape[1])  # positions the metric reads
    if variants_per_trace is None:
        budget = memory_bytes or (REMOTE_BUDGET if remote and remote != "local" else default_budget(getattr(lm, "device", "cpu")))
        rows = budget / _row_bytes(lm, T, k)
        variants_per_trace = max(1, int(rows) // N - 1)
    chunks = list(todo.split(variants_per_trace))
    act, width = K.act, heads_of(lm, K.act)
    for sel in tqdm(chunks, desc=f"nnsight patch {kind}", disable=not progress or len(chunks) < 2, leave=False):
        V = len(sel)
        tokens = torch.cat([src_t, einops.repeat(base_t, "n t -> (v n) t", v=V)])
        src_row = torch.cat([torch.arange(N), torch.arange(V * N) % N])
        lpos = einops.repeat(plan.index[sel], "v c -> (v n) c", n=N)     # row N + v*N + i: variant v, pair i
        rows = torch.arange(N, N + V * N)
        masks: dict[int, Tensor] = {}
        for layer in sorted(set(lpos[:, 0].tolist())):
            m = torch.zeros(N + V * N, T, width, dtype=torch.bool)
            at = lpos[:, 0] == layer
            r, p, h = rows[at], lpos[at, 1], lpos[at, 2]
            pos = torch.arange(T)[None, :].expand(len(r), T) if K.dims == ("layer", "head") else p[:, None]
            col = h[:, None] if act in HEAD_ACTS else torch.zeros_like(p)[:, None]
            m[r[:, None], pos, col] = True
            masks[layer] = m
        picked, lse = _trace(lm, tokens, readout_ids(metric, batch, src_row), act, masks, src_row, d_head, remote)
        vals = einops.reduce(_score(metric, picked, lse)[N:], "(v n) -> v", "mean", n=N)
        out[plan.flat[sel]] = vals
    names = [HOOK_KINDS[K.hook].format(l=l) for l in range(L)]
    prov = {"kind": kind, "metric": metric, "direction": direction, "method": "nnsight", "n_pairs": N, "n_pos": T,
            "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor, "n_variants": len(plan.index),
            "n_noop": int(plan.noop.sum()), "n_traces": len(chunks) + (metrics is None), "variants_per_trace": variants_per_trace,
            "layers": sorted(set(plan.index[:, 0].tolist())), "remote": remote,
            "activation_cache": "off", "seconds": time.perf_counter() - t0}
    return PatchResult(kind, out.view(plan.shape).float(), K.dims, names, batch.token_labels(metric),
                       clean_m, corr_m, direction, "nnsight", scale, prov)


def path_patch(lm: Any, batch: PairBatch, receiver_: Any, senders: str = "z_all_pos", metric: str = "logit_diff",
               direction: str = "denoising", freeze: str = "all", remote: bool | str = False,
               memory_bytes: float | None = None, variants_per_trace: int | None = None, scale: float | None = None,
               progress: bool = True, metrics: tuple[float, float] | None = None) -> PatchResult:
    """Path patching through nnsight interventions: equal to `engine.paths.path_patch` (the
    engine) on the same model and pairs, and runs on a remote model too.

    Both passes of the hook algorithm ride in one trace: after the source and the base prompts,
    a block of frozen copies (every head output, and with `freeze="all"` every MLP output, taken
    from the pair's base row, the sender's from its source row) and a block of plain copies whose
    receiver takes the frozen copy's value at the same site, in the same pass, since the frozen
    copy computes it first or at the same module call."""
    t0 = time.perf_counter()
    L, H, d_head = check_lm(lm, "paths")
    r = check_request(lm, receiver_, senders, freeze)
    base_t, src_t = prompts_of(batch, [], metric, direction)
    N, T = base_t.shape
    at_r = receiver_positions(r, T, base_t.device)
    dims, shape, names = sender_axes(senders, r, T, H)
    index = torch.cartesian_prod(*[torch.arange(n) for n in shape]).view(-1, len(shape))
    pos = index[:, 1] if "pos" in dims else torch.full((len(index),), -1)
    head = index[:, -1] if "head" in dims else torch.full((len(index),), -1)
    first = batch.diff_positions[0] if batch.diff_positions else T
    noop = (pos >= 0) & (pos < first)               # source and base agree there bit for bit
    clean_m, corr_m = metrics or metric_values(lm, batch, metric, remote=remote)
    base_m = corr_m if direction == "denoising" else clean_m
    out = torch.full((len(index),), base_m, dtype=torch.float64)
    todo = torch.nonzero(~noop).flatten()
    k = int(readout_ids(metric, batch, torch.zeros(1, dtype=torch.long)).shape[1])
    if variants_per_trace is None:
        budget = memory_bytes or (REMOTE_BUDGET if remote and remote != "local" else default_budget(getattr(lm, "device", "cpu")))
        variants_per_trace = max(1, (int(budget / _row_bytes(lm, T, k)) // N - 2) // 2)
    chunks = list(todo.split(variants_per_trace))
    r_width = heads_of(lm, r.act) if r.act in ("q", "k", "v") else 1
    for sel in tqdm(chunks, desc=f"nnsight path {senders} -> {r.label}", disable=not progress or len(chunks) < 2,
                    leave=False):
        V = len(sel)
        R = 2 * N + 2 * V * N                                       # [src; base; frozen copies; plain copies]
        tokens = torch.cat([src_t, base_t, einops.repeat(base_t, "n t -> (c v n) t", c=2, v=V)])
        pair = torch.arange(R) % N
        frozen = torch.arange(2 * N, 2 * N + V * N)
        plain = frozen + V * N
        var_l = einops.repeat(index[sel, 0], "v -> (v n)", n=N)
        var_p, var_h = (einops.repeat(t[sel], "v -> (v n)", n=N) for t in (pos, head))
        from_src, from_base = pair, N + pair
        from_frozen = torch.arange(R) - V * N                       # a plain copy's frozen twin

        def mask(width: int, rows: Tensor, p: Tensor | None = None, h: Tensor | None = None) -> Tensor:
            """[R, T, width]: `rows`, at each row's position `p` and head `h` (None: all of them)."""
            pp = torch.arange(T)[None, :].expand(len(rows), T) if p is None else p[:, None]
            hh = torch.arange(width)[None, :].expand(len(rows), width) if h is None else h[:, None]
            m = torch.zeros(R, T, width, dtype=torch.bool)
            m[rows[:, None, None], pp[:, :, None], hh[:, None, :]] = True
            return m

        edits: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}
        if senders == "embed":  # the embedding is layer 0's input: the frozen copies take the source's there
            edits[0, "resid_pre"] = [(mask(1, frozen, var_p), from_src)]
        frozen_z, frozen_mlp = mask(H, frozen), mask(1, frozen)      # the same at every layer
        for layer in range(L):
            z = [(frozen_z, from_base)]
            mo = [] if freeze == "heads" or (r.act == "mlp_in" and layer == r.layer) else [(frozen_mlp, from_base)]
            at = var_l == layer
            if at.any() and senders.startswith("z"):
                z.append((mask(H, frozen[at], var_p[at] if senders == "z" else None, var_h[at]), from_src))
            if at.any() and senders == "mlp_out":
                mo.append((mask(1, frozen[at], var_p[at]), from_src))
            edits[layer, "z"] = z
            if mo:
                edits[layer, "mlp_out"] = mo
        site = {"q": "q", "k": "k", "v": "v", "mlp_in": "mlp_out", "final": "resid_post"}[r.act]
        r_layer = L - 1 if r.act == "final" else r.layer
        rm = mask(r_width, plain) & at_r[None, :, None]
        if r.heads is not None:
            rm &= torch.isin(torch.arange(r_width), torch.tensor(r.heads))[None, None, :]
        edits.setdefault((r_layer, site), []).append((rm, from_frozen))
        picked, lse = _trace_edits(lm, tokens, readout_ids(metric, batch, pair), edits, d_head, remote)
        out[sel] = einops.reduce(_score(metric, picked, lse)[2 * N + V * N:], "(v n) -> v", "mean", n=N)
    prov = {"kind": senders, "receiver": r.label, "freeze": freeze, "metric": metric, "direction": direction,
            "method": "nnsight_path", "n_pairs": N, "n_pos": T, "prompt_sha256": batch.sha256(),
            "backdoor": batch.backdoor, "n_variants": len(index), "n_noop": int(noop.sum()),
            "n_traces": len(chunks) + (metrics is None), "variants_per_trace": variants_per_trace, "remote": remote,
            "activation_cache": "off", "seconds": time.perf_counter() - t0}
    return PatchResult(senders, out.view(shape).float(), dims, names,
                       batch.token_labels(metric), clean_m, corr_m, direction, "nnsight_path", scale, prov)


def exact_all(lm: Any, batch: PairBatch, kinds: Sequence[str] = DEFAULT_KINDS,
              metric: str = "logit_diff", direction: str = "denoising", **kw: Any) -> dict[str, PatchResult]:
    """Several kinds, validated before any trace runs, sharing one unpatched trace."""
    check_lm(lm)
    prompts_of(batch, kinds, metric, direction, lm)
    metrics = metric_values(lm, batch, metric, remote=kw.get("remote", False))
    return {k: exact(lm, batch, k, metric, direction, metrics=metrics, **kw) for k in kinds}


# Where, in a decoder layer's run, each step of a gradient trace happens: the activations read and,
# for GradDrop, the two norm outputs whose gradient is cut. nnsight serves module boundaries in
# execution order only, so a trace body follows this order.
_STEP_ORDER = ("resid_pre", "drop_attn", "q", "k", "v", "z", "attn_out", "resid_mid", "drop_mlp", "mlp_out")
_FORWARD_ORDER = tuple(a for a in _STEP_ORDER if not a.startswith("drop_"))


def _atp_sites(kinds: Sequence[str], L: int) -> list[tuple[int, str]]:
    """(layer, activation) whose gradients the kinds need, in forward order. resid_post of layer l
    is the very tensor that resid_pre of layer l+1 is, and a tensor's gradient can be asked once,
    so it is read there; only the last layer's resid_post is a site of its own."""
    acts = {get_kind(k).act for k in kinds}
    if "resid_post" in acts:
        acts = (acts - {"resid_post"}) | {"resid_pre"}
    sites = [(layer, a) for layer in range(L) for a in _FORWARD_ORDER if a in acts]
    return sites + ([(L - 1, "resid_post")] if "resid_post" in {get_kind(k).act for k in kinds} else [])


def _site_of(act: str, layer: int, L: int) -> tuple[int, str]:
    return (layer + 1, "resid_pre") if act == "resid_post" and layer < L - 1 else (layer, act)


@dataclass(frozen=True)
class _Groups:
    """The base-row groups of one gradient trace, N rows each, after the N source rows: the plain
    base rows (AtP), then `ig` interpolation groups (their alphas), then `drop` GradDrop groups
    (the layer each one cuts)."""

    ig: tuple[float, ...] = ()
    drop: tuple[int, ...] = ()

    def __len__(self) -> int:
        return 1 + len(self.ig) + len(self.drop)


def _grad_trace(lm: Any, batch: PairBatch, src_t: Tensor, base_t: Tensor, sites: Sequence[tuple[int, str]],
                groups: _Groups, metric: str, ig_steps: int, remote: bool | str,
                qk: Sequence[str] = ()) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One trace over [source; base; each group's base rows] with one backward pass. Returns every
    group's AtP estimate per site, flattened ([groups, sum over sites of T*heads]), the source and
    plain-base rows' metric, and for each query/key kind in `qk` its QK-fixed estimate per layer
    (`engine.attribution.qk_fix` computes the same; `sites` must then hold every layer's q, k, v and z).

    Each row's loss weight makes its gradient the one `engine.attribution.atp` takes: 1/N per pair (the
    mean over pairs), and 1/N/ig_steps on an interpolation row, so that the IG groups' estimates sum to
    the estimate with the gradient averaged over the path. Rows do not interact in a forward
    pass, so one backward serves every group."""
    N, T = base_t.shape
    G = len(groups)
    tokens = torch.cat([src_t] + [base_t] * G)
    ids, logit_diff = readout_ids(metric, batch, torch.arange(len(tokens)) % N), metric == "logit_diff"
    weight = torch.cat([torch.zeros(N), torch.full((N,), 1.0 / N), torch.full((N * len(groups.ig),), 1.0 / N / max(ig_steps, 1)),
                        torch.full((N * len(groups.drop),), 1.0 / N)])
    alpha = einops.repeat(torch.tensor(groups.ig, dtype=torch.float32), "g -> (g n) 1 1", n=N)
    wanted = set(sites) | {(layer, c) for layer in groups.drop for c in ("drop_attn", "drop_mlp")}
    L = n_layers_of(lm)
    mods = architectures.modules_of(lm)
    order = [(layer, a) for layer in range(L) for a in _STEP_ORDER] + [(L - 1, "resid_post")]  # the output last
    # (what, envoy, attr, item, heads or row mask, tensor, sub): reads and cuts in execution order. A read
    # takes tensor `tensor` of the body's list (read there first if it is new) and its part `sub`: q, k
    # and v of a fused projection are slices of one output, whose gradient can be asked once
    steps = []
    reads = []  # (layer, activation) of each read, in the order of `xs` in the body
    tensors: dict[tuple[int, str, Any], int] = {}
    for layer, a in (s for s in order if s in wanted):
        if a.startswith("drop_"):
            blk = architectures.block(lm, layer, mods)
            norm = architectures.get(blk, mods.ln1 if a == "drop_attn" else mods.ln2)
            rows = torch.zeros(len(tokens), dtype=torch.bool)
            g = 1 + len(groups.ig) + groups.drop.index(layer)
            rows[N + g * N: N + (g + 1) * N] = True
            steps.append(("cut", norm, "output", None, rows[:, None, None], -1, None))
        else:
            envoy, attr, item = architectures.site(lm, a, layer, mods)
            sub = item if isinstance(item, tuple) else None
            item = None if sub is not None else item
            key = (id(envoy), attr, item)
            new = key not in tensors
            tensors.setdefault(key, len(tensors))
            steps.append(("read" if new else "again", envoy, attr, item, heads_of(lm, a), tensors[key], sub))
            reads.append((layer, a))
    n_steps = len(groups.ig)
    n_interp = n_steps * N
    dims = architectures.dims_of(lm)
    H, KV, e = dims["n_heads"], dims["n_kv"], dims["d_head"]
    R = H // KV
    embed, head = architectures.get(lm, mods.embed), architectures.get(lm, mods.unembed)
    rotary_emb = architectures.get(lm, mods.rotary) if qk else None
    # per layer, where its q, k, v and z reads sit among the body's reads
    qk_at = [[reads.index((layer, a)) for a in ("q", "k", "v", "z")] for layer in range(L)] if qk else []
    want_q, want_q_all, want_k, want_k_all = ("q" in qk, "q_all_pos" in qk, "k" in qk, "k_all_pos" in qk)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scale = e ** -0.5
    # built-ins, torch and envoys only in the body (the metric is `_score` written out, and no
    # `_Groups`): a server that runs it lacks this package. No comment lines in it either: with one
    # above the nested backward block, nnsight 0.8's remote serialisation lost that block
    with lm.trace(tokens, remote=remote):
        emb = embed.output.requires_grad_(True)
        if n_interp:
            e_src, e_base = emb[:N].repeat(n_steps, 1, 1), emb[N:2 * N].repeat(n_steps, 1, 1)
            interp = e_base + alpha.to(emb.device, emb.dtype) * (e_src - e_base)
            embed.output = torch.cat([emb[:2 * N], interp, emb[2 * N + n_interp:]])
        if qk_at:
            rotary = rotary_emb.output
            cos, sin = rotary[0][:1, None].float(), rotary[1][:1, None].float()
        ts, xs = [], []
        for what, envoy, attr, item, extra, ti, sub in steps:
            if what == "cut":
                x = getattr(envoy, attr)
                setattr(envoy, attr, torch.where(extra.to(x.device), x.detach(), x))
            else:
                if what == "read":
                    x = getattr(envoy, attr)
                    ts.append(x if item is None else x[item])
                xs.append((ts[ti] if sub is None else ts[ti][sub], extra, ti, sub))
        logits = head.output[:, -ids.shape[1]:].float()
        picked = logits.gather(-1, ids.to(logits.device))
        score = picked[:, 0, 0] - picked[:, 0, 1] if logit_diff else (picked[:, :, 0] - logits.logsumexp(-1)).sum(-1)
        metrics = score[:2 * N].detach().save()
        estimates = []
        with (score * weight.to(score.device)).sum().backward():
            tgrads = [None] * len(ts)
            for i in range(len(ts) - 1, -1, -1):
                tgrads[i] = ts[i].grad
            grads = []
            for x, heads, ti, sub in xs:
                grads.append(tgrads[ti] if sub is None else tgrads[ti][sub])
                d = (x[:N] - x[N:2 * N]).detach().repeat(G, 1, 1)
                prod = (d * grads[-1][N:]).reshape(G, N, T, heads, -1).sum(-1).sum(1)
                estimates.append(prod.reshape(G, -1))
            flat = torch.cat(estimates, 1).save()
            fixed = []
            for iq, ik, iv, iz in qk_at:
                q = xs[iq][0][:2 * N].detach().float().reshape(2 * N, T, H, e).transpose(1, 2)
                k = xs[ik][0][:2 * N].detach().float().to(q.device).reshape(2 * N, T, KV, e).transpose(1, 2)
                rc, rs = cos.to(q.device), sin.to(q.device)
                q = q * rc + torch.cat([-q[..., e // 2:], q[..., :e // 2]], -1) * rs
                k = (k * rc + torch.cat([-k[..., e // 2:], k[..., :e // 2]], -1) * rs).repeat_interleave(R, 1)
                v = xs[iv][0][N:2 * N].detach().float().to(q.device).reshape(N, T, KV, e).transpose(1, 2)
                v = v.repeat_interleave(R, 1)
                g_z = grads[iz][N:2 * N].float().to(q.device).reshape(N, T, H, e).transpose(1, 2)
                g_a = g_z @ v.transpose(-1, -2)
                mask = future.to(q.device)
                s_base = (q[N:] @ k[N:].transpose(-1, -2) * scale).masked_fill(mask, float("-inf"))
                a_base = s_base.softmax(-1)
                if want_q or want_q_all:
                    a_q = (q[:N] @ k[N:].transpose(-1, -2) * scale).masked_fill(mask, float("-inf")).softmax(-1)
                    per_row = ((a_q - a_base) * g_a).sum(-1).sum(0).transpose(0, 1)
                    if want_q:
                        fixed.append(per_row.reshape(-1).to(cos.device))
                    if want_q_all:
                        fixed.append(per_row.sum(0).to(cos.device))
                if want_k or want_k_all:
                    s_new = (q[N:] @ k[:N].transpose(-1, -2) * scale).masked_fill(mask, float("-inf"))
                if want_k_all:
                    fixed.append(((s_new.softmax(-1) - a_base) * g_a).sum(-1).sum(-1).sum(0).reshape(KV, R).sum(-1).to(cos.device))
                if want_k:
                    la_new = a_base.log() + (s_new - s_base).nan_to_num(0.0)
                    log_c = -torch.logaddexp(torch.log1p(-a_base.clamp(max=1.0)), la_new)
                    row = (a_base * g_a).sum(-1, keepdim=True)
                    change = (log_c.exp() - 1) * (row - a_base * g_a) + ((la_new + log_c).exp() - a_base) * g_a
                    change = torch.where(mask, torch.zeros_like(change), change.nan_to_num(0.0))
                    fixed.append(change.sum(2).sum(0).reshape(KV, R, T).sum(1).transpose(0, 1).reshape(-1).to(cos.device))
            if qk_at:
                fixed = torch.cat(fixed).save()
    flat = getattr(flat, "value", flat).detach().double().cpu()
    out: dict[str, Tensor] = {}
    if qk_at:  # per layer, the wanted kinds in the body's order, each flattened
        shapes = {"q": (T, H), "q_all_pos": (H,), "k_all_pos": (KV,), "k": (T, KV)}
        kinds = [kd for kd, on in zip(shapes, (want_q, want_q_all, want_k_all, want_k)) if on]
        per_layer = getattr(fixed, "value", fixed).detach().double().cpu().view(L, -1)
        sizes = [int(torch.tensor(shapes[kd]).prod()) for kd in kinds]
        for kd, part in zip(kinds, per_layer.split(sizes, dim=1)):
            out[kd] = part.reshape(L, *shapes[kd])
    return flat, getattr(metrics, "value", metrics).double().cpu(), out


def _grad_row_bytes(lm: Any, T: int, k: int) -> float:
    """Bytes one row of a gradient trace keeps: a no-grad row's working set per layer, since the
    backward pass needs every layer's activations."""
    return _row_bytes(lm, T, k) * n_layers_of(lm)


# Bytes of one local CPU gradient trace: a trace's fixed cost dominates on small models, so few big
# traces beat the engine's cache-sized chunks (measured on the small organism, AtP + 8 IG steps +
# GradDrop, 8 pairs: 289 ms in one trace, 387 ms in 3, 638 ms in 12).
CPU_GRAD_BUDGET = 2**30


def _grad_budget(lm: Any, remote: bool | str) -> float:
    if remote and remote != "local":
        return REMOTE_BUDGET
    device = torch.device(getattr(lm, "device", "cpu"))
    return default_budget(device) if device.type == "cuda" else CPU_GRAD_BUDGET


def atp(lm: Any, batch: PairBatch, kinds: Sequence[str] = DEFAULT_KINDS, metric: str = "logit_diff",
        direction: str = "denoising", graddrop: bool = False, ig_steps: int = 0, qk_fix: bool = False,
        remote: bool | str = False, scale: float | None = None, memory_bytes: float | None = None,
        groups_per_trace: int | None = None) -> dict[str, PatchResult]:
    """AtP estimates for every index of each kind through nnsight, with one backward pass per
    trace: equal to `engine.attribution.atp` on the same model and pairs (with the same `graddrop`,
    `ig_steps` and `qk_fix`, giving `<kind>:graddrop`, `<kind>:ig` and `<kind>:qk`), and runnable
    remotely: only the estimates, one number per index and group, come back.

    The QK fix rides in the first trace: on the server, each layer's attention pattern is rebuilt
    from the q/k projections (rotated with the model's own rotary tables) for the base and the
    patched queries or keys, and dM/dA is the head output's gradient against the values (z = A v
    is linear in A), so no pattern needs to be a module's output.

    AtP alone is one trace. IG adds `ig_steps` groups of base rows whose input embeddings lie on
    the path from the base to the source prompt, GradDrop one group per layer with that layer's
    attention and MLP cut from the gradient; they share that trace, or are split over several when
    `memory_bytes` (default: the device's budget, `REMOTE_BUDGET` remotely) or `groups_per_trace`
    says the rows do not fit in one.
    """
    t0 = time.perf_counter()
    for function in ["atp"] + ["atp+ig"] * bool(ig_steps) + ["atp+graddrop"] * graddrop + ["atp+qk"] * qk_fix:
        check_lm(lm, function)
    (L, _, _), (base_t, src_t) = check_lm(lm, "atp"), prompts_of(batch, kinds, metric, direction, lm)
    if ig_steps < 0:
        raise ConfigError(f"ig_steps must be >= 0 (0: no integrated gradients), not {ig_steps}")
    N, T = base_t.shape
    qk = qk_kinds(kinds) if qk_fix else []
    if qk and architectures.modules_of(lm).rotary is None:
        raise ConfigError("the QK fix rebuilds attention from the model's rotary tables, "
                          f"which this {type(lm).__name__} lacks; use qk_fix=False")
    sites = _atp_sites(list(kinds) + (["q", "k", "v", "z"] if qk else []), L)
    k = int(readout_ids(metric, batch, torch.zeros(1, dtype=torch.long)).shape[1])  # positions the metric reads
    extra = [("ig", a) for a in ig_alphas(ig_steps)] + [("drop", layer) for layer in range(L) if graddrop]
    if groups_per_trace is None:
        budget = memory_bytes or _grad_budget(lm, remote)
        if qk:  # the fix's working set: a few [N, heads, T, T] float32 patterns of one layer at a time
            budget -= 8 * 4 * N * architectures.dims_of(lm)["n_heads"] * T * T
        groups_per_trace = max(1, int(budget / _grad_row_bytes(lm, T, k)) // N - 2)
    chunks = [extra[i:i + groups_per_trace] for i in range(0, len(extra), groups_per_trace)] or [[]]
    plain, ig, drop, fixed = None, [], [], {}  # per group: [S], flattened over the sites
    for i, chunk in enumerate(chunks):
        groups = _Groups(tuple(v for w, v in chunk if w == "ig"), tuple(v for w, v in chunk if w == "drop"))
        flat, scores, got = _grad_trace(lm, batch, src_t, base_t, sites, groups, metric, ig_steps, remote,
                                        qk if i == 0 else ())
        fixed.update(got)
        plain, n_ig = flat[0], len(groups.ig)
        ig.append(flat[1:1 + n_ig])
        drop.append(flat[1 + n_ig:])
    src_m, base_m = float(scores[:N].mean()), float(scores[N:].mean())
    clean_m, corr_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    sizes = [T * heads_of(lm, a) for _, a in sites]

    def per_kind(flat: Tensor, kind: str) -> Tensor:
        """[groups, S] -> [groups, *kind's shape]: a kind's node is summed before any |.|."""
        K, per_site = get_kind(kind), dict(zip(sites, flat.split(sizes, dim=1)))
        est = torch.stack([per_site[_site_of(K.act, layer, L)].view(len(flat), T, -1) for layer in range(L)], 1)
        return est[..., 0] if "head" not in K.dims else (est if "pos" in K.dims else est.sum(2))

    # (method, per-group estimates, how the groups combine): AtP, IG's path mean, GradDrop's |.| mean
    variants = [("atp", plain[None], lambda e: e[0])]
    if ig_steps:
        variants.append(("atp+ig", torch.cat(ig), lambda e: e.sum(0)))
    if graddrop:
        variants.append(("atp+graddrop", torch.cat(drop), lambda e: e.abs().sum(0) / max(L - 1, 1)))
    if qk_fix:  # plain AtP's estimates, the query and key kinds' replaced by their fixed ones
        variants.append(("atp+qk", plain[None], lambda e: e[0]))
    out: dict[str, PatchResult] = {}
    for method, flat, combine in variants:
        for kind in kinds:
            K = get_kind(kind)
            prov = {"kind": kind, "metric": metric, "direction": direction, "method": method, "backend": "nnsight",
                    "n_pairs": N, "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor, "remote": remote,
                    "n_traces": len(chunks), "activation_cache": "off", "seconds": time.perf_counter() - t0,
                    **({"ig_steps": ig_steps} if method == "atp+ig" else {})}
            key = kind if method == "atp" else f"{kind}:{method.split('+')[1]}"
            est = fixed[kind] if method == "atp+qk" and kind in fixed else combine(per_kind(flat, kind))
            out[key] = PatchResult(kind, (base_m + est).float(), K.dims,
                                   [HOOK_KINDS[K.hook].format(l=l) for l in range(L)],
                                   batch.token_labels(metric), clean_m, corr_m, direction, method, scale, prov)
    return out
