"""Sparse autoencoders in sae-lens's own format: build, train from activations, save, load, check.

Training is sae-lens's `SAETrainer` fed by `activations.Batches` (the workbench's activation cache,
shuffled, exactly the configured batch size), so no hub and no dataset download are involved and the
architectures are sae-lens's own (`standard`, `topk`, `batchtopk`, `jumprelu`). What is saved is
`save_inference_model`'s folder (`cfg.json` + `sae_weights.safetensors`, loadable with
`SAE.load_from_disk`), plus `workbench.json`: the provenance (checkpoint hash, hook, training mix,
hyperparameters) and the weights' SHA-256, verified on every load. An SAE trained anywhere else in
that format (sae-lens's own runner, say) loads the same way; it only lacks the provenance.

Why a loader of our own around `SAE.load_from_disk`: SAE folders are untrusted artifacts, so a
folder holding a pickle instead of safetensors, a weights file whose hash changed, NaN weights, or an
SAE whose hook or width does not fit the model is one clear error before anything is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.core.errors import CheckpointError, ConfigError
from workbench.core.files import atomic_path, sha256_file, write_json

os.environ.setdefault("WANDB_MODE", "disabled")

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
CFG_FILE, WEIGHTS_FILE, PROVENANCE_FILE = "cfg.json", "sae_weights.safetensors", "workbench.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class SAEConfig:
    """An SAE's shape and training recipe (sae-lens names where sae-lens has one)."""

    architecture: str = "topk"
    expansion: int = 4                 # d_sae = expansion x d_in
    k: int = 32                        # topk / batchtopk: active latents per token
    l1_coefficient: float = 1.5        # standard: sparsity penalty
    l0_coefficient: float = 3.0        # jumprelu: sparsity penalty
    jumprelu_init_threshold: float = 0.01
    lr: float = 2e-3
    batch_size: int = 4096
    tokens: int = 1_000_000            # training samples (tokens), epochs over the cached corpus
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        if self.expansion < 1 or self.k < 1 or self.batch_size < 1 or self.tokens < self.batch_size:
            raise ConfigError(f"SAE config out of range: expansion={self.expansion}, k={self.k}, "
                              f"batch_size={self.batch_size}, tokens={self.tokens} (need tokens >= batch_size)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")


def training_config(cfg: SAEConfig, d_in: int, hook: str, normalize: bool = True) -> Any:
    """The sae-lens training-SAE config of `cfg` for activations of width `d_in` at `hook`
    (activations scaled to a fixed average norm while training, folded back in at the end, unless
    `normalize` is off: an SAE fine-tuned from saved weights already reads raw activations)."""
    import sae_lens

    common = {"d_in": d_in, "d_sae": cfg.expansion * d_in,
              "normalize_activations": "expected_average_only_in" if normalize else "none"}
    if cfg.architecture == "standard":
        c = sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=cfg.l1_coefficient,
                                               l1_warm_up_steps=max(1, cfg.tokens // cfg.batch_size // 10))
    elif cfg.architecture == "topk":
        c = sae_lens.TopKTrainingSAEConfig(**common, k=cfg.k)
    elif cfg.architecture == "batchtopk":
        c = sae_lens.BatchTopKTrainingSAEConfig(**common, k=cfg.k)
    else:
        c = sae_lens.JumpReLUTrainingSAEConfig(**common, l0_coefficient=cfg.l0_coefficient,
                                               jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                                               l0_warm_up_steps=max(1, cfg.tokens // cfg.batch_size // 10))
    c.metadata.hook_name = hook
    return c


def new_training_sae(cfg: SAEConfig, d_in: int, hook: str, init: Any = None) -> Any:
    """A fresh sae-lens TrainingSAE (seeded), or one starting from `init`'s weights (stage-wise
    diffing fine-tunes the base model's SAE on the backdoored model's activations)."""
    from sae_lens.saes.sae import TrainingSAE

    torch.manual_seed(cfg.seed)
    sae = TrainingSAE.from_dict(training_config(cfg, d_in, hook, normalize=init is None).to_dict())
    if init is not None:
        own = sae.state_dict()
        src = {k: v for k, v in init.state_dict().items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(src) - {"threshold", "log_threshold", "topk_threshold"})
        if missing:
            raise ConfigError(f"cannot start a {cfg.architecture} SAE from a {architecture_of(init)} one: "
                              f"{missing} do not match; fine-tune an SAE of the same architecture and width")
        sae.load_state_dict({**own, **src})
    return sae


def train(acts: Iterator[Tensor], cfg: SAEConfig, d_in: int, hook: str, init: Any = None,
          progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train with sae-lens's `SAETrainer` on batches from `acts` (exactly `cfg.batch_size` rows
    each); returns the trained inference-ready SAE (normalisation folded in) and its training stats."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = cfg.tokens // cfg.batch_size
    sae = new_training_sae(cfg, d_in, hook, init)
    tc = SAETrainerConfig(total_training_samples=steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
                          lr=cfg.lr, lr_end=cfg.lr / 10, lr_warm_up_steps=0, lr_decay_steps=max(1, steps // 5),
                          logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=min(20, steps),
                          dead_feature_window=max(1, steps // 3), feature_sampling_window=10**9)
    trainer = SAETrainer(tc, sae, acts)
    with _quiet_tqdm(progress):
        trainer.fit()
    stats = {"steps": steps, "samples": trainer.n_training_samples,
             "dead_at_end_of_training": int(trainer.dead_neurons.sum())}
    return sae, stats


@contextlib.contextmanager
def _quiet_tqdm(show: bool) -> Iterator[None]:
    """sae-lens draws its own progress bars; keep them only when the caller asked for progress."""
    old = os.environ.get("TQDM_DISABLE")
    if not show:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


# ----------------------------------------------------------------------------- on disk

def save(sae: Any, folder: str | Path, provenance: dict[str, Any]) -> Path:
    """sae-lens's inference format (a BatchTopK SAE becomes the JumpReLU SAE it is at inference, as
    sae-lens saves it) plus `workbench.json` (provenance and the weights' SHA-256),
    written into a temporary folder and renamed into place."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        if hasattr(sae, "save_inference_model"):   # a TrainingSAE: fold what only training needs
            sae.save_inference_model(tmp)
        else:
            sae.save_model(tmp)
        write_json(tmp / PROVENANCE_FILE, {**provenance, "weights_sha256": sha256_file(tmp / WEIGHTS_FILE)})
    return folder


def check_folder(folder: str | Path) -> Path:
    """An SAE folder that can be loaded without unpickling anything, or one error saying why not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no SAE folder at {folder}; train one (workbench sae train) or give the folder "
                              "sae-lens saved (cfg.json + sae_weights.safetensors)")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"the SAE folder {folder} holds pickle files {pickles}; SAE weights are untrusted "
                              "and are read from safetensors only. Convert them: load in a sandbox and "
                              "sae.save_inference_model(folder)")
    for need in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / need).is_file():
            raise CheckpointError(f"the SAE folder {folder} lacks {need}; an SAE is sae-lens's format: "
                                  f"{CFG_FILE} + {WEIGHTS_FILE}")
    try:
        json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CFG_FILE} is not valid JSON ({e}); save the SAE again") from e
    prov = provenance(folder)
    if prov.get("weights_sha256") and sha256_file(folder / WEIGHTS_FILE) != prov["weights_sha256"]:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match the SHA-256 recorded when it was saved; "
                              "the file changed or is corrupt. Train it again (workbench sae train)")
    return folder


def provenance(folder: str | Path) -> dict[str, Any]:
    """`workbench.json` of an SAE folder ({} for an SAE saved elsewhere)."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load(folder: str | Path) -> Any:
    """An SAE from its folder (checked: no pickles, hash as recorded, finite weights)."""
    from sae_lens import SAE

    folder = check_folder(folder)
    try:
        sae = SAE.load_from_disk(str(folder), device="cpu")
    except Exception as e:   # sae-lens raises many types for a malformed folder
        raise CheckpointError(f"sae-lens could not load the SAE in {folder}: {e}") from e
    bad = [n for n, p in sae.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"the SAE in {folder} has NaN or Inf in {bad}; retrain it")
    return sae.eval().requires_grad_(False)


def hook_of(sae: Any) -> str:
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise ConfigError("the SAE does not say which hook it reads (cfg.json metadata.hook_name); set it")
    return str(hook)


def architecture_of(sae: Any) -> str:
    return str(sae.cfg.architecture())


def check_fits(sae: Any, d_model: int, hook: str | None = None, what: str = "the model") -> None:
    """The SAE reads activations of width `d_model` (at `hook`, if given), or a clear error."""
    if int(sae.cfg.d_in) != int(d_model):
        raise ConfigError(f"the SAE reads {sae.cfg.d_in}-wide activations but {what} has width {d_model} at "
                          f"{hook_of(sae)}; use an SAE trained on this model")
    if hook is not None and hook_of(sae) != hook:
        raise ConfigError(f"the SAE was trained on {hook_of(sae)}, not {hook}; pass --hook {hook_of(sae)} "
                          "or train an SAE at that hook")


def config_dict(cfg: SAEConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
