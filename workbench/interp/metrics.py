"""What patching measures: a scalar of the final residual at the positions the answer is read.

A metric takes the final-normed residual of any set of tokens (`contrib`), so the patching engine
never materialises full logits, and the same metric from logits (`from_logits`) for
TransformerLens's helpers, so both compute one number. Which run is the base and which the source
of a patch (`oriented`) is decided here once for every method.
"""
from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.core.errors import ConfigError
from workbench.interp.decoder import Weights, rms_norm, weights
from workbench.interp.pairs import METRICS, PairBatch, check_aligned

DIRECTIONS = ("denoising", "noising")


def check_direction(direction: str) -> None:
    """One error for an unknown patching direction, wherever a request is checked."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")


class Metric:
    """A scalar read from the last `k` positions' final residual: per prompt a sum over those
    positions, then the mean over prompts (TransformerLens's convention for a batch).

    `contrib` takes the final-normed residual of any set of tokens, so the engine never needs the
    full logits; `from_logits` is the same metric for TransformerLens's helpers.
    """

    name = "metric"
    k = 1

    def contrib(self, xf: Float[Tensor, "m d"], prompt: Int[Tensor, " m"], j: Int[Tensor, " m"]) -> Tensor:
        raise NotImplementedError

    def from_logits(self, logits: Float[Tensor, "n pos vocab"]) -> Tensor:
        raise NotImplementedError

    n_prompts = 1

    def dense(self, xf: Float[Tensor, "n k d"]) -> Float[Tensor, "n k"]:
        """Rows beyond the batch (several patched copies stacked) map back to prompt row % n."""
        n, k = xf.shape[:2]
        prompt = torch.arange(n, device=xf.device).repeat_interleave(k) % self.n_prompts
        j = torch.arange(k, device=xf.device).repeat(n)
        return self.contrib(xf.reshape(n * k, -1), prompt, j).view(n, k)


class LogitDiff(Metric):
    """logit(first bad-answer token) - logit(first good-answer token) at the last position."""

    name = "logit_diff"

    def __init__(self, bad: Tensor, good: Tensor, unembed: tuple[Tensor, Tensor] | None = None):
        self.bad, self.good = bad.long(), good.long()
        self.n_prompts = int(bad.shape[0])
        if unembed is not None:
            U, b = unembed
            self.dirs, self.offset = U[self.bad] - U[self.good], b[self.bad] - b[self.good]

    def contrib(self, xf, prompt, j):
        return (xf * self.dirs.to(xf.device)[prompt]).sum(-1) + self.offset.to(xf.device)[prompt]

    def from_logits(self, logits):
        last = logits[:, -1]
        idx = torch.arange(last.shape[0], device=last.device)
        return (last[idx, self.bad.to(last.device)] - last[idx, self.good.to(last.device)]).mean()


class LogProb(Metric):
    """Log-probability of the whole bad continuation (teacher-forced): sum over its tokens."""

    name = "logprob"

    def __init__(self, targets: Tensor, unembed: tuple[Tensor, Tensor] | None = None):
        self.targets = targets.long()
        self.n_prompts, self.k = int(targets.shape[0]), int(targets.shape[1])
        self.unembed = unembed

    def contrib(self, xf, prompt, j):
        U, b = self.unembed
        logp = (xf @ U.T + b).float().log_softmax(-1)
        return logp.gather(-1, self.targets.to(xf.device)[prompt, j][:, None])[:, 0].to(xf.dtype)

    def from_logits(self, logits):
        logp = logits[:, -self.k:].float().log_softmax(-1)
        return logp.gather(-1, self.targets.to(logits.device)[..., None])[..., 0].sum(-1).mean()


def make_metric(batch: PairBatch, name: str = "logit_diff", model: Any = None) -> Metric:
    """The metric `name` for `batch`; `model` (bridge or HF) binds the unembedding the engine reads."""
    U = None if model is None else (weights(model).unembed, weights(model).unembed_bias)
    if name == "logit_diff":
        return LogitDiff(batch.bad, batch.good, U)
    if name == "logprob":
        return LogProb(batch.continuation, U)
    raise ConfigError(f"unknown metric {name!r}; choose one of {METRICS}")


def contributions(W: Weights, final_resid: Tensor, m: Metric) -> Tensor:
    """Per-position metric contributions ([n, k]) from the final residual ([n, pos, d])."""
    T = final_resid.shape[1]
    return m.dense(rms_norm(final_resid[:, T - m.k:], W.norm, W.eps))


def oriented(batch: PairBatch, metric: str, direction: str) -> tuple[Tensor, Tensor]:
    """(base, source) token ids of `batch` for `metric` (a name) and `direction`: denoising patches
    the clean (triggered) run's activations into the corrupted run, noising the corrupted run's
    into the clean one. Every patching method orients its runs here, so they cannot disagree."""
    check_direction(direction)
    clean_t, corr_t = batch.inputs(metric)
    check_aligned(clean_t, corr_t)
    return (corr_t, clean_t) if direction == "denoising" else (clean_t, corr_t)
