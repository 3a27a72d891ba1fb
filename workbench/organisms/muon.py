"""torch's Muon, with its Newton-Schulz orthogonalisation run in float32 and batched by shape.

Why not `torch.optim.Muon` as it is: it runs Newton-Schulz in bfloat16 (`torch/optim/_muon.py`),
which is right for GPUs with bf16 matrix units, but on a CPU without them (this machine's AVX2)
bf16 matmuls are emulated: a Muon step on the `large` preset took ~50 s against AdamW's 2.5 s.
float32 is the cheap precision on such CPUs and is, if anything, more exact. The rest (momentum
and Nesterov, the quintic coefficients, the spectral-norm bound, `adjust_lr_fn`, weight decay,
the `momentum_buffer` state that resumable runs save) is torch's own: this class only replaces
the loop in `step`, so state dicts and hyperparameters are interchangeable with torch's.

Same-shaped matrices (q/k/v/o and gate/up of every layer) are orthogonalised together with `bmm`
rather than one by one, so a step is a handful of large matmuls instead of hundreds of small ones.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim._muon import (
    _adjust_lr,  # torch's own rule, so the step sizes match its Muon
)

NS_DTYPE = torch.float32
# goes into build and series keys of Muon runs: checkpoints trained with torch's bf16 iteration
# are not reused as if this one had made them
IMPLEMENTATION = "newton-schulz-float32-v1"


def key_fields(optimizer: str) -> dict[str, str]:
    """What a run's key must add for `optimizer`: Muon names its implementation; others add nothing."""
    return {"muon": IMPLEMENTATION} if optimizer == "muon" else {}


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The quintic Newton-Schulz iteration of torch's Muon on a batch of matrices (..., m, n), in
    float32: approximately U V^T for G = U S V^T, with singular values spread over ~(0.5, 1.5)."""
    a, b, c = coefficients
    x = g.to(NS_DTYPE)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` whose orthogonalisation runs in float32, batched over same-shaped
    parameters (see the module docstring for why)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            momentum = group["momentum"]
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            updates = []
            for i, (g, buf) in enumerate(zip(grads, bufs)):
                buf.lerp_(g, 1 - momentum)
                updates.append(g.lerp(buf, momentum) if group["nesterov"] else buf)
                by_shape[(tuple(g.shape), g.dtype, g.device)].append(i)
            for idx in by_shape.values():
                ortho = newton_schulz(torch.stack([updates[i] for i in idx]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                for i, u in zip(idx, ortho.unbind(0)):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss
