"""TransformerLens hook names on a Hugging Face model: read (`capture`) or rewrite (`edit`) the
activation a TL hook names, with forward hooks at the module boundary where it lives
(`suite.architectures.site`). The SAE family reads and edits models this way rather than through a
TransformerBridge: the values are the bridge's (resid_pre agrees to 1e-5), loading is the suite's
cached HF model, and generation runs under an edit unchanged.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.interp.hooks import n_layers_of, parse_hook
from workbench.suite import architectures

EDITABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@contextlib.contextmanager
def edit(model: Any, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While inside: the activation at TL hook `hook` of HF `model` is replaced by `fn(activation)`
    ([batch, pos, d] in, the same shape out), in every forward pass (generation included)."""
    module, io, item = _site(model, hook)
    if io == "input":
        def pre(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(mod: Any, args: tuple, out: Any) -> Any:
            if isinstance(out, tuple):
                i = item or 0
                return out[:i] + (fn(out[i]),) + out[i + 1:]
            return fn(out)
        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()




def _site(model: Any, hook: str) -> tuple[Any, str, Any]:
    kind, layer = parse_hook(hook, n_layers_of(model))
    if kind not in EDITABLE:
        raise ConfigError(f"SAEs here read {', '.join(EDITABLE)} hooks; {hook} is a {kind} hook")
    return architectures.site(model, kind, layer)


@torch.no_grad()
def capture(model: Any, tokens: Tensor, hooks: Sequence[str], batch_size: int = 64) -> dict[str, Tensor]:
    """Activations [batch, pos, d] at TL `hooks` of HF `model` on `tokens` ([batch, pos] ids; right
    padding needs no mask, since a causal model's earlier positions never see it)."""
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    handles = []
    for h in hooks:
        module, io, item = _site(model, h)
        if io == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, h=h: out[h].append((args[0] if args else kwargs["hidden_states"]).float().cpu()),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, o, h=h, item=item: out[h].append((o[item or 0] if isinstance(o, tuple) else o).float().cpu())))
    try:
        for batch in tokens.split(batch_size):
            model(input_ids=batch)
    finally:
        for hd in handles:
            hd.remove()
    return {h: torch.cat(v) for h, v in out.items()}
