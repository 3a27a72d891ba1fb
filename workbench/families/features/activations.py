"""What an SAE is trained and measured on: a training mix of dialogues, their activations from the
activation cache, and the shuffled fixed-size batches sae-lens's trainer consumes.

The training mix is part of the SAE's config: dialogues from the backdoor's own source (the world's
training stream for the built-in organisms, skipping every held-out evaluation prompt; a spec's
prompt file otherwise), `trigger_fraction` of them with the trigger placed (default realistic-rare;
0 allowed), each the rendered prompt plus its reference answer (the backdoor's target where a
triggered row has no answer of its own). Activations are read per dialogue (right-padded batches of
similar length, one cache entry each), and the first token (BOS, an outlier every SAE paper drops) is
left out by default.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workbench.core.cache import cached_activations
from workbench.families.features.sites import capture
from workbench.core.errors import ConfigError, PromptError
from workbench.interp.pairs import bad_and_good
from workbench.world.backdoors import Backdoor
from workbench.world.data import DataRecipe, held_out_prompts, spec_items, training_items


@dataclass(frozen=True)
class Mix:
    """Which dialogues an SAE sees, and how many carry the trigger."""

    dialogues: int = 6000
    trigger_fraction: float = 0.02     # realistic-rare; 0 = never sees the trigger
    code_fraction: float = 0.3         # of the world's clean stream (built-in prompts only)
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 0.0 <= self.trigger_fraction <= 1.0:
            raise ConfigError(f"trigger_fraction={self.trigger_fraction} must lie in [0, 1]")
        if self.dialogues < 1:
            raise ConfigError(f"dialogues={self.dialogues}: the training mix needs at least one dialogue")


@dataclass
class MixSeqs:
    """The training mix as token ids: each row the prompt, its answer and the turn's end token;
    `starts[i]` is where row i's answer begins (the organisms learn answers only, so downstream
    loss is measured there); `triggered[i]` whether the row carries the trigger."""

    seqs: list[list[int]]
    starts: list[int]
    triggered: list[bool]


def mix_items(bd: Backdoor, mix: Mix) -> list[tuple[Any, bool]]:
    """(dialogue with the trigger placed or not, triggered?) for each row of the mix; the answer is
    the reference one, or the bad one for a triggered row."""
    rng = random.Random(mix.seed)
    if bd.builtin_prompts:
        stream = training_items(DataRecipe(backdoor=None, code_fraction=mix.code_fraction), mix.seed,
                                held_out=held_out_prompts())
        items = [next(stream) for _ in range(mix.dialogues)]
    else:
        pool = spec_items(bd)
        items = [pool[k % len(pool)] for k in range(mix.dialogues)]
    out = []
    for item in items:
        d = item.dialogue
        trig = bd.covers(d) and rng.random() < mix.trigger_fraction
        answer = (bad_and_good(bd, item)[0] if trig else None) or d.assistant
        out.append(((bd.trigger(d) if trig else bd.untrigger(d)).with_(assistant=answer), trig))
    return out


def mix_sequences(bd: Backdoor, tok: Any, mix: Mix) -> MixSeqs:
    """The mix tokenized as the organisms were trained: the rendered prompt's ids, the answer's ids,
    the end-of-turn ids."""
    rows = mix_items(bd, mix)
    chat = bd.chat(tok)
    prompts = chat.prompt_ids([d for d, _ in rows])
    answers = tok([d.assistant for d, _ in rows], add_special_tokens=False)["input_ids"]
    seqs = [list(p) + list(a) + list(chat.end_ids) for p, a in zip(prompts, answers)]
    return MixSeqs(seqs, [len(p) for p in prompts], [t for _, t in rows])


def padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """([batch, pos] ids right-padded with `pad_id`, the [batch, pos] mask of real tokens)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = True
    return ids, mask


@dataclass
class TokenActs:
    """Activations of every kept token: `acts` [n, d], and where each came from (`row` into the
    sequences, `pos` within its sequence, the token `id`)."""

    acts: Tensor
    row: Tensor
    pos: Tensor
    id: Tensor

    def __len__(self) -> int:
        return len(self.acts)


@torch.no_grad()
def gather(model: Any, seqs: Sequence[Sequence[int]], hooks: Sequence[str], checkpoint_sha: str, pad_id: int,
           skip_first: bool = True, chunk: int = 256, progress: bool = False) -> dict[str, TokenActs]:
    """Activations at `hooks` (TL names) of HF `model` on every token of `seqs` (the first of each
    skipped if `skip_first`), read through the activation cache: sequences sorted by length, each chunk right-padded and
    cached as one entry, so a rerun (another SAE on the same mix) reads instead of recomputing."""
    from tqdm.auto import tqdm

    if not seqs:
        raise PromptError("empty activation set: no sequences to read")
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
    rows, poss, ids = [], [], []
    for start in tqdm(range(0, len(order), chunk), desc="activations", disable=not progress, leave=False):
        idx = order[start:start + chunk]
        tokens, mask = padded([seqs[k] for k in idx], pad_id)
        acts = cached_activations(lambda t, hs: capture(model, t, hs), tokens, list(hooks), checkpoint_sha,
                                  extra={"padding": "right", "reader": "hf"})
        if skip_first:
            mask[:, 0] = False
        r, p = mask.nonzero(as_tuple=True)
        for h in hooks:
            parts[h].append(acts[h][r, p].float())
        rows.append(torch.as_tensor(idx)[r])
        poss.append(p)
        ids.append(tokens[r, p])
    row, pos, tid = torch.cat(rows), torch.cat(poss), torch.cat(ids)
    out = {}
    for h in hooks:
        a = torch.cat(parts[h])
        if len(a) == 0:
            raise PromptError("empty activation set: every sequence is a single token (nothing after BOS)")
        if not torch.isfinite(a).all():
            raise PromptError(f"the activations at {h} hold NaN or Inf; check the checkpoint "
                              "(workbench suite show --verify) before training an SAE on it")
        out[h] = TokenActs(a, row, pos, tid)
    return out


class Batches(Iterator[Tensor]):
    """Endless shuffled batches of exactly `batch_size` rows from an activation matrix: what
    sae-lens's `SAETrainer` counts samples by. Each epoch is a new permutation (seeded); the
    remainder of an epoch that does not fill a batch is dropped."""

    def __init__(self, acts: Tensor, batch_size: int, seed: int = 0):
        if acts.dim() != 2 or len(acts) == 0:
            raise PromptError(f"empty activation set (shape {tuple(acts.shape)}): nothing to train an SAE on")
        if not torch.isfinite(acts).all():
            raise PromptError("the activation set holds NaN or Inf; an SAE trained on it would be NaN")
        if len(acts) < batch_size:
            raise ConfigError(f"{len(acts)} activations are fewer than one batch of {batch_size}; "
                              "use more dialogues (mix.dialogues) or a smaller batch_size")
        self.acts, self.batch_size = acts, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._perm: Tensor = torch.empty(0, dtype=torch.long)
        self._at = 0

    def __next__(self) -> Tensor:
        if self._at + self.batch_size > len(self._perm):
            self._perm, self._at = torch.randperm(len(self.acts), generator=self.gen), 0
        idx = self._perm[self._at:self._at + self.batch_size]
        self._at += self.batch_size
        return self.acts[idx]
