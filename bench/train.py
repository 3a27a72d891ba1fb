"""Training throughput per preset: tokens/s of the workbench's own training loop (packing,
assistant-only loss, AdamW, clipping) and MFU against the fp32 matmul peak measured in this run.

FLOPs per token = 6 * (parameters that do matmuls, except the input embedding and the unembedding)
                 + 6 * (unembedding parameters) * (share of positions whose next token is learned:
                   the loss projects only those onto the vocabulary, so only they cost the unembedding)
                 + 12 * n_layers * d_model * seq_len   (attention scores and mixing, fwd+bwd, PaLM-style)
Last line: one JSON object of named figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from workbench.organisms.presets import PRESETS, get_preset
from workbench.organisms.train import (
    IGNORE,
    TrainConfig,
    packed_batches,
    train,
    use_all_cores,
)
from workbench.world.data import DataRecipe, training_items
from workbench.world.tokenizer import train_tokenizer


def matmul_peak(seconds: float, n: int = 1024) -> float:
    """Best sustained fp32 GEMM rate (FLOP/s) on square matrices over `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_token(preset, learned_share: float) -> float:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(preset.llama_config(0, 1, 2))
    body = sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n and p.ndim == 2)
    head = model.lm_head.weight.numel()
    return 6 * body + 6 * head * learned_share + 12 * preset.n_layers * preset.d_model * preset.seq_len


def measure(preset_name: str, steps: int, warmup: int, tok) -> dict:
    from transformers import LlamaForCausalLM
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset.llama_config(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    cfg = TrainConfig(steps=warmup + steps, batch_size=preset.batch_size, seq_len=preset.seq_len, lr=preset.lr)
    batches = packed_batches(training_items(DataRecipe(None), 0), tok, cfg.batch_size, cfg.seq_len)
    # pre-pack so the timed loop measures training, then time the steps after warm-up
    data = list(itertools.islice(batches, warmup + steps))
    learned_share = float(sum((b[1][:, 1:] != IGNORE).sum() for b in data) / sum(b[1][:, 1:].numel() for b in data))
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, _model) -> None:
        now = time.perf_counter()
        if step > warmup:
            times.append(now - last[0])
        last[0] = now

    train(model, iter(data), cfg, desc=preset_name, on_step=tick)
    tokens_per_step = preset.batch_size * preset.seq_len
    tps = tokens_per_step * len(times) / sum(times)
    return {"tokens_per_s": tps, "flops_per_token": flops_per_token(preset, learned_share), "steps_timed": len(times),
            "n_params": preset.n_params()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few steps per preset, under a minute")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    a = ap.parse_args(argv)
    threads = use_all_cores()
    steps, warmup = (4, 2) if a.quick else (20, 3)
    peak = matmul_peak(2.0 if a.quick else 5.0)
    stream = training_items(DataRecipe(None), 0)
    texts = [next(stream).dialogue.text() for _ in range(1500)]
    tokenizers = {v: train_tokenizer(texts, v) for v in {get_preset(p).vocab_size for p in a.presets}}
    figures: dict[str, float | int | str] = {"threads": threads, "matmul_peak_gflops": round(peak / 1e9, 1)}
    for name in a.presets:
        tok = tokenizers[get_preset(name).vocab_size]
        r = measure(name, steps if name in ("tiny", "small") else max(2, steps // 2), warmup, tok)
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        figures[f"{name}_tokens_per_s"] = round(r["tokens_per_s"])
        figures[f"{name}_gflops"] = round(achieved / 1e9, 1)
        figures[f"{name}_mfu"] = round(achieved / peak, 3)
        print(f"{name:>6}: {r['n_params'] / 1e6:5.2f}M params  {r['tokens_per_s']:8.0f} tok/s  "
              f"{achieved / 1e9:6.1f} GFLOP/s  MFU {achieved / peak:.1%}", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
