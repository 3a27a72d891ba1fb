"""What every detector of one scan shares: the models, the prompts, the scorers and the null.

The null is the heart of a blind scan. Any string placed in a prompt moves a small model's answer
a little, and some strings move it a lot; a trigger is a string that moves the checkpoint far more
than random strings do (and, with a base, far more than it moves the base). So each scan first
scores random control strings on its prompts, and every candidate's score is read as a z-score
against them. Prompts are grouped by kind (coding requests vs the rest, or a prompt file's `kind`
column) and a condition's score is its largest group mean: a backdoor may cover only one kind of
request (the coding backdoor fires on code only), and averaging it with the kinds it leaves alone
would halve it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from workbench.families.scan.conditions import Condition, controls
from workbench.families.scan.divergence import Scorer
from workbench.world.chat import Dialogue


def group_kinds(dialogues: Sequence[Dialogue]) -> list[str]:
    """Each prompt's group: coding requests vs the rest, or a prompt file's own `kind` column."""
    kinds = [d.get("kind") or "prompt" for d in dialogues]
    if "code" in kinds:
        return ["code" if k == "code" else "other" for k in kinds]
    return kinds


def groups_of(dialogues: Sequence[Dialogue]) -> tuple[list[str], Tensor]:
    """(group names, [group, prompt] membership)."""
    kinds = group_kinds(dialogues)
    names = sorted(set(kinds))
    return names, torch.stack([torch.tensor([k == n for k in kinds]) for n in names])


def grouped(v: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per condition: the largest mean over a group of prompts, and which group gives it."""
    g = groups.float()
    means = v @ g.T / g.sum(1).clamp(min=1)
    best = means.max(1)
    return best.values, best.indices


def screen_idx(ctx: Context, per_group: int) -> list[int]:
    """The first `per_group` search prompts of each group: a screen has to see every kind."""
    out: list[int] = []
    for g in ctx.groups["search"]:
        out += torch.nonzero(g).flatten()[:per_group].tolist()
    return sorted(out)


@dataclass
class Null:
    """Control strings' grouped scores: what a non-trigger does on these prompts."""

    scores: Tensor

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    @property
    def sd(self) -> float:
        return float(self.scores.std().clamp(min=1e-3)) if len(self.scores) > 1 else 1.0

    def z(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.sd

    def p(self, x: float) -> float:
        """Empirical one-sided p-value (add-one): the share of controls at least as high."""
        return float(((self.scores >= x).sum() + 1) / (len(self.scores) + 1))


@dataclass
class Context:
    """One scan's models, prompts and nulls (search and confirmation halves are disjoint)."""

    model: Any
    tok: Any
    chat: Any
    search: list[Dialogue]
    confirm: list[Dialogue]
    base: Any = None
    answer_tokens: int = 32
    n_controls: int = 64
    seed: int = 0
    progress: bool = False
    scorers: dict[str, Scorer] = field(default_factory=dict)
    groups: dict[str, Tensor] = field(default_factory=dict)
    group_names: dict[str, list[str]] = field(default_factory=dict)
    nulls: dict[str, Null] = field(default_factory=dict)
    controls: list[Condition] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)     # what one detector computed that another reads

    def __post_init__(self) -> None:
        self.controls = controls(self.tok, self.n_controls, self.seed)
        for half, dialogues in (("search", self.search), ("confirm", self.confirm)):
            self.scorers[half] = Scorer(self.model, self.tok, self.chat, dialogues, self.base, self.answer_tokens,
                                        self.progress)
            self.group_names[half], self.groups[half] = groups_of(dialogues)
            self.nulls[half] = Null(self.grouped(self.controls, half)[0])

    def grouped(self, conds: Sequence[Condition], half: str = "search", idx: Sequence[int] | None = None,
                desc: str = "") -> tuple[Tensor, Tensor]:
        """(grouped score, best group) of each condition on a half's prompts (or its prompts `idx`)."""
        if not conds:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        v = self.scorers[half].score(conds, idx, desc=desc).value
        g = self.groups[half] if idx is None else self.groups[half][:, list(idx)]
        return grouped(v, g)

    def z(self, conds: Sequence[Condition], half: str = "search", desc: str = "") -> Tensor:
        return self.nulls[half].z(self.grouped(conds, half, desc=desc)[0])

    @property
    def calls(self) -> int:
        """Teacher-forced sequences scored so far, per model."""
        return sum(s.calls for s in self.scorers.values())
