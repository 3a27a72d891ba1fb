"""Which layer, module and heads a checkpoint tensor belongs to, from its name and the config.

Weight deltas are read per tensor but shown per layer and module (q, k, v, o, gate, up, down,
norms, embeddings, unembedding) and per attention head; this is the one place that knows how an
architecture names its parameters (`workbench.suite.architectures` says where each part lives) and
how a projection's rows or columns split into heads. q rows and o columns go by query head; with
grouped-query attention k and v rows go by KV head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from workbench.suite.architectures import LLAMA_MODULES, SUPPORT, Modules

MODULES = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "down", "ln1", "ln2", "final_norm", "unembed", "other")
RESIDUAL_WRITERS = ("o", "down")       # matrices whose outputs are added to the residual stream
RESIDUAL_READERS = ("q", "k", "v", "gate", "up")   # matrices applied to a normed residual stream
MLP_PATHS = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down", "mlp.w1": "gate",
             "mlp.w3": "up", "mlp.w2": "down", "mlp.c_fc": "up", "mlp.c_proj": "down"}


@dataclass(frozen=True)
class Heads:
    """How attention splits into heads."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return max(1, self.n_heads // max(1, self.n_kv_heads))


@dataclass(frozen=True)
class Param:
    """One tensor's place in the model."""

    name: str
    layer: int | None        # None: outside the decoder blocks (embeddings, final norm, unembedding)
    module: str              # one of MODULES
    kind: str                # "weight" or "bias"

    @property
    def group(self) -> str:
        return {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
                "down": "mlp", "ln1": "norm", "ln2": "norm", "final_norm": "norm"}.get(self.module, self.module)


def modules_for(config: dict[str, Any]) -> Modules:
    support = SUPPORT.get(config.get("model_type", "llama"))
    return support.modules if support else LLAMA_MODULES


def heads_of(config: dict[str, Any]) -> Heads | None:
    """The head layout a config.json states (None where it states none)."""
    n = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not n or not hidden:
        return None
    kv = config.get("num_key_value_heads") or n
    return Heads(int(n), int(kv), int(config.get("head_dim") or hidden // n))


def classify(name: str, modules: Modules = LLAMA_MODULES) -> Param:
    """A tensor name as (layer, module, weight/bias)."""
    kind = "bias" if name.endswith(".bias") else "weight"
    stem = re.sub(r"\.(weight|bias)$", "", name)
    m = re.match(rf"^(?:.*\.)?{re.escape(modules.layers.split('.')[-1])}\.(\d+)\.(.+)$", stem)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        qkv = dict(zip(modules.qkv, ("q", "k", "v"))) if not modules.fused_qkv else {modules.qkv[0]: "qkv"}
        table = {**qkv, modules.o_proj: "o", modules.ln1: "ln1", modules.ln2: "ln2", **MLP_PATHS}
        return Param(name, layer, table.get(rest, "other"), kind)
    for path, module in ((modules.embed, "embed"), (modules.final_norm, "final_norm"), (modules.unembed, "unembed")):
        last = path.split(".")[-1]
        if stem == path or stem == last or stem.endswith("." + last):
            return Param(name, None, module, kind)
    return Param(name, None, "other", kind)


def head_axis(module: str) -> int | None:
    """The axis of a weight [out, in] that splits into heads: rows for q/k/v, columns for o."""
    return {"q": 0, "k": 0, "v": 0, "o": 1}.get(module)


def n_head_groups(module: str, heads: Heads) -> int:
    """How many head slices a module's weight has (query heads for q and o, KV heads for k and v)."""
    return heads.n_kv_heads if module in ("k", "v") else heads.n_heads
