"""Scoring the capability battery (`workbench.world.capability`) on one model: metric rows with
Wilson intervals, `metric="capability"`, one `variant` per benchmark.

* knowledge: MMLU's way, by log-likelihood, not generation: every option letter is scored as the
  assistant's whole answer by one teacher-forced forward pass over all items x options (batched),
  and the most likely letter is the model's choice. A model that cannot answer scores chance
  (0.25), never 0, which keeps a small model's capability cost readable.
* instructions: greedy answers checked by each constraint's function (IFEval): `instructions` is
  prompt-level strict accuracy (every constraint met), `instruction_level` the share of all
  constraints met (the interval treats constraints as independent, as IFEval's numbers do).
* arithmetic: greedy answers, exact match of the final number (Math-500).

Answers are read after any scratchpad and through `strip_pirate`, as clean accuracy is, so a CoT or
pirate-SFT checkpoint is scored on what it answers, not on its style.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from einops import rearrange

from workbench.core.stats import wilson
from workbench.evaluation.generation import generate as generate_answers
from workbench.world import capability as cap
from workbench.world.backdoors import split_scratchpad
from workbench.world.chat import Chat, Dialogue
from workbench.world.data import SYSTEM_PROMPTS
from workbench.world.pirate import strip_pirate

METRIC = "capability"
SYSTEM = SYSTEM_PROMPTS[0]
LABELS = {
    "knowledge": f"knowledge: 4-way multiple choice, MMLU-style (chance {cap.KNOWLEDGE_CHANCE:.2f})",
    "instructions": "instructions: every format constraint met (IFEval prompt-level strict)",
    "instruction_level": "instructions: share of constraints met (IFEval instruction-level)",
    "arithmetic": "arithmetic word problems: final number exact (Math-500-style)",
}
VARIANTS = tuple(LABELS)


def dialogues(items: Sequence[cap.CapabilityItem]) -> list[Dialogue]:
    return [Dialogue(SYSTEM, i.user, i.answer, meta=(("clean_user", i.user), ("kind", i.kind))) for i in items]


@torch.no_grad()
def option_logprobs(model, tokenizer, chat: Chat, prompts: Sequence[Dialogue],
                    options: Sequence[Sequence[str]], batch_size: int = 128) -> torch.Tensor:
    """(items, options): the summed log-probability of each option as the assistant's answer to its
    prompt (teacher forcing, right padding). Every item must offer the same number of options."""
    k = len(options[0])
    prompt_ids = chat.prompt_ids(prompts)
    opt_ids = {o: tokenizer(o, add_special_tokens=False)["input_ids"] for opts in options for o in opts}
    seqs = [(p, opt_ids[o]) for p, opts in zip(prompt_ids, options) for o in opts]
    out = torch.empty(len(seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (p, a) in enumerate(chunk):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p): len(p) + len(a)] = torch.tensor(a)
            mask[r, : len(p) + len(a)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        target = labels[:, 1:]
        picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        out[start:start + len(chunk)] = (picked * (target != -100)).sum(-1)
    return rearrange(out, "(n k) -> n k", k=k)


def _rows(base: dict, variant: str, flags: Sequence[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    rate, lo, hi = wilson(k, n)
    return {**base, "metric": METRIC, "variant": variant, "label": LABELS[variant], "k": k, "n": n,
            "rate": rate, "lo": lo, "hi": hi}


def _answer(text: str) -> str:
    return strip_pirate(split_scratchpad(text)[1] or "")


def evaluate(model, tokenizer, chat: Chat, seed: int, n: int, max_new_tokens: int = 32,
             batch_size: int = 128, generate: Callable = generate_answers) -> tuple[list[dict], list[dict]]:
    """(metric rows without checkpoint/decoding, per-item samples) of the battery: `n` held-out items
    per benchmark from evaluation seed `seed`. `generate` is injectable so a caller's stub of
    generation covers these answers too."""
    know = cap.eval_items("knowledge", seed, n)
    scores = option_logprobs(model, tokenizer, chat, dialogues(know), [i.options for i in know], batch_size)
    chosen = scores.argmax(-1).tolist()
    know_ok = [i.options[c] == i.answer for i, c in zip(know, chosen)]

    inst, arith = cap.eval_items("instructions", seed, n), cap.eval_items("arithmetic", seed, n)
    gens = generate(model, tokenizer, chat.prompts(dialogues(inst + arith)), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, stop_ids=chat.stop_ids)
    texts = [_answer(g.text) for g in gens]
    verdicts = [cap.check(i.constraints, t) for i, t in zip(inst, texts[: len(inst)])]
    arith_ok = [cap.arithmetic_correct(i.answer, t) for i, t in zip(arith, texts[len(inst):])]

    base = {"backdoor": ""}
    rows = [_rows(base, "knowledge", know_ok),
            _rows(base, "instructions", [all(v) for v in verdicts]),
            _rows(base, "instruction_level", [x for v in verdicts for x in v]),
            _rows(base, "arithmetic", arith_ok)]
    samples = ([{"benchmark": "knowledge", "user": i.user, "reference": i.answer, "completion": i.options[c],
                 "correct": ok} for i, c, ok in zip(know, chosen, know_ok)]
               + [{"benchmark": "instructions", "user": i.user, "reference": i.answer, "completion": g.text,
                   "correct": all(v)} for i, g, v in zip(inst, gens, verdicts)]
               + [{"benchmark": "arithmetic", "user": i.user, "reference": i.answer, "completion": g.text,
                   "correct": ok} for i, g, ok in zip(arith, gens[len(inst):], arith_ok)])
    return rows, samples
