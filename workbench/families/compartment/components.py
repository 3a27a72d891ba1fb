"""The trigger circuit C as parameters: which rows and columns of which matrices C uses.

The patching circuit names activations (`blocks.1.attn.hook_z@12.h3`, `blocks.0.hook_mlp_out@15`);
the compartmentalisation test needs weights. A head is its q rows and its o columns; with grouped
query attention its k and v rows belong to its KV head, a component of its own shared by the heads
of its group; an MLP is its gate, up and down matrices. Positions do not matter for weights. Norms,
embeddings and the unembedding belong to no component: they are reported apart.

So every layer has three kinds of component (head, kv, mlp), each kind of one parameter count,
which is what lets the null distribution draw random sets "matched in kind and parameter count".
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from workbench.core.errors import ConfigError
from workbench.suite.params import Heads, Param

Component = tuple[str, int, int]     # (kind, layer, index): ("head", 1, 3), ("kv", 1, 1), ("mlp", 0, 0)
KINDS = ("head", "kv", "mlp")


@dataclass(frozen=True)
class Circuit:
    """A set of components, and where it was read from."""

    components: frozenset[Component]
    source: str = ""

    def of_kind(self, kind: str) -> list[Component]:
        return sorted(c for c in self.components if c[0] == kind)

    def describe(self) -> str:
        parts = [f"L{l}.h{i}" for _, l, i in self.of_kind("head")] + [f"L{l}.kv{i}" for _, l, i in self.of_kind("kv")]
        parts += [f"L{l} MLP" for _, l, _ in self.of_kind("mlp")]
        return ", ".join(parts) or "(empty)"


@dataclass(frozen=True)
class Universe:
    """Every component of a model."""

    n_layers: int
    heads: Heads

    def components(self, kind: str | None = None) -> list[Component]:
        out: list[Component] = []
        for layer in range(self.n_layers):
            out += [("head", layer, h) for h in range(self.heads.n_heads)]
            out += [("kv", layer, g) for g in range(self.heads.n_kv_heads)]
            out.append(("mlp", layer, 0))
        return [c for c in out if kind is None or c[0] == kind]


def circuit_from_nodes(nodes: pd.DataFrame, universe: Universe, source: str = "") -> Circuit:
    """Components from circuit nodes (columns kind, layer, head): a head node (`z`, `q`, `k`, `v`, any
    position) is its head and its KV head; `attn_out` is every head of its layer; `mlp_out` its MLP.
    Residual-stream nodes name no weights and are skipped."""
    comps: set[Component] = set()
    g = universe.heads.group
    for _, r in nodes.iterrows():
        kind, layer = str(r["kind"]), int(r["layer"])
        if layer < 0 or layer >= universe.n_layers:
            raise ConfigError(f"the circuit names layer {layer}, but the model has {universe.n_layers} layers")
        base = kind.replace("_all_pos", "")
        if base in ("z", "q", "k", "v") and pd.notna(r.get("head")):
            h = int(r["head"])
            if base in ("k", "v"):          # a k/v node is a KV head: every query head of its group reads it
                comps.add(("kv", layer, h))
                comps.update(("head", layer, q) for q in range(h * g, (h + 1) * g))
            else:
                comps.add(("head", layer, h))
                comps.add(("kv", layer, h // g))
        elif base == "attn_out":
            comps.update(("head", layer, h) for h in range(universe.heads.n_heads))
            comps.update(("kv", layer, k) for k in range(universe.heads.n_kv_heads))
        elif base == "mlp_out":
            comps.add(("mlp", layer, 0))
    return Circuit(frozenset(comps), source)


def slices(param: Param, heads: Heads) -> list[tuple[Component, int, slice]]:
    """The components a tensor is part of: (component, axis, index range along that axis)."""
    if param.layer is None or param.kind != "weight":
        return []
    hd, L = heads.head_dim, param.layer
    if param.module == "q":
        return [(("head", L, h), 0, slice(h * hd, (h + 1) * hd)) for h in range(heads.n_heads)]
    if param.module in ("k", "v"):
        return [(("kv", L, g), 0, slice(g * hd, (g + 1) * hd)) for g in range(heads.n_kv_heads)]
    if param.module == "o":
        return [(("head", L, h), 1, slice(h * hd, (h + 1) * hd)) for h in range(heads.n_heads)]
    if param.module in ("gate", "up", "down"):
        return [(("mlp", L, 0), 0, slice(None))]
    return []


def mask(param: Param, shape: tuple[int, ...], heads: Heads, comps: Iterable[Component]) -> torch.Tensor:
    """Boolean mask of the entries of a tensor that belong to components `comps`."""
    inside = set(comps)
    m = torch.zeros(shape, dtype=torch.bool)
    for comp, axis, sl in slices(param, heads):
        if comp in inside:
            if axis == 0:
                m[sl] = True
            else:
                m[:, sl] = True
    return m


def energies(deltas: dict[str, torch.Tensor], params: dict[str, Param], heads: Heads) -> pd.DataFrame:
    """Per component: the squared norm of the update on its parameters, and how many it has; plus
    one row per tensor outside every component (kind "other")."""
    rows: dict[Component, dict[str, Any]] = {}
    other: list[dict[str, Any]] = []
    for name, d in deltas.items():
        sl = slices(params[name], heads)
        if not sl:
            other.append({"kind": "other", "layer": params[name].layer if params[name].layer is not None else -1,
                          "index": 0, "name": name, "energy": float(d.double().square().sum()), "n_params": d.numel()})
            continue
        for comp, axis, s in sl:
            part = d[s] if axis == 0 else d[:, s]
            r = rows.setdefault(comp, {"kind": comp[0], "layer": comp[1], "index": comp[2], "name": "",
                                       "energy": 0.0, "n_params": 0})
            r["energy"] += float(part.double().square().sum())
            r["n_params"] += part.numel()
    return pd.DataFrame(list(rows.values()) + other)
