"""Circuits: the smallest set of components that carries the backdoor, and how it changes along a
series of checkpoints ("does the circuit survive safety training?").

A circuit is read off single-component patching results (exact or AtP): components are ranked
by effect, and the smallest top-k whose *joint* patch recovers `fraction` (default 0.9) of the
clean-vs-corrupted gap is the circuit. Faithfulness is always measured by patching exactly that
set in one forward pass, never inferred from the single effects (effects do not add up).

Components are named by TransformerLens hook names plus position and head, as everywhere else:
`blocks.1.attn.hook_z@12.h3`, `blocks.0.hook_mlp_out@15`.

`tasks/circuit.py` follows the circuit along a series of checkpoints.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.families.patching.engine.exact import (
    PatchResult,
    Runs,
    acts_for,
    forward,
    get_kind,
    metric_values,
    prepare,
    run_cache,
)
from workbench.suite import architectures
from workbench.interp.decoder import Weights, weights
from workbench.interp.hooks import HOOK_KINDS
from workbench.interp.metrics import make_metric, oriented
from workbench.interp.pairs import PairBatch

NODE_KINDS = ("z", "mlp_out", "attn_out", "resid_pre", "z_all_pos", "q", "k", "v", "q_all_pos", "k_all_pos", "v_all_pos")
DEFAULT_NODES = ("z", "mlp_out")


@dataclass(frozen=True, order=True)
class Node:
    """One component: a patch kind at a layer, and a position and/or head where the kind has one."""

    kind: str
    layer: int
    pos: int | None = None
    head: int | None = None

    @property
    def hook(self) -> str:
        return HOOK_KINDS[get_kind(self.kind).hook].format(l=self.layer)

    @property
    def label(self) -> str:
        return self.hook + ("" if self.pos is None else f"@{self.pos}") + ("" if self.head is None else f".h{self.head}")


def nodes_of(result: PatchResult) -> list[tuple[Node, float]]:
    """(node, effect) for every index of a patching result."""
    out = []
    for ix, e in zip(result.index(), result.effect().flatten().tolist()):
        r = dict(zip(result.dims, ix))
        out.append((Node(result.kind, r["layer"], r.get("pos"), r.get("head")), e))
    return out


# --- patching a set of nodes at once, for many sets in one batch ---------------------------------
@torch.no_grad()
def patch_sets(model: Any, batch: PairBatch, sets: Sequence[Sequence[Node]], metric: str = "logit_diff",
               direction: str = "denoising", cache: Any = None, checkpoint_sha: str | None = None,
               runs: Runs | None = None) -> Tensor:
    """Metric after patching every node of each set simultaneously (one row block per set).
    The source activations come from `runs` (`engine.exact.prepare` of the same batch and metric) if
    given, else from the activation cache with `cache`, else from a fresh run."""
    architectures.check_engine(model, "set patching (circuits)")
    W = weights(model)
    m = make_metric(batch, metric, model)
    base_t, src_t = oriented(batch, m.name, direction)
    dev = W.embed.device
    N, T = base_t.shape
    S = len(sets)
    acts = sorted({"resid_pre" if get_kind(n.kind).act == "resid_post" else get_kind(n.kind).act
                   for s in sets for n in s})
    if runs is None and cache:
        runs = prepare(model, batch, m, acts=acts_for({n.kind for s in sets for n in s}), cache=cache,
                       checkpoint_sha=checkpoint_sha)
    if runs is not None:
        if not set(acts) <= set(runs.clean):
            raise ConfigError(f"the prepared runs hold {sorted(runs.clean)}, not all of {acts}; prepare them again")
        src = runs.clean if direction == "denoising" else runs.corrupted
    else:
        _, src = run_cache(W, src_t.to(dev), m, acts) if acts else (None, {})
    masks = _masks(W, sets, T, dev)

    def hook(kind: str, l: int, a: Tensor) -> Tensor:
        key = (kind, l)
        if key not in masks:
            return a
        mask = masks[key]                                          # [S, pos] or [S, pos, head]
        a = a.unflatten(0, (S, N))
        s = src["resid_pre"][l + 1][None] if kind == "resid_post" else src[kind][l][None]
        mk = mask[:, None, :, :, None] if mask.ndim == 3 else mask[:, None, :, None]
        return torch.where(mk, s, a).flatten(0, 1)

    contrib, _ = forward(W, base_t.to(dev).repeat(S, 1), m, hook)
    return contrib.sum(1).unflatten(0, (S, N)).mean(1)


def _masks(W: Weights, sets: Sequence[Sequence[Node]], T: int, dev: torch.device) -> dict[tuple[str, int], Tensor]:
    out: dict[tuple[str, int], Tensor] = {}
    for i, s in enumerate(sets):
        for n in s:
            K = get_kind(n.kind)
            if not 0 <= n.layer < W.n_layers:
                raise ConfigError(f"{n.label}: layer out of range (0..{W.n_layers - 1})")
            head = "head" in K.dims                                     # outputs, queries, keys, values
            key = (K.act, n.layer)
            if key not in out:
                out[key] = torch.zeros((len(sets), T, K.n_heads(W.n_heads, W.n_kv)) if head else (len(sets), T),
                                       dtype=torch.bool, device=dev)
            pos = slice(None) if n.pos is None else n.pos
            if head:
                out[key][i, pos, slice(None) if n.head is None else n.head] = True
            else:
                out[key][i, pos] = True
    return out


# --- the minimal circuit -----------------------------------------------------------------------
@dataclass
class Circuit:
    """The smallest top-k set reaching `target` faithfulness, and how it was found."""

    nodes: list[Node]
    effects: list[float]                 # single-node effects, same order
    faithfulness: float                  # normalised metric with exactly these nodes patched
    target: float
    reached: bool
    curve: dict[int, float]              # k -> faithfulness of the top-k set (every k evaluated)
    clean_metric: float
    corrupted_metric: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def labels(self) -> list[str]:
        return [n.label for n in self.nodes]

    def to_frame(self) -> pd.DataFrame:
        df = pd.DataFrame([{"rank": i, "node": n.label, "kind": n.kind, "hook": n.hook, "layer": n.layer,
                            "pos": n.pos, "head": n.head, "effect": e}
                           for i, (n, e) in enumerate(zip(self.nodes, self.effects))])
        df["faithfulness"], df["target"] = self.faithfulness, self.target
        if "checkpoint" in self.provenance:
            df["checkpoint"] = self.provenance["checkpoint"]
        return df


def minimal_circuit(model: Any, batch: PairBatch, results: Sequence[PatchResult] | dict[str, PatchResult],
                    fraction: float = 0.9, metric: str | None = None, max_nodes: int | None = None,
                    cache: Any = None, checkpoint_sha: str | None = None) -> Circuit:
    """Rank the nodes of `results` by effect and find the smallest top-k whose joint patch recovers
    `fraction` of the gap. k is searched on a doubling grid (one batched forward), then by bisection,
    assuming faithfulness grows with k (each step is measured, so a violation cannot pass unseen:
    the answer is always a k whose measured faithfulness reached the target).
    `cache`: the unpatched runs come through the activation cache (see `engine.exact.prepare`)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must lie in (0, 1], got {fraction}")
    res = list(results.values()) if isinstance(results, dict) else list(results)
    if not res:
        raise ConfigError("minimal_circuit needs at least one patching result to rank nodes by")
    direction = res[0].direction
    metric = metric or res[0].provenance.get("metric", "logit_diff")
    ranked = sorted((ne for r in res for ne in nodes_of(r)), key=lambda ne: -ne[1])
    if max_nodes:
        ranked = ranked[:max_nodes]
    n_all = len(ranked)
    runs = prepare(model, batch, metric, acts=acts_for([r.kind for r in res]), cache=cache,
                   checkpoint_sha=checkpoint_sha) if cache else None
    if runs is not None:  # one read of the cache serves every faithfulness evaluation below
        clean_m, corr_m = float(runs.clean_contrib.sum(1).mean()), float(runs.corrupted_contrib.sum(1).mean())
    else:
        clean_m, corr_m = metric_values(model, batch, metric)
    gap = clean_m - corr_m

    def faith(ks: list[int]) -> dict[int, float]:
        vals = patch_sets(model, batch, [[n for n, _ in ranked[:k]] for k in ks], metric, direction, runs=runs)
        if direction == "denoising":
            f = (vals - corr_m) / gap
        else:
            f = (clean_m - vals) / gap
        return dict(zip(ks, f.tolist()))

    grid = sorted({min(2 ** i, n_all) for i in range(n_all.bit_length() + 1)})
    curve = faith(grid)
    hit = next((k for k in grid if curve[k] >= fraction), None)
    if hit is None:
        k = n_all
    else:
        lo = max([g for g in grid if g < hit], default=0)
        hi = hit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            curve.update(faith([mid]))
            if curve[mid] >= fraction:
                hi = mid
            else:
                lo = mid
        k = hi
    return Circuit([n for n, _ in ranked[:k]], [e for _, e in ranked[:k]], curve[k], fraction, curve[k] >= fraction,
                   dict(sorted(curve.items())), clean_m, corr_m,
                   {"metric": metric, "direction": direction, "n_ranked": n_all, "prompt_sha256": batch.sha256(),
                    **{k_: v for k_, v in res[0].provenance.items() if k_ in ("checkpoint", "sha256", "backdoor")}})
