"""The reference backend: TransformerLens's own patching on a `TransformerBridge`.

Slow (one forward pass per patched index, with a sync each time), and that is its job: the engine
and the nnsight backend are checked against these in the tests and `bench/patching.py`, which
measures the engine's speed-up over them.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from workbench.families.patching.engine.exact import (
    PatchResult,
    get_kind,
    token_labels_of,
)
from workbench.families.patching.engine.paths import (
    Receiver,
    check_request,
    receiver_positions,
    sender_axes,
)
from workbench.interp.hooks import HOOK_KINDS, n_layers_of
from workbench.interp.metrics import make_metric, oriented
from workbench.interp.pairs import PairBatch


def tl_patch(bridge: Any, batch: PairBatch, kind: str = "resid_pre", metric: str = "logit_diff",
             direction: str = "denoising", progress: bool = False) -> PatchResult:
    """The same result through TransformerLens's own patching helpers: the reference (slow)."""
    from transformer_lens import patching as tlp

    K = get_kind(kind)
    m = make_metric(batch, metric)
    base_t, src_t = oriented(batch, m.name, direction)
    t0 = time.perf_counter()
    with torch.no_grad():
        src_logits, src_cache = bridge.run_with_cache(src_t)
        base_logits = bridge(base_t)
        fn = getattr(tlp, K.tl) if not K.tl.startswith("generic:") else _tl_resid_post
        quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
        with quiet:  # TL draws a progress bar per call
            vals = fn(bridge, base_t, src_cache, m.from_logits)
    src_m, base_m = float(m.from_logits(src_logits)), float(m.from_logits(base_logits))
    cm, xm = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    names = [HOOK_KINDS[K.hook].format(l=l) for l in range(n_layers_of(bridge))]
    prov = {"kind": kind, "metric": m.name, "direction": direction, "method": "tl", "n_pairs": len(batch),
            "prompt_sha256": batch.sha256(), "backdoor": batch.backdoor, "seconds": time.perf_counter() - t0}
    return PatchResult(kind, vals.detach().cpu().float(), K.dims, names, token_labels_of(batch, m.name), cm, xm,
                       direction, "tl", None, prov)


def _tl_resid_post(model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: Callable) -> Tensor:
    from transformer_lens import patching as tlp
    fn = partial(tlp.generic_activation_patch, patch_setter=tlp.layer_pos_patch_setter,
                 activation_name="resid_post", index_axis_names=("layer", "pos"))
    return fn(model, corrupted_tokens, clean_cache, metric)


# --- path patching: the two-pass hook algorithm, one sender at a time ---------------------------
def tl_path_patch(bridge: Any, batch: PairBatch, receiver_: Receiver | str, senders: str = "z_all_pos",
                  metric: str = "logit_diff", direction: str = "denoising", freeze: str = "all",
                  only: Sequence[tuple[int, ...]] | None = None) -> PatchResult:
    """The same result by the two-pass hook algorithm on a TransformerBridge, one sender per pair
    of forward passes (slow: the reference the tests and the benchmark compare with). `only`: the
    sender indices to compute (others are left at the base metric)."""
    r = check_request(bridge, receiver_, senders, freeze)
    m = make_metric(batch, metric)
    base_t, src_t = oriented(batch, m.name, direction)
    L, H = n_layers_of(bridge), int(bridge.cfg.n_heads)
    t0 = time.perf_counter()
    with torch.no_grad():
        src_logits, src_cache = bridge.run_with_cache(src_t)
        base_logits, base_cache = bridge.run_with_cache(base_t)
    T = base_t.shape[1]
    at_r = receiver_positions(r, T, base_t.device)
    dims, shape, names = sender_axes(senders, r, T, H)
    out = torch.full(shape, float(m.from_logits(base_logits)))
    indices = list(only) if only is not None else list(itertools.product(*[range(s) for s in shape]))
    zname, mname = HOOK_KINDS["z"], HOOK_KINDS["mlp_out"]
    rname = {"final": HOOK_KINDS["resid_post"].format(l=L - 1),
             "mlp_in": mname.format(l=r.layer)}.get(r.act, r.hook)
    for ix in indices:
        d = dict(zip(dims, ix))
        sl, sp, sh = d["layer"], d.get("pos"), d.get("head")

        def freeze_hook(act: Tensor, hook: Any, *, name: str, layer: int) -> Tensor:
            act = base_cache[name].clone()
            is_sender = layer == sl and ((senders.startswith("z") and name == zname.format(l=layer))
                                         or (senders == "mlp_out" and name == mname.format(l=layer)))
            if is_sender:
                pos = slice(None) if sp is None else sp
                if sh is None:
                    act[:, pos] = src_cache[name][:, pos]
                else:
                    act[:, pos, sh] = src_cache[name][:, pos, sh]
            return act

        recorded: dict[str, Tensor] = {}
        hooks = []
        if senders == "embed":
            def embed_hook(act: Tensor, hook: Any) -> Tensor:
                act = act.clone()
                act[:, sp] = src_cache["hook_embed"][:, sp]
                return act

            hooks.append(("hook_embed", embed_hook))
        for l in range(L):
            hooks.append((zname.format(l=l), _bind(freeze_hook, zname.format(l=l), l)))
            is_sender_mlp = senders == "mlp_out" and l == sl
            if freeze == "all" or is_sender_mlp:
                if not (r.act == "mlp_in" and l == r.layer):
                    hooks.append((mname.format(l=l), _bind(freeze_hook, mname.format(l=l), l)))
        def record(act: Tensor, hook: Any) -> Tensor:
            recorded["r"] = act.clone()
            return act

        hooks.append((rname, record))
        with torch.no_grad():
            bridge.run_with_hooks(base_t, fwd_hooks=hooks)

        def patch_receiver(act: Tensor, hook: Any) -> Tensor:
            new = recorded["r"]
            if r.act in ("q", "k", "v"):
                heads = list(r.heads) if r.heads is not None else list(range(act.shape[2]))
                mask = at_r[None, :, None, None] & torch.isin(torch.arange(act.shape[2]), torch.tensor(heads))[None, None, :, None]
            else:
                mask = at_r[None, :, None]
            return torch.where(mask, new, act)

        with torch.no_grad():
            logits = bridge.run_with_hooks(base_t, fwd_hooks=[(rname, patch_receiver)])
        out[ix] = float(m.from_logits(logits))
    src_m, base_m = float(m.from_logits(src_logits)), float(m.from_logits(base_logits))
    cm, xm = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    prov = {"kind": senders, "receiver": r.label, "freeze": freeze, "method": "tl_path", "metric": m.name,
            "direction": direction, "seconds": time.perf_counter() - t0, "n_computed": len(indices)}
    return PatchResult(senders, out, dims, names, batch.token_labels(m.name),
                       cm, xm, direction, "tl_path", None, prov)


def _bind(fn: Any, name: str, layer: int) -> Any:
    return lambda act, hook: fn(act, hook, name=name, layer=layer)
