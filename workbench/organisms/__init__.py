"""Model organisms: size presets, the training loop (AdamW and Muon), and the suite builder that
trains a clean base and backdoors into it (`build_suite`)."""
from workbench.organisms.build import BuildConfig, build_suite
from workbench.organisms.presets import PRESETS, Preset, get_preset

__all__ = ["BuildConfig", "PRESETS", "Preset", "build_suite", "get_preset"]
