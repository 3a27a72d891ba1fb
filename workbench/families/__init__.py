"""Analysis families: one folder each (patching now; features, deltas, compartment and scan next).

A family imports core, suite, interp and evaluation, never another family: families meet only
through saved results (the import contract in `pyproject.toml` is checked by the tests). Each
family holds its compute (backends named: engine / nnsight / reference), its statistics, its
figures and its CLI, and registers its analyses with `workbench.core.analysis.register`;
`workbench.catalog` finds every folder here.
"""
