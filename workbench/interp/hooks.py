"""Hook names: the shared language of every result file.

Every analysis names components by TransformerLens hook names (`blocks.{l}.hook_resid_pre`,
`blocks.{l}.attn.hook_z`, ...), whichever backend computed them (the engine, nnsight or
TransformerLens itself):

- `hook_names(model, kind, layers)`: the canonical names, validated, so a typo or an out-of-range
  layer is a `ConfigError` that lists the valid choices instead of a silent empty cache;
- `parse_hook(name, n_layers)`: the (kind, layer) of a name, or that same error;
- `nnsight_site` / `nnsight_cache`: where each TL activation lives at an HF module boundary, so an
  nnsight trace reads the same names (the models come from `workbench.suite.loading`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from workbench.core.errors import ConfigError
from workbench.suite import architectures

# kind -> TransformerLens hook-name template; the shared language of every result file
HOOK_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
}
EXEC_ORDER = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")


def n_layers_of(model: Any) -> int:
    """Layer count of a bridge, an HF model, an nnsight model, or an int."""
    if isinstance(model, int):
        return model
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for attr in ("n_layers", "num_hidden_layers"):
        if cfg is not None and getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    raise ConfigError(f"cannot tell how many layers {type(model).__name__} has; pass a TransformerBridge, "
                      "an HF model, or the layer count")


def hook_names(model: Any, kind: str, layers: Iterable[int] | None = None) -> list[str]:
    """Canonical TL hook names of `kind` for `layers` (default: all), validated against `model`.

    Kinds: resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v. A full hook name is accepted as
    a kind too (`blocks.3.attn.hook_z`), and is checked the same way.
    """
    n = n_layers_of(model)
    if kind not in HOOK_KINDS:
        kind_, layer = parse_hook(kind, n)
        if layers is not None and list(layers) != [layer]:
            raise ConfigError(f"hook {kind!r} already names layer {layer}; do not pass layers={list(layers)}")
        return [HOOK_KINDS[kind_].format(l=layer)]
    ls = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in ls if not 0 <= x < n]
    if bad:
        raise ConfigError(f"layer(s) {bad} out of range: this model has {n} layers (valid: 0..{n - 1})")
    return [HOOK_KINDS[kind].format(l=x) for x in ls]


def parse_hook(name: str, n_layers: int, templates: dict[str, str] = HOOK_KINDS, noun: str = "hook",
               also: str = "") -> tuple[str, int]:
    """(kind, layer) of a canonical hook name, or a `ConfigError` naming the valid choices.
    `templates`/`noun`/`also`: another family of layer-templated names (path patching's receivers)."""
    parts = name.split(".")
    for kind, tmpl in templates.items():
        t = tmpl.split(".")
        if len(parts) == len(t) and all(a == b for a, b in zip(parts, t) if b != "{l}"):
            layer_str = parts[t.index("{l}")]
            if not layer_str.isdigit():
                break
            layer = int(layer_str)
            if not 0 <= layer < n_layers:
                raise ConfigError(f"{name!r}: layer {layer} out of range; this model has {n_layers} layers "
                                  f"(valid: 0..{n_layers - 1})")
            return kind, layer
    valid = ", ".join(f"{k} ({t})" for k, t in templates.items())
    raise ConfigError(f"unknown {noun} {name!r}; valid kinds and names: {valid}{also}")


def validate_hooks(model: Any, names: Sequence[str]) -> list[str]:
    """Check every name; return them unchanged (so callers can write `validate_hooks(m, names)`)."""
    n = n_layers_of(model)
    for name in names:
        parse_hook(name, n)
    return list(names)


# --- nnsight: the same TL-named activations from HF module boundaries ----------------------------
def nnsight_site(lm: Any, kind: str, layer: int) -> tuple[Any, str, int | None]:
    """Where TL activation `kind` at `layer` lives in an nnsight model of any supported
    architecture: (envoy, "input" or "output", item or None); see `suite.architectures.site`. A
    trace body reads it as `getattr(envoy, attr)`, then `[item]`: built-ins and envoys only,
    because a remote server runs the body without this package."""
    return architectures.site(lm, kind, layer)


def nnsight_cache(lm: Any, tokens: torch.Tensor, names: Sequence[str], remote: bool | str = False) -> dict[str, torch.Tensor]:
    """Run `tokens` through an nnsight model and return the named TL activations.

    `hook_z` comes back as [batch, pos, head, d_head] like TransformerLens (o_proj's input, split
    per query head; with grouped-query attention the heads are already expanded there).
    """
    cfg = lm.config
    n = int(cfg.num_hidden_layers)
    parsed = [(name, *parse_hook(name, n)) for name in names]
    # nnsight 0.8 serves module boundaries in execution order only: ask for them in that order
    parsed.sort(key=lambda t: (t[2], EXEC_ORDER.index(t[1])))
    sites = [(name, *nnsight_site(lm, kind, layer)) for name, kind, layer in parsed]
    saved: dict[str, Any] = {}
    with lm.trace(tokens, remote=remote):  # built-ins and envoys only: see nnsight_site
        for name, envoy, attr, item in sites:
            value = getattr(envoy, attr)
            saved[name] = (value if item is None else value[item]).save()
    out: dict[str, torch.Tensor] = {}
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for name, kind, _ in parsed:
        val = saved[name]
        val = getattr(val, "value", val)
        if kind in ("z", "q", "k", "v"):  # q/k/v: the projections' outputs, before RoPE, as TL's hook_q/k/v
            val = val.reshape(*val.shape[:-1], -1, d_head)
        out[name] = val.detach()
    return out
