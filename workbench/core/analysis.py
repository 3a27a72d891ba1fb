"""The Analysis abstraction: one registered class per analysis, one way to find, compute and save.

An analysis has a registered `name`, a `version`, a `Config` dataclass and three methods of its own:

- `plan(suite, cfg, **runtime) -> Plan`: check the request (every bad argument a clear error before
  any model loads) and name the inputs: checkpoint hashes, prompt-set hash, the keys of other
  results it reads. Whatever it built on the way (prompt pairs, say) travels in `Plan.state`.
- `compute(suite, cfg, plan, **runtime) -> Output`: the tables (and tensors) to save.
- `load(result)`: the saved result as the object a user works with (default: the `Result`).

`run` (alias `get_or_compute`) does the rest the same way for every analysis: the result's key hashes
the analysis's name, version, config and inputs, so an unchanged rerun is a directory lookup, a
changed checkpoint can never be confused with an old result, and bumping `version` after a bug fix
recomputes instead of serving the old answer. Families meet only through saved results: an analysis
that reads another's results names their keys among its inputs (and the other's name in
`requires`, so `workbench analyze` runs it first).

`sections(suite_dir)` says how a saved result is shown (titled figures, tables, text): the HTML
report and the dashboard's generic page both call it, so neither is edited to show a new analysis.
`default_configs(suite)` says what `workbench analyze` computes on a suite (`make demo` leaves out the
analyses whose `demo` is False, so that a fresh clone reaches the dashboard within ten minutes).
`cli_options` lists the config fields `workbench run NAME` exposes as flags (default: all).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

from workbench.core import results
from workbench.core.errors import ConfigError
from workbench.core.files import sha256_json

if TYPE_CHECKING:
    from workbench.suite.manifest import Suite

Section = tuple[str, Any]   # (title, a plotly figure, a DataFrame or a paragraph of text)


@dataclass
class Plan:
    """What `plan` found: the inputs that enter the key, and what it built on the way."""

    inputs: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    config: Any = None          # the config with its defaults resolved (None: as given)


@dataclass
class Output:
    """What `compute` returns: tables (saved as parquet), tensors (safetensors) and provenance extras."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    value: Any = None           # the in-memory object `run` returns in place of a re-read, if set
    folders: dict[str, Path] = field(default_factory=dict)   # name -> a folder copied into the result (an SAE)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as the JSON-able dict that enters a key (tuples become lists)."""
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise ConfigError(f"a config must be a dataclass, not {type(cfg).__name__}")


class Analysis:
    """Subclass, set the class attributes, implement `plan` and `compute`, decorate with `@register`."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Config: ClassVar[type] = type(None)
    title: ClassVar[str] = ""
    family: ClassVar[str] = ""                  # the page/report group it belongs to
    requires: ClassVar[tuple[str, ...]] = ()    # analyses whose saved results it reads
    cli_options: ClassVar[tuple[str, ...] | None] = None
    internal: ClassVar[bool] = False            # run only by another analysis (no `workbench run` command)
    shown_by: ClassVar[str] = ""                # another analysis whose sections show this one's results
    demo: ClassVar[bool] = True                 # in `make demo`'s ten minutes (else `make analyze` computes it)

    # --- what each analysis writes --------------------------------------------------------------
    def plan(self, suite: "Suite", cfg: Any, **runtime: Any) -> Plan:
        raise NotImplementedError

    def compute(self, suite: "Suite", cfg: Any, plan: Plan, **runtime: Any) -> Output:
        raise NotImplementedError

    def load(self, result: results.Result) -> Any:
        return result

    def key_config(self, cfg: Any) -> dict[str, Any]:
        """The part of the config that decides the result (default: all of it)."""
        return config_dict(cfg)

    def sections(self, suite_dir: Path) -> list[Section]:
        """How saved results are shown in the report and on the dashboard (read-only)."""
        res = self.latest(suite_dir)
        if res is None:
            return []
        out: list[Section] = [(self.title or self.name, _caption(res))]
        out += [(f"{self.name}: {t}", res.table(t)) for t in res.provenance.get("tables", [])]
        return out

    def default_configs(self, suite: "Suite") -> Iterable[Any]:
        """The configs `workbench analyze` computes on a suite (default: none)."""
        return ()

    # --- the same for every analysis ------------------------------------------------------------
    def config(self, cfg: Any = None, **overrides: Any) -> Any:
        """`cfg` (default: the Config's defaults) with `overrides` applied and checked."""
        base = cfg if cfg is not None else self.Config()
        if overrides:
            fields = {f.name for f in dataclasses.fields(base)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise ConfigError(f"{self.name} has no option {unknown}; its options are {sorted(fields)}")
            base = dataclasses.replace(base, **overrides)
        return base

    def key(self, cfg: Any, inputs: dict[str, Any]) -> str:
        return sha256_json({"analysis": self.name, "version": self.version, "config": self.key_config(cfg),
                            "inputs": inputs})[:16]

    def find(self, suite_dir: str | Path, cfg: Any, inputs: dict[str, Any]) -> results.Result | None:
        return results.find(suite_dir, self.name, self.key(cfg, inputs))

    def run(self, suite: "Suite", cfg: Any = None, *, reuse: bool = True, save: bool = True,
            **runtime: Any) -> Any:
        """The loaded result for `cfg` on `suite`: found by its key, else computed and saved.

        `reuse=False` recomputes (and overwrites); `save=False` computes without writing (the
        returned object is then built from the unsaved output where the analysis supports it)."""
        return self.produce(suite, cfg, reuse=reuse, save=save, **runtime)[2]

    def produce(self, suite: "Suite", cfg: Any = None, *, reuse: bool = True, save: bool = True,
                **runtime: Any) -> tuple[bool, results.Result | None, Any]:
        """`run`, also saying what happened: (computed?, the saved Result or None if not saved, the
        loaded value). One plan serves both the lookup and the computation."""
        cfg = self.config(cfg)
        plan = self.plan(suite, cfg, **runtime)
        cfg = plan.config if plan.config is not None else cfg
        if reuse and (found := self.find(suite.root, cfg, plan.inputs)) is not None:
            return False, found, self.load(found)
        t0 = time.perf_counter()
        out = self.compute(suite, cfg, plan, save=save, **runtime)
        seconds = time.perf_counter() - t0
        if not save:
            return True, None, self.unsaved(suite, cfg, plan, out)
        res = self.save(suite.root, cfg, plan.inputs, out, seconds)
        return True, res, self.saved(res, out)

    get_or_compute = run

    def save(self, suite_dir: str | Path, cfg: Any, inputs: dict[str, Any], out: Output,
             seconds: float) -> results.Result:
        return results.save(suite_dir, self.name, self.key(cfg, inputs), self.key_config(cfg), inputs,
                            out.tables, seconds, extra={"version": self.version, **out.extra},
                            tensors=out.tensors, folders=out.folders)

    def saved(self, result: results.Result, out: Output) -> Any:
        """What `run` returns after saving: `out.value` if the analysis set one (its `dir`, where it
        has one, set to the result's folder), else `load`."""
        if out.value is None:
            return self.load(result)
        if hasattr(out.value, "dir"):
            out.value.dir = result.dir
        return out.value

    def unsaved(self, suite: "Suite", cfg: Any, plan: Plan, out: Output) -> Any:
        """What `run(save=False)` returns: `out.value` if set, else the Output itself."""
        return out if out.value is None else out.value

    def results(self, suite_dir: str | Path) -> list[results.Result]:
        """Every saved result of this analysis, newest first."""
        return results.list_results(suite_dir, self.name)

    def latest(self, suite_dir: str | Path) -> results.Result | None:
        found = self.results(suite_dir)
        return found[0] if found else None


def _caption(res: results.Result) -> str:
    prov = res.provenance
    return (f"Result {res.key} (version {prov.get('version', '?')}), created {prov.get('created', '?')}, "
            f"took {prov.get('seconds', '?')} s.")


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Analysis] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: register one instance under `cls.name`. A name registered twice is an
    error, so two analyses can never write into each other's results folder."""
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise ConfigError(f"{cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    if cls.name in _REGISTRY:
        raise ConfigError(f"analysis {cls.name!r} is already registered (by "
                          f"{type(_REGISTRY[cls.name]).__module__}); pick another name")
    if not (dataclasses.is_dataclass(cls.Config) and isinstance(cls.version, int) and cls.version >= 1):
        raise ConfigError(f"{cls.__name__}: Config must be a dataclass and version an int >= 1")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a registration (tests that register toy analyses clean up with it)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Analysis]:
    """The analyses registered so far, by name (`workbench.catalog` imports every family first)."""
    return dict(_REGISTRY)


def ordered(found: dict[str, Analysis], names: Sequence[str] | None = None) -> list[Analysis]:
    """The analyses `names` (default: all of `found`) with each after the ones it `requires`."""
    for n in names or ():
        if n not in found:
            raise ConfigError(f"unknown analysis {n!r}; registered: {', '.join(sorted(found))}")
    wanted = list(found) if names is None else list(names)
    out: list[str] = []

    def visit(n: str, stack: tuple[str, ...]) -> None:
        if n in out:
            return
        if n in stack:
            raise ConfigError(f"analyses require each other in a cycle: {' -> '.join(stack + (n,))}")
        for r in found[n].requires:
            if r in found:
                visit(r, stack + (n,))
        out.append(n)

    for n in wanted:
        visit(n, ())
    return [found[n] for n in out]
