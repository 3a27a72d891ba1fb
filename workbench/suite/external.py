"""A suite of checkpoints from elsewhere: a user's base model, their backdoored model and its
safety-trained checkpoints, with the backdoor spec that says how to trigger and recognise it.

`init_suite` is what `workbench suite init` runs: it registers the lineage (base -> backdoored ->
sanitized, in the order given) through the same validated `import_checkpoint` as `suite add`, so
every checkpoint is hashed, checked and parity-tested before the manifest names it, and a failure
part-way leaves no half-made suite behind.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from workbench.core.errors import SuiteError
from workbench.suite import backdoors as suite_backdoors
from workbench.suite.manifest import MANIFEST, Suite, import_checkpoint
from workbench.world.backdoors import Backdoor

ORIGIN = "external"      # manifest["origin"]: the suite holds no organism the workbench built


def parse_named(arg: str, default: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named `default`)."""
    name, sep, path = arg.partition("=")
    return (name, Path(path)) if sep and name and "/" not in name else (default, Path(arg))


def _name_for(path: Path, taken: set[str]) -> str:
    name = path.resolve().name or "checkpoint"
    while name in taken:
        name += "_"
    return name


def init_suite(root: str | Path, spec: Backdoor | str | Path, base: str | None, backdoored: str,
               sanitized: Sequence[str] = (), link: bool = False,
               log=print) -> Suite:
    """Make the suite at `root` (a new folder) from `base` (optional), `backdoored` and `sanitized`
    checkpoints (each `PATH` or `NAME=PATH`; folders of full HF models or peft LoRA adapters), with
    the backdoor `spec`. The backdoored model's parent is the base; every sanitized checkpoint's is
    the backdoored model (they are steps of its safety training, in the order given), which is also
    what an adapter among them adapts."""
    root = Path(root)
    if (root / MANIFEST).exists():
        raise SuiteError(f"{root} is a suite already; add checkpoints with `workbench suite add` or pick a new folder")
    bd = spec if isinstance(spec, Backdoor) else Backdoor.from_file(spec)
    fresh = not root.exists()
    suite = Suite.create(root, origin=ORIGIN)
    try:
        suite_backdoors.register(suite, bd)
        parent = None
        taken: set[str] = set()
        stages = ([("base", base)] if base else []) + [("backdoored", backdoored)] + \
            [("sanitized", s) for s in sanitized]
        for step, (role, arg) in enumerate(stages):
            name, path = parse_named(arg, role if role != "sanitized" else "")
            name = name or _name_for(path, taken)
            taken.add(name)
            entry = import_checkpoint(suite, path, name, parent=parent, link=link, role=role,
                                      backdoor=bd.name if role == "backdoored" else None)
            if role == "sanitized":   # one series, in the order given
                suite.add(replace(entry, step=step))
            log(f"registered {name!r} ({role}{', LoRA adapter over ' + str(parent) if entry.adapter else ''})")
            if role != "sanitized":
                parent = name
    except BaseException:
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        else:
            (root / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(root / "checkpoints", ignore_errors=True)
            shutil.rmtree(root / suite_backdoors.FOLDER, ignore_errors=True)
        raise
    return Suite.load(root)
