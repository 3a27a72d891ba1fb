"""What every analysis family shares: hook names (`hooks`), the Llama decoder as functions of its
weights (`decoder`), token-aligned prompt pairs (`pairs`) and what patching measures (`metrics`)."""
from workbench.interp.pairs import PairBatch, make_pairs

__all__ = ["PairBatch", "make_pairs"]
