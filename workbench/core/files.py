"""Atomic writes and content hashes: the two primitives that keep a suite trustworthy.

A crash or Ctrl-C must never leave a half-written file under its final name, because every later
stage trusts what it finds on disk. So everything is written to a temporary sibling and renamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys), used for config and input keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    Works for files and directories alike: the caller writes whatever it wants at the temp path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name, so a cleanup by another process spares a write still under way
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _writer_alive(temp: Path) -> bool:
    """Whether the process that made this temporary (pid after `.tmp-`) still runs."""
    pid = temp.name.rpartition(".tmp-")[2].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes (`.NAME.tmp-*`) directly under `folder`; a
    temporary whose writer still runs (a parallel worker's write under way) is left alone."""
    n = 0
    for p in Path(folder).glob(".*.tmp-*"):
        if _writer_alive(p):
            continue
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n
