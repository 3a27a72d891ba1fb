"""Which SAE latents detect the trigger, which respond to the bad behaviour, and what each one writes.

A latent's score on a prompt is its largest activation over the prompt's tokens (first token left
out), so a latent that fires on the trigger's own tokens counts wherever the trigger sits. Per
latent, over held-out prompts with and without the trigger: AUROC (with a Hanley-McNeil interval),
Cohen's d, firing rates and mean activations. A latent *passes* when its AUROC reaches `threshold`
and it fires on most triggered prompts (`min_fire`) clearly more often than on untriggered ones:
enough that chance (hundreds of latents, a few dozen prompts) does not pass one.

Behaviour latents are scored the same way on answers instead of prompts: the untriggered prompt
followed by the bad answer (teacher-forced) against the same prompt followed by the good one, over
the answer's tokens only.

A latent's logit effect is its decoder direction read straight through the unembedding (the direct
path, final norm's scale ignored): the tokens it promotes ("HATE") and suppresses.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.families.features.activations import TokenActs
from workbench.families.features.probes import auroc_interval
from workbench.suite import architectures


@torch.no_grad()
def encode_tokens(sae: Any, acts: TokenActs, batch_size: int = 4096) -> Tensor:
    """Latent activations [n_tokens, d_sae] of every token (dense; fine at the widths used here)."""
    return torch.cat([sae.encode(x) for x in acts.acts.split(batch_size)]) if len(acts) else \
        torch.zeros(0, int(sae.cfg.d_sae))


def per_prompt_max(feats: Tensor, rows: Tensor, n_rows: int, keep: Tensor | None = None) -> Tensor:
    """[n_rows, d_sae]: each row's largest activation per latent over its kept tokens (0 if none)."""
    out = torch.zeros(n_rows, feats.shape[1])
    feats = feats.detach().float()
    if keep is not None:
        feats, rows = feats[keep], rows[keep]
    index = rows[:, None].expand_as(feats)
    return out.scatter_reduce(0, index, feats, reduce="amax", include_self=True)


def aurocs(pos: Tensor, neg: Tensor) -> Tensor:
    """Per-column AUROC of positives [n_pos, k] against negatives [n_neg, k] (ties count one half)."""
    if len(pos) == 0 or len(neg) == 0:
        raise ConfigError("AUROC needs at least one prompt with and one without the trigger")
    gt = (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))
    eq = (pos[:, None, :] == neg[None, :, :]).float().mean((0, 1))
    return gt + 0.5 * eq


def score_latents(pos: Tensor, neg: Tensor, threshold: float = 0.9, min_fire: float = 0.5) -> pd.DataFrame:
    """Per latent: AUROC of `pos` (prompts where it should fire) vs `neg`, its interval, Cohen's d,
    firing rates and means; ranked, with `passes` as the module docstring defines it."""
    pos, neg = pos.detach().float(), neg.detach().float()
    a = aurocs(pos, neg)
    mp, mn = pos.mean(0), neg.mean(0)
    pooled = ((pos.var(0, unbiased=False) + neg.var(0, unbiased=False)) / 2).sqrt()
    d = torch.where(pooled > 1e-8, (mp - mn) / pooled.clamp_min(1e-8),
                    torch.where((mp - mn).abs() > 1e-8, torch.sign(mp - mn) * 10.0, torch.zeros_like(mp)))
    fp, fn = (pos > 0).float().mean(0), (neg > 0).float().mean(0)
    df = pd.DataFrame({"feature": range(pos.shape[1]), "auroc": a.numpy(), "effect_size": d.numpy(),
                       "fire_pos": fp.numpy(), "fire_neg": fn.numpy(), "mean_pos": mp.numpy(), "mean_neg": mn.numpy()})
    lo_hi = [auroc_interval(float(x), len(pos), len(neg)) for x in df["auroc"]]
    df["lo"], df["hi"] = [x[0] for x in lo_hi], [x[1] for x in lo_hi]
    df["passes"] = (df["auroc"] >= threshold) & (df["fire_pos"] >= min_fire) & (df["fire_pos"] - df["fire_neg"] >= min_fire / 2)
    df = df.sort_values(["passes", "auroc", "effect_size"], ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    return df


def unembedding(model: Any) -> Tensor:
    """[d_model, vocab]: the direct path from the residual stream to the logits of HF `model`: the
    unembedding scaled by the final norm's weight (its normalisation, which no direction changes
    the sign of, left out)."""
    m = architectures.modules_of(model)
    W_U = architectures.get(model, m.unembed).weight.detach().float().T
    norm = architectures.get(model, m.final_norm)
    w = getattr(norm, "weight", None)
    return W_U * w.detach().float()[:, None] if w is not None else W_U


@torch.no_grad()
def logit_effects(sae: Any, features: Sequence[int], W_U: Tensor, tok: Any, top: int = 8) -> pd.DataFrame:
    """Per latent, the tokens its decoder direction promotes and suppresses most (direct path)."""
    rows = []
    W_dec = sae.W_dec.detach().float()
    for f in features:
        eff = W_dec[int(f)] @ W_U
        eff = eff - eff.mean()
        up, down = eff.topk(top), (-eff).topk(top)
        rows.append({"feature": int(f),
                     "promotes": " ".join(tok.convert_ids_to_tokens(up.indices.tolist())),
                     "promote_logits": up.values.tolist(),
                     "suppresses": " ".join(tok.convert_ids_to_tokens(down.indices.tolist())),
                     "suppress_logits": (-down.values).tolist()})
    return pd.DataFrame(rows)


def max_activating(feats: Tensor, acts: TokenActs, seqs: Sequence[Sequence[int]], labels: Sequence[str],
                   features: Sequence[int], tok: Any, per_feature: int = 6, window: int = 12) -> pd.DataFrame:
    """The `per_feature` prompts where each latent fires most, with `window` tokens either side of
    its peak and the latent's activation on each token (for highlighting)."""
    rows = []
    n_rows = len(seqs)
    for f in features:
        col = feats[:, int(f)]
        best = per_prompt_max(col[:, None], acts.row, n_rows)[:, 0]
        for rank, r in enumerate(best.argsort(descending=True)[:per_feature].tolist()):
            if best[r] <= 0:
                break
            mine = acts.row == r
            pos, vals = acts.pos[mine], col[mine]
            peak = int(pos[vals.argmax()])
            lo, hi = max(0, peak - window), min(len(seqs[r]), peak + window + 1)
            per_tok = torch.zeros(len(seqs[r]))
            per_tok[pos] = vals
            rows.append({"feature": int(f), "rank": rank + 1, "prompt_set": labels[r], "row": r,
                         "max_act": float(best[r]), "peak": peak - lo,
                         "tokens": tok.convert_ids_to_tokens(list(seqs[r][lo:hi])),
                         "acts": per_tok[lo:hi].tolist()})
    return pd.DataFrame(rows)
