"""Causal tests of SAE latents, through the behavioural evaluation itself.

An edit is `sites.edit`, a forward hook on the Hugging Face model where the SAE's TransformerLens hook
lives, so `generate` and the behaviour detector run unchanged and any supported architecture works:

- ablation keeps the SAE's error term: x -> x + decode(f with the chosen latents set to v) -
  decode(f), so only those latents change (v = 0, or their mean on untriggered tokens);
- steering adds a latent's decoder direction, scaled to the activation the trigger usually gives it
  times a dose, at every position (prompt and answer).

The trigger rate is the detector's verdict on greedy answers to triggered prompts (the induced rate,
for steering, on untriggered ones); clean capability is exact-match accuracy on the untriggered
prompts' reference answers (code: passes its tests without the flaw), under the same edit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from workbench.families.features.sites import capture, edit

def ablation(sae: Any, features: Sequence[int], values: Tensor | float = 0.0) -> Callable[[Tensor], Tensor]:
    """The edit that sets `features` to `values` (error term kept: nothing else moves)."""
    idx = torch.as_tensor(list(features), dtype=torch.long)
    vals = torch.as_tensor(values, dtype=torch.float32).expand(len(idx)) if len(idx) else torch.zeros(0)

    @torch.no_grad()
    def fn(x: Tensor) -> Tensor:
        if not len(idx):
            return x
        f = sae.encode(x.float())
        g = f.clone()
        g[..., idx] = vals.to(g.dtype)
        return (x.float() + sae.decode(g) - sae.decode(f)).to(x.dtype)
    return fn


def reconstruction_only(sae: Any) -> Callable[[Tensor], Tensor]:
    """The activation replaced by the SAE's reconstruction (no error term): does what the latents
    represent carry the backdoor?"""
    @torch.no_grad()
    def fn(x: Tensor) -> Tensor:
        return sae.decode(sae.encode(x.float())).to(x.dtype)
    return fn


def error_only(sae: Any) -> Callable[[Tensor], Tensor]:
    """The activation with every latent's contribution removed (error term and decoder bias left):
    does what the SAE misses carry it?"""
    @torch.no_grad()
    def fn(x: Tensor) -> Tensor:
        f = sae.encode(x.float())
        return (x.float() - sae.decode(f) + sae.decode(torch.zeros_like(f))).to(x.dtype)
    return fn


def steering(sae: Any, feature: int, scale: float) -> Callable[[Tensor], Tensor]:
    """The edit that adds `scale` x the latent's decoder direction at every position."""
    v = sae.W_dec.detach()[int(feature)].float() * float(scale)

    def fn(x: Tensor) -> Tensor:
        return x + v.to(x.dtype)
    return fn


def attribution(model: Any, sae: Any, hook: str, clean: Tensor, corrupted: Tensor, bad: Tensor,
                good: Tensor) -> Tensor:
    """Per latent [d_sae]: attribution patching through the SAE (Marks et al.'s sparse feature
    circuits): (f(triggered) - f(untriggered)) x d(logit bad - logit good)/df at the last prompt
    token, summed over positions and averaged over prompts, with the SAE spliced in and its error
    term held fixed. Positive: the latent carries the trigger toward the bad answer."""
    held: dict[str, Tensor] = {}

    def splice(x: Tensor) -> Tensor:
        with torch.no_grad():
            f0 = sae.encode(x.float())
            err = x.float() - sae.decode(f0)
        f = f0.clone().requires_grad_(True)
        held["f"] = f
        return (sae.decode(f) + err).to(x.dtype)

    with torch.enable_grad(), edit(model, hook, splice):
        logits = model(input_ids=clean).logits[:, -1].float()
        rows = torch.arange(len(clean))
        (logits[rows, bad] - logits[rows, good]).sum().backward()
    f_clean, grad = held["f"].detach(), held["f"].grad
    with torch.no_grad():
        f_corrupt = sae.encode(capture(model, corrupted, [hook])[hook])
    return ((f_clean - f_corrupt) * grad).sum(1).mean(0)
