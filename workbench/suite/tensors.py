"""Checkpoint weights read one tensor (or one block of rows) at a time, never a whole model.

Weight deltas of real checkpoints (8B, 70B) must not hold two models in memory, so everything that
compares weights reads through `Weights`: the tensors of one checkpoint by name, wherever they live
(one `model.safetensors`, shards named by `model.safetensors.index.json`'s weight map, or a loose
set of `.safetensors` files), each block read from a memory map that is closed again at once, so
the pages of one tensor never pile up behind the next. `AdaptedWeights` serves a peft LoRA adapter
as the weights it makes (parent + scaled B @ A), block by block, and hands its factors to whoever can
use them without forming the update.

Weights are untrusted: a header is checked against the file before any tensor is read (every
tensor's byte span must equal its dtype times its shape and lie inside the file), a folder that holds
only pickles is refused by name (nothing is ever unpickled), and a block with NaN or Inf is an error
that names the tensor and the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workbench.core.errors import CheckpointError

INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype -> bytes per element
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
            "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# safetensors dtype -> torch dtype, for reading raw bytes straight into a tensor
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# float32 bytes per block read: bounds memory whatever the tensor's size. Small enough that a block
# of each side and its update stay in the CPU's last-level cache while they are reduced (on a 2-core
# VM with 32 MB of L3, 4 MB blocks ran the deltas pass ~2x faster than 32 MB ones)
BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says it is."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = -1     # where its bytes start in the file (-1: not known)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def _pickle_error(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is a pickle, not safetensors: the workbench never unpickles weights (a "
                           "pickle can run code); convert it once, in a sandbox you trust, with "
                           "`model.save_pretrained(dir, safe_serialization=True)`")


def _looks_pickled(head: bytes) -> bool:
    """torch.save's zip archive, or a bare pickle (protocol 2 and up)."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor a safetensors file holds, after checking the header against the file: the file
    must be long enough for the header, and each tensor's byte span must be its dtype times its
    shape and end inside the file (a header that lies about sizes, or a truncated download, is
    caught here, before anything is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; copy the checkpoint again or name the right folder")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        # a header length whose low byte is 0x80 or that reads "PK" is a valid safetensors file: only a
        # file that is not safetensors (no JSON header where the length says) is called a pickle
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        if len(head) < 9 or n < 2 or n + 8 > size or head[8:9] != b"{":
            if _looks_pickled(head):
                raise _pickle_error(path)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes, not even a header length); restore it")
            raise CheckpointError(f"{path} is truncated or not safetensors: its header claims {n} bytes but the "
                                  f"file has {size}; restore it from a backup or export it again")
        try:
            raw = json.loads(head[8:] + f.read(n - 1))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has an unreadable safetensors header ({e}); export it again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} has a safetensors header that is not a table of tensors; export it again")
    out: dict[str, TensorInfo] = {}
    for name, v in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = v["dtype"], tuple(int(s) for s in v["shape"]), v["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the header entry of tensor {name!r} is malformed; export it again") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which safetensors does not define")
        info = TensorInfo(name, path, dtype, shape, 8 + n + start)
        if end - start != info.nbytes or start < 0:
            raise CheckpointError(f"{path}: the header says tensor {name!r} is {dtype} {list(shape)} ({info.nbytes} "
                                  f"bytes) but gives it {end - start} bytes; the header lies about sizes: "
                                  "the file is corrupt, export it again")
        if 8 + n + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {8 + n + end} but the file "
                                  f"has {size}; restore it from a backup or download it again")
        out[name] = info
    return out


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the file it is in: through the shard index where there is one (each shard it
    names must exist), else every .safetensors file of the folder. Only pickles: refused."""
    index = folder / INDEX
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            assert isinstance(wmap, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e}); export the checkpoint again") from None
        missing = sorted({s for s in wmap.values() if not (folder / s).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {missing[:5]}; copy every shard "
                                  "of the checkpoint into the folder")
        return {k: folder / s for k, s in wmap.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise _pickle_error(folder / pickles[0])
        raise CheckpointError(f"{folder} holds no .safetensors weights; name a checkpoint folder (config.json and "
                              "model.safetensors, or shards with model.safetensors.index.json)")
    return {name: f for f in files for name in header(f)}


class Weights:
    """One checkpoint's tensors by name, read block by block in float32."""

    def __init__(self, path: str | Path, label: str | None = None):
        path = Path(path)
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise _pickle_error(path)
            self.folder, where = path.parent, {name: path for name in header(path)}
        elif path.is_dir():
            self.folder, where = path, weight_files(path)
        else:
            raise CheckpointError(f"checkpoint {path} does not exist; name a folder of safetensors weights")
        self.label = label or str(path)
        headers = {f: header(f) for f in sorted(set(where.values()))}
        self.infos: dict[str, TensorInfo] = {}
        for name, f in where.items():
            if name not in headers[f]:
                raise CheckpointError(f"the shard index of {self.folder} puts tensor {name!r} in {f.name}, which "
                                      "does not hold it; export the checkpoint again")
            self.infos[name] = headers[f][name]

    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise CheckpointError(f"tensor {name!r} is not in {self.label}")
        return self.infos[name]

    def config(self) -> dict[str, Any]:
        cfg = self.folder / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of a 0-/1-D tensor) in float32, checked finite."""
        info = self.info(name)
        try:
            with safe_open(str(info.file), framework="pt") as f:
                t = f.get_slice(name)[start:stop] if len(info.shape) >= 1 else f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"could not read tensor {name!r} from {info.file}: {e}") from None
        t = t.float() if info.dtype in FLOAT_DTYPES else t
        self.finite_or_raise(name, t)
        return t

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name)

    def _span(self, name: str, start: int, stop: int | None) -> tuple[TensorInfo, tuple[int, ...], int, int]:
        """(info, the rows' shape, their first byte in the file, their byte count)."""
        info = self.info(name)
        if info.dtype not in TORCH_DTYPES or info.offset < 0:
            raise CheckpointError(f"tensor {name!r} in {info.file} is {info.dtype}, which cannot be read raw")
        size = ITEMSIZE[info.dtype]
        if not info.shape:
            return info, (), info.offset, size
        stop = info.shape[0] if stop is None else min(stop, info.shape[0])
        start = min(start, stop)
        row = size * math.prod(info.shape[1:])
        shape = (stop - start, *info.shape[1:])
        return info, shape, info.offset + start * row, math.prod(shape) * size

    def read_into(self, name: str, start: int, stop: int | None, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` converted into `out` (float32, their shape; not checked
        finite: the caller checks values), straight from a memory map of just their bytes (the page
        cache's pages, no intermediate copy), unmapped again at once."""
        info, shape, first, nbytes = self._span(name, start, stop)
        if tuple(out.shape) != shape:
            raise ValueError(f"out is {list(out.shape)}, the rows are {list(shape)}")
        if nbytes == 0:
            return out
        base = first - first % mmap.ALLOCATIONGRANULARITY
        try:
            with open(info.file, "rb") as f:
                if os.fstat(f.fileno()).st_size < first + nbytes:   # mapped bytes past the end: SIGBUS
                    raise CheckpointError(f"{info.file} is truncated: tensor {name!r} needs bytes up to "
                                          f"{first + nbytes}; restore it from a backup or download it again")
                mm = mmap.mmap(f.fileno(), first - base + nbytes, offset=base, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"could not read tensor {name!r} from {info.file}: {e}") from None
        try:
            t = torch.frombuffer(mm, dtype=TORCH_DTYPES[info.dtype], count=math.prod(shape), offset=first - base)
            out.copy_(t.view(shape))
        finally:
            t = None          # the map cannot close while a tensor views it
            mm.close()
        return out

    def advise(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading rows [start, stop) of `name` from disk now (a no-op for pages
        already cached), so that the next `read_into` finds them there."""
        info, _, first, nbytes = self._span(name, start, stop)
        if hasattr(os, "posix_fadvise") and nbytes:
            with open(info.file, "rb") as f:
                os.posix_fadvise(f.fileno(), first, nbytes, os.POSIX_FADV_WILLNEED)

    def finite_or_raise(self, name: str, t: torch.Tensor) -> None:
        """The error `rows` raises for a block with NaN or Inf, for a block read with `read`."""
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name!r} in {self.info(name).file} holds NaN or Inf values; the weights "
                                  "are unusable: rebuild or re-export the checkpoint")

    def block_rows(self, name: str, block_bytes: int = BLOCK_BYTES) -> int:
        """Rows per block so that a float32 block stays within `block_bytes`."""
        shape = self.info(name).shape
        per_row = 4 * math.prod(shape[1:]) if len(shape) > 1 else 4 * max(1, math.prod(shape))
        return max(1, block_bytes // max(1, per_row))

    def blocks(self, name: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 block) over tensor `name`, each block within `block_bytes`."""
        shape = self.info(name).shape
        if len(shape) < 2:
            yield 0, self.rows(name)
            return
        step = self.block_rows(name, block_bytes)
        for r in range(0, shape[0], step):
            yield r, self.rows(name, r, min(r + step, shape[0]))


# ----------------------------------------------------------------------------- LoRA adapters

@dataclass(frozen=True)
class LoraFactors:
    """One adapted matrix: its update is `scale * B @ A` (transposed when `fan_in_fan_out`)."""

    target: str          # the base tensor's name
    A: torch.Tensor      # [r, in]
    B: torch.Tensor      # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the update as the base tensor stores it."""
        if self.fan_in_fan_out:   # stored [in, out]: rows of the transpose
            return self.scale * (self.A[:, start:stop].T @ self.B.T)
        return self.scale * (self.B[start:stop] @ self.A)

    def dense(self) -> torch.Tensor:
        """The whole update as the base tensor stores it (small adapters, checks)."""
        n = self.A.shape[1] if self.fan_in_fan_out else self.B.shape[0]
        return self.delta_rows(0, n)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: a key matches a module whose name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_factors(folder: str | Path) -> tuple[dict[str, Any], dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """A peft LoRA adapter's config, its factors by base tensor name (with peft's scaling: alpha / r,
    or alpha / sqrt(r) with rsLoRA; rank and alpha patterns honoured), and the full tensors it
    replaces (`modules_to_save`) by base name."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} does not load ({e}); save the adapter with peft's "
                              "save_pretrained") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{folder} is a {cfg.get('peft_type')} adapter; weight deltas read LoRA adapters only")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{folder} is a DoRA adapter (magnitude vectors rescale the merged weight); merge it "
                              "with peft (`merge_and_unload`), save the result, and compare the merged folder")
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        pickles = [p for p in folder.glob("adapter_model*") if p.suffix in PICKLE_SUFFIXES]
        raise _pickle_error(pickles[0]) if pickles else CheckpointError(
            f"{folder} has no {ADAPTER_WEIGHTS}; save the adapter with peft's save_pretrained")
    w = Weights(path, label=str(folder))
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for name in w.names():
        key = re.sub(r"^base_model\.model\.", "", name)
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = w.get(name)
        elif ".lora_" in key or "lora_magnitude" in key:
            raise CheckpointError(f"{path}: tensor {name!r} is not a LoRA factor the workbench reads")
        else:
            full[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = w.get(name)
    factors: dict[str, LoraFactors] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: module {module!r} has lora_{''.join(ab)} but not both factors")
        r = int(_pattern_value(cfg.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise CheckpointError(f"{path}: module {module!r} has factors of rank {ab['A'].shape[0]} but the "
                                  f"adapter config says r={r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors[module + ".weight"] = LoraFactors(module + ".weight", ab["A"], ab["B"], scale,
                                                  bool(cfg.get("fan_in_fan_out")))
    return cfg, factors, full


class AdaptedWeights(Weights):
    """The weights a LoRA adapter makes from its base: base + scale * B @ A where adapted, the
    adapter's own tensor where it saves a whole module, the base's elsewhere."""

    def __init__(self, adapter: str | Path, base: Weights, label: str | None = None):
        self.base = base
        self.adapter_config, self.factors, self.replaced = lora_factors(adapter)
        self.folder, self.label = base.folder, label or f"{adapter} over {base.label}"
        self.infos = dict(base.infos)
        for target in [*self.factors, *self.replaced]:
            if target not in base.infos:
                raise CheckpointError(f"the adapter {adapter} adapts {target!r}, which its base {base.label} "
                                      "does not hold; is it the adapter of another model?")
        for target, t in self.replaced.items():
            if tuple(t.shape) != base.infos[target].shape:
                raise CheckpointError(f"the adapter {adapter} saves {target!r} as {list(t.shape)} but the base "
                                      f"holds {list(base.infos[target].shape)}")

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name][start:stop].float()
        t = self.base.rows(name, start, stop)
        if name in self.factors and t.dim() >= 2:
            t = t + self.factors[name].delta_rows(start, start + t.shape[0])
        return t


def open_weights(path: str | Path, base: str | Path | Weights | None = None, label: str | None = None) -> Weights:
    """A checkpoint folder (or file) as `Weights`; a LoRA adapter folder as the weights it makes over
    `base` (a folder or `Weights`)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        if base is None:
            raise CheckpointError(f"{path} is a LoRA adapter; name the base model it adapts")
        return AdaptedWeights(path, base if isinstance(base, Weights) else Weights(base), label)
    return Weights(path, label)


def suite_weights(suite: Any, name: str, verify: bool = True) -> Weights:
    """Checkpoint `name` of a suite as `Weights`, its files' SHA-256 checked against the manifest
    first (an adapter: over its verified parent)."""
    entry = suite.entry(name)
    if verify:
        suite.verify(name)
    if entry.adapter:
        return AdaptedWeights(suite.dir(name), suite_weights(suite, entry.parent, verify), label=name)
    return Weights(suite.dir(name), label=name)
