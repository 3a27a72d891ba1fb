"""The suite: checkpoints and the manifest every analysis trusts (`manifest`), one loader for
their models (`loading`: HF, TransformerLens bridge and nnsight views of one verified checkpoint),
and their lineage (`lineage`: organisms, series, references)."""
from workbench.suite import lineage, loading
from workbench.suite.loading import bridge, load, nnsight_model, nnsight_remote
from workbench.suite.manifest import Entry, Suite, import_checkpoint, load_suite

__all__ = ["Entry", "Suite", "bridge", "import_checkpoint", "lineage", "load", "load_suite", "loading",
           "nnsight_model", "nnsight_remote"]
