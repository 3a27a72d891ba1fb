"""Validate a checkpoint folder before it joins a suite.

Registration is the one moment a checkpoint from elsewhere is looked at as a whole: afterwards every
analysis trusts the manifest. So each way the folder could load wrongly or not at all is checked
here, before anything is written, and reported as one `CheckpointError` that names the problem and
the fix, instead of surfacing later as a long transformers message deep inside an analysis or, worse,
not at all: a tensor the config expects but the files lack is initialised at random by
`from_pretrained`, with only a log line to say so.

The checks, in the order they run (cheapest first, so a wrong folder fails fast):
config (loads, architecture supported) -> tensor shapes against the config (headers only) ->
finite weights -> tokenizer -> HF/TransformerLens logit parity. An adapter is checked for what it
carries itself (finite weights, a readable adapter config, its tokenizer if it brings one).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from workbench.core.errors import CheckpointError, WorkbenchError
from workbench.suite import loading
from workbench.suite.architectures import check_supported
from workbench.world.tokenizer import load_tokenizer

INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
SHOWN = 5  # mismatches named in one message (the count says how many more)
# what a tokenizer can be saved as; tokenizer_config.json alone describes one but holds no vocabulary
TOKENIZER_SOURCES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
TOKENIZER_LOOKED_FOR = "tokenizer.json, tokenizer.model, vocab.json + merges.txt, tokenizer_config.json"
# tensors old exports carry that no current model has, and that transformers drops on load
BENIGN_EXTRA = (r"rotary_emb\.inv_freq$",)


# ----------------------------------------------------------------------------- the entry points

def validate_model(folder: Path) -> dict[str, Any]:
    """Every check of a full model folder; returns the parity record for the manifest."""
    files = weight_files(folder)
    cfg = load_config(folder)
    check_shapes(cfg, files)
    for f in files:
        check_safetensors(f)
    tok = check_tokenizer(folder, cfg.vocab_size)
    need, have = parity_bytes(files), available_memory()
    if need > 0.8 * have:   # the HF model and the bridge, in float32: a 70B model cannot be probed here
        return {"skipped": f"the probe needs ~{need / 2**30:.0f} GiB, {have / 2**30:.0f} GiB are available; "
                           "the architecture's parity is measured on smaller models (tests/test_architectures.py)"}
    return check_parity(folder, tok)


def parity_bytes(files: list[Path]) -> int:
    """What the parity probe holds: the model twice (HF and the bridge's copy) in float32."""
    n = 0
    for f in files:
        for k, v in read_header(f).items():
            if k != "__metadata__":
                n += math.prod(v["shape"])
    return 2 * 4 * n


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def validate_adapter(folder: Path) -> dict[str, Any]:
    """The checks an adapter can answer alone. Parity is not run: the bridge is checked on the parent,
    and an adapter only changes weights, not the architecture the bridge must mirror."""
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} does not load ({e}); save the adapter again with "
                              "peft's save_pretrained") from e
    for f in weight_files(folder):
        check_safetensors(f)
    if (folder / "tokenizer.json").exists():  # else it reads its parent's, which is checked already
        check_tokenizer(folder, None)
    return {"skipped": "adapter"}


# ----------------------------------------------------------------------------- weight files

def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the shards an index names (each must exist), else
    every .safetensors file in the folder."""
    index = folder / INDEX
    if not index.exists():
        return sorted(folder.glob("*.safetensors"))
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({e}); export the checkpoint again "
                              "with save_pretrained") from e
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are not in {folder}: {missing[:SHOWN]}; copy every "
                              "shard of the checkpoint into the folder")
    return [folder / s for s in shards]


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header (tensor name -> dtype, shape, offsets), checked against the file size:
    a truncated download is caught here, before any tensor is read."""
    size = path.stat().st_size
    truncated = CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes); "
                                "restore it from a backup or rebuild the checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or (n := struct.unpack("<Q", head)[0]) + 8 > size:
            raise truncated
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise truncated from None
    if not isinstance(header, dict):
        raise truncated
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (KeyError, IndexError, TypeError):
        raise truncated from None
    if 8 + n + end > size:
        raise truncated
    return tensors


def check_safetensors(path: Path) -> None:
    """Header sanity plus finiteness of every tensor: catches truncation and NaN/Inf weights."""
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                # numpy, not torch: one small op per tensor, where torch's thread pool made a 4 MB
                # checkpoint's check take 0.5 s on a busy 2-core machine (bf16 has no numpy type: float first)
                if t.is_floating_point() and not np.isfinite(t.float().numpy()).all():
                    raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf values; the weights "
                                          "are unusable: rebuild the checkpoint or re-export it")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); restore or rebuild it") from e


# ----------------------------------------------------------------------------- config and shapes

def load_config(folder: Path) -> Any:
    """config.json as transformers reads it, for an architecture the workbench supports. An unknown
    `model_type` is named here, not in transformers' page-long advice to upgrade."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a Hugging Face model directory; copy the model's "
                              "config.json into it")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the model's config.json") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise CheckpointError(f"{path} has no model_type; restore the model's own config.json")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path} names model_type {model_type!r}, which the installed transformers does "
                              "not know; check the config (a typo?) or register a model of a known architecture")
    check_supported(model_type)
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, TypeError... for a bad config
        raise CheckpointError(f"{path} does not load as a {model_type} config ({_first_line(e)}); "
                              "restore the model's own config.json") from e


def check_shapes(cfg: Any, files: list[Path]) -> None:
    """The tensors in the files are exactly what a model of `cfg` has, name for name and shape for
    shape: else a checkpoint loads with mismatched or randomly initialised weights, or not at all."""
    found: dict[str, list[int]] = {}
    for f in files:
        found.update({k: list(v.get("shape", [])) for k, v in read_header(f).items()})
    expected, groups, model_cls = _skeleton(cfg)
    found = _with_prefix(found, expected, getattr(model_cls, "base_model_prefix", ""))
    problems = [f"{k} has shape {found[k]}, the config implies {shape}"
                for k, shape in expected.items() if k in found and found[k] != shape]
    optional = _patterns(model_cls, "_keys_to_ignore_on_load_missing")
    for names in groups:
        if not any(n in found for n in names) and not any(p.search(names[0]) for p in optional):
            problems.append(f"{names[0]} is missing from the weight files")
    benign = _patterns(model_cls, "_keys_to_ignore_on_load_unexpected") + [re.compile(p) for p in BENIGN_EXTRA]
    problems += [f"{k} is in the weight files but not in a model of this config"
                 for k in found if k not in expected and not any(p.search(k) for p in benign)]
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise CheckpointError(f"the weights in {files[0].parent} do not match its config.json: "
                              f"{'; '.join(problems[:SHOWN])}{more}. Fix config.json to describe these "
                              "weights (the model's own config), or re-export the checkpoint")


def _skeleton(cfg: Any) -> tuple[dict[str, list[int]], list[list[str]], type]:
    """Names and shapes of a model of `cfg`, built on the meta device (no memory, no init), and the
    groups of names that share one tensor (tied weights: a file need hold only one of each)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:
        raise CheckpointError(f"no causal language model can be built from this config.json "
                              f"({_first_line(e)}); register a causal LM") from e
    expected = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    by_tensor: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in expected:
            by_tensor.setdefault(id(t), []).append(name)
    return expected, list(by_tensor.values()), type(model)


def _with_prefix(found: dict[str, list[int]], expected: dict[str, Any], prefix: str) -> dict[str, list[int]]:
    """A base model's weights (`layers.0...`) as its causal-LM wrapper names them (`model.layers.0...`):
    `from_pretrained` accepts both."""
    if not prefix:
        return found
    return {(f"{prefix}.{k}" if k not in expected and f"{prefix}.{k}" in expected else k): v for k, v in found.items()}


def _patterns(model_cls: type, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model_cls, attr, None) or [])]


# ----------------------------------------------------------------------------- tokenizer and parity

def check_tokenizer(folder: Path, vocab_size: int | None) -> Any:
    """The folder's tokenizer, loaded as the workbench loads it, and no larger than the embedding
    (a token id past the last row would crash every forward pass that meets it)."""
    if not any(all((folder / f).exists() for f in files) for files in TOKENIZER_SOURCES):
        raise CheckpointError(f"{folder} holds no tokenizer (looked for {TOKENIZER_LOOKED_FOR}); copy the "
                              "tokenizer the model was trained with into the folder (e.g. "
                              "AutoTokenizer.from_pretrained(...).save_pretrained(folder)) and register it again")
    try:
        tok = load_tokenizer(folder)
    except Exception as e:  # sentencepiece-only folders, broken JSON, unknown classes...
        raise CheckpointError(f"the tokenizer in {folder} does not load as a fast tokenizer "
                              f"({type(e).__name__}: {_first_line(e)}); save it with tokenizer.json "
                              "(AutoTokenizer.from_pretrained(...).save_pretrained(folder)) and register it again"
                              ) from e
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(f"the tokenizer in {folder} has {len(tok)} tokens but the model's embedding has "
                              f"{vocab_size} rows (config.json vocab_size); the tokenizer belongs to another "
                              "model: copy in the one this model was trained with")
    return tok


def check_parity(folder: Path, tok: Any) -> dict[str, Any]:
    """`loading.check_parity`, with a bridge that cannot be built reported as a checkpoint problem."""
    try:
        return loading.check_parity(str(folder), tok)
    except WorkbenchError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder}: the TransformerLens bridge could not run this model "
                              f"({type(e).__name__}: {_first_line(e)}); every patching analysis needs it. "
                              "Check the architecture is supported by the bridge") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
