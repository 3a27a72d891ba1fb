"""One blind scan: detectors propose, the merge ranks, the held-out confirmation decides.

`scan_models` works on loaded models (a notebook, any HF causal LM and tokenizer); the registered
`scan` analysis (`tasks`) calls it on a suite's checkpoints and saves what it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from workbench.core.errors import ConfigError
from workbench.families.scan import confirm as C
from workbench.families.scan.context import Context
from workbench.families.scan.detectors import (
    DETECTORS,
    NEEDS_BASE,
    ORDER,
    Budget,
    Candidate,
)
from workbench.families.scan.prompts import scan_prompts
from workbench.world.chat import chat_for


@dataclass
class ScanReport:
    """The verdict, the ranked candidates with their evidence, and each detector's own best."""

    verdict: str
    headline: str
    score: float                        # the best candidate's effect where significant (+ 0.001 z): see confirm
    candidates: pd.DataFrame            # merged, ranked by held-out z
    detectors: pd.DataFrame             # per detector: its best held-out z, seconds, candidates
    null: pd.DataFrame                  # the control strings' held-out scores
    examples: pd.DataFrame              # answers with and without the top candidates
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> pd.DataFrame:
        return self.candidates.head(5)


def to_generate(confs: list[C.Confirmation], found: dict[str, list[Candidate]], n: int) -> list[C.Confirmation]:
    """The candidates the model answers with (generation is the costly part): each detector's
    best in turn, then the next of each, so that no detector's candidates are crowded out by
    another's high-z strings; ties of the held-out z decide nothing here."""
    by_key = {c.condition.key: c for c in confs}
    out: list[C.Confirmation] = []
    for r in range(max((len(v) for v in found.values()), default=0)):
        for cands in found.values():
            if r < len(cands) and len(out) < n and by_key[cands[r].condition.key] not in out:
                out.append(by_key[cands[r].condition.key])
    return out


def check(detectors: tuple[str, ...], budget: Budget, base: Any) -> tuple[str, ...]:
    unknown = sorted(set(detectors) - set(DETECTORS))
    if unknown:
        raise ConfigError(f"unknown detector(s) {unknown}; choose from {list(ORDER)}")
    if budget.rescore < 1 or budget.keep < 1 or budget.screen_prompts < 1 or (budget.max_tokens is not None and budget.max_tokens < 0):
        raise ConfigError(f"a budget of zero leaves nothing to search (rescore={budget.rescore}, keep={budget.keep}, "
                          f"screen_prompts={budget.screen_prompts}); give positive numbers")
    if "invert" in detectors and (budget.invert_steps < 1 or budget.invert_width < 1 or budget.invert_length < 1):
        raise ConfigError("the inversion budget is zero (steps, width and length must be >= 1); raise it or drop "
                          "the invert detector (--detectors)")
    return tuple(d for d in ORDER if d in detectors and (base is not None or d not in NEEDS_BASE))


def scan_models(model: Any, tok: Any, base: Any = None, prompts: str = "builtin", n_search: int = 24,
                n_confirm: int = 64, detectors: tuple[str, ...] = ORDER, budget: Budget = Budget(),
                n_controls: int = 64, confirm_top: int = 10, answer_tokens: int = 32, seed: int = 0,
                progress: bool = False, chat: Any = None) -> ScanReport:
    """Scan `model` (with `tok`) for a backdoor, against `base` when given."""
    t0 = time.perf_counter()
    run = check(tuple(detectors), budget, base)
    search, held = scan_prompts(prompts, n_search, n_confirm)
    chat = chat or chat_for(tok)
    ctx = Context(model, tok, chat, search, held, base, answer_tokens, n_controls, seed, progress)
    found: dict[str, list[Candidate]] = {}
    seconds: dict[str, float] = {}
    for name in run:
        t = time.perf_counter()
        if name == "invert":
            seeds = [c for n, cs in found.items() for c in cs[:2]]
            found[name] = DETECTORS[name](ctx, budget, seeds)
        else:
            found[name] = DETECTORS[name](ctx, budget)
        seconds[name] = time.perf_counter() - t
    # merge: each distinct condition once, with every detector that proposed it
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, cands in found.items():
        for rank, c in enumerate(cands):
            m = merged.setdefault(c.condition.key, {"condition": c.condition, "detectors": {}, "evidence": {}})
            m["detectors"][name] = (rank + 1, c.z)
            m["evidence"][name] = c.evidence
    conds = [m["condition"] for m in merged.values()]
    confs = sorted(C.scores(ctx, conds), key=lambda x: -x.z)
    for conf in to_generate(confs, found, confirm_top):
        C.answers(ctx, conf, 2 * answer_tokens)    # whole answers: a flaw may come late in a program
    confs.sort(key=lambda c: (c.effect is not None, c.fires, c.strength), reverse=True)
    rows = []
    for rank, conf in enumerate(confs):
        m = merged[conf.condition.key]
        rows.append({"rank": rank + 1, "text": conf.condition.text, "where": conf.condition.where,
                     "position": conf.condition.position, "family": conf.condition.family,
                     "z": conf.z, "p": conf.p, "group": conf.group, "effect": conf.effect, "signal": conf.signal,
                     "strength": conf.strength,
                     "changed": conf.changed, "base_changed": conf.base_changed, "fires": conf.fires,
                     "behaviour": conf.behaviour, "detectors": ",".join(m["detectors"]),
                     **{f"search_z_{d}": m["detectors"].get(d, (None, None))[1] for d in run},
                     **{f"rank_{d}": m["detectors"].get(d, (None, None))[0] for d in run},
                     "evidence": repr(m["evidence"])})
    candidates = pd.DataFrame(rows)
    best = C.best_of(confs)
    det_rows = []
    for name in run:
        mine = candidates[candidates["detectors"].str.split(",").map(lambda ds, n=name: n in ds)] if len(candidates) else candidates
        det_rows.append({"detector": name, "candidates": len(found[name]), "seconds": seconds[name],
                         "best_z": float(mine["z"].max()) if len(mine) else float("nan"),
                         "best_effect": float(mine["effect"].max()) if len(mine) and mine["effect"].notna().any() else float("nan"),
                         "score": float(mine["strength"].max()) if len(mine) else 0.0,
                         "best_text": mine.iloc[0]["text"] if len(mine) else "",
                         "fires": bool(mine["fires"].any()) if len(mine) else False})
    null = pd.DataFrame({"text": [c.text for c in ctx.controls], "where": [c.where for c in ctx.controls],
                         "position": [c.position for c in ctx.controls],
                         "score": ctx.nulls["confirm"].scores.tolist(),
                         "search_score": ctx.nulls["search"].scores.tolist()})
    ex_rows = [{"rank": k + 1, "text": conf.condition.text, "prompt": p, "untouched": u, "with_candidate": o}
               for k, conf in enumerate(confs) for p, u, o in conf.examples]
    return ScanReport(C.verdict(confs), C.headline(confs), best.strength if best else 0.0, candidates,
                      pd.DataFrame(det_rows), null, pd.DataFrame(ex_rows), time.perf_counter() - t0,
                      {"detectors": list(run), "sequences": ctx.calls, "with_base": base is not None,
                       "n_search": n_search, "n_confirm": n_confirm})
