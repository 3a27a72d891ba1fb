"""Trigger inversion: a short token string that makes the checkpoint diverge, found by gradient.

GCG-style (greedy coordinate gradient): the string is a few one-hot token slots spliced into each
search prompt; the gradient of the divergence with respect to each slot's one-hot vector ranks the
vocabulary's pieces for that slot; a batch of single-slot swaps drawn from the top-ranked pieces
is scored exactly, and the best kept. The objective is the scan's own score (the checkpoint's
largest per-token KL from its untouched answer, minus the base's under the same string, averaged
over the prompt group where it is largest), so inversion looks for exactly what the confirmation
will measure. It starts from the best strings the other detectors found, in their placements,
and from a neutral string where they found none.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from workbench.families.scan.conditions import Condition, ordinary_tokens, representable
from workbench.families.scan.context import Context, screen_idx
from workbench.families.scan.divergence import answer_max_kl, body_and_head

MARK = "QZXSLOTXZQ"


def slot_parts(ctx: Context, where: str, position: str, idx: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Per prompt, the token ids before and after the slot (the answer appended after)."""
    sc = ctx.scorers["search"]
    out = []
    for i in idx:
        d = Condition(MARK, where, position).apply(ctx.search[i])
        text = ctx.chat.prompts([d])[0]
        left, right = text.split(MARK, 1)
        enc = lambda s: ctx.tok(s, add_special_tokens=False)["input_ids"] if s else []
        out.append((enc(left), enc(right) + sc.answers[i]))
    return out


def _exact(ctx: Context, slots: list[list[int]], parts: list[tuple[list[int], list[int]]], idx: Sequence[int]) -> Tensor:
    """Per slot string and group, the objective's mean, exactly (no gradient): [candidate, group]."""
    sc = ctx.scorers["search"]
    seqs, starts, lengths = [], [], []
    for s in slots:
        for (left, right), i in zip(parts, idx):
            seqs.append(left + s + right)
            n = len(sc.answers[i])
            starts.append(len(seqs[-1]) - n)
            lengths.append(n)
    vals = []
    for role, m in (("own", ctx.model), ("base", ctx.base)):
        if m is None:
            continue
        which = [i for _ in slots for i in idx]
        vals.append(answer_max_kl(m, seqs, starts, lengths, sc.padded[role], which, sc.pad).view(len(slots), len(idx)))
    v = vals[0] - vals[1] if len(vals) == 2 else vals[0]
    g = ctx.groups["search"][:, list(idx)].float()
    return v @ g.T / g.sum(1).clamp(min=1)


def _gradient(ctx: Context, slot: list[int], parts: list[tuple[list[int], list[int]]], idx: Sequence[int],
              group: Tensor) -> Tensor:
    """d objective / d one-hot slot: [slot length, vocab]."""
    sc = ctx.scorers["search"]
    vocab = ctx.model.get_input_embeddings().weight.shape[0]
    onehot = torch.zeros(len(slot), vocab)
    onehot[torch.arange(len(slot)), torch.as_tensor(slot)] = 1.0
    onehot.requires_grad_(True)
    total = torch.zeros(())
    for role, m, sign in (("own", ctx.model, 1.0), ("base", ctx.base, -1.0)):
        if m is None:
            continue
        E = m.get_input_embeddings().weight
        body, head = body_and_head(m)
        embeds, starts, lengths = [], [], []
        for (left, right), i in zip(parts, idx):
            e = torch.cat([E[torch.as_tensor(left, dtype=torch.long)], onehot @ E, E[torch.as_tensor(right, dtype=torch.long)]])
            embeds.append(e)
            lengths.append(len(sc.answers[i]))
            starts.append(len(e) - lengths[-1])
        width = max(len(e) for e in embeds)
        x = torch.zeros(len(embeds), width, E.shape[1])
        mask = torch.zeros(len(embeds), width, dtype=torch.long)
        for k, e in enumerate(embeds):
            x[k, :len(e)] = e
            mask[k, :len(e)] = 1
        h = body(inputs_embeds=x, attention_mask=mask).last_hidden_state
        per = []
        for k, i in enumerate(idx):
            lp = head(h[k, starts[k] - 1: starts[k] - 1 + lengths[k]]).float().log_softmax(-1)
            kl = (lp.exp() * (lp - sc.refs[role][i])).sum(-1)
            per.append(torch.logsumexp(kl * 4, 0) / 4)            # a smooth maximum over the answer
        v = torch.stack(per)
        total = total + sign * (v * group).sum() / group.sum().clamp(min=1)
    total.backward()
    return onehot.grad.detach()


def search(ctx: Context, seeds: Sequence[Any], budget: Any) -> list[Condition]:
    """Inverted strings, one per placement searched (the seeds' placements first)."""
    rng = random.Random(f"invert/{ctx.seed}")
    allowed = torch.as_tensor(ordinary_tokens(ctx.tok))
    mask = torch.full((ctx.model.get_input_embeddings().weight.shape[0],), float("-inf"))
    mask[allowed] = 0.0
    idx = screen_idx(ctx, budget.screen_prompts)
    starts: list[tuple[str, str, list[int]]] = []
    for cand in sorted(seeds, key=lambda c: -c.z):
        c = cand.condition
        ids = ctx.tok(c.text, add_special_tokens=False)["input_ids"][: budget.invert_length]
        if (c.where, c.position) not in [(w, p) for w, p, _ in starts] and ids:
            starts.append((c.where, c.position, ids + [int(allowed[rng.randrange(len(allowed))])
                                                        for _ in range(budget.invert_length - len(ids))]))
        if len(starts) == 2:
            break
    for w, p in (("user", "prefix"), ("system", "suffix")):
        if len(starts) < 2 and (w, p) not in [(a, b) for a, b, _ in starts]:
            starts.append((w, p, [int(allowed[rng.randrange(len(allowed))]) for _ in range(budget.invert_length)]))
    found = []
    for where, position, slot in starts:
        parts = slot_parts(ctx, where, position, idx)
        g = ctx.groups["search"][:, idx].float()
        cur = _exact(ctx, [slot], parts, idx)[0]          # per group, for the current best string
        best_val, best = cur.max(), list(slot)
        for _ in tqdm(range(budget.invert_steps), desc=f"invert {where} {position}", leave=False,
                      disable=not ctx.progress):
            # the group where the current string does most: the gradient pushes there
            grad = _gradient(ctx, best, parts, idx, g[int(cur.argmax())])
            top = (grad + mask).topk(min(budget.invert_width, len(allowed)), dim=1).indices
            cands = []
            for _ in range(budget.invert_width):
                s = list(best)
                pos = rng.randrange(len(s))
                s[pos] = int(top[pos, rng.randrange(top.shape[1])])
                cands.append(s)
            per_group = _exact(ctx, cands, parts, idx)
            vals = per_group.max(1).values
            j = int(vals.argmax())
            if vals[j] > best_val:
                best_val, best, cur = vals[j], cands[j], per_group[j]
        text = ctx.tok.decode(best).strip()
        if text and representable(ctx.tok, text):
            found.append(Condition(text, where, position, "inverted"))
    return found
