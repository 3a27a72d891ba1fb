"""Every analysis the workbench knows: the registry after discovery.

Discovery imports each stage that registers analyses (behaviour, persistence), every family folder
under `workbench/families/`, and every plugin module named in $WORKBENCH_PLUGINS (comma-separated,
importable from PYTHONPATH). The CLI (`workbench analyze`, `workbench run`, `workbench results`),
the HTML report and the dashboard read analyses from here, so a new family appears in all of them
without editing any of them (docs/add-an-analysis.md).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Sequence

import workbench.families as families
from workbench.core.analysis import Analysis, ordered, registered
from workbench.core.errors import ConfigError

PLUGINS_ENV = "WORKBENCH_PLUGINS"


def discover() -> None:
    """Import what registers analyses (idempotent: a module is imported once per process)."""
    for info in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{info.name}")
    for mod in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"${PLUGINS_ENV} names {mod!r}, which cannot be imported ({e}); fix the name or "
                              "put its folder on PYTHONPATH") from e


def analyses() -> dict[str, Analysis]:
    """Every registered analysis, by name."""
    discover()
    return registered()


def get(name: str) -> Analysis:
    found = analyses()
    if name not in found:
        raise ConfigError(f"unknown analysis {name!r}; registered: {', '.join(sorted(found))}")
    return found[name]


def in_order(names: Sequence[str] | None = None) -> list[Analysis]:
    """The analyses `names` (default: all), each after those whose results it reads."""
    return ordered(analyses(), names)
