"""The process environment every entry point sets first: nothing in the workbench may reach a model
hub or a logging service at run time, so a forgotten download fails at once instead of hanging."""
from __future__ import annotations

import os


def offline() -> None:
    """Set the offline flags (only where the user has not set them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
