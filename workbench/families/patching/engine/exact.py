"""Exact activation patching, batched through the batch dimension and run on suffixes only.

TransformerLens's `patching` helpers run one full forward pass per patched index. That is the
reference for correctness here (the tests compare to it at 1e-4), but not the way to compute it:

1. One dense forward over the clean and corrupted prompts together caches only what the kinds
   need: the residual stream, the rotated keys/values, and the patched activations.
2. A patch at (layer l, position p) changes nothing at positions < p (causal attention) and nothing
   below layer l. So each patched variant enters the network at layer l holding only positions
   p..T-1; the keys and values of positions < p, at every later layer, are the base run's own.
   Variants of all (layer, position) pairs are packed into one flat token batch, so the linear
   layers (nearly all the FLOPs) do no wasted work; attention pads queries only.
3. The last layer computes attention and MLP only at the positions the metric reads, and the
   unembedding only for the answer tokens (logit difference) or the metric's positions (log-prob).
4. A patch whose source equals the base activation bit for bit (positions before the trigger) is
   an exact no-op: its value is the base run's metric, with no forward pass at all.

The two dense runs of step 1 can be read through the activation cache (`cache=True` or an
`ActivationCache`; see `cached_runs`), so a rerun of an analysis recomputes only the patched
variants; the results are bit-identical with and without it.

The engine computes a Llama-family decoder (`decoder.py`) from the bridge's own (compatibility-mode) weights, so
it is the same function as the bridge. Results are `PatchResult`s labelled with TransformerLens
hook names, the prompt's tokens and a provenance dict; `.to_frame()` gives a tidy table.
"""
from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.cache import ActivationCache, default_cache, make_key
from workbench.core.errors import ConfigError
from workbench.interp.decoder import (
    Weights,
    attention_pattern,
    mlp,
    mlp_residual,
    qkv,
    rms_norm,
    weights,
)
from workbench.interp.hooks import HOOK_KINDS
from workbench.interp.metrics import (
    Metric,
    check_direction,
    contributions,
    make_metric,
)
from workbench.interp.pairs import PairBatch, check_aligned
from workbench.suite import architectures, loading

# --- patch kinds: a registry, so the CLI and the app can list them -----------------------------
HEAD_ACTS = ("z", "q", "k", "v")  # activations with a head axis: head outputs, queries, keys, values


def head_count(act: str, n_heads: int, n_kv: int) -> int:
    """Size of `act`'s head axis (1: a residual-width activation). With grouped-query attention a
    key or value head is one of the `n_kv` heads a group of query heads shares (TransformerLens's
    hook_k/hook_v shape)."""
    if act not in HEAD_ACTS:
        return 1
    return n_kv if act in ("k", "v") else n_heads


@dataclass(frozen=True)
class Kind:
    """A patchable activation. `act`: which cached activation is swapped; `entry`: the layer offset
    and stage (0 = block input, 1 = after attention) where the change enters the residual stream."""

    name: str
    hook: str                      # key of hooks.HOOK_KINDS: the TL hook names that label results
    dims: tuple[str, ...]
    act: str
    entry: tuple[int, int]
    tl: str                        # the transformer_lens.patching function computing the same thing

    def n_heads(self, n_heads: int, n_kv: int) -> int:
        return head_count(self.act, n_heads, n_kv)

    @property
    def needs(self) -> tuple[str, ...]:
        """The cached activations patching this kind reads (keys and values are always kept): a
        query, key or value head is patched by recomputing its layer's attention from the base run's
        queries, keys and values, against that run's head outputs."""
        if self.act in ("q", "k", "v"):
            return ("q", "z")
        return ("resid_pre",) if self.act == "resid_post" else (self.act,)


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> None:
    if kind.name in KINDS:
        raise ConfigError(f"patch kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind


for _k in (
    Kind("resid_pre", "resid_pre", ("layer", "pos"), "resid_pre", (0, 0), "get_act_patch_resid_pre"),
    Kind("resid_mid", "resid_mid", ("layer", "pos"), "resid_mid", (0, 1), "get_act_patch_resid_mid"),
    Kind("resid_post", "resid_post", ("layer", "pos"), "resid_post", (1, 0), "generic:resid_post"),
    Kind("attn_out", "attn_out", ("layer", "pos"), "attn_out", (0, 1), "get_act_patch_attn_out"),
    Kind("mlp_out", "mlp_out", ("layer", "pos"), "mlp_out", (1, 0), "get_act_patch_mlp_out"),
    Kind("z", "z", ("layer", "pos", "head"), "z", (0, 1), "get_act_patch_attn_head_out_by_pos"),
    Kind("z_all_pos", "z", ("layer", "head"), "z", (0, 1), "get_act_patch_attn_head_out_all_pos"),
    *(Kind(f"{a}{suffix}", a, dims, a, (0, 1), f"get_act_patch_attn_head_{a}_{tl}")
      for a in "qkv" for suffix, dims, tl in (("", ("layer", "pos", "head"), "by_pos"),
                                               ("_all_pos", ("layer", "head"), "all_pos"))),
):
    register_kind(_k)


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ConfigError(f"unknown patch kind {name!r}; choose one of {sorted(KINDS)}")
    return KINDS[name]


# --- dense runs: baselines, cached activations, gradients, and set patching --------------------
Hook = Callable[[str, int, Tensor], Tensor]


def forward(W: Weights, tokens: Int[Tensor, "n pos"], metric: Metric, hook: Hook | None = None,
            keep_kv: bool = False, embed: Tensor | None = None, drop_layer: int | None = None,
            pattern: bool = False) -> tuple[Float[Tensor, "n k"], dict[str, list[Tensor]]]:
    """A full forward pass returning the metric's per-position contributions.

    `hook(kind, layer, act)` sees every activation a patch kind can name and returns it (possibly
    replaced); `keep_kv` also returns the rotated keys/values the suffix engine reuses; `embed`
    replaces the token embeddings (a leaf to differentiate from); `drop_layer` feeds that layer's
    attention and MLP a detached residual, so no gradient flows back through them (GradDrop);
    `pattern` computes attention explicitly so that the hook also sees the attention pattern
    ("pattern", [n, head, query, key], TL's hook_pattern), which the fused kernel never forms.
    """
    T = tokens.shape[1]
    cos, sin = W.rope(T)
    hook = hook or (lambda kind, l, a: a)
    kv: dict[str, list[Tensor]] = {"k": [], "v": []}
    x = W.embed[tokens] if embed is None else embed
    for l in range(W.n_layers):
        x = hook("resid_pre", l, x)
        q, k, v = qkv(W, l, x.detach() if l == drop_layer else x, cos, sin)
        q, k, v = hook("q", l, q), hook("k", l, k), hook("v", l, v)
        if keep_kv:
            kv["k"].append(k)
            kv["v"].append(v)
        if pattern:
            A = hook("pattern", l, attention_pattern(W, q, k))
            z = einops.einsum(A, v.repeat_interleave(W.n_heads // W.n_kv, 2), "n h i j, n j h e -> n i h e")
        else:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=W.n_kv != W.n_heads).transpose(1, 2)
        z = hook("z", l, z)
        a = hook("attn_out", l, z.flatten(-2) @ W.wo[l])
        x = hook("resid_mid", l, x + a)
        m = hook("mlp_out", l, mlp(W, l, x.detach() if l == drop_layer else x))
        x = x + m
        if l < W.n_layers - 1:
            x = hook("resid_post", l, x)
    x = hook("resid_post", W.n_layers - 1, x)
    return metric.dense(rms_norm(x[:, T - metric.k:], W.norm, W.eps)), kv


def run_cache(W: Weights, tokens: Tensor, metric: Metric, acts: Sequence[str],
              keep_kv: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-position metric contributions and the named activations stacked over layers
    ([layer, n, pos, ...]; `resid_pre` gets one more entry, the final residual)."""
    store: dict[str, list[Tensor]] = {a: [] for a in acts}

    def hook(kind: str, l: int, a: Tensor) -> Tensor:
        if kind in store:
            store[kind].append(a)
        if kind == "resid_post" and l == W.n_layers - 1 and "resid_pre" in store:
            store["resid_pre"].append(a)
        return a

    contrib, kv = forward(W, tokens, metric, hook, keep_kv)
    out = {a: torch.stack(v) for a, v in store.items()}
    out.update({a: torch.stack(v) for a, v in kv.items() if v})
    return contrib, out


# --- the suffix engine ------------------------------------------------------------------------
@dataclass
class Variants:
    """Patched variants (each covers every prompt): where they enter and what they add there.
    The additions are made per chunk (`point`/`dense` of the selected variants only), so memory
    stays bounded by the chunk, not by the number of variants."""

    entry: Tensor                                   # layer whose input/mid sees the change (n_layers: final norm)
    stage: Tensor                                   # 0: block input, 1: after attention
    start: Tensor                                   # first position the change touches; -1: exact no-op
    point: Callable[[Tensor], Tensor] | None = None  # sel -> [v, n, d] added at position `start`
    dense: Callable[[Tensor], Tensor] | None = None  # sel -> [v, n, pos, d] added at positions >= start


@dataclass
class Chunk:
    entry: Tensor
    stage: Tensor
    start: Tensor
    point: Tensor | None
    dense: Tensor | None


def suffix(W: Weights, base: dict[str, Tensor], var: Chunk, metric: Metric,
            base_contrib: Tensor, stats: dict[str, float]) -> Tensor:
    """Metric of every variant, computing only layers >= entry and positions >= start."""
    N, T = base["resid_pre"].shape[1:3]
    k, L, dev = metric.k, W.n_layers, base_contrib.device
    V = int(var.entry.shape[0])
    R = V * N
    row_var = torch.arange(R, device=dev) // N
    row_prompt = torch.arange(R, device=dev) % N
    row_entry, row_stage, row_start = var.entry[row_var], var.stage[row_var], var.start[row_var]
    cos_t, sin_t = W.rope(T)
    d, qkv_out, hd = W.d_model, W.wqkv[0].shape[1], W.n_heads * W.d_head
    x = W.embed.new_empty(0, d)
    t_row = torch.empty(0, dtype=torch.long, device=dev)
    t_pos = torch.empty_like(t_row)

    point_mid = (row_stage == 1) & (var.point is not None)

    def insert(l: int, stage: int, metric_only: bool) -> None:
        """Add the tokens of rows whose change enters at (l, stage). A single-position change after
        attention alters only that position's MLP input: the row's later positions join one layer
        up, from the base run's residual."""
        nonlocal x, t_row, t_pos
        enter = (row_entry == l) & (row_stage == stage)
        rows = torch.nonzero(enter | (point_mid & (row_entry == l - 1) & (stage == 0))).flatten()
        if rows.numel() == 0:
            return
        first = torch.where(enter[rows], row_start[rows], row_start[rows] + 1)
        if metric_only:
            first = first.clamp(min=T - k)
        lens = (T - first).clamp(min=0)
        if stage == 1 and var.point is not None:
            lens = lens.clamp(max=1)
        tr = rows.repeat_interleave(lens)
        offs = torch.arange(tr.numel(), device=dev) - (lens.cumsum(0) - lens).repeat_interleave(lens)
        tp = first.repeat_interleave(lens) + offs
        act = base["resid_pre"][l] if stage == 0 else base["resid_mid"][l]
        xv = act[row_prompt[tr], tp]
        if var.point is not None:
            sel = torch.nonzero((tp == row_start[tr]) & enter[rows].repeat_interleave(lens)).flatten()
            xv = xv.index_add(0, sel, var.point[row_var[tr[sel]], row_prompt[tr[sel]]])
        if var.dense is not None:
            xv = xv + var.dense[row_var[tr], row_prompt[tr], tp]
        x, t_row, t_pos = torch.cat([x, xv]), torch.cat([t_row, tr]), torch.cat([t_pos, tp])

    flops = 0.0
    for l in range(int(var.entry.min()), L):
        last = l == L - 1
        insert(l, 0, metric_only=False)
        if x.shape[0]:
            q, kk, vv = qkv(W, l, x, cos_t[t_pos], sin_t[t_pos])
            flops += x.shape[0] * 2 * d * qkv_out
            arows, local = torch.unique(t_row, return_inverse=True)
            Kf = base["k"][l][row_prompt[arows]]            # keys of positions < start: the base run's
            Vf = base["v"][l][row_prompt[arows]]
            Kf[local, t_pos] = kk
            Vf[local, t_pos] = vv
            if last:                                        # only the metric's positions read the output
                qsel = torch.nonzero(t_pos >= T - k).flatten()
                x, t_row, t_pos, local, q = x[qsel], t_row[qsel], t_pos[qsel], local[qsel], q[qsel]
            S = T - int(t_pos.min())
            Qp = q.new_zeros(arows.numel(), S, W.n_heads, W.d_head)
            Qp[local, t_pos - (T - S)] = q
            mask = torch.arange(T, device=dev)[None, :] <= torch.arange(T - S, T, device=dev)[:, None]
            z = F.scaled_dot_product_attention(Qp.transpose(1, 2), Kf.transpose(1, 2), Vf.transpose(1, 2),
                                               attn_mask=mask, enable_gqa=W.n_kv != W.n_heads).transpose(1, 2)
            z = z[local, t_pos - (T - S)]
            x = torch.addmm(x, z.flatten(-2), W.wo[l])
            flops += x.shape[0] * 2 * hd * d + float((t_pos + 1).sum()) * 4 * hd
        insert(l, 1, metric_only=last)
        if x.shape[0]:
            x = mlp_residual(W, l, x)
            flops += x.shape[0] * 6 * d * W.d_mlp
    insert(L, 0, metric_only=True)
    xf = rms_norm(x, W.norm, W.eps)
    j = t_pos - (T - k)
    res = base_contrib[row_prompt].clone()
    res[t_row, j] = metric.contrib(xf, row_prompt[t_row], j)
    stats["flops"] += flops + x.shape[0] * 2 * d * (1 if metric.name == "logit_diff" else W.embed.shape[0])
    return res.sum(1).view(V, N).mean(1)


def _variants(kind: Kind, W: Weights, base: dict[str, Tensor], src: dict[str, Tensor],
              k: int) -> tuple[list[tuple[int, ...]], Variants]:
    """Every index of `kind` as a variant, in TransformerLens's index order."""
    L, H = W.n_layers, W.n_heads
    T = base["resid_pre"].shape[2]
    dev = base["resid_pre"].device
    el, stage = kind.entry
    ar = lambda n: torch.arange(n, device=dev)
    if kind.act in ("q", "k", "v"):
        return _head_input_variants(kind, W, base, src, k)
    if kind.act == "z":
        dz = src["z"] - base["z"]                                           # [L, n, pos, head, d_head]
        Wo = torch.stack([W.wo_heads(l) for l in range(L)])                  # [L, head, d_head, d]
        nz = einops.reduce(dz != 0, "l n p h e -> l p h", "max")
        if kind.name == "z":
            idx = [(l, p, h) for l in range(L) for p in range(T) for h in range(H)]
            entry = ar(L).repeat_interleave(T * H)
            start = ar(T).repeat_interleave(H).repeat(L)
            live = nz.reshape(-1) & ~((entry == L - 1) & (start < T - k))

            def point(sel: Tensor) -> Tensor:
                l, p, h = sel // (T * H), (sel // H) % T, sel % H
                return einops.einsum(dz[l, :, p, h], Wo[l, h], "v n e, v e d -> v n d")
            return idx, Variants(entry, torch.ones_like(entry), torch.where(live, start, -1), point=point)
        idx = [(l, h) for l in range(L) for h in range(H)]
        nzp = einops.rearrange(nz, "l p h -> (l h) p")
        first = torch.where(nzp.any(1), nzp.float().argmax(1).long(), torch.full((L * H,), -1, device=dev))
        if k and L:  # at the last layer only the metric's positions matter
            lastl = ar(L * H) // H == L - 1
            first = torch.where(lastl & ~nzp[:, T - k:].any(1), -1, first)

        def dense(sel: Tensor) -> Tensor:
            l, h = sel // H, sel % H
            return einops.einsum(dz[l, :, :, h], Wo[l, h], "v n p e, v e d -> v n p d")
        entry = ar(L).repeat_interleave(H)
        return idx, Variants(entry, torch.ones_like(entry), first, dense=dense)
    act = kind.act if kind.act != "resid_post" else "resid_pre"
    lo = 1 if kind.act == "resid_post" else 0
    diff = (src[act][lo:lo + L] - base[act][lo:lo + L])                      # [L, n, pos, d]
    idx = [(l, p) for l in range(L) for p in range(T)]
    entry = ar(L).repeat_interleave(T) + el
    start = ar(T).repeat(L)
    nz = einops.reduce(diff != 0, "l n p d -> (l p)", "max")
    # after the last attention a change at a position the metric does not read cannot reach it
    late = (entry == L) | ((entry == L - 1) & (stage == 1))
    live = nz & ~(late & (start < T - k))
    flat = einops.rearrange(diff, "l n p d -> (l p) n d")
    return idx, Variants(entry, torch.full_like(entry, stage), torch.where(live, start, -1),
                          point=lambda sel: flat[sel])


def _head_input_variants(kind: Kind, W: Weights, base: dict[str, Tensor], src: dict[str, Tensor],
                         k: int) -> tuple[list[tuple[int, ...]], Variants]:
    """Query, key and value heads. A variant's change enters after its layer's attention: the
    attention of the heads it touches is recomputed exactly with the source run's query (or key,
    or value) swapped in, against the base run's others. A query at one position changes that
    position's head output only (a point change); a key or value at position p changes every
    later position of each query head in its group (dense), which is why, with grouped-query
    attention, one key/value head is patched for all the query heads sharing it."""
    L, H, G, dh = W.n_layers, W.n_heads, W.n_heads // W.n_kv, W.d_head
    T = base["resid_pre"].shape[2]
    dev = base["resid_pre"].device
    a = kind.act
    nh = kind.n_heads(H, W.n_kv)
    ar = lambda n: torch.arange(n, device=dev)
    nz = einops.reduce(src[a] != base[a], "l n p h e -> l p h", "max")
    Wo = torch.stack([W.wo_heads(l) for l in range(L)])                   # [L, head, d_head, d]

    def heads(l: Tensor, h: Tensor) -> Tensor:
        """[v, G'] query heads a variant's head feeds: itself (q), or its key/value group."""
        return h[:, None] if a == "q" else h[:, None] * G + ar(G)[None, :]

    def attention(l: Tensor, h: Tensor, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """(patched minus base head outputs [v, n, pos, G', d_head], the query heads [v, G'])."""
        qh = heads(l, h)
        q = base["q"][l[:, None], :, :, qh]                                # [v, G', n, T, e]
        kk = base["k"][l[:, None], :, :, qh // G]
        vv = base["v"][l[:, None], :, :, qh // G]
        swap = {"q": q, "k": kk, "v": vv}[a]
        new = src[a][l[:, None], :, :, h[:, None] if a == "q" else h[:, None].expand_as(qh)]
        if pos is None:
            swap = new
        else:
            at = (ar(T)[None, :] == pos[:, None])[:, None, None, :, None]    # [v, 1, 1, T, 1]
            swap = torch.where(at, new, swap)
        q, kk, vv = (swap if a == x else y for x, y in (("q", q), ("k", kk), ("v", vv)))
        z = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)        # [v, G', n, T, e]
        z_base = base["z"][l[:, None], :, :, qh]
        return einops.rearrange(z - z_base, "v g n p e -> v n p g e"), qh

    def delta(z: Tensor, l: Tensor, qh: Tensor) -> Tensor:
        return einops.einsum(z, Wo[l[:, None], qh], "v n p g e, v g e d -> v n p d")

    if "pos" in kind.dims:
        idx = [(l, p, h) for l in range(L) for p in range(T) for h in range(nh)]
        entry = ar(L).repeat_interleave(T * nh)
        start = ar(T).repeat_interleave(nh).repeat(L)
        live = nz.reshape(-1)
        if a == "q":  # a query changes its own position only, which at the last layer the metric may not read
            live = live & ~((entry == L - 1) & (start < T - k))

        def unpack(sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return sel // (T * nh), (sel // nh) % T, sel % nh

        if a == "q":
            def point(sel: Tensor) -> Tensor:
                """Only the patched query's own row of attention: the source query at p against the
                base run's keys up to p."""
                l, p, h = unpack(sel)
                g = h // G
                s = einops.einsum(src["q"][l, :, p, h], base["k"][l, :, :, g], "v n e, v n t e -> v n t") / dh ** 0.5
                s = s.masked_fill(ar(T)[None, None, :] > p[:, None, None], float("-inf"))
                z = einops.einsum(s.softmax(-1), base["v"][l, :, :, g], "v n t, v n t e -> v n e")
                return einops.einsum(z - base["z"][l, :, p, h], Wo[l, h], "v n e, v e d -> v n d")
            return idx, Variants(entry, torch.ones_like(entry), torch.where(live, start, -1), point=point)

        def dense(sel: Tensor) -> Tensor:
            l, p, h = unpack(sel)
            z, qh = attention(l, h, p)
            return delta(z, l, qh)
        return idx, Variants(entry, torch.ones_like(entry), torch.where(live, start, -1), dense=dense)
    idx = [(l, h) for l in range(L) for h in range(nh)]
    nzp = einops.rearrange(nz, "l p h -> (l h) p")
    first = torch.where(nzp.any(1), nzp.float().argmax(1).long(), torch.full((L * nh,), -1, device=dev))
    if a == "q" and k:  # at the last layer a query matters only where the metric reads
        lastl = ar(L * nh) // nh == L - 1
        first = torch.where(lastl & ~nzp[:, T - k:].any(1), -1, first)

    def dense_all(sel: Tensor) -> Tensor:
        l, h = sel // nh, sel % nh
        z, qh = attention(l, h, None)
        return delta(z, l, qh)
    entry = ar(L).repeat_interleave(nh)
    return idx, Variants(entry, torch.ones_like(entry), first, dense=dense_all)


def take(var: Variants, sel: Tensor) -> Chunk:
    return Chunk(var.entry[sel], var.stage[sel], var.start[sel],
                  None if var.point is None else var.point(sel), None if var.dense is None else var.dense(sel))


def plan_chunks(var: Variants, W: Weights, N: int, T: int, budget_bytes: float) -> list[Tensor]:
    """Live variants, sorted by start (tight attention padding), cut to fit the memory budget."""
    live = torch.nonzero(var.start >= 0).flatten()
    if live.numel() == 0:
        return []
    live = live[torch.argsort(var.start[live], stable=True)]
    el = W.embed.element_size()
    per_tok = el * (4 * W.d_model + 2 * W.wqkv[0].shape[1] + 3 * 2 * W.d_mlp)
    per_row = el * (2 * T * W.n_kv * W.d_head + 2 * W.n_heads * T * T + T * W.n_heads * W.d_head
                    + (T * W.d_model if var.dense is not None else W.d_model))
    cost = ((T - var.start[live]).float() * per_tok + per_row) * N
    cuts, acc, begin = [], 0.0, 0
    for i, c in enumerate(cost.tolist()):
        if acc + c > budget_bytes and i > begin:
            cuts.append(live[begin:i])
            begin, acc = i, 0.0
        acc += c
    cuts.append(live[begin:])
    return cuts


def default_budget(device: torch.device | str = "cpu") -> float:
    """Bytes one chunk of variants may hold: half the free GPU memory; on CPU 48 MiB, because
    chunks that stay in the caches ran faster there than bigger ones (measured on the small and
    large presets: 32-64 MiB best; 12 MiB cost the large preset 15-30%, 192 MiB 5-10%)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    return 48 * 2**20


# --- results ----------------------------------------------------------------------------------
@dataclass
class PatchResult:
    """Metric after patching each index of `kind`, with everything needed to read it.

    `values` holds the raw metric; `normalised()` maps the model's own corrupted run to 0 and the
    clean run to 1 (or uses `scale`, the triggered-minus-untriggered gap of a reference model,
    so a model without a backdoor reads ~0 instead of noise divided by noise).
    `effect()` is the share of the behaviour a component carries: the normalised value when
    denoising, one minus it when noising.
    """

    kind: str
    values: Tensor
    dims: tuple[str, ...]
    hook_names: list[str]
    tokens: list[str]
    clean_metric: float
    corrupted_metric: float
    direction: str = "denoising"
    method: str = "exact"
    scale: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.scale if self.scale is not None else self.clean_metric - self.corrupted_metric

    def normalised(self) -> Tensor:
        return (self.values - self.corrupted_metric) / self.gap

    def effect(self) -> Tensor:
        if self.direction == "denoising":
            return self.normalised()
        return (self.clean_metric - self.values) / self.gap

    def with_scale(self, scale: float | None) -> PatchResult:
        return PatchResult(**{**self.__dict__, "scale": scale})

    def index(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*[range(s) for s in self.values.shape]))

    def to_frame(self) -> pd.DataFrame:
        """One row per patched index: hook name, layer, position/token, head, value, effect."""
        idx = self.index()
        vals, norm, eff = (t.flatten().tolist() for t in (self.values, self.normalised(), self.effect()))
        rows = []
        for ix, v, n, e in zip(idx, vals, norm, eff):
            r = dict(zip(self.dims, ix))
            rows.append({"kind": self.kind, "hook": self.hook_names[r["layer"]], **r,
                         **({"token": self.tokens[r["pos"]]} if "pos" in r else {}),
                         "value": v, "normalised": n, "effect": e})
        df = pd.DataFrame(rows)
        for key in ("checkpoint", "backdoor", "metric"):
            if key in self.provenance:
                df[key] = self.provenance[key]
        df["method"], df["direction"] = self.method, self.direction
        return df


def token_labels_of(batch: PairBatch, metric: str) -> list[str]:
    return batch.token_labels(metric)


# --- the public entry points ------------------------------------------------------------------
@dataclass
class Runs:
    """The two unpatched runs of one batch, cached for every kind that is patched next.
    `cache`: where the activations came from: "hit" (the activation cache), "miss" (computed and
    stored there) or "off" (computed, no cache)."""

    W: Weights
    metric: Metric
    clean_contrib: Tensor
    corrupted_contrib: Tensor
    clean: dict[str, Tensor]
    corrupted: dict[str, Tensor]
    cache: str = "off"

    def oriented(self, metric: str, direction: str) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """(base activations, source activations, base contributions) for `direction`, after
        checking that these runs score `metric`: what every patching method starts from."""
        if self.metric.name != metric:
            raise ConfigError(f"the prepared runs score {self.metric.name!r}, not {metric!r}; prepare them again")
        if direction == "denoising":
            return self.corrupted, self.clean, self.corrupted_contrib
        return self.clean, self.corrupted, self.clean_contrib


DEFAULT_ACTS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z")


def acts_for(kinds: Sequence[str]) -> tuple[str, ...]:
    """The cached activations that patching `kinds` reads: the default set (one activation-cache
    entry shared by every default analysis), plus queries only when a head-input kind asks."""
    extra = {a for k in kinds for a in get_kind(k).needs} - set(DEFAULT_ACTS)
    return DEFAULT_ACTS + tuple(sorted(extra))
CACHE_ENGINE = "workbench.patching.run_cache/1"  # bump when what the cached runs hold changes


def _act_hooks(W: Weights, act: str) -> list[str]:
    """TL hook names of the per-layer tensors a stacked activation holds (stored one per hook).
    The residual stack has one more entry, the final residual (`blocks.{L-1}.hook_resid_post`);
    keys are stored rotated, as attention reads them."""
    L = W.n_layers
    if act == "resid_pre":
        return [HOOK_KINDS["resid_pre"].format(l=l) for l in range(L)] + [HOOK_KINDS["resid_post"].format(l=L - 1)]
    if act in ("q", "k"):
        return [f"blocks.{l}.attn.hook_rot_{act}" for l in range(L)]
    if act == "v":
        return [f"blocks.{l}.attn.hook_v" for l in range(L)]
    return [HOOK_KINDS[act].format(l=l) for l in range(L)]


def resolve_cache(cache: Any, model: Any, checkpoint_sha: str | None) -> tuple[Any, str | None]:
    """(ActivationCache or None, checkpoint hash) for a `cache=` argument.

    None/False: no cache. True: the process's default cache (`$WORKBENCH_CACHE` or cached_acts/).
    An `ActivationCache`: that one. A cache needs the checkpoint's weight hash: `checkpoint_sha`, or
    the one `loading.bridge` recorded for the model."""
    if cache is None or cache is False:
        return None, None
    sha = checkpoint_sha or loading.checkpoint_sha(model)
    if not sha:
        raise ConfigError("the activation cache keys entries by the checkpoint's weight hash, and this model "
                          "was not loaded through workbench.loading.bridge: pass checkpoint_sha="
                          "suite.sha256(name), or cache=False")
    if cache is True:
        return default_cache(), sha
    if not isinstance(cache, ActivationCache):
        raise ConfigError(f"cache= takes True, False, None or an ActivationCache, not {type(cache).__name__}")
    return cache, sha


def cached_runs(model: Any, tokens: Tensor, acts: Sequence[str], keep_kv: bool = True, cache: Any = None,
                checkpoint_sha: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The activations `acts` (stacked over layers, as `run_cache` returns them) of a dense run over
    `tokens`, read through the activation cache when one is given; and "hit", "miss" or "off".

    The entry's key: the checkpoint's weight hash, the token ids, the per-layer TL hook names, the
    dtype, and `extra` = this engine's version and the model class (a bridge in compatibility mode
    and the plain HF model compute differently folded activations). The metric is not part of it:
    the metric's contributions are recomputed from the cached final residual, so one entry serves
    every metric on the same tokens. With or without the cache the same tensors come out (the stored
    float32 copies are bit-identical), so results do not depend on whether it was used.
    """
    architectures.check_engine(model)
    architectures.check_window(model, int(tokens.shape[1]))
    W = weights(model)
    acts = sorted({"resid_pre" if a == "resid_post" else a for a in acts} | {"resid_pre"})
    stacked = acts + [a for a in ("k", "v") if keep_kv and a not in acts]
    hooks = {a: _act_hooks(W, a) for a in stacked}

    def compute() -> dict[str, Tensor]:
        dummy = _NoMetric()
        _, out = run_cache(W, tokens.to(W.embed.device), dummy, acts, keep_kv=keep_kv)
        return {h: out[a][i] for a in stacked for i, h in enumerate(hooks[a])}

    c, sha = resolve_cache(cache, model, checkpoint_sha)
    if c is None:
        flat, status = compute(), "off"
    else:
        key = make_key(sha, tokens, [h for a in stacked for h in hooks[a]], W.embed.dtype,
                       extra={"engine": CACHE_ENGINE, "model": type(model).__name__})
        before = c.stats.misses
        flat = c.get_or_compute(key, compute, meta={"engine": CACHE_ENGINE, "acts": stacked,
                                                     "n_rows": int(tokens.shape[0])})
        status = "miss" if c.stats.misses > before else "hit"
    dev = W.embed.device
    return {a: torch.stack([flat[h] for h in hooks[a]]).to(dev) for a in stacked}, status


class _NoMetric(Metric):
    """Reads nothing: cached runs store activations only (the metric is applied afterwards)."""

    k = 0

    def dense(self, xf: Tensor) -> Tensor:
        return xf.new_zeros(xf.shape[0], 0)


@torch.no_grad()
def prepare(model: Any, batch: PairBatch, metric: str | Metric = "logit_diff",
            acts: Sequence[str] = DEFAULT_ACTS, cache: Any = None, checkpoint_sha: str | None = None) -> Runs:
    """Both dense runs, caching the residual stream, keys/values and the activations in `acts`.

    `cache`: read/write these runs through the activation cache (True: the default one; see
    `cached_runs`), so a rerun of the same analysis reads them instead of recomputing.
    """
    architectures.check_engine(model)
    W = weights(model)
    m = make_metric(batch, metric, model) if isinstance(metric, str) else metric
    clean_t, corr_t = batch.inputs(m.name)
    check_aligned(clean_t, corr_t)
    need = sorted(set(acts) | {"resid_pre", "resid_mid"})
    N = clean_t.shape[0]
    # one forward over both prompt sets: twice the rows per GEMM (the metric maps row r to prompt r % N)
    cache_, status = cached_runs(model, torch.cat([clean_t, corr_t]), need, keep_kv=True, cache=cache,
                                 checkpoint_sha=checkpoint_sha)
    contrib = contributions(W, cache_["resid_pre"][-1], m)
    cache_c = {a: v[:, :N] for a, v in cache_.items()}
    cache_x = {a: v[:, N:] for a, v in cache_.items()}
    return Runs(W, m, contrib[:N], contrib[N:], cache_c, cache_x, status)


def _tokens_and_names(W: Weights, kind: Kind, batch: PairBatch, metric: str) -> tuple[list[str], list[str]]:
    return token_labels_of(batch, metric), [HOOK_KINDS[kind.hook].format(l=l) for l in range(W.n_layers)]


@torch.no_grad()
def exact(model: Any, batch: PairBatch, kind: str = "resid_pre", metric: str = "logit_diff",
          direction: str = "denoising", runs: Runs | None = None, memory_bytes: float | None = None,
          scale: float | None = None, progress: bool = True, cache: Any = None,
          checkpoint_sha: str | None = None) -> PatchResult:
    """Exact activation patching of every index of `kind`, equal to TransformerLens's helper.

    denoising: the corrupted run with one clean activation patched in (TL's convention);
    noising: the clean run with one corrupted activation patched in.
    `cache`/`checkpoint_sha`: read the two dense runs through the activation cache (see `prepare`).
    """
    K = get_kind(kind)
    check_direction(direction)
    t0 = time.perf_counter()
    own_runs = runs is None
    runs = runs or prepare(model, batch, metric, acts=K.needs, cache=cache, checkpoint_sha=checkpoint_sha)
    base, src, base_c = runs.oriented(metric, direction)
    W, m = runs.W, runs.metric
    N, T = base["resid_pre"].shape[1:3]
    idx, var = _variants(K, W, base, src, m.k)
    out = torch.full((len(idx),), float(base_c.sum(1).mean()), dtype=torch.float64)
    stats = {"flops": 2 * dense_flops(W, N, T, m) if own_runs else 0.0}
    budget = memory_bytes or default_budget(W.embed.device)
    chunks = plan_chunks(var, W, N, T, budget)
    for sel in tqdm(chunks, desc=f"patch {kind}", disable=not progress or len(chunks) < 2, leave=False):
        out[sel.cpu()] = suffix(W, base, take(var, sel), m, base_c, stats).double().cpu()
    shape = [W.n_layers] + [T if d == "pos" else K.n_heads(W.n_heads, W.n_kv) for d in K.dims[1:]]
    tokens, names = _tokens_and_names(W, K, batch, m.name)
    warn_small_gap(runs, scale)
    prov = {"kind": kind, "metric": m.name, "direction": direction, "method": "exact", "n_pairs": N, "n_pos": T,
            "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor, "n_variants": len(idx),
            "n_noop": int((var.start < 0).sum()), "n_chunks": len(chunks), "flops": stats["flops"],
            "activation_cache": runs.cache, "seconds": time.perf_counter() - t0}
    return PatchResult(kind, out.view(shape).float(), K.dims, names, tokens,
                       float(runs.clean_contrib.sum(1).mean()), float(runs.corrupted_contrib.sum(1).mean()),
                       direction, "exact", scale, prov)


def warn_small_gap(runs: Runs, scale: float | None, rel: float = 0.02) -> None:
    """Normalising by a gap that is mostly noise turns every effect into noise: say so."""
    c, x = float(runs.clean_contrib.sum(1).mean()), float(runs.corrupted_contrib.sum(1).mean())
    if scale is None and abs(c - x) < rel * max(abs(c), abs(x), 1.0):
        warnings.warn(f"clean ({c:.3g}) and corrupted ({x:.3g}) runs barely differ: this model shows little "
                      "of the behaviour on these pairs, so normalised effects are ill-conditioned; read the raw "
                      "values, or pass scale= (the gap of a model that has the behaviour)", stacklevel=4)


def dense_flops(W: Weights, N: int, T: int, m: Metric) -> float:
    f = W.flops_per_token()
    per_layer = N * T * (f["attn_linear"] + f["mlp"]) + N * T * (T + 1) / 2 * f["score_per_key"]
    return W.n_layers * per_layer


def exact_all(model: Any, batch: PairBatch, kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z", "z_all_pos"),
              metric: str = "logit_diff", direction: str = "denoising", cache: Any = None,
              checkpoint_sha: str | None = None, **kw: Any) -> dict[str, PatchResult]:
    """Several kinds sharing one pair of dense runs (read through the activation cache if `cache`)."""
    check_direction(direction)
    runs = prepare(model, batch, metric, acts=acts_for(kinds), cache=cache, checkpoint_sha=checkpoint_sha)
    return {k: exact(model, batch, k, metric, direction, runs=runs, **kw) for k in kinds}


def metric_values(model: Any, batch: PairBatch, metric: str = "logit_diff", cache: Any = None,
                  checkpoint_sha: str | None = None) -> tuple[float, float]:
    """(clean, corrupted) metric of `model` on `batch`: the two ends of the normalisation.
    With a cache it reads the same entry as `exact_all` (the default activations), so it is a hit
    after any patching of the same checkpoint and batch."""
    with torch.no_grad():
        runs = prepare(model, batch, metric, acts=DEFAULT_ACTS if cache else (), cache=cache,
                       checkpoint_sha=checkpoint_sha)
    return float(runs.clean_contrib.sum(1).mean()), float(runs.corrupted_contrib.sum(1).mean())

