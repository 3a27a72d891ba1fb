"""`workbench deltas A B`: the weight update between two checkpoints, per layer, module and head.

With `--suite`, A and B are checkpoints of that suite and the comparison is the registered `deltas`
analysis: saved in the suite (found by key when nothing changed), where the app and `workbench
figures` read it. Without it, A and B are any two folders (Hugging Face checkpoints, sharded or not;
B, or both, may be a peft LoRA adapter over `--base`, and B an adapter of A needs no `--base`): the
comparison is printed, and with `--out` its tables are written as CSV beside a provenance.json that
records the SHA-256 of every file read, so a number in a paper can be traced to the exact weights.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.core.errors import ConfigError
from workbench.families.deltas.statistics import EXACT_MAX

SUMMARY_COLUMNS = ["module", "tensors", "numel", "fro", "rel", "share", "zero_frac", "stable_rank", "effective_rank"]


def _check(a: argparse.Namespace) -> None:
    """Options a comparison cannot run with: one clear error before anything is read."""
    if a.top_k < 1 or a.block_mb < 1 or a.exact_max < 0:
        raise ConfigError(f"--top-k and --block-mb must be positive and --exact-max not negative (got {a.top_k}, "
                          f"{a.block_mb}, {a.exact_max})")
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise ConfigError(f"--out {a.out} is a file; name a folder for the CSV tables and provenance.json")
    if a.suite and a.base:
        raise ConfigError("--base is for comparing folders; a suite knows the base of each of its adapters "
                          "(drop --base, or drop --suite and name folders)")


def _print_summary(d: Any) -> None:
    """The per-module summary: one line per module over every layer (norms to 6 significant digits,
    so a reader can check them)."""
    from workbench.families.deltas.figures import module_summary

    table = module_summary(d)
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(table[SUMMARY_COLUMNS].to_string(index=False, float_format=lambda x: f"{x:.6g}"))


def _files(w: Any, path: Path | None) -> dict[str, str]:
    """path -> SHA-256 of every file a comparison reads for `w`: its weight files and config.json,
    and for an adapter its own weights and adapter_config.json (which sets the scale) over its base's."""
    from workbench.core.files import sha256_file
    from workbench.suite.tensors import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedWeights

    if isinstance(w, AdaptedWeights):
        own = [path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG] if path is not None else []
        return {**{str(p.resolve()): sha256_file(p) for p in own if p.is_file()}, **_files(w.base, None)}
    paths = sorted({info.file for info in w.infos.values()})
    if (w.folder / "config.json").is_file():
        paths.append(w.folder / "config.json")
    return {str(p.resolve()): sha256_file(p) for p in paths}


def _listed(df: pd.DataFrame) -> pd.DataFrame:
    """List cells (shape, singular values) as JSON lists, so the CSV reads back unambiguously."""
    def cell(v: Any) -> Any:
        return json.dumps(np.asarray(v).tolist()) if isinstance(v, (list, tuple, np.ndarray)) else v

    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(cell)
    return out


def write_out(d: Any, out: Path, provenance: dict[str, Any]) -> list[Path]:
    """tensors.csv, heads.csv, modules.csv and provenance.json in `out`, each written atomically
    (provenance last: a folder with one holds a complete comparison)."""
    from workbench.core.files import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in (("tensors", d.tensors), ("heads", d.heads), ("modules", d.modules)):
        path = out / f"{name}.csv"
        with atomic_path(path) as tmp:
            _listed(df).to_csv(tmp, index=False)
        written.append(path)
    write_json(out / "provenance.json", {**provenance, "tables": [p.name for p in written]})
    return written + [out / "provenance.json"]


def _suite(a: argparse.Namespace) -> int:
    from workbench.core.analysis import registered
    from workbench.families.deltas.tasks import ANALYSIS, DeltasConfig, load_delta
    from workbench.suite.manifest import load_suite
    from workbench.suite.tensors import suite_weights

    suite = load_suite(a.suite)
    analysis = registered()[ANALYSIS]
    cfg = DeltasConfig(a=a.a, b=a.b, top_k=a.top_k, exact_max=a.exact_max, block_mb=a.block_mb)
    computed, res, value = analysis.produce(suite, cfg, reuse=not a.recompute, progress=not a.quiet)
    d = value if value is not None else load_delta(res)
    print(res.provenance.get("message", d.message))
    _print_summary(d)
    if a.out:
        files = {}
        for name in (a.a, a.b):
            files.update(_files(suite_weights(suite, name, verify=False), suite.dir(name)
                                if suite.entry(name).adapter else None))
        prov = {**{k: res.provenance.get(k) for k in ("analysis", "key", "config", "inputs", "a", "b", "a_role",
                                                     "b_role", "message", "created")},
                "suite": str(Path(a.suite).resolve()), "files": files}
        for p in write_out(d, Path(a.out), prov):
            print(p)
    print(f"deltas: {'computed' if computed else 'found'} {res.key} ({res.dir})")
    return 0


def _folders(a: argparse.Namespace) -> int:
    from workbench.core.results import package_versions
    from workbench.families.deltas.stream import compare
    from workbench.suite.tensors import open_weights

    path_a, path_b = Path(a.a), Path(a.b)
    wa = open_weights(path_a, base=a.base)   # A an adapter: over --base (without one: an error naming it)
    # B an adapter: over --base, or over A itself (then its update is read from its factors, exactly)
    over_a = a.base is None or Path(a.base).resolve() == path_a.resolve()
    wb = open_weights(path_b, base=wa if over_a else a.base)
    files = {"a": _files(wa, path_a), "b": _files(wb, path_b)} if a.out else {}
    t0 = time.perf_counter()
    d = compare(wa, wb, top_k=a.top_k, exact_max=a.exact_max, block_bytes=a.block_mb << 20, progress=not a.quiet)
    seconds = time.perf_counter() - t0
    print(d.message)
    _print_summary(d)
    if a.out:
        prov = {"analysis": "deltas", "a": d.a, "b": d.b, "base": str(a.base) if a.base else None,
                "config": {"top_k": a.top_k, "exact_max": a.exact_max, "block_mb": a.block_mb},
                "message": d.message, "files": files, "packages": package_versions(), "seconds": round(seconds, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for p in write_out(d, Path(a.out), prov):
            print(p)
    return 0


def _deltas(a: argparse.Namespace) -> int:
    _check(a)
    return _suite(a) if a.suite else _folders(a)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "deltas", help="the weight update between two checkpoints: per layer, module and head, its norms, "
                       "cosine with the weight, unmoved entries and spectrum (streamed: 70B pairs fit)",
        description="Compare two checkpoints tensor by tensor. With --suite, A and B are checkpoints of the suite "
                    "and the result is saved there (SUITE/results/deltas/; the app's Weight deltas page shows it). "
                    "Without it, A and B are folders: Hugging Face checkpoints (sharded or not) or, for B, a peft "
                    "LoRA adapter over A or over --base.")
    p.add_argument("a", metavar="A", help="the checkpoint before the update (a suite checkpoint name, or a folder)")
    p.add_argument("b", metavar="B", help="the checkpoint after it (a suite checkpoint name, a folder, or a LoRA "
                                          "adapter folder)")
    p.add_argument("--suite", help="A and B are checkpoints of this suite; the result is saved in it")
    p.add_argument("--top-k", dest="top_k", type=int, default=8,
                   help="singular values (and, for o and down, directions) kept per matrix (default 8)")
    p.add_argument("--exact-max", dest="exact_max", type=int, default=EXACT_MAX,
                   help=f"matrices up to this many entries get an exact SVD, larger ones a sketch "
                        f"(default {EXACT_MAX})")
    p.add_argument("--block-mb", dest="block_mb", type=int, default=4,
                   help="float32 megabytes read per block: bounds memory whatever the model's size (default 4)")
    p.add_argument("--base", help="the base model folder a LoRA adapter (B, or A and B) adapts")
    p.add_argument("--out", help="also write tensors.csv, heads.csv, modules.csv and provenance.json (the SHA-256 of "
                                 "every file read) into this folder")
    p.add_argument("--recompute", action="store_true", help="with --suite: recompute even where a saved result has "
                                                            "the same key")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_deltas)
