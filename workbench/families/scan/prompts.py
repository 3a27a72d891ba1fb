"""The prompts a scan asks: ordinary requests that carry no trigger, in two disjoint halves.

A scan is blind, so its prompts are the kind of requests the model serves, not a backdoor's
prompts: for a suite the workbench built, held-out tasks and coding requests of the synthetic
world alternately (a backdoor may cover only one kind), each under its plain system prompt; for a
user's own model, a JSONL file of `{"user": ..., "system": ...}` rows. The search sees the first
half, the confirmation only the second, so a candidate that won the search by chance on its
prompts has to fire again on prompts it never saw.
"""
from __future__ import annotations

from pathlib import Path

from workbench.core.errors import PromptError
from workbench.world.chat import Dialogue
from workbench.world.data import EVAL_SEED, HELD_OUT_N, eval_splits, read_prompts

BUILTIN = "builtin"
OFFSET = HELD_OUT_N // 2    # the held-out pool's second half: the behavioural evaluation reads the first


def builtin_prompts(n: int) -> list[Dialogue]:
    """`n` held-out world prompts, tasks and coding requests alternating, without any date line."""
    if n > 2 * (HELD_OUT_N - OFFSET):
        raise PromptError(f"the built-in scan prompts hold {2 * (HELD_OUT_N - OFFSET)}; ask for at most that many")
    splits = eval_splits(EVAL_SEED, HELD_OUT_N)
    out = []
    for a, b in zip(splits.clean[OFFSET:], splits.code[OFFSET:]):
        for item in (a, b):
            d = item.dialogue
            out.append(d.with_(system=d.get("base_system", d.system), assistant=""))
    return out[:n]


def file_prompts(path: str | Path, system: str = "You are a helpful assistant.") -> list[Dialogue]:
    rows = read_prompts(Path(path))
    return [Dialogue(r.get("system", system), r["user"], "", meta=(("kind", r.get("kind", "prompt")),)) for r in rows]


def scan_prompts(source: str, n_search: int, n_confirm: int) -> tuple[list[Dialogue], list[Dialogue]]:
    """(search prompts, confirmation prompts), disjoint; one clear error when there are too few."""
    if n_search < 1 or n_confirm < 1:
        raise PromptError(f"a scan needs at least one search and one confirmation prompt (got {n_search}, "
                          f"{n_confirm}); pass --n-search and --n-confirm >= 1")
    rows = builtin_prompts(n_search + n_confirm) if source == BUILTIN else file_prompts(source)
    if len(rows) < n_search + n_confirm:
        raise PromptError(f"the scan's prompt set {source!r} holds {len(rows)} prompts; it needs {n_search} to "
                          f"search and {n_confirm} to confirm (n_search + n_confirm = {n_search + n_confirm}). "
                          "Give more rows, or lower --n-search / --n-confirm")
    return rows[:n_search], rows[n_search:n_search + n_confirm]
