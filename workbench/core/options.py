"""Command-line options derived from an analysis's Config dataclass: what `workbench run NAME` and a
family's own commands (`workbench sae train`, ...) expose as flags, so a new config field is a new
flag without editing any parser."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from workbench.core.analysis import Analysis

_SIMPLE = (str, int, float, bool)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def options(analysis: Analysis) -> list[tuple[str, Any, Any]]:
    """(field name, parser type or ("many", item type) or bool, default) of every option of an
    analysis's Config the command line can set (simple values and tuples of them)."""
    hints = typing.get_type_hints(analysis.Config)
    wanted = analysis.cli_options
    out = []
    for f in dataclasses.fields(analysis.Config):
        if wanted is not None and f.name not in wanted:
            continue
        tp, _ = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if typing.get_origin(tp) is tuple and (items := typing.get_args(tp)) and items[0] in _SIMPLE:
            out.append((f.name, ("many", items[0]), default))
        elif tp in _SIMPLE:
            out.append((f.name, tp, default))
    return out


def add_options(parser: argparse.ArgumentParser, analysis: Analysis) -> None:
    for name, tp, default in options(analysis):
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {default})" if default not in (None, ()) else ""
        if tp is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{name}{shown}")
        elif isinstance(tp, tuple):
            parser.add_argument(flag, dest=name, nargs="+", type=tp[1], default=None, help=f"{name}{shown}")
        else:
            parser.add_argument(flag, dest=name, type=tp, default=None, help=f"{name}{shown}")


def config_from(analysis: Analysis, ns: argparse.Namespace) -> Any:
    given = {name: (tuple(v) if isinstance(v, list) else v) for name, _, _ in options(analysis)
             if (v := getattr(ns, name, None)) is not None}
    return analysis.config(**given)


