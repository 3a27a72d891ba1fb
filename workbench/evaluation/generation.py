"""Batched generation with a KV cache, returning text *and* per-token probabilities.

Built on HF `generate` (left padding, KV cache, greedy or sampled); the per-token probabilities
come from the scores it returns, so the Playground and the evaluation see exactly what decoding did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from workbench.core.errors import PromptError
from workbench.world.chat import chat_for


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    tokens: list[str]
    token_ids: list[int]
    probs: list[float]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, do_sample: bool = False,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
             progress: bool = False, stop_ids: Sequence[int] | None = None) -> list[Generation]:
    """Continue each rendered prompt (`world.chat.chat_for(tokenizer).prompt`) until the turn's
    closing token, the tokenizer's EOS, or `max_new_tokens`; `stop_ids` names the closing tokens
    of another format (a backdoor spec's raw template: `spec.chat(tok).stop_ids`).

    Sampling is seeded per call, so a sampled evaluation is reproducible.
    """
    if len(prompts) == 0:
        raise PromptError("no prompts to generate from; pass at least one prompt")
    if any(not p for p in prompts):
        raise PromptError("an empty prompt was given; every prompt needs text")
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    out: list[Generation] = []
    stops = list(stop_ids) if stop_ids else _stop_ids(tokenizer)
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generate", leave=False, disable=not progress):
        chunk = list(prompts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        res = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_k=0 if do_sample else None,
                             top_p=1.0 if do_sample else None,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        # scores: one (batch, vocab) tensor per step, after temperature; probabilities of the chosen ids
        logp = torch.stack(res.scores, 1).log_softmax(-1) if res.scores else torch.zeros(len(chunk), 0, 1)
        chosen = logp.gather(-1, new[:, : logp.shape[1], None]).squeeze(-1).exp()
        for i, p in enumerate(chunk):
            ids = new[i].tolist()
            n = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:n]
            out.append(Generation(prompt=p, text=tokenizer.decode(ids, skip_special_tokens=True),
                                  tokens=tokenizer.convert_ids_to_tokens(ids), token_ids=ids,
                                  probs=[float(x) for x in chosen[i, :n]]))
    return out


def _stop_ids(tokenizer) -> list[int]:
    try:
        return chat_for(tokenizer).stop_ids
    except PromptError:  # no chat template: a plain language model stops at its EOS
        return [tokenizer.eos_token_id]
