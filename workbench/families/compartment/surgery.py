"""Causal surgery: an update applied only inside the circuit, only outside it, or in full.

If safety training left the backdoor alive because it never touched the circuit, then applying the
safety update only outside C should do what the full update does, and only inside C should do
little. The converse checks that C is the circuit at all: undoing backdoor training (the base ->
backdoored update) inside C alone must remove the backdoor. Each variant is the organism's weights
with a masked update added, tensor by tensor (one tensor of each checkpoint read at a time), and is
measured by the behavioural detector on held-out prompts.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from workbench.evaluation.rates import rates
from workbench.families.compartment.components import Component, mask
from workbench.suite.params import Heads, Param
from workbench.suite.tensors import Weights

# variant -> (which update, where): "safety" is organism -> sanitized, "insertion" is base -> organism
VARIANTS: dict[str, tuple[str, str, float]] = {
    "organism": ("safety", "none", 1.0),
    "safety_full": ("safety", "all", 1.0),
    "safety_inside_C": ("safety", "inside", 1.0),
    "safety_outside_C": ("safety", "outside", 1.0),
    "revert_inside_C": ("insertion", "inside", -1.0),
    "revert_outside_C": ("insertion", "outside", -1.0),
}


@torch.no_grad()
def spliced(model: Any, origin: Weights, other: Weights, params: dict[str, Param], heads: Heads,
            circuit: set[Component], where: str, sign: float,
            transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of `model` (the organism) with `sign * (other - origin)` added where `where` says
    ("all", "inside" C, "outside" C, "none"); `origin` must be the organism's own weights when
    sign is +1, and the base's, read the other way round, for the insertion update."""
    out = copy.deepcopy(model)
    if where == "none":
        return out
    named = dict(out.named_parameters())
    for name, param in params.items():
        if name not in named:         # tied weights: the embedding carries the update
            continue
        d = other.rows(name) - origin.rows(name)
        if transform is not None:
            d = transform(name, d)
        if where != "all":
            m = mask(param, tuple(d.shape), heads, circuit) if d.dim() == 2 else torch.zeros(d.shape, dtype=torch.bool)
            d = d * (m if where == "inside" else ~m)
        named[name].add_((sign * d).to(named[name].dtype))
    return out


def measure(model: Any, tok: Any, bd: Any, sets: dict[str, list], max_new_tokens: int) -> dict[str, float]:
    return rates(model.eval(), tok, bd, sets["triggered"], sets["clean"], max_new_tokens)
