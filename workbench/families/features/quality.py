"""How good an SAE is, measured after training (sae-lens runs its evaluator only with its logger on).

- reconstruction, on held-out activations: explained variance (sae-lens's streaming
  `ExplainedVarianceCalculator`), MSE, L0, dead latents (never fire) and dense latents (fire on more
  than `DENSE` of tokens);
- downstream, with the SAE spliced into the (HF) model at its hook (every token but the first, which the
  SAE never saw): cross-entropy of the answer tokens (the organisms are trained on answers only; a
  prompt token's loss is near chance and would drown the SAE's effect), CE loss recovered
  `(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)`, and KL(clean || spliced).

The splice keeps no error term: that is what "the SAE in place of the activation" measures. The causal
tests (`interventions`) keep it, so there only the edited latents change.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.families.features.activations import padded
from workbench.families.features.sites import edit

DENSE = 0.1


def reconstruction(sae: Any, acts: Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Explained variance, MSE, L0, dead and dense fractions of `sae` on activations [n, d_in]."""
    return reconstruction_and_frequencies(sae, acts, batch_size)[0]


@torch.no_grad()
def reconstruction_and_frequencies(sae: Any, acts: Tensor, batch_size: int = 8192) -> tuple[dict[str, float], Tensor]:
    """`reconstruction`, and each latent's firing frequency [d_sae] from the same pass."""
    from sae_lens.evals import ExplainedVarianceCalculator

    ev = ExplainedVarianceCalculator()
    fires = torch.zeros(int(sae.cfg.d_sae))
    sq, l0, n = 0.0, 0.0, 0
    for x in acts.split(batch_size):
        f = sae.encode(x)
        rec = sae.decode(f)
        ev.add_batch(rec, x)
        sq += float(((rec - x) ** 2).sum())
        active = f > 0
        l0 += float(active.sum())
        fires += active.sum(0).float()
        n += len(x)
    freq = fires / max(n, 1)
    return ({"explained_variance": ev.compute(), "mse": sq / max(n * acts.shape[1], 1), "l0": l0 / max(n, 1),
             "dead_fraction": float((fires == 0).float().mean()), "dense_fraction": float((freq > DENSE).float().mean()),
             "n_tokens": n}, freq)


def _next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position cross-entropy of the next token [b, p-1]."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1)


@torch.no_grad()
def downstream(model: Any, sae: Any, hook: str, seqs: Sequence[Sequence[int]], pad_id: int,
               starts: Sequence[int] | None = None, batch_size: int = 64) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered and KL over the next-token predictions
    of `seqs` whose target lies at or after `starts[i]` (the answer: what a chat model is trained to
    predict; default every token), the SAE spliced in at every token but the first."""
    tot = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    starts = list(starts) if starts is not None else [1] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    for at in range(0, len(order), batch_size):
        idx = order[at:at + batch_size]
        tokens, mask = padded([seqs[k] for k in idx], pad_id)
        scored = mask.clone()
        for r, k in enumerate(idx):
            scored[r, : starts[k]] = False
        keep = mask.clone()
        keep[:, 0] = False

        def splice(x: Tensor) -> Tensor:
            return torch.where(keep[..., None], sae.decode(sae.encode(x.float())).to(x.dtype), x)

        def zero(x: Tensor) -> Tensor:
            return torch.where(keep[..., None], torch.zeros_like(x), x)

        clean = model(input_ids=tokens).logits
        with edit(model, hook, splice):
            spliced = model(input_ids=tokens).logits
        with edit(model, hook, zero):
            zeroed = model(input_ids=tokens).logits
        m = scored[:, 1:]                      # predictions whose target is scored
        for name, logits in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
            ce = _next_token_ce(logits, tokens)
            tot[name] += float(ce[m].sum())
        lp_clean, lp_sae = clean[:, :-1].float().log_softmax(-1), spliced[:, :-1].float().log_softmax(-1)
        kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)
        tot["kl"] += float(kl[m].sum())
        count += int(m.sum())
    ce = {k: v / max(count, 1) for k, v in tot.items()}
    gap = ce["zero"] - ce["clean"]
    recovered = (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-9 else float("nan")
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": recovered, "kl": ce["kl"], "n_predictions": count}
