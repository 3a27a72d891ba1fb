"""The directions the trigger circuit uses: where the residual stream moves when the trigger is present.

Per layer and site (resid_pre: what attention reads; resid_mid: what the MLP reads and attention
writes into; resid_post: what the MLP writes into), the trigger direction is the difference of the
mean residual vector between triggered and untriggered prompts of aligned pairs (positions before the
trigger are identical in both, so the mean is over what the trigger changed), normalised. It is the
direction a linear probe for the trigger would find first, needs no SAE, and works for any backdoor
the suite has prompts for. SAE trigger latents' decoder rows, where an SAE was saved, are read by
`tasks` as further directions at their hook.
"""
from __future__ import annotations

from typing import Any

import torch

from workbench.interp.hooks import HOOK_KINDS
from workbench.interp.pairs import make_pairs

SITES = ("resid_pre", "resid_mid", "resid_post")


@torch.no_grad()
def trigger_directions(suite: Any, checkpoint: str, backdoor: Any, n: int = 64
                       ) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], float],
                                  dict[tuple[str, int], torch.Tensor]]:
    """(site, layer) -> the unit trigger direction there (float32 [d_model]); the norm of the raw
    mean difference (how far the trigger moves the stream there); and the covariance of the
    untriggered prompts' residual vectors there, from which `data_directions` draws the null's
    random directions "as the stream uses them"."""
    model = suite.load_model(checkpoint, "bridge")
    n_layers = model.cfg.n_layers
    names = {HOOK_KINDS[s].format(l=layer): (s, layer) for s in SITES for layer in range(n_layers)}
    sums: dict[tuple[str, int], torch.Tensor] = {}
    moments: dict[tuple[str, int], list] = {}
    count = 0
    for batch in make_pairs(suite, backdoor, n=n, checkpoint=checkpoint):
        caches = []
        for tokens in (batch.clean, batch.corrupted):
            _, cache = model.run_with_cache(tokens, names_filter=lambda x: x in names)
            caches.append(cache)
        for hook, site in names.items():
            diff = (caches[0][hook].float() - caches[1][hook].float()).mean(1).sum(0)   # over positions, pairs
            sums[site] = sums.get(site, 0) + diff
            x = caches[1][hook].double().reshape(-1, caches[1][hook].shape[-1])
            m = moments.setdefault(site, [0, 0.0, 0.0])
            m[0] += x.shape[0]
            m[1] = m[1] + x.sum(0)
            m[2] = m[2] + x.T @ x
        count += batch.clean.shape[0]
    means = {k: v / max(1, count) for k, v in sums.items()}
    norms = {k: float(v.norm()) for k, v in means.items()}
    cov = {}
    for k, (cnt, s1, s2) in moments.items():
        mu = s1 / cnt
        cov[k] = (s2 / cnt - torch.outer(mu, mu)).float()
    return {k: v / v.norm().clamp_min(1e-12) for k, v in means.items()}, norms, cov


def data_directions(cov: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random unit directions distributed as the residual stream's own variation (N(0, cov),
    normalised) [d, n]: a weight update lies in the span of the activations it was trained on, so
    beating isotropic random directions says little; beating these says the update singles out the
    trigger among the directions the stream actually uses."""
    vals, vecs = torch.linalg.eigh(cov.double())
    root = vecs * vals.clamp_min(0).sqrt()
    z = root @ torch.randn(cov.shape[0], n, generator=generator, dtype=torch.float64)
    return (z / z.norm(dim=0, keepdim=True).clamp_min(1e-12)).float()
