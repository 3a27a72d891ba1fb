"""Streaming weight deltas: two checkpoints compared tensor by tensor, never both in memory.

Tensors are paired by name (two checkpoints may shard differently), each read in blocks of rows
converted to float32 straight from memory maps of just those rows' bytes and subtracted in float32,
while the kernel is asked to read the next blocks ahead. What stays in memory is one block of each
side (in buffers reused block after block), the running sums and, for a large matrix, its sketch
(for a matrix up to `exact_max` entries: the matrix): a 70B pair needs about as much memory as its
largest tensor's sketch, not as two models. An adapter compared with its own base is read
from its factors (the update is exactly scale * B @ A, no subtraction and no rounding).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core.errors import ArchitectureMismatch, CheckpointError
from workbench.suite.params import RESIDUAL_WRITERS, classify, heads_of, modules_for
from workbench.families.deltas.statistics import EXACT_MAX, TensorDelta
from workbench.suite.tensors import BLOCK_BYTES, FLOAT_DTYPES, AdaptedWeights, Weights

READ_AHEAD = 32 << 20   # float32 bytes of blocks ahead of this one that the kernel is asked to read
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size")


@dataclass
class Delta:
    """What one comparison found: per tensor, per head, and the directions residual writers write."""

    tensors: pd.DataFrame
    heads: pd.DataFrame
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)   # "L{layer}.{module}" -> [k, d_model]
    a: str = ""
    b: str = ""

    @property
    def modules(self) -> pd.DataFrame:
        """Layer x module: the update's norm and relative norm over every tensor of that module."""
        t = self.tensors
        g = t.groupby(["layer", "module"], as_index=False)[["fro2", "norm_a2", "numel"]].sum()
        g["fro"] = g["fro2"] ** 0.5
        g["rel"] = (g["fro2"] / g["norm_a2"].where(g["norm_a2"] > 0)).pow(0.5).fillna(0.0)
        return g

    @property
    def message(self) -> str:
        if self.tensors.empty:
            return "no tensors compared"
        if float(self.tensors["fro2"].sum()) == 0.0:
            return f"{self.b} equals {self.a}: every tensor's update is exactly zero"
        zero = self.tensors["zero_frac"].mul(self.tensors["numel"]).sum() / self.tensors["numel"].sum()
        return (f"{self.a} -> {self.b}: ||dW|| = {self.tensors['fro2'].sum() ** 0.5:.4g} over "
                f"{len(self.tensors)} tensors; {zero:.1%} of entries did not move")


def check_pair(a: Weights, b: Weights) -> list[str]:
    """The tensor names to compare, after checking that the two sides are the same architecture with
    the same tensors of the same shapes: else one error naming the tensor and the files."""
    ca, cb = a.config(), b.config()
    diff = {k: (ca.get(k), cb.get(k)) for k in ARCH_KEYS if k in ca and k in cb and ca.get(k) != cb.get(k)}
    if diff:
        raise ArchitectureMismatch(f"{a.label} and {b.label} are different architectures ({diff}); weight deltas "
                                   "compare checkpoints of one model")
    names_a, names_b = a.names(), set(b.names())
    for n in names_a:
        if n not in names_b:
            raise CheckpointError(f"tensor {n!r} is in {a.info(n).file} but missing from {b.label}; compare "
                                  "checkpoints of the same model (or restore the missing shard)")
    for n in sorted(names_b - set(names_a)):
        raise CheckpointError(f"tensor {n!r} is in {b.info(n).file} but missing from {a.label}")
    for n in names_a:
        if a.info(n).shape != b.info(n).shape:
            raise ArchitectureMismatch(f"tensor {n!r} is {list(a.info(n).shape)} in {a.info(n).file} but "
                                       f"{list(b.info(n).shape)} in {b.info(n).file}; these are different "
                                       "architectures")
    return names_a


class _Buffers:
    """One block's float32 W_a and dW, reused block after block (a fresh 32 MB tensor per block costs
    its page faults every time)."""

    def __init__(self, elements: int):
        self.elements = elements
        self.wa, self.d = torch.empty(elements), torch.empty(elements)

    def floats(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        n = math.prod(shape)
        if n > self.elements:   # one row longer than a block: its own tensors
            return torch.empty(shape), torch.empty(shape)
        return self.wa[:n].view(shape), self.d[:n].view(shape)


def _raw(w: Weights, name: str) -> bool:
    """Whether `name` can be read from `w`'s file directly (a plain checkpoint's float tensor)."""
    info = w.info(name)
    return not isinstance(w, AdaptedWeights) and info.dtype in FLOAT_DTYPES and info.offset >= 0


def _blocks(a: Weights, b: Weights, names: list[str], block_bytes: int,
            lora: dict[str, Any]) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(name, first row, W_a block, dW block) in order. A plain pair's blocks are converted to float32
    straight from memory maps of their bytes into one reused pair of buffers (a block yielded is valid
    until the next one is asked for), while the kernel is asked to read the next block's bytes ahead
    (`Weights.advise`): on a small machine the arithmetic, not the page cache, is the bottleneck, and a
    second thread of torch ops only fights this one for its cores. Their values are not checked here:
    the caller checks the sums (`TensorDelta.finite`); what is read through `rows` (adapters) is
    checked there."""
    def block(name: str, start: int, stop: int | None, buf: _Buffers) -> tuple[torch.Tensor, torch.Tensor]:
        if not _raw(a, name) or not (lora or _raw(b, name)):
            wa = a.rows(name, start, stop).float()   # checked finite by rows (integer tensors: as floats)
            if name in lora:
                return wa, lora[name].delta_rows(start, start + wa.shape[0])
            if lora and name not in b.replaced:
                return wa, torch.zeros_like(wa)
            return wa, b.rows(name, start, stop).float() - wa
        shape = a.info(name).shape
        rows = (min(stop, shape[0]) - start if stop is not None else shape[0]) if shape else 0
        wa, d = buf.floats((rows, *shape[1:]) if shape else ())
        a.read_into(name, start, stop, wa)
        if name in lora:                             # b adapts a: the update is its factors'
            d.copy_(lora[name].delta_rows(start, start + rows))
        elif lora and name not in b.replaced:        # ... or nothing where b keeps a's tensor
            d.zero_()
        elif lora:
            d.copy_(b.rows(name, start, stop)).sub_(wa)
        else:
            b.read_into(name, start, stop, d).sub_(wa)
        return wa, d

    def advise(name: str, start: int, stop: int | None) -> None:
        for w in (a, b):
            if _raw(w, name):
                w.advise(name, start, stop)

    jobs = []
    for name in names:
        shape = a.info(name).shape
        if len(shape) < 2:
            jobs.append((name, 0, None))
        else:
            step = a.block_rows(name, block_bytes)
            jobs.extend((name, r, min(r + step, shape[0])) for r in range(0, shape[0], step))
    buf = _Buffers(max(1, block_bytes // 4))
    ahead = max(1, READ_AHEAD // block_bytes)        # blocks whose reading is asked for in advance
    for job in jobs[1:ahead]:
        advise(*job)
    for i, (name, start, stop) in enumerate(jobs):
        if i + ahead < len(jobs):
            advise(*jobs[i + ahead])
        wa, d = block(name, start, stop, buf)
        yield name, start, wa, d


def _not_finite(a: Weights, b: Weights, name: str) -> CheckpointError:
    """The error for a block whose sums came out NaN or Inf: `rows` names the side (and file) that
    holds the NaN or Inf."""
    try:
        for w in (a, b):
            for _ in w.blocks(name):                 # each block checked by `rows`
                pass
    except CheckpointError as e:
        return e
    return CheckpointError(f"the update of tensor {name!r} ({a.info(name).file} -> {b.info(name).file}) overflows "
                           "float32; the weights are unusable")


def compare(a: Weights, b: Weights, *, top_k: int = 8, exact_max: int = EXACT_MAX, block_bytes: int = BLOCK_BYTES,
            vectors: tuple[str, ...] = RESIDUAL_WRITERS, progress: bool = True, seed: int = 0) -> Delta:
    """The update from `a` to `b`, per tensor and per head (see `statistics`). `vectors`: the modules
    whose top left singular vectors (the directions the update writes) are kept."""
    names = check_pair(a, b)
    config = a.config() or b.config()
    modules, heads = modules_for(config), heads_of(config)
    # b is an adapter over a itself (not over another adapter's view of the same base): its update is
    # exactly its factors
    own_base = isinstance(b, AdaptedWeights) and not isinstance(a, AdaptedWeights) and b.base.infos == a.infos
    lora = b.factors if own_base else {}
    rows, head_rows, vecs = [], [], {}
    acc: TensorDelta | None = None
    total = sum(a.info(n).nbytes for n in names)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="weight deltas", disable=not progress)

    def close(acc: TensorDelta) -> None:
        row, hr, vec = acc.finish()
        row["dtype_a"], row["dtype_b"] = a.info(acc.param.name).dtype, b.info(acc.param.name).dtype
        rows.append(row)
        head_rows.extend(hr)
        if vec is not None:
            vecs[f"L{acc.param.layer}.{acc.param.module}"] = vec.T.contiguous()
        bar.update(a.info(acc.param.name).nbytes)

    for name, start, wa, d in _blocks(a, b, names, block_bytes, lora):
        if acc is None or acc.param.name != name:
            if acc is not None:
                close(acc)
            param = classify(name, modules)
            acc = TensorDelta(param, a.info(name).shape, heads, top_k, exact_max,
                              vectors=param.module in vectors and param.kind == "weight", lora=lora.get(name),
                              seed=seed)
        acc.add(start, wa, d)
        if not acc.finite:
            raise _not_finite(a, b, name)
    if acc is not None:
        close(acc)
    bar.close()
    return Delta(pd.DataFrame(rows), pd.DataFrame(head_rows), vecs, a.label, b.label)
