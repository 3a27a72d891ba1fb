"""One exception family, so the CLI and the app can show a message instead of a traceback.

Every message says what is wrong *and* what to do about it: the user of a research tool should
never have to read our source to recover from bad input.
"""
from __future__ import annotations


class WorkbenchError(Exception):
    """Base class: anything the user can fix by changing their input or re-running a command."""


class CheckpointError(WorkbenchError):
    """A checkpoint is missing, corrupt, has bad weights, or does not match its manifest."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint's architecture differs from its siblings in the same suite."""


class ParityError(CheckpointError):
    """TransformerLens and HF disagree on a checkpoint's logits beyond the tolerance."""


class SuiteError(WorkbenchError):
    """The suite manifest is missing, malformed, or names something that is not there."""


class UnknownCheckpoint(SuiteError):
    """A checkpoint name that the manifest does not hold."""


class PromptError(WorkbenchError):
    """An empty prompt set, or prompts that cannot be used as asked (e.g. an unrepresentable trigger)."""


class ConfigError(WorkbenchError):
    """A configuration value that is out of range or names an unknown option."""


def require_columns(df: object, cols: "list[str] | tuple[str, ...]", what: str,
                    fix: str = "save it again with the command that made it") -> None:
    """Fail with a message that names the missing columns of a saved table, not with a KeyError deep
    inside a plot."""
    missing = [c for c in cols if c not in getattr(df, "columns", ())]
    if missing:
        raise WorkbenchError(f"the {what} table lacks columns {missing}; {fix}")
