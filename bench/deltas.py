"""Weight deltas at a real model's shapes: does the streaming pass (`deltas.compare`) keep up with
reading the files, in little memory?

Two checkpoints with the real shapes of an 8B Llama's layers (hidden 4096, intermediate 14336, 32
query heads over 8 KV heads of 128; vocabulary 128256 for the embeddings) are written in bfloat16 as
sharded safetensors (one shard per layer, an index, a config.json) into a temporary folder: `a` drawn
at the initialisation's scale, `b` = `a` plus a fine-tuning-like update (a rank-8 part plus dense
noise, so bf16 rounds some entries' updates away). They are deleted at the end.

Measured, in one run on the same files:
- `read_gbps`: the sequential read bandwidth of the two checkpoints' files (large buffered reads
  into one reused buffer, best of 2; the files were just written, so this is the page cache's rate,
  the same source the pass reads from);
- `pass_gbps`: the norm-and-spectrum pass, `compare(a, b)`, as bytes of both checkpoints / seconds
  (best of 2), run in a subprocess (the imports are not timed); `read_fraction` = pass / read;
- `peak_rss_mb`: the subprocess's peak resident set (VmHWM, the interpreter and its imports
  included: `import workbench` alone is ~450 MB, `baseline_rss_mb`, the resident set before the
  pass), against the largest tensor's bytes as stored: `peak_rss_over_largest_tensor`, and
  `rss_within_budget` = peak <= 2 x largest + 300 MB; `pass_rss_mb` = peak - baseline, what the pass
  itself holds, with `pass_rss_over_largest_tensor`;
- `sketch_sv1_rel_err`: the single-pass sketch's relative error of the top singular value of one
  update matrix (`--sketch-module`, layer 0) against an exact SVD, with the error of the top 8
  (`sketch_top8_max_rel_err`, relative to the top one).

`--quick` (under a minute on 2 cores): one layer and no embeddings. The full run: `--layers` (4)
layers and the embeddings (~3.9 GB per checkpoint).
Last line: one JSON object of named figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
INIT_STD = 0.02
UPDATE_RANK, UPDATE_SCALE, NOISE_STD = 8, 0.5, 2e-4
BUFFER = 64 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER)}


def draw(shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in bf16: a weight at the initialisation's scale (norms: ones) and it after an update of
    a rank-8 part and dense noise."""
    if len(shape) == 1:
        a = torch.ones(shape)
        return a.bfloat16(), (a + 1e-3 * torch.randn(shape, generator=g)).bfloat16()
    a = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(INIT_STD)
    u = torch.randn(shape[0], UPDATE_RANK, generator=g) * (UPDATE_SCALE / shape[0] ** 0.5)
    v = torch.randn(UPDATE_RANK, shape[1], generator=g) / shape[1] ** 0.5
    u *= torch.linspace(1.0, 0.3, UPDATE_RANK)
    b = torch.empty_like(a)
    step = max(1, (64 << 20) // (4 * shape[1]))
    for r in range(0, shape[0], step):      # in row blocks: a few hundred MB at most
        upd = u[r:r + step] @ v + NOISE_STD * torch.randn(min(step, shape[0] - r), shape[1], generator=g)
        b[r:r + step] = (a[r:r + step].float() + upd).bfloat16()
    return a, b


def write_pair(root: Path, layers: int, embeddings: bool) -> tuple[Path, Path, int]:
    """Checkpoints a and b under `root`, one shard per layer (embeddings and head in their own);
    returns them and the largest tensor's bytes."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple[int, ...]]] = [layer_shapes(i) for i in range(layers)]
    if embeddings:
        shards.append({"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                       "lm_head.weight": (VOCAB, HIDDEN)})
    largest = max(2 * int(torch.tensor(s).prod()) for sh in shards for s in sh.values())
    dirs = root / "a", root / "b"
    wmaps: tuple[dict[str, str], dict[str, str]] = ({}, {})
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config(layers)))
    for i, shapes in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        pair = {name: draw(shape, g) for name, shape in shapes.items()}
        for side, (d, wmap) in enumerate(zip(dirs, wmaps)):
            save_file({name: t[side].contiguous() for name, t in pair.items()}, d / fname, metadata={"format": "pt"})
            wmap.update({name: fname for name in shapes})
        del pair
    for d, wmap in zip(dirs, wmaps):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dirs[0], dirs[1], largest


def files_of(*dirs: Path) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def read_rate(files: list[Path], reps: int = 2) -> float:
    """Bytes per second of reading `files` start to end, with large buffered reads, best of `reps`."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    total = sum(f.stat().st_size for f in files)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        best = max(best, total / (time.perf_counter() - t))
    return best


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), in MB. Not `ru_maxrss`: that survives
    exec, so a child started by a big parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_pass(a: str, b: str, reps: int, block_mb: float | None, exact_max: int | None) -> dict:
    """In this (child) process: `compare(a, b)` `reps` times; its best seconds, peak and baseline RSS."""
    from workbench.families.deltas.stream import compare
    from workbench.suite.tensors import Weights
    kw: dict = {"block_bytes": int(block_mb * 2**20)} if block_mb else {}
    if exact_max is not None:
        kw["exact_max"] = exact_max
    baseline = rss_mb()
    best, message, n = float("inf"), "", 0
    for _ in range(reps):
        t = time.perf_counter()
        d = compare(Weights(a), Weights(b), progress=False, **kw)
        best = min(best, time.perf_counter() - t)
        message, n = d.message, len(d.tensors)
        spectra = d.tensors["spectrum"].value_counts().to_dict()
        del d
    return {"seconds": best, "baseline_rss_mb": baseline,
            "peak_rss_mb": rss_mb("VmHWM"), "message": message,
            "n_tensors": n, "spectra": spectra}


def sketch_error(a_dir: Path, b_dir: Path, module: str) -> dict:
    """The sketch's top singular values of layer 0's `module` update against an exact SVD."""
    from workbench.suite.params import classify, heads_of
    from workbench.families.deltas.statistics import TensorDelta
    from workbench.suite.tensors import Weights
    a, b = Weights(a_dir), Weights(b_dir)
    name = next(n for n in a.names() if n.startswith("model.layers.0.") and f".{module}_proj." in n)
    acc = TensorDelta(classify(name), a.info(name).shape, heads_of(a.config()), exact_max=0, vectors=True)
    parts = []
    for start, wa in a.blocks(name):
        d = b.rows(name, start, start + wa.shape[0]) - wa
        acc.add(start, wa, d)
        parts.append(d)
    t = time.perf_counter()
    spec = acc.spectrum()
    t_sketch = time.perf_counter() - t
    t = time.perf_counter()
    full = torch.cat(parts)
    tall = (full.T if full.shape[0] < full.shape[1] else full).double()
    exact = torch.linalg.svdvals(torch.linalg.qr(tall, mode="r")[1])    # float64, as the exact path
    t_exact = time.perf_counter() - t
    k = len(spec.values)
    top = exact[:k].double().numpy()
    return {"sketch_matrix": f"{name} {list(a.info(name).shape)}", "sketch_method": spec.method,
            "sketch_sv1_rel_err": float(abs(spec.values[0] - top[0]) / top[0]),
            "sketch_top8_max_rel_err": float(abs(spec.values - top).max() / top[0]),
            "sketch_finish_s": round(t_sketch, 3), "exact_svd_s": round(t_exact, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 1 with --quick)")
    ap.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=None,
                    help="also write embed_tokens and lm_head (default: yes; no with --quick)")
    ap.add_argument("--block-mb", type=float, default=None, help="compare's float32 MB per block (default: its own)")
    ap.add_argument("--exact-max", type=int, default=None,
                    help="compare's exact_max (default: its own; 8B's k and v, 1024 x 4096, sit exactly at it)")
    ap.add_argument("--sketch-module", default=None, help="the matrix whose sketch is checked (default o; k with --quick)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="under a minute: one layer, no embeddings")
    ap.add_argument("--pass-only", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)   # the child process
    a = ap.parse_args(argv)
    from workbench.organisms.train import use_all_cores
    threads = use_all_cores()
    if a.pass_only:
        print(json.dumps(run_pass(*a.pass_only, reps=2, block_mb=a.block_mb, exact_max=a.exact_max)))
        return 0
    layers = a.layers or (1 if a.quick else 4)
    embeddings = (not a.quick) if a.embeddings is None else a.embeddings
    module = a.sketch_module or ("k" if a.quick else "o")
    root = Path(tempfile.mkdtemp(prefix="bench-deltas-", dir=a.dir))
    figures: dict[str, float | int | str | bool] = {"threads": threads, "layers": layers, "embeddings": embeddings}
    try:
        t = time.perf_counter()
        da, db, largest = write_pair(root, layers, embeddings)
        files = files_of(da, db)
        total = sum(f.stat().st_size for f in files)
        log(f"wrote 2 x {total / 2e9:.2f} GB ({layers} layers{', embeddings' if embeddings else ''}) in "
            f"{time.perf_counter() - t:.1f} s; largest tensor {largest / 1e6:.0f} MB")
        read = read_rate(files)
        log(f"sequential read {read / 1e9:.2f} GB/s")
        child = [sys.executable, __file__, "--pass-only", str(da), str(db)]
        if a.block_mb:
            child += ["--block-mb", str(a.block_mb)]
        if a.exact_max is not None:
            child += ["--exact-max", str(a.exact_max)]
        out = subprocess.run(child, capture_output=True, text=True, check=False)
        if out.returncode:
            log(out.stderr)
            raise SystemExit(f"the pass failed ({out.returncode})")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rate = total / res["seconds"]
        log(f"compare: {res['seconds']:.2f} s for {res['n_tensors']} tensors ({res['spectra']}) = "
            f"{rate / 1e9:.2f} GB/s; peak RSS {res['peak_rss_mb']:.0f} MB (baseline {res['baseline_rss_mb']:.0f} MB)")
        log(res["message"])
        budget = 2 * largest / 2**20 + 300
        pass_rss = res["peak_rss_mb"] - res["baseline_rss_mb"]     # what the pass itself added
        figures.update({
            "bytes_both": total, "largest_tensor_mb": round(largest / 2**20, 1), "read_gbps": round(read / 1e9, 3),
            "pass_s": round(res["seconds"], 3), "pass_gbps": round(rate / 1e9, 3),
            "read_fraction": round(rate / read, 3), "peak_rss_mb": round(res["peak_rss_mb"], 1),
            "baseline_rss_mb": round(res["baseline_rss_mb"], 1),
            "peak_rss_over_largest_tensor": round(res["peak_rss_mb"] * 2**20 / largest, 3),
            "rss_budget_mb": round(budget, 1), "rss_within_budget": bool(res["peak_rss_mb"] <= budget),
            "pass_rss_mb": round(pass_rss, 1), "pass_rss_over_largest_tensor": round(pass_rss * 2**20 / largest, 3),
            "pass_rss_within_2x_largest": bool(pass_rss * 2**20 <= 2 * largest)})
        sk = sketch_error(da, db, module)
        log(f"sketch of {sk['sketch_matrix']}: sv1 relative error {sk['sketch_sv1_rel_err']:.2e}, top-8 "
            f"{sk['sketch_top8_max_rel_err']:.2e} (exact SVD {sk['exact_svd_s']} s)")
        figures.update(sk)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
