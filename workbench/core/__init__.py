"""What every stage stands on: errors, atomic files and hashes, results with provenance, the
Analysis abstraction and its registry, the activation cache, statistics and the offline switch."""
