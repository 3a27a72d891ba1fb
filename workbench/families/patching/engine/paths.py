"""Path patching: how much of the behaviour flows along the direct path from a sender to a
receiver, every other component held at its base value (Wang et al. 2022, the IOI paper;
Goldowsky-Dill et al. 2023).

Node patching says *that* a component matters; path patching says *through whom*. A layer-0
head may copy the trigger onto the tokens after it, and node patching credits those tokens, but
only path patching into the head that reads the trigger out says whether the copies are read or
only travel along.

Definition (denoising: the base run is the corrupted one, the source the clean one; noising swaps
them). For a sender s (one head's output at every position or at one, or an MLP's output at one
position, or the token embedding at one position) and a receiver R (the query, key or value input
of some heads of one layer, optionally
at some positions; the MLP input of one layer; or the final residual the metric reads):

1. s's change to the residual stream, `source(s) - base(s)`, reaches R's input along the residual
   stream only: every component in between is frozen to the base run (`freeze="all"`), or only
   the attention heads are and the MLPs in between recompute (`freeze="heads"`, the IOI
   convention, which counts MLPs as part of the path).
2. R is recomputed from that input; nothing else in R's layer sees it.
3. From R on, the network runs normally and the metric is read.

Each sender is one variant of the batched suffix engine (`engine.exact.suffix`): its change enters
after R's attention (query/key/value receivers), after R's MLP (`mlp_in`) or at the final norm
(`final`), and only the layers from there and the positions from the sender's first change are
computed. `tl_path_patch` is the reference, the two-pass hook algorithm on a TransformerBridge
(pass 1: sender patched, everything else frozen, R's activation recorded; pass 2: R patched);
the tests compare the two at 1e-4.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.errors import ConfigError
from workbench.families.patching.engine.exact import (
    PatchResult,
    Runs,
    Variants,
    acts_for,
    default_budget,
    dense_flops,
    head_count,
    plan_chunks,
    prepare,
    suffix,
    take,
    warn_small_gap,
)
from workbench.interp.decoder import Weights, mlp, qkv
from workbench.interp.hooks import HOOK_KINDS, n_layers_of, parse_hook
from workbench.interp.metrics import check_direction
from workbench.interp.pairs import PairBatch
from workbench.suite import architectures

# sender kinds (named like the patch kinds they refine) and their result axes; `embed` is the token
# embedding at one position (TL's hook_embed; its layer axis has one entry), the graph's input
SENDERS: dict[str, tuple[str, ...]] = {"z_all_pos": ("layer", "head"), "z": ("layer", "pos", "head"),
                                       "mlp_out": ("layer", "pos"), "embed": ("layer", "pos")}
FREEZE = ("all", "heads")
_RECEIVER_HOOKS = {"q": HOOK_KINDS["q"], "k": HOOK_KINDS["k"], "v": HOOK_KINDS["v"],
                   "mlp_in": "blocks.{l}.hook_mlp_in"}


@dataclass(frozen=True)
class Receiver:
    """Where a path ends. `heads` index the receiver hook's own head axis (query heads for `q`;
    key/value heads for `k`/`v`, each shared by its group of query heads, as in TransformerLens's
    hook_k/hook_v), None for all; `positions` restrict which positions' inputs are recomputed
    (negative ones count from the end), None for all."""

    act: str
    layer: int
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    @property
    def hook(self) -> str:
        return "final" if self.act == "final" else _RECEIVER_HOOKS[self.act].format(l=self.layer)

    @property
    def label(self) -> str:
        pos = "" if self.positions is None else "@" + ",".join(map(str, self.positions))
        heads = "" if self.heads is None else ".h" + ",".join(map(str, self.heads))
        return self.hook + pos + heads

    def spec(self) -> dict[str, Any]:
        """What a saved result records of it (JSON: lists, not tuples)."""
        return {"act": self.act, "layer": self.layer, "heads": None if self.heads is None else list(self.heads),
                "positions": None if self.positions is None else list(self.positions)}

    @classmethod
    def from_spec(cls, d: dict[str, Any]) -> Receiver:
        return cls(d["act"], d["layer"], None if d["heads"] is None else tuple(d["heads"]),
                   None if d["positions"] is None else tuple(d["positions"]))

    @property
    def time(self) -> int:
        """Where R reads the residual stream, on a clock that ticks twice a layer (block input,
        after attention): a sender feeds R directly only if it writes no later than this."""
        return 2 * self.layer + (self.act == "mlp_in")


def receiver(model: Any, hook: str, heads: Sequence[int] | None = None,
             positions: Sequence[int] | None = None) -> Receiver:
    """A `Receiver` from a hook name (`blocks.1.attn.hook_v`, `blocks.2.hook_mlp_in`, or `final` for
    the residual the metric reads), checked against `model` (a bridge, an HF model or a layer
    count) so that a wrong layer, head or position is one clear error here, not an index error
    later."""
    L = n_layers_of(model)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if hook in ("final", "logits", HOOK_KINDS["resid_post"].format(l=L - 1)):
        act, layer = "final", L
    else:
        act, layer = parse_hook(hook, L, _RECEIVER_HOOKS, "receiver", ", or final (the residual the metric reads)")
    if heads is not None:
        if act not in ("q", "k", "v"):
            raise ConfigError(f"receiver {hook!r} has no heads; give heads only for a query/key/value hook")
        n = n_heads_of(cfg, act)
        bad = [h for h in heads if not 0 <= int(h) < n] if n else []
        if bad or not heads:
            raise ConfigError(f"head(s) {list(heads)} out of range for {hook!r}: it has {n} heads (valid: 0..{n - 1})")
        heads = tuple(sorted({int(h) for h in heads}))
    if positions is not None:
        if not positions:
            raise ConfigError("positions=[] selects nothing; give None for every position")
        positions = tuple(int(p) for p in positions)
    return Receiver(act, layer, heads, positions)


def n_heads_of(cfg: Any, act: str) -> int | None:
    """Size of `act`'s head axis in a bridge's or HF model's config (`engine.exact.head_count`)."""
    if cfg is None:
        return None
    n = getattr(cfg, "n_heads", None) or getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "n_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or n
    return head_count(act, int(n), int(kv))


def sender_label(kind: str, layer: int, head: Any = None) -> str:
    """A sender's short name in tables and figures: `embed`, `L0 MLP`, `L1.h2`."""
    return {"mlp_out": f"L{layer} MLP", "embed": "embed"}.get(kind) or f"L{layer}.h{int(head)}"


def _sender_time(kind: str, layer: Tensor) -> Tensor:
    """A head writes after its layer's attention (2l+1), an MLP at the next block's input (2l+2),
    the embedding before everything (0)."""
    return torch.zeros_like(layer) if kind == "embed" else 2 * layer + (1 if kind.startswith("z") else 2)


def n_senders(kind: str, r: Receiver) -> int:
    """How many layers hold senders upstream of `r` (the embedding: one, upstream of everything)."""
    if kind == "embed":
        return 1
    return (r.time - 1) // 2 + 1 if kind.startswith("z") else r.time // 2


def check_options(senders: Sequence[str], freeze: str) -> None:
    """The sender kinds and the freezing, checked before any model is touched."""
    bad = [s for s in senders if s not in SENDERS]
    if bad or not senders:
        raise ConfigError(f"unknown sender kind {', '.join(map(repr, bad)) or '(none given)'}; "
                          f"choose one of {list(SENDERS)}")
    if freeze not in FREEZE:
        raise ConfigError(f"freeze={freeze!r}: choose 'all' (direct paths) or 'heads' (MLPs in between recompute)")


def check_request(model: Any, receiver_: Receiver | str, senders: str, freeze: str) -> Receiver:
    """One path-patching request, checked against `model` (the engine, the hook reference and the
    nnsight path all take the same): its `Receiver`, with at least one sender upstream of it."""
    check_options([senders], freeze)
    r = receiver(model, receiver_) if isinstance(receiver_, str) else receiver_
    if n_senders(senders, r) == 0:
        alt = "embed" if r.time == 0 else "head senders (z, z_all_pos) or embed"
        raise ConfigError(f"no {senders} sender writes before {r.hook}: choose {alt}, or a later receiver")
    return r


def sender_axes(senders: str, r: Receiver, T: int, H: int) -> tuple[tuple[str, ...], list[int], list[str]]:
    """(dims, shape, per-layer TL hook names) of a path-patching result over the senders upstream of `r`."""
    dims, Ls = SENDERS[senders], n_senders(senders, r)
    hook = "hook_embed" if senders == "embed" else HOOK_KINDS["z" if senders.startswith("z") else "mlp_out"]
    return dims, [Ls] + [T if d == "pos" else H for d in dims[1:]], [hook.format(l=l) for l in range(Ls)]


def receiver_positions(r: Receiver, T: int, dev: torch.device) -> Tensor:
    """Boolean [T]: the positions whose receiver input is recomputed."""
    if r.positions is None:
        return torch.ones(T, dtype=torch.bool, device=dev)
    bad = [p for p in r.positions if not -T <= p < T]
    if bad:
        raise ConfigError(f"receiver position(s) {bad} out of range: the prompts have {T} positions")
    mask = torch.zeros(T, dtype=torch.bool, device=dev)
    mask[[p % T for p in r.positions]] = True
    return mask


def _path_variants(kind: str, r: Receiver, W: Weights, base: dict[str, Tensor], src: dict[str, Tensor],
                   k: int, freeze: str) -> tuple[list[tuple[int, ...]], Variants]:
    """Every sender of `kind` upstream of `r` as one variant of the suffix engine: its `dense`
    change is what R, recomputed from the sender's direct contribution, adds after itself."""
    L, H = W.n_layers, W.n_heads
    T = base["resid_pre"].shape[2]
    dev = base["resid_pre"].device
    ar = lambda n: torch.arange(n, device=dev)
    Ls = n_senders(kind, r)
    at_r = receiver_positions(r, T, dev)
    if kind.startswith("z"):
        dz = src["z"][:Ls] - base["z"][:Ls]                                    # [Ls, n, pos, head, e]
        Wo = torch.stack([W.wo_heads(l) for l in range(Ls)])                  # [Ls, head, e, d]
        nz = einops.reduce(dz != 0, "l n p h e -> l p h", "max")
        if kind == "z":
            idx = [(l, p, h) for l in range(Ls) for p in range(T) for h in range(H)]
            layer = ar(Ls).repeat_interleave(T * H)
            first = torch.where(nz.reshape(-1), ar(T).repeat_interleave(H).repeat(Ls), -1)
        else:
            idx = [(l, h) for l in range(Ls) for h in range(H)]
            layer = ar(Ls).repeat_interleave(H)
            nzp = einops.rearrange(nz, "l p h -> (l h) p")
            first = torch.where(nzp.any(1), nzp.float().argmax(1).long(), -1)
    else:
        dm = (src["resid_pre"][:1] - base["resid_pre"][:1] if kind == "embed"   # [Ls, n, pos, d]
              else src["mlp_out"][:Ls] - base["mlp_out"][:Ls])
        idx = [(l, p) for l in range(Ls) for p in range(T)]
        layer = ar(Ls).repeat_interleave(T)
        first = torch.where(einops.reduce(dm != 0, "l n p d -> (l p)", "max"), ar(T).repeat(Ls), -1)
    if r.act == "final":  # the final norm is read at the metric's positions only
        at_r = at_r & (ar(T) >= T - k)
    # R changes only at its own positions, from the sender's first change on
    reach = torch.where(at_r[None, :] & (ar(T)[None, :] >= first[:, None]), ar(T)[None, :], T).amin(1)
    start = torch.where((first >= 0) & (reach < T), reach, -1)
    t_send = _sender_time(kind, layer)

    def sender_delta(sel: Tensor) -> Tensor:
        """[v, n, pos, d]: what each selected sender adds to the residual stream where it writes."""
        N = base["resid_pre"].shape[1]
        if kind == "z_all_pos":
            l, h = sel // H, sel % H
            return einops.einsum(dz[l, :, :, h], Wo[l, h], "v n p e, v e d -> v n p d")
        out = base["resid_pre"].new_zeros(sel.numel(), N, T, W.d_model)
        if kind == "z":
            l, p, h = sel // (T * H), (sel // H) % T, sel % H
            out[ar(sel.numel()), :, p] = einops.einsum(dz[l, :, p, h], Wo[l, h], "v n e, v e d -> v n d")
        else:
            l, p = sel // T, sel % T
            out[ar(sel.numel()), :, p] = dm[l, :, p]
        return out

    def carried(delta: Tensor, ts: Tensor) -> Tensor:
        """The change as it reaches R: unchanged when everything in between is frozen; with
        `freeze="heads"`, each MLP between sender and R adds its own recomputed change."""
        if freeze == "all":
            return delta
        touched = delta.ne(0).any(-1, keepdim=True)  # [v, n, pos, 1]; MLPs are per position: it stays so
        for j in range(L):
            rows = torch.nonzero((ts <= 2 * j + 1) & (2 * j + 2 <= r.time)).flatten()
            if rows.numel():
                x = base["resid_mid"][j][None] + delta[rows]
                dmj = (mlp(W, j, x) - base["mlp_out"][j][None]) * touched[rows]
                delta = delta.index_add(0, rows, dmj)
        return delta

    def dense(sel: Tensor) -> Tensor:
        delta = carried(sender_delta(sel), t_send[sel])
        V, N = delta.shape[:2]
        if r.act == "final":
            return delta * at_r[None, None, :, None]
        if r.act == "mlp_in":
            x = base["resid_mid"][r.layer][None] + delta
            return (mlp(W, r.layer, x) - base["mlp_out"][r.layer][None]) * (at_r[None, None, :, None]
                                                                             & delta.ne(0).any(-1, keepdim=True))
        return _attention_change(W, r, base, base["resid_pre"][r.layer][None] + delta, at_r).view(V, N, T, -1)

    entry = torch.full_like(layer, L if r.act == "final" else r.layer + (r.act == "mlp_in"))
    stage = torch.full_like(layer, 1 if r.act in ("q", "k", "v") else 0)
    return idx, Variants(entry, stage, start, dense=dense)


def _attention_change(W: Weights, r: Receiver, base: dict[str, Tensor], x: Tensor, at_r: Tensor) -> Tensor:
    """[v*n, pos, d]: the attention output change of R's layer when R's heads read their query
    (key, value) from `x` [v, n, pos, d] at R's positions and everything else from the base run."""
    l, G, T = r.layer, W.n_heads // W.n_kv, x.shape[2]
    V, N = x.shape[:2]
    cos, sin = W.rope(T)
    q_new, k_new, v_new = qkv(W, l, x.flatten(0, 1), cos, sin)
    new = {"q": q_new, "k": k_new, "v": v_new}[r.act]
    nh = new.shape[2]
    heads = torch.tensor(r.heads if r.heads is not None else range(nh), device=x.device)
    qh = heads if r.act == "q" else (heads[:, None] * G + torch.arange(G, device=x.device)).flatten()
    rep = lambda t: t.repeat(V, 1, 1, 1)                                       # base [n, ...] -> [v*n, ...]
    acts = {a: rep(base[a][l]) for a in "qkv"}
    sw = acts[r.act]
    mask = at_r[None, :, None, None] & (torch.arange(nh, device=x.device)[None, None, :, None]
                                       == heads[None, None, None, :]).any(-1, keepdim=True)
    acts[r.act] = torch.where(mask, new, sw)
    q = acts["q"][:, :, qh]
    kk, vv = acts["k"][:, :, qh // G], acts["v"][:, :, qh // G]
    z = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                       is_causal=True).transpose(1, 2)         # [v*n, pos, |qh|, e]
    dz = z - rep(base["z"][l])[:, :, qh]
    return einops.einsum(dz, W.wo_heads(l)[qh], "m p h e, h e d -> m p d")


@torch.no_grad()
def path_patch(model: Any, batch: PairBatch, receiver_: Receiver | str, senders: str = "z_all_pos",
               metric: str = "logit_diff", direction: str = "denoising", freeze: str = "all",
               runs: Runs | None = None, memory_bytes: float | None = None, scale: float | None = None,
               progress: bool = True, cache: Any = None, checkpoint_sha: str | None = None) -> PatchResult:
    """The metric after patching the path from each sender of kind `senders` to `receiver_`
    (a `Receiver` or a hook name), as a `PatchResult` over the senders upstream of it: its
    `effect()` is the share of the behaviour that flows along each path.

    `runs`/`cache`: the two dense runs, shared with exact patching of the query kinds (the same
    activation-cache entry)."""
    architectures.check_engine(model, "path patching (the batched engine)")
    check_direction(direction)
    r = check_request(model, receiver_, senders, freeze)
    t0 = time.perf_counter()
    own = runs is None
    runs = runs or prepare(model, batch, metric, acts=acts_for(["q"]), cache=cache, checkpoint_sha=checkpoint_sha)
    base, src, base_c = runs.oriented(metric, direction)
    missing = {"q", "z", "mlp_out", "resid_mid"} - set(runs.clean)
    if missing:
        raise ConfigError(f"the prepared runs lack {sorted(missing)}; prepare them with acts=acts_for(['q'])")
    W, m = runs.W, runs.metric
    N, T = base["resid_pre"].shape[1:3]
    idx, var = _path_variants(senders, r, W, base, src, m.k, freeze)
    out = torch.full((len(idx),), float(base_c.sum(1).mean()), dtype=torch.float64)
    stats = {"flops": 2 * dense_flops(W, N, T, m) if own else 0.0}
    chunks = plan_chunks(var, W, N, T, memory_bytes or default_budget(W.embed.device))
    for sel in tqdm(chunks, desc=f"path {senders} -> {r.label}", disable=not progress or len(chunks) < 2,
                    leave=False):
        out[sel.cpu()] = suffix(W, base, take(var, sel), m, base_c, stats).double().cpu()
    dims, shape, names = sender_axes(senders, r, T, W.n_heads)
    warn_small_gap(runs, scale)
    prov = {"kind": senders, "receiver": r.label, "receiver_act": r.act, "receiver_layer": r.layer,
            "receiver_heads": list(r.heads) if r.heads is not None else None,
            "receiver_positions": list(r.positions) if r.positions is not None else None, "freeze": freeze,
            "metric": m.name, "direction": direction, "method": "path", "n_pairs": N, "n_pos": T,
            "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor, "n_variants": len(idx),
            "n_noop": int((var.start < 0).sum()), "n_chunks": len(chunks), "flops": stats["flops"],
            "activation_cache": runs.cache, "seconds": time.perf_counter() - t0}
    return PatchResult(senders, out.view(shape).float(), dims, names,
                       batch.token_labels(m.name), float(runs.clean_contrib.sum(1).mean()),
                       float(runs.corrupted_contrib.sum(1).mean()), direction, "path", scale, prov)
