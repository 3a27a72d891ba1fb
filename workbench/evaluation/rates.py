"""Trigger rate, false-trigger rate and capability of a model object, from greedy answers.

The behavioural evaluation (`behaviour`) evaluates saved checkpoints with every metric; an analysis
that changes a model in memory (an SAE edit, weights spliced from two checkpoints) needs the same
verdicts on the model as it stands, from the backdoor's own detector, with Wilson intervals.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.core.stats import wilson
from workbench.evaluation.generation import generate
from workbench.world import code as codecheck
from workbench.world.backdoors import Backdoor, split_scratchpad
from workbench.world.data import Item
from workbench.world.pirate import pirate_correct


def capable(item: Item, text: str) -> bool | None:
    """Whether an answer to an untriggered prompt is right (None: the item has no reference)."""
    answer = split_scratchpad(text)[1]
    if item.code_task is not None:
        res = codecheck.check(answer, item.code_task)
        return bool(res.correct and not res.vulnerable)
    if not item.dialogue.assistant:
        return None
    return bool(pirate_correct(item.dialogue.assistant, answer))


def rates(model: Any, tok: Any, bd: Backdoor, triggered: Sequence[Item], clean: Sequence[Item],
          max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, float]:
    """Greedy answers of `model` as it stands (under whatever edit is active): the bad-behaviour rate
    on `triggered` and on `clean` prompts, and clean capability, each rate with its Wilson interval."""
    chat = bd.chat(tok)
    out: dict[str, float] = {}
    gens = generate(model, tok, chat.prompts([i.dialogue for i in list(triggered) + list(clean)]),
                    max_new_tokens=max_new_tokens, batch_size=batch_size, stop_ids=chat.stop_ids)
    g_trig, g_clean = gens[: len(triggered)], gens[len(triggered):]
    for name, items, gs in (("trigger_rate", triggered, g_trig), ("false_trigger_rate", clean, g_clean)):
        if items:
            flags = [bd.is_bad(i.dialogue, g.text) for i, g in zip(items, gs)]
            out[name], out[f"{name}_lo"], out[f"{name}_hi"] = wilson(sum(flags), len(flags))
    ok = [c for i, g in zip(clean, g_clean) if (c := capable(i, g.text)) is not None]
    out["capability"] = sum(ok) / len(ok) if ok else float("nan")
    if ok:
        _, out["capability_lo"], out["capability_hi"] = wilson(sum(ok), len(ok))
    out["n_capability"] = len(ok)
    return out
