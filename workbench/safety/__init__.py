"""Safety training and whether the backdoor survives it: the methods (HHH SFT, pirate SFT,
adversarial training with a red team, RL, the positive control), sweeps over them, and the
persistence analysis."""
from workbench.safety.persistence import ReturnRule, persistence_tables
from workbench.safety.training import (
    SanitizeConfig,
    method_names,
    sanitize,
    series_log,
    sweep,
)

__all__ = ["ReturnRule", "SanitizeConfig", "method_names", "persistence_tables", "sanitize", "series_log", "sweep"]
