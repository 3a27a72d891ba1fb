"""The front door's cost: registering a checkpoint from elsewhere (`workbench suite add`: copy, hash,
config and shape checks, finiteness, tokenizer, HF/TransformerLens parity) against what its bytes
alone cost on this machine (copying the folder and hashing every file, measured in the same run),
and how the checks split the rest.

The model is a random-weight Llama written to a temporary folder (its size set by --layers and
--width; `--quick` makes a small one), with a tokenizer from the synthetic world. Nothing is kept.
Last line: one JSON object of named figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from workbench.core.files import sha256_file  # noqa: E402
from workbench.suite import validate  # noqa: E402
from workbench.suite.loading import check_parity  # noqa: E402
from workbench.suite.manifest import Suite, import_checkpoint  # noqa: E402
from workbench.world.chat import WORKBENCH  # noqa: E402
from workbench.world.data import eval_splits  # noqa: E402
from workbench.world.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def make_model(folder: Path, layers: int, width: int) -> int:
    """A random Llama with its tokenizer in `folder`; returns its size in bytes."""
    tok = train_tokenizer((WORKBENCH.text(i.dialogue) for i in eval_splits(0, 200).clean), 512)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a small model, one repeat (under a minute)")
    a = p.parse_args()
    if a.quick:
        a.layers, a.width, a.repeats = 4, 256, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        size = make_model(src, a.layers, a.width)
        import_checkpoint(Suite.create(tmp / "warm"), src, "mine")   # imports and first-call costs, untimed
        regs, refs = [], []
        for i in range(a.repeats):
            dest = tmp / f"copy{i}"
            refs.append(timed(lambda: (shutil.copytree(src, dest), [sha256_file(f) for f in dest.iterdir()])))
            suite = Suite.create(tmp / f"suite{i}")
            regs.append(timed(lambda: import_checkpoint(suite, src, "mine")))
        tok = load_tokenizer(src)
        parts = {"shapes": timed(lambda: validate.check_shapes(validate.load_config(src), validate.weight_files(src))),
                 "finite": timed(lambda: [validate.check_safetensors(f) for f in validate.weight_files(src)]),
                 "parity": timed(lambda: check_parity(str(src), tok))}
    reg, ref = min(regs), min(refs)
    print(f"model {size / 2**20:.0f} MiB: register {reg:.2f} s, copy+hash {ref:.2f} s "
          f"({size / 2**20 / ref:.0f} MiB/s); checks: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    print(json.dumps({"model_mib": round(size / 2**20, 1), "register_s": round(reg, 3), "copy_hash_s": round(ref, 3),
                      "register_over_copy_hash": round(reg / ref, 2),
                      "copy_hash_mib_per_s": round(size / 2**20 / ref, 1),
                      **{f"{k}_s": round(v, 3) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
