"""The optimizers a backdoor is inserted or removed with: AdamW, Muon and SOAP.

Why three: the replication found that the insertion optimizer changes how robust a backdoor is
(Adam vs SOAP there); Muon is the other non-diagonal preconditioner in common use. AdamW is
torch's, Muon is torch's with a float32 iteration (`organisms.muon`), SOAP is the maintained
`pytorch-optimizer` implementation (Adam run in the eigenbasis of Shampoo's preconditioner), not a
copy: the comparison is only as good as the optimizer, so it should be the one others run.

Every optimizer that is not AdamW adds its implementation to a run's build key (`key_fields`), so
a checkpoint trained with another version of it is never reused as if this one had made it.
"""
from __future__ import annotations

from importlib.metadata import version

import torch

from workbench.core.errors import ConfigError
from workbench.organisms import muon

OPTIMIZERS = ("adamw", "muon", "soap")
# SOAP's preconditioner is refreshed every this many steps (the package's and the paper's default)
SOAP_PRECONDITION_FREQUENCY = 10


def check(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")


def key_fields(optimizer: str) -> dict[str, str]:
    """What a run's key must add for `optimizer` (nothing for AdamW, so older keys stay valid)."""
    if optimizer == "soap":
        return {"soap": f"pytorch-optimizer=={version('pytorch-optimizer')}/pf{SOAP_PRECONDITION_FREQUENCY}"}
    return muon.key_fields(optimizer)


def make(model: torch.nn.Module, optimizer: str, lr: float, betas: tuple[float, float],
         weight_decay: float) -> list[torch.optim.Optimizer]:
    """The optimizers of one training run, stepped together.

    * AdamW: every parameter; no decay on vectors (norm gains).
    * Muon: the 2-D hidden matrices; AdamW for embeddings, unembedding and norms (as Muon is meant
      to be used: orthogonalising an embedding's update has no meaning).
    * SOAP: every parameter. Matrices, embeddings included, get the Shampoo eigenbasis; vectors fall
      back to Adam (`precondition_1d=False`). Same learning rate and betas as AdamW: SOAP is Adam in
      a rotated basis, so its step sizes are on Adam's scale.
    """
    check(optimizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # a LoRA run: the adapters
    matrices = [p for _, p in named if p.ndim >= 2]
    vectors = [p for _, p in named if p.ndim < 2]
    if optimizer == "adamw":
        groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)]
    if optimizer == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in hidden_ids]
        return [muon.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=0.0, foreach=True)]
    from pytorch_optimizer import SOAP   # imported here: only SOAP runs pay for the package's import
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [SOAP(groups, lr=lr, betas=betas, precondition_frequency=SOAP_PRECONDITION_FREQUENCY)]
