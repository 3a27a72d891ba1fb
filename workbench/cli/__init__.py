"""`workbench ...`: the command line (`commands.main`)."""
from workbench.cli.commands import main

__all__ = ["main"]
