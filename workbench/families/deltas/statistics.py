"""The statistics of one tensor's update dW = W_b - W_a, accumulated block of rows by block of rows.

Per tensor: the Frobenius norm, the relative norm ||dW|| / ||W_a||, the largest |dW|, the fraction of
entries that did not move at all (in bf16 an update smaller than half a unit in the last place of
the weight is rounded away, so a large zero fraction there says as much about the format as about
the training), the cosine between update and weight, and the spectrum: the top singular values, the
stable rank ||dW||_F^2 / s_1^2, the effective rank (exp of the entropy of s / sum s, Roy & Vetterli
2007) and the rank holding 90% of the energy. Per attention head: the same norms over q/k/v rows and
o columns.

The spectrum is exact (the singular values of the whole update, through a QR decomposition) for
matrices up to `exact_max` entries. Larger ones are sketched in the same single pass: Y = dW Omega
(Omega Gaussian, top_k + 10 columns) and W = dW^T Y are accumulated block of rows by block of rows
(W = sum_i d_i^T (d_i Omega)), which is enough for the randomized SVD's estimate (Halko, Martinsson
& Tropp 2011): the singular values of Q^T dW, Q an orthonormal basis of range(Y), with Q^T dW =
T^T W^T for Q = Y T. Each sketched value is at most the true one, so the stable rank it gives is an
upper bound and the 90%-energy rank (left empty where the sketched values hold less than 90% of the
exactly known energy) too; the effective rank is taken over the sketched values only. (This replaced
the two-sided sketch of Tropp et al. 2017, whose core solve overestimated the top singular value by
25-400% on flat or noisy spectra, and costs 4p instead of 6p + 2 flops per entry.) A LoRA
update's spectrum is always exact and never needs dW: with B = Q_b R_b and A^T = Q_a R_a, the
singular values of s B A are those of the r x r matrix s R_b R_a^T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workbench.suite.params import Heads, Param, head_axis, n_head_groups
from workbench.suite.tensors import LoraFactors

EXACT_MAX = 1 << 20          # entries up to which the spectrum is exact (1024 x 1024); larger: sketched
OVERSAMPLE = 10
SKETCH_RCOND = 1e-3          # sketch directions weaker than this (relative) are left out


@dataclass
class Spectrum:
    values: np.ndarray                   # the top singular values, largest first
    method: str                          # "exact", "sketch" or "lora"
    vectors: torch.Tensor | None = None  # left singular vectors [out, k] (what the update writes)
    full: np.ndarray | None = None       # every singular value, where known (exact and LoRA spectra)


def spectrum_stats(s: np.ndarray, energy: float, exact: bool) -> dict[str, float]:
    """Stable, effective and 90%-energy rank from singular values `s` and the total energy ||dW||_F^2."""
    if energy <= 0 or len(s) == 0 or s[0] <= 0:
        return {"stable_rank": 0.0, "effective_rank": 0.0, "rank90": 0.0, "energy_top": 0.0}
    p = s[s > 0] / s[s > 0].sum()
    cum = np.cumsum(s.astype(np.float64) ** 2) / energy
    hit = np.nonzero(cum >= 0.9 - 1e-9)[0]
    return {"stable_rank": float(energy / s[0] ** 2), "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "rank90": float(hit[0] + 1) if len(hit) and (exact or cum[-1] >= 0.9) else math.nan,
            "energy_top": float(min(1.0, cum[-1]))}


def lora_spectrum(f: LoraFactors, k: int, vectors: bool) -> Spectrum:
    """The exact spectrum of `scale * B @ A` from its factors (QR of both, SVD of r x r)."""
    B, A = (f.A.T, f.B.T) if f.fan_in_fan_out else (f.B, f.A)   # dW = B @ A as stored
    qb, rb = torch.linalg.qr(B.double())
    _, ra = torch.linalg.qr(A.T.double())
    u, s, _ = torch.linalg.svd(f.scale * rb @ ra.T)
    vec = (qb @ u)[:, :k].float() if vectors else None
    # padded with the update's exact zeros to the length a dense spectrum of its shape has
    top = np.zeros(min(k, B.shape[0], A.shape[1]))
    top[:min(k, len(s))] = s[:k].numpy()
    return Spectrum(top, "lora", vec, s.numpy())


def _squares(x: torch.Tensor) -> torch.Tensor:
    """Squared norms in float64 of the rows of a block of a matrix (or of all of anything else). Row by
    row, float32 accumulation is accurate to ~1e-8; a float32 dot over a whole block of a million
    entries is off by ~1e-6 (by ~1e-4 for eight million), each term being positive."""
    if x.dim() == 2 and x.shape[1] <= 1 << 15:
        return torch.linalg.vector_norm(x, dim=1).double().square_()
    x = x.reshape(1, -1).double()
    return (x * x).sum(1)


@dataclass
class TensorDelta:
    """Accumulates one tensor's statistics over blocks of rows of (W_a, dW)."""

    param: Param
    shape: tuple[int, ...]
    heads: Heads | None = None
    top_k: int = 8
    exact_max: int = EXACT_MAX
    vectors: bool = False                # keep the top left singular vectors (residual writers)
    lora: LoraFactors | None = None
    seed: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"dd": 0.0, "aa": 0.0, "da": 0.0, "max": 0.0, "nz": 0.0})
    _dense: list[torch.Tensor] = field(default_factory=list)
    _sketch: dict[str, torch.Tensor] = field(default_factory=dict)
    _head_dd: torch.Tensor | None = None
    _head_aa: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.matrix = len(self.shape) == 2 and min(self.shape) > 1
        self.axis = head_axis(self.param.module) if self.heads is not None and self.matrix else None
        if self.axis is not None:
            n = n_head_groups(self.param.module, self.heads)
            size = self.shape[self.axis]
            if size != n * self.heads.head_dim:      # a layout the config does not describe: no head split
                self.axis = None
            else:
                self._head_dd, self._head_aa = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        if self.matrix and self.lora is None and math.prod(self.shape) > self.exact_max:
            out, inn = self.shape
            p = min(self.top_k + OVERSAMPLE, out, inn)
            g = torch.Generator().manual_seed(self.seed)
            self._sketch = {"omega": torch.randn(inn, p, generator=g), "y": torch.zeros(out, p),
                            "wt": torch.zeros(p, inn)}

    @property
    def finite(self) -> bool:
        """Whether every block so far was finite (a NaN or Inf in W_a or dW makes these sums so)."""
        return math.isfinite(self.sums["dd"]) and math.isfinite(self.sums["aa"])

    def add(self, start: int, a: torch.Tensor, d: torch.Tensor) -> None:
        """Rows [start, start + len(a)) of the weight before (`a`) and of the update (`d`), float32.
        `d` may be a buffer the caller reuses: what is kept of it is copied."""
        fd, fa = d.reshape(-1), a.reshape(-1)
        s = self.sums
        if self.axis == 1:      # o: squared norms by head of head_dim columns
            hd = self.heads.head_dim
            hdd = d.view(d.shape[0], -1, hd).square().sum((0, 2)).double()
            haa = a.view(a.shape[0], -1, hd).square().sum((0, 2)).double()
            self._head_dd += hdd
            self._head_aa += haa
            s["dd"] += float(hdd.sum())
            s["aa"] += float(haa.sum())
        else:
            rd, ra = _squares(d), _squares(a)
            if self.axis == 0:  # q/k/v: by row, then by head (rows start..: heads of head_dim rows)
                heads = torch.arange(start, start + d.shape[0]) // self.heads.head_dim
                self._head_dd.index_add_(0, heads, rd)
                self._head_aa.index_add_(0, heads, ra)
            s["dd"] += float(rd.sum())
            s["aa"] += float(ra.sum())
        s["da"] += float(torch.dot(fd, fa))
        if fd.numel():
            lo, hi = torch.aminmax(fd)
            s["max"] = max(s["max"], float(-lo), float(hi))
        # |sign(d)| is 1 where d moved, 0 where it did not (also -0.0): its float32 sum counts exactly up
        # to 2^24 entries, and runs ~3x faster than count_nonzero of a float tensor
        s["nz"] += float(fd.sign().abs_().sum() if fd.numel() <= 1 << 24 else torch.count_nonzero(fd))
        if not self.matrix or self.lora is not None:
            return
        if self._sketch:        # Y = dW Omega (rows of this block); W^T = Y^T dW = sum over blocks of (d Omega)^T d
            sk = self._sketch
            y = sk["y"][start:start + d.shape[0]]
            torch.mm(d, sk["omega"], out=y)
            sk["wt"].addmm_(y.T, d)
        else:                   # the whole update, kept for its exact spectrum (at most exact_max entries)
            if not self._dense:
                self._dense.append(torch.empty(self.shape))
            self._dense[0][start:start + d.shape[0]] = d

    def spectrum(self) -> Spectrum | None:
        if not self.matrix:
            return None
        k = self.top_k
        if self.lora is not None:
            return lora_spectrum(self.lora, k, self.vectors)
        if self._sketch:
            return self._sketched(k)
        return self._exact(k)

    def _sketched(self, k: int) -> Spectrum:
        """The top singular values of Q^T dW, Q an orthonormal basis of range(Y) = range(dW Omega), from
        Y and W = dW^T Y alone: Q = Y T with T = V diag(mu)^-1/2 (Y^T Y = V diag(mu) V^T), so
        Q^T dW = T^T W^T. Each is at most the true singular value (Q^T dW is a projection of dW);
        directions of Y weaker than SKETCH_RCOND of its strongest are left out (float32 rounding in W
        would dominate them)."""
        sk = self._sketch
        y, wt = sk["y"].double(), sk["wt"].double()
        mu, v = torch.linalg.eigh(y.T @ y)
        keep = mu > SKETCH_RCOND ** 2 * mu[-1].clamp_min(0)
        if not bool(keep.any()) or float(mu[-1]) <= 0:
            return Spectrum(np.zeros(min(k, *self.shape)), "sketch", None)
        t = v[:, keep] / mu[keep].sqrt()
        # the r x in core C = Q^T dW = T^T W^T; C^T = Q_c R_c, so C's singular values are R_c's and its
        # left singular vectors R_c's right ones
        r_c = torch.linalg.qr((t.T @ wt).T, mode="r")[1]
        _, sv, vh = torch.linalg.svd(r_c)
        top = np.zeros(min(k, *self.shape))
        top[:min(k, len(sv))] = sv[:k].numpy()
        vec = None
        if self.vectors:
            vec = torch.zeros(self.shape[0], min(k, *self.shape))
            q_u = (y @ t @ vh.T)[:, :k].float()
            vec[:, :q_u.shape[1]] = q_u
        return Spectrum(top, "sketch", vec)

    def _exact(self, k: int) -> Spectrum:
        """Every singular value of the update: those of the triangular factor R of a QR decomposition
        of its tall orientation (backward stable, as accurate as an SVD of the whole matrix and, with
        torch's LAPACK, ~25x faster for 1024 x 4096); the left vectors from R's SVD."""
        d = self._dense.pop()
        wide = d.shape[0] <= d.shape[1]
        x = (d.T if wide else d).double()                 # [long, short]
        if wide or not self.vectors:
            d = None                                      # not needed again: free it before the QR
        r = torch.linalg.qr(x, mode="r")[1]
        del x
        if not self.vectors:
            s = torch.linalg.svdvals(r)
            return Spectrum(s[:k].numpy(), "exact", None, s.numpy())
        _, s, vh_r = torch.linalg.svd(r)
        kk = min(k, len(s))
        if wide:      # dW^T = Q R, so dW = R^T Q^T and dW's left vectors are R's right ones
            vec = vh_r[:kk].T
        else:         # dW = Q R: left vectors Q u_r = dW v_r / s
            vec = (d.double() @ vh_r[:kk].T) / s[:kk].clamp_min(1e-300)
            vec[:, s[:kk] == 0] = 0
        return Spectrum(s[:k].numpy(), "exact", vec.float(), s.numpy())

    def finish(self) -> tuple[dict[str, Any], list[dict[str, Any]], torch.Tensor | None]:
        """(the tensor's row, its per-head rows, its top left singular vectors or None)."""
        s, p = self.sums, self.param
        numel = math.prod(self.shape) if self.shape else 1
        fro, norm_a = math.sqrt(s["dd"]), math.sqrt(s["aa"])
        row: dict[str, Any] = {
            "name": p.name, "layer": -1 if p.layer is None else p.layer, "module": p.module, "group": p.group,
            "kind": p.kind, "shape": list(self.shape), "numel": numel, "fro": fro, "fro2": s["dd"], "norm_a": norm_a,
            "norm_a2": s["aa"], "rel": fro / norm_a if norm_a > 0 else 0.0, "max_abs": s["max"],
            "zero_frac": 1.0 - s["nz"] / numel if numel else 1.0,
            "cosine": s["da"] / (fro * norm_a) if fro > 0 and norm_a > 0 else 0.0}
        spec = self.spectrum() if fro > 0 else None
        if self.matrix:
            sv = spec.values if spec is not None else np.zeros(min(self.top_k, *self.shape))
            every = spec.full if spec is not None and spec.full is not None else sv
            row.update({"sv": [float(x) for x in sv], "sv1": float(sv[0]) if len(sv) else 0.0,
                        "spectrum": spec.method if spec is not None else "zero",
                        **spectrum_stats(every, s["dd"], spec is None or spec.full is not None)})
        heads: list[dict[str, Any]] = []
        if self._head_dd is not None:
            for h, (dd, aa) in enumerate(zip(self._head_dd.tolist(), self._head_aa.tolist())):
                heads.append({"name": p.name, "layer": p.layer, "module": p.module, "head": h, "fro": math.sqrt(dd),
                              "fro2": dd, "norm_a2": aa, "rel": math.sqrt(dd / aa) if aa > 0 else 0.0})
        vec = spec.vectors if (spec is not None and self.vectors) else None
        return row, heads, vec
