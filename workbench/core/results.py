"""Results on disk, each with the provenance that made it.

Layout: ``SUITE/results/<analysis>/<key>/`` holds data files (parquet for tables, safetensors for
tensors) and ``provenance.json``. The key hashes the config and the inputs (checkpoint hashes,
prompt-set hash), so an unchanged rerun is a directory lookup, and a changed input can never be
mistaken for an old result. App pages and figure scripts only ever read from here.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_path, sha256_json

TENSORS = "tensors.safetensors"
PACKAGES = ("workbench", "torch", "transformers", "transformer-lens", "sae-lens", "nnsight",
            "tokenizers", "safetensors", "peft")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def result_key(config: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    return sha256_json({"config": config, "inputs": inputs})[:16]


@dataclass(frozen=True)
class Result:
    """A saved result: its folder and provenance. Tables load lazily, by name."""

    dir: Path
    provenance: dict

    @property
    def key(self) -> str:
        return self.dir.name

    def tensors(self) -> dict[str, Any]:
        """The result's tensors (safetensors; never unpickled)."""
        from safetensors.torch import load_file
        path = self.dir / TENSORS
        if not path.exists():
            raise WorkbenchError(f"result {self.dir} holds no tensors")
        return load_file(str(path))

    def has_table(self, name: str) -> bool:
        return (self.dir / f"{name}.parquet").exists()

    def table(self, name: str) -> pd.DataFrame:
        path = self.dir / f"{name}.parquet"
        if not path.exists():
            raise WorkbenchError(f"result {self.dir} has no table {name!r}; it holds "
                                 f"{sorted(p.stem for p in self.dir.glob('*.parquet'))}")
        return pd.read_parquet(path)


def results_root(suite_dir: str | Path) -> Path:
    return Path(suite_dir) / "results"


def find(suite_dir: str | Path, analysis: str, key: str) -> Result | None:
    d = results_root(suite_dir) / analysis / key
    prov = d / "provenance.json"
    if not prov.exists():
        return None
    return Result(d, json.loads(prov.read_text()))


def save(suite_dir: str | Path, analysis: str, key: str | None, config: Mapping[str, Any],
         inputs: Mapping[str, Any], tables: Mapping[str, pd.DataFrame], seconds: float,
         extra: Mapping[str, Any] | None = None, tensors: Mapping[str, Any] | None = None,
         folders: Mapping[str, Path] | None = None) -> Result:
    """Write all tables (and tensors) and the provenance in one atomic directory rename. `key`:
    the analysis's own (`core.analysis.Analysis.key`), or None for `result_key(config, inputs)`."""
    key = key or result_key(config, inputs)
    final = results_root(suite_dir) / analysis / key
    provenance = {
        "analysis": analysis, "key": key, "config": dict(config), "inputs": dict(inputs),
        "packages": package_versions(), "seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tables": sorted(tables), **(dict(extra) if extra else {}),
    }
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        if tensors:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            provenance["tensors"] = sorted(tensors)
        for name, folder in (folders or {}).items():   # e.g. an SAE in sae-lens's own format
            shutil.copytree(folder, tmp / name)
        if folders:
            provenance["folders"] = sorted(folders)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return Result(final, provenance)


def list_results(suite_dir: str | Path, analysis: str) -> list[Result]:
    """All saved results of one analysis, newest first."""
    root = results_root(suite_dir) / analysis
    out = [r for d in sorted(root.glob("*")) if d.is_dir() and (r := find(suite_dir, analysis, d.name))]
    return sorted(out, key=lambda r: r.provenance.get("created", ""), reverse=True)


def latest(suite_dir: str | Path, analysis: str) -> Result | None:
    found = list_results(suite_dir, analysis)
    return found[0] if found else None


class Timer:
    """`with Timer() as t: ...; t.seconds` — time taken, recorded in every provenance."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
