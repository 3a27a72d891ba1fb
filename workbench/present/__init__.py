"""How results look: one paper style and export for every figure (`style`), and the checkpoint
lineage figure (`lineage`)."""
