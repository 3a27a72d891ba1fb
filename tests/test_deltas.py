"""Streaming weight deltas (workbench/families/deltas, workbench/suite/tensors.py) against direct
dense computations on small random Llama checkpoints (hidden 64, 2 layers, 4 query heads over 2 KV
heads): every statistic, LoRA adapters read from their factors, sharding, storage dtypes, the zero
delta, the randomized sketch, and the refusals of bad input (nothing is ever unpickled).

The checkpoints are written by `save_pretrained`, as any HF folder is; the reference reads them
back with `safetensors.torch.load_file` and computes in float64 from the same float32 difference.
"""
from __future__ import annotations

import copy
import json
import math
import pickletools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.core.errors import ArchitectureMismatch, CheckpointError
from workbench.families.deltas import compare, open_weights
from workbench.families.deltas.statistics import lora_spectrum
from workbench.suite.tensors import LoraFactors, Weights

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
K = 8  # top singular values kept
SCALARS = ("fro", "norm_a", "rel", "max_abs", "zero_frac", "cosine")
SPECTRAL = ("sv1", "stable_rank", "effective_rank", "rank90")


def llama_config(**over):
    from transformers import LlamaConfig
    kw = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV, "vocab_size": VOCAB, "tie_word_embeddings": False, "initializer_range": 0.05}
    return LlamaConfig(**{**kw, **over})


def new_model(seed: int, **over):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**over)).eval()


def perturb(model, seed: int) -> None:
    """An update of many kinds: dense noise, untouched tensors, sparse, low-rank (with distinct
    singular values, so directions are defined), a few embedding rows, a changed norm."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in sd.items():
            def noise(s: float = 0.01, shape: torch.Size = p.shape) -> torch.Tensor:
                return s * torch.randn(shape, generator=g)
            if "layers.0.self_attn.k_proj" in name or "post_attention_layernorm" in name:
                continue                                         # unchanged: a zero update
            if "v_proj" in name:                                 # sparse: ~70% of entries do not move
                p.add_(noise() * (torch.rand(p.shape, generator=g) < 0.3))
            elif "o_proj" in name or "down_proj" in name:        # low rank (3) plus a little noise
                u = torch.linalg.qr(torch.randn(p.shape[0], 3, generator=g))[0]
                v = torch.linalg.qr(torch.randn(p.shape[1], 3, generator=g))[0]
                p.add_(u @ torch.diag(torch.tensor([0.5, 0.3, 0.15])) @ v.T + noise(0.001))
            elif "embed_tokens" in name:                         # a few token rows
                p[[3, 17, 99]] += noise()[[3, 17, 99]] * 10
            else:
                p.add_(noise())


def state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rank90(s: np.ndarray) -> int:
    cum = np.cumsum(s ** 2) / (s ** 2).sum()
    return int(np.argmax(cum >= 0.9) + 1)


def reference(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every statistic, densely, in float64 from the float32 difference (as the library subtracts)."""
    rows, heads = [], []
    for name, wa_t in wa.items():
        a = wa_t.float()
        d = (wb[name].float() - a).double()
        a = a.double()
        fro, na = float(d.norm()), float(a.norm())
        row = {"name": name, "fro": fro, "norm_a": na, "rel": fro / na, "max_abs": float(d.abs().max()),
               "zero_frac": float((d == 0).double().mean()),
               "cosine": float((d * a).sum()) / (fro * na) if fro > 0 else 0.0}
        if d.dim() == 2:
            s = torch.linalg.svdvals(d).numpy()
            row["sv"] = s[:K]
            if fro > 0:
                p = s[s > 0] / s.sum()
                row.update(sv1=s[0], stable_rank=fro ** 2 / s[0] ** 2, effective_rank=math.exp(-(p * np.log(p)).sum()),
                           rank90=rank90(s))
            else:
                row.update(sv1=0.0, stable_rank=0.0, effective_rank=0.0, rank90=0)
            row["u"] = torch.linalg.svd(d)[0][:, :3].T
        rows.append(row)
        module = next((m for m in ("q", "k", "v", "o") if f"{m}_proj" in name), None)
        if module:   # q rows and o columns by query head; k and v rows by KV head
            n = KV if module in ("k", "v") else HEADS
            parts = (d.T if module == "o" else d).reshape(n, HEAD_DIM, -1)
            base = (a.T if module == "o" else a).reshape(n, HEAD_DIM, -1)
            for h in range(n):
                dd, aa = float(parts[h].square().sum()), float(base[h].square().sum())
                heads.append({"name": name, "head": h, "fro2": dd, "norm_a2": aa, "rel": math.sqrt(dd / aa)})
    return pd.DataFrame(rows).set_index("name"), pd.DataFrame(heads).set_index(["name", "head"])


def by_name(d) -> tuple[pd.DataFrame, pd.DataFrame]:
    return d.tensors.set_index("name").sort_index(), d.heads.set_index(["name", "head"]).sort_index()


def run(a, b, **kw):
    return compare(a if isinstance(a, Weights) else open_weights(a),
                   b if isinstance(b, Weights) else open_weights(b), progress=False, **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """a and b = a + `perturb`, in float32 (single file and sharded two ways), float16 and bfloat16,
    and a byte copy of a."""
    root = tmp_path_factory.mktemp("deltas")
    model = new_model(0)
    out = {"a": root / "a", "b": root / "b", "a_copy": root / "a_copy"}
    model.save_pretrained(out["a"])
    model.save_pretrained(root / "a_shard", max_shard_size="100KB")
    for dt in ("float16", "bfloat16"):
        copy.deepcopy(model).to(getattr(torch, dt)).save_pretrained(root / f"a_{dt}")
    shutil.copytree(out["a"], out["a_copy"])
    perturb(model, 1)
    model.save_pretrained(out["b"])
    model.save_pretrained(root / "b_shard", max_shard_size="60KB")
    for dt in ("float16", "bfloat16"):
        copy.deepcopy(model).to(getattr(torch, dt)).save_pretrained(root / f"b_{dt}")
    for key in ("a_shard", "b_shard", "a_float16", "b_float16", "a_bfloat16", "b_bfloat16"):
        out[key] = root / key
    return out


@pytest.fixture(scope="module")
def delta(ckpts):
    return run(ckpts["a"], ckpts["b"])


# ----------------------------------------------------------------------------- every statistic


@pytest.mark.parametrize("block_rows", [None, 3])
def test_every_statistic_equals_a_dense_computation(ckpts, delta, block_rows) -> None:
    if block_rows:    # blocks of 3 rows (of 64-wide matrices): blocks straddle heads, sketches see many blocks
        delta = run(ckpts["a"], ckpts["b"], block_bytes=block_rows * HIDDEN * 4)
    ref, ref_heads = reference(state(ckpts["a"]), state(ckpts["b"]))
    t, h = by_name(delta)
    assert sorted(t.index) == sorted(ref.index) and len(t) == 2 + 1 + LAYERS * 9
    for name, r in ref.iterrows():
        got = t.loc[name]
        for col in SCALARS:
            assert got[col] == pytest.approx(r[col], rel=1e-5, abs=1e-12), (name, col)
        assert got["fro2"] == pytest.approx(r["fro"] ** 2, rel=1e-5, abs=1e-20)
        if "sv" not in r or not isinstance(r["sv"], np.ndarray):
            continue
        assert got["spectrum"] == ("zero" if r["fro"] == 0 else "exact"), name
        np.testing.assert_allclose(got["sv"], r["sv"], rtol=1e-6, atol=1e-12, err_msg=name)
        for col in SPECTRAL:
            assert got[col] == pytest.approx(r[col], rel=1e-5, abs=1e-12), (name, col)
        assert got["energy_top"] == pytest.approx(1.0 if r["fro"] > 0 else 0.0)
    # the kinds of update were as designed, so each statistic was tested on something that shows it
    v0 = t.loc["model.layers.0.self_attn.v_proj.weight"]
    assert 0.6 < v0["zero_frac"] < 0.8
    assert t.loc["model.layers.0.self_attn.k_proj.weight", "fro"] == 0.0
    assert t.loc["model.layers.1.self_attn.o_proj.weight", "rank90"] <= 3 < t.loc["model.layers.1.self_attn.q_proj.weight", "rank90"]
    assert t.loc["model.embed_tokens.weight", "zero_frac"] == pytest.approx(1 - 3 / VOCAB)

    # per head, GQA: 4 query heads for q and o (o by its columns), 2 KV heads for k and v
    assert sorted(h.index) == sorted(ref_heads.index)
    counts = delta.heads.groupby(["layer", "module"]).size().to_dict()
    assert counts == {(layer, m): (KV if m in "kv" else HEADS) for layer in range(LAYERS) for m in "qkvo"}
    for key, r in ref_heads.iterrows():
        for col in ("fro2", "norm_a2", "rel"):
            assert h.loc[key, col] == pytest.approx(r[col], rel=1e-5, abs=1e-20), (key, col)
    # heads add up to their tensor; layer x module adds up tensors
    per_tensor = delta.heads.groupby("name")["fro2"].sum()
    for name, fro2 in per_tensor.items():
        assert fro2 == pytest.approx(t.loc[name, "fro2"], rel=1e-6)
    m = delta.modules.set_index(["layer", "module"])
    q1 = ref.loc["model.layers.1.self_attn.q_proj.weight"]
    assert m.loc[(1, "q"), "rel"] == pytest.approx(q1["rel"], rel=1e-5)

    # the directions o and down updates write: the dense top left singular vectors (up to sign)
    assert set(delta.vectors) == {f"L{i}.{m}" for i in range(LAYERS) for m in ("o", "down")}
    for layer in range(LAYERS):
        for m, path in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
            got, want = delta.vectors[f"L{layer}.{m}"], ref.loc[f"model.layers.{layer}.{path}.weight", "u"]
            assert got.shape == (K, HIDDEN)
            cos = (got[:3].double() * want).sum(1).abs()
            assert torch.all(cos > 1 - 1e-6), (layer, m, cos)


def test_dtypes_and_message(ckpts, delta) -> None:
    t = delta.tensors
    assert set(t["dtype_a"]) == set(t["dtype_b"]) == {"F32"}
    assert str(ckpts["a"]) in delta.message and str(ckpts["b"]) in delta.message
    total = float(np.sqrt(t["fro2"].sum()))
    assert f"{total:.4g}" in delta.message


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora(ckpts, tmp_path_factory) -> dict[str, Path]:
    """Two adapters of a (plain LoRA and rsLoRA, B perturbed from its zero init; the second also saves
    the whole lm_head), each saved and merged into a saved full checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    root = tmp_path_factory.mktemp("lora")
    out = {}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    for i, (key, extra) in enumerate((("lora", {}), ("rslora", {"use_rslora": True, "modules_to_save": ["lm_head"]}))):
        model = LlamaForCausalLM.from_pretrained(ckpts["a"], dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                elif "modules_to_save" in name:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(root / key)
        peft_model.merge_and_unload().save_pretrained(root / f"{key}_merged")
        out[key], out[f"{key}_merged"] = root / key, root / f"{key}_merged"
    assert json.loads((out["rslora"] / "adapter_config.json").read_text())["use_rslora"] is True
    return out


def assert_same_delta(d1, d2, rel: float, cols=(*SCALARS, *SPECTRAL)) -> None:
    t1, h1 = by_name(d1)
    t2, h2 = by_name(d2)
    assert list(t1.index) == list(t2.index) and list(h1.index) == list(h2.index)
    for name in t1.index:
        scale = max(t1.loc[name, "fro"], 1e-30)
        for col in cols:
            if col not in t1.columns or pd.isna(t2.loc[name, col]):
                continue
            if col == "zero_frac" and t1.loc[name, "fro"] == 0:
                assert t1.loc[name, col] == t2.loc[name, col] == 1.0
            elif col in ("effective_rank", "rank90", "stable_rank", "cosine", "rel", "zero_frac"):
                assert t1.loc[name, col] == pytest.approx(t2.loc[name, col], rel=rel, abs=rel), (name, col)
            else:
                assert t1.loc[name, col] == pytest.approx(t2.loc[name, col], rel=rel, abs=rel * scale), (name, col)
        if isinstance(t1.loc[name, "sv"], list):
            np.testing.assert_allclose(t1.loc[name, "sv"], t2.loc[name, "sv"], rtol=rel,
                                       atol=rel * t1.loc[name, "sv1"] + 1e-30, err_msg=name)
    for col in ("fro2", "norm_a2"):
        np.testing.assert_allclose(h1[col], h2[col], rtol=2 * rel, atol=1e-20)


@pytest.mark.parametrize("key", ["lora", "rslora"])
def test_lora_statistics_equal_the_merged_difference(ckpts, lora, key) -> None:
    adapted = open_weights(lora[key], base=ckpts["a"])
    d = run(ckpts["a"], adapted)
    merged = run(ckpts["a"], lora[f"{key}_merged"])
    t = d.tensors.set_index("name")
    adapted_names = [n for n in t.index if any(f"{m}_proj" in n for m in "qkvo") or "down_proj" in n]
    assert len(adapted_names) == 5 * LAYERS
    assert set(t.loc[adapted_names, "spectrum"]) == {"lora"}          # read from the factors, no dW formed
    assert set(merged.tensors.set_index("name").loc[adapted_names, "spectrum"]) == {"exact"}
    # rank 4 exactly: the 4 factor singular values, then zeros (same length as a dense spectrum)
    for name in adapted_names:
        sv = t.loc[name, "sv"]
        assert len(sv) == K and all(x > 0 for x in sv[:4]) and all(x == 0 for x in sv[4:]), (name, sv)
        assert t.loc[name, "rank90"] <= 4
    assert_same_delta(d, merged, rel=1e-4)
    # the scaling: rsLoRA's alpha / sqrt(r) = 4, LoRA's alpha / r = 2
    scale = adapted.factors["model.layers.0.self_attn.q_proj.weight"].scale
    assert scale == (4.0 if key == "rslora" else 2.0)
    if key == "rslora":   # the saved lm_head replaces the base's
        assert t.loc["lm_head.weight", "fro"] > 0 and t.loc["lm_head.weight", "spectrum"] == "exact"
    else:
        assert t.loc["lm_head.weight", "fro"] == 0


def test_adapted_weights_are_the_merged_weights(ckpts, lora) -> None:
    # the adapter's weights (base rows + scale * B @ A) against the merged checkpoint: equal up to rounding
    d = run(lora["rslora_merged"], open_weights(lora["rslora"], base=ckpts["a"]))
    t = d.tensors
    assert (t["fro"] <= 1e-6 * t["norm_a"]).all()
    # two adapters of one base compared with each other: the difference of the merged checkpoints
    # (not the second adapter's factors alone)
    two = run(open_weights(lora["lora"], base=ckpts["a"]), open_weights(lora["rslora"], base=ckpts["a"]))
    merged = run(lora["lora_merged"], lora["rslora_merged"])
    assert "lora" not in set(two.tensors["spectrum"])
    assert_same_delta(two, merged, rel=1e-4)


def test_lora_factors_fan_in_fan_out_and_spectrum() -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, 20, generator=g), torch.randn(12, 3, generator=g)
    f = LoraFactors("w", A, B, 1.5, fan_in_fan_out=False)
    np.testing.assert_allclose(f.dense(), 1.5 * B @ A, rtol=1e-6)
    np.testing.assert_allclose(f.delta_rows(4, 9), (1.5 * B @ A)[4:9], rtol=1e-6)
    # fan_in_fan_out (GPT-2's Conv1D): the base stores [in, out], so the factors hold the transpose
    ft = LoraFactors("w", B.T.contiguous(), A.T.contiguous(), 1.5, fan_in_fan_out=True)
    np.testing.assert_allclose(ft.dense(), (1.5 * B @ A), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ft.delta_rows(2, 7), (1.5 * B @ A)[2:7], rtol=1e-5, atol=1e-6)
    for factors in (f, ft):
        spec = lora_spectrum(factors, 5, vectors=True)
        np.testing.assert_allclose(spec.values[:3], torch.linalg.svdvals(factors.dense().double())[:3], rtol=1e-6)
        assert len(spec.values) == 5 and (spec.values[3:] == 0).all()


# ----------------------------------------------------------------------------- files and formats


def test_sharded_and_unsharded_copies_agree(ckpts, delta) -> None:
    for key, n_min in (("a_shard", 2), ("b_shard", 3)):
        index = json.loads((ckpts[key] / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= n_min
    wa, wb = (json.loads((ckpts[k] / "model.safetensors.index.json").read_text())["weight_map"]
              for k in ("a_shard", "b_shard"))
    assert any(Path(wa[n]).name != Path(wb[n]).name for n in wa)   # the two shard differently
    t0, h0 = by_name(delta)
    for a, b in (("a_shard", "b"), ("a", "b_shard"), ("a_shard", "b_shard")):
        t, h = by_name(run(ckpts[a], ckpts[b]))
        pd.testing.assert_frame_equal(t, t0)
        pd.testing.assert_frame_equal(h, h0)


def test_fp16_and_bf16_copies_agree_within_their_precision(ckpts, delta) -> None:
    t32, h32 = by_name(delta)
    wa, wb = state(ckpts["a"]), state(ckpts["b"])
    moved = {}
    for dt, u, code in (("float16", 2.0 ** -11, "F16"), ("bfloat16", 2.0 ** -8, "BF16")):
        d = run(ckpts[f"a_{dt}"], ckpts[f"b_{dt}"])
        t, h = by_name(d)
        assert set(t["dtype_a"]) == set(t["dtype_b"]) == {code}
        for name in t.index:
            a, b = wa[name].double(), wb[name].double()
            # rounding each side to the format moves dW by at most u(|a| + |b|) per entry (plus fp16's
            # subnormal spacing), so norms, singular values (Weyl) and |dW|max move at most that much
            bound = u * (float(a.norm()) + float(b.norm())) + 1e-6
            got, want = t.loc[name], t32.loc[name]
            assert abs(got["fro"] - want["fro"]) <= bound, (dt, name)
            assert abs(got["norm_a"] - want["norm_a"]) <= u * float(a.norm()) + 1e-6, (dt, name)
            assert abs(got["max_abs"] - want["max_abs"]) <= u * float(a.abs().max() + b.abs().max()) + 1e-7
            if isinstance(want["sv"], list):
                assert np.abs(np.array(got["sv"]) - np.array(want["sv"])).max() <= bound, (dt, name)
            if want["fro"] == 0:   # an untouched tensor stays exactly untouched in any format
                assert got["fro"] == 0 and got["zero_frac"] == 1.0
            elif want["fro"] > 0.1 * float(a.norm()):   # a large update: its relative norm barely moves
                assert got["rel"] == pytest.approx(want["rel"], rel=20 * u)
        for key in h.index:   # per head the same bound, with |b_h| <= |a_h| + |dW_h|
            na, nd = math.sqrt(h32.loc[key, "norm_a2"]), math.sqrt(h32.loc[key, "fro2"])
            assert abs(math.sqrt(h.loc[key, "fro2"]) - nd) <= u * (2 * na + nd) + 1e-6, (dt, key)
        moved[dt] = float((t["fro"] - t32["fro"]).abs().max())
    # the copies really were read in their formats: bf16's coarser grid moves the answer more than fp16's
    assert moved["bfloat16"] > moved["float16"] > 0


def test_a_zero_delta_is_zeros_and_the_plain_message(ckpts) -> None:
    d = run(ckpts["a"], ckpts["a_copy"])
    t = d.tensors
    assert d.message == f"{ckpts['a_copy']} equals {ckpts['a']}: every tensor's update is exactly zero"
    for col in ("fro", "fro2", "rel", "max_abs", "cosine"):
        assert (t[col] == 0).all(), col
    assert (t["zero_frac"] == 1).all() and (t["norm_a"] > 0).all()
    mat = t[t["shape"].map(len) == 2]
    assert set(mat["spectrum"]) == {"zero"}
    assert not mat[["sv1", *SPECTRAL[1:], "energy_top"]].isna().any().any()
    assert all(v == [0.0] * K for v in mat["sv"])
    assert not d.heads.isna().any().any() and (d.heads["rel"] == 0).all() and len(d.heads) == LAYERS * 12
    assert not d.modules.isna().any().any() and (d.modules["rel"] == 0).all()
    assert d.vectors == {}


# ----------------------------------------------------------------------------- the sketch


def write_pair(folder: Path, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    save_file(a, folder / "a" / "model.safetensors")
    save_file(b, folder / "b" / "model.safetensors")
    return folder / "a", folder / "b"


@pytest.mark.parametrize("out,inn", [(384, 512), (512, 384)])
def test_the_sketch_finds_the_top_singular_values_of_a_low_rank_plus_noise_update(tmp_path, out, inn) -> None:
    g = torch.Generator().manual_seed(5)
    name = "model.layers.0.mlp.down_proj.weight"
    w = 0.05 * torch.randn(out, inn, generator=g)
    u = torch.linalg.qr(torch.randn(out, 6, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inn, 6, generator=g))[0]
    # rank 6 (singular values 8 .. 1) plus dense noise of Frobenius norm ~1.3 (spectral ~0.13)
    upd = u @ torch.diag(torch.tensor([8.0, 5.0, 3.0, 2.0, 1.5, 1.0])) @ v.T + 0.003 * torch.randn(out, inn, generator=g)
    pa, pb = write_pair(tmp_path, {name: w}, {name: w + upd})
    exact = run(pa, pb).tensors.iloc[0]
    sk = run(pa, pb, exact_max=1000, block_bytes=40 * inn * 4)   # 10 blocks of rows
    t = sk.tensors.iloc[0]
    assert exact["spectrum"] == "exact" and t["spectrum"] == "sketch"
    s_exact, s_sketch = np.array(exact["sv"]), np.array(t["sv"])
    # stated tolerance: sv1 within 0.5%, each of the top 6 (the low-rank part) within 10%
    assert t["sv1"] == pytest.approx(exact["sv1"], rel=5e-3)
    np.testing.assert_allclose(s_sketch[:6], s_exact[:6], rtol=0.1)
    # a projection of the update: no sketched value exceeds the true one
    assert (s_sketch <= s_exact * (1 + 1e-6)).all()
    # the norms never depend on the spectrum's method (up to float32 rounding of other blocks of rows)
    for col in SCALARS:
        assert t[col] == pytest.approx(exact[col], rel=1e-6, abs=1e-8)
    assert t["stable_rank"] == pytest.approx(exact["stable_rank"], rel=1e-2)
    assert t["rank90"] == exact["rank90"] == 3
    # the direction it writes: the top left singular vector (and the exact path's, wide or tall)
    cos = float((sk.vectors["L0.down"][0].double() @ u[:, 0].double()).abs())
    assert cos > 0.995
    u_exact = torch.linalg.svd((upd + w - w).double())[0][:, :3].T
    got = run(pa, pb).vectors["L0.down"][:3].double()
    assert torch.all((got * u_exact).sum(1).abs() > 1 - 1e-6)


# ----------------------------------------------------------------------------- bad input


def copy_ckpt(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def resave(folder: Path, edit) -> None:
    """Rewrite a single-file checkpoint's tensors through `edit(dict)` (config.json untouched)."""
    f = folder / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path: Path, head: dict, body: bytes, size: int | None = None) -> None:
    text = json.dumps(head).encode()
    text += b" " * ((size or len(text)) - len(text))
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def refused(exc, *needles: str, a, b) -> str:
    with pytest.raises(exc) as e:
        run(a, b)
    msg = str(e.value)
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


Q1 = "model.layers.1.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def test_different_architectures_or_shapes_are_refused(ckpts, tmp_path) -> None:
    other = tmp_path / "wide"
    new_model(0, intermediate_size=2 * INTER).save_pretrained(other)
    refused(ArchitectureMismatch, "intermediate_size", ckpts["a"], other, a=ckpts["a"], b=other)
    # the same config but one tensor of another shape (a config that lies, or an edited file)
    b = copy_ckpt(ckpts["b"], tmp_path / "b")
    resave(b, lambda sd: sd.__setitem__(Q1, sd[Q1][:-HEAD_DIM].contiguous()))
    msg = refused(ArchitectureMismatch, Q1, ckpts["a"] / "model.safetensors", b / "model.safetensors",
                  a=ckpts["a"], b=b)
    assert f"{[HIDDEN, HIDDEN]}" in msg and f"{[HIDDEN - HEAD_DIM, HIDDEN]}" in msg


def test_a_tensor_missing_from_either_side_is_named(ckpts, tmp_path) -> None:
    b = copy_ckpt(ckpts["b"], tmp_path / "b")
    resave(b, lambda sd: sd.pop(UP1))
    refused(CheckpointError, UP1, ckpts["a"] / "model.safetensors", b, a=ckpts["a"], b=b)
    refused(CheckpointError, UP1, ckpts["a"] / "model.safetensors", b, a=b, b=ckpts["a"])


def test_a_missing_shard_is_named(ckpts, tmp_path) -> None:
    a = copy_ckpt(ckpts["a_shard"], tmp_path / "a")
    shard = sorted(a.glob("*.safetensors"))[1]
    shard.unlink()
    refused(CheckpointError, shard.name, a / "model.safetensors.index.json", a=a, b=ckpts["b"])
    # an index that puts a tensor in a shard that does not hold it
    a2 = copy_ckpt(ckpts["a_shard"], tmp_path / "a2")
    index = json.loads((a2 / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][moved] = files[1]
    (a2 / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(CheckpointError, moved, files[1], a=a2, b=ckpts["b"])


def test_a_truncated_file_is_named_with_its_tensor(ckpts, tmp_path) -> None:
    b = copy_ckpt(ckpts["b"], tmp_path / "b")
    f = b / "model.safetensors"
    head, _ = raw_header(f)
    last = max((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][1])
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    refused(CheckpointError, "truncated", str(f), last, a=ckpts["a"], b=b)
    with open(f, "r+b") as fh:                       # not even a header length left
        fh.truncate(5)
    refused(CheckpointError, "truncated", str(f), a=ckpts["a"], b=b)
    # truncated after it was opened (a copy still running): an error, not a crash on a mapped page past the end
    b2 = copy_ckpt(ckpts["b"], tmp_path / "b2")
    wb = Weights(b2)
    with open(b2 / "model.safetensors", "r+b") as fh:
        fh.truncate((b2 / "model.safetensors").stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        compare(Weights(ckpts["a"]), wb, progress=False)
    assert str(b2 / "model.safetensors") in str(e.value)


def test_a_header_that_lies_about_sizes_is_refused_before_reading(ckpts, tmp_path) -> None:
    b = copy_ckpt(ckpts["b"], tmp_path / "b")
    f = b / "model.safetensors"
    head, body = raw_header(f)
    lie = json.loads(json.dumps(head))
    lie[Q1]["shape"] = [HIDDEN, HIDDEN + 8]          # more bytes than its span holds
    write_raw(f, lie, body)
    refused(CheckpointError, "lies about sizes", Q1, str(f), a=ckpts["a"], b=b)
    lie = json.loads(json.dumps(head))
    lie[Q1]["dtype"] = "F16"                         # a dtype that does not fit its span
    write_raw(f, lie, body)
    refused(CheckpointError, "lies about sizes", Q1, str(f), a=ckpts["a"], b=b)
    lie = json.loads(json.dumps(head))
    end = lie[Q1]["data_offsets"][1]                 # a span past the end of the file
    lie[Q1]["data_offsets"] = [len(body) - 8, len(body) - 8 + end - lie[Q1]["data_offsets"][0]]
    write_raw(f, lie, body)
    refused(CheckpointError, "truncated", Q1, str(f), a=ckpts["a"], b=b)


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_weight_names_the_tensor_and_its_file(ckpts, tmp_path, side, value) -> None:
    bad = copy_ckpt(ckpts[side], tmp_path / side)

    def poison(sd):
        sd[UP1][7, 3] = value
    resave(bad, poison)
    a, b = (bad, ckpts["b"]) if side == "a" else (ckpts["a"], bad)
    refused(CheckpointError, "NaN or Inf", UP1, str(bad / "model.safetensors"), a=a, b=b)
    # the same for a bf16 checkpoint
    bad16 = copy_ckpt(ckpts[f"{side}_bfloat16"], tmp_path / f"{side}16")
    resave(bad16, poison)
    a, b = (bad16, ckpts["b_bfloat16"]) if side == "a" else (ckpts["a_bfloat16"], bad16)
    refused(CheckpointError, "NaN or Inf", UP1, str(bad16 / "model.safetensors"), a=a, b=b)


class Armed:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_pickled_weights_are_refused_and_never_unpickled(ckpts, tmp_path) -> None:
    marker = tmp_path / "MARKER"
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "hook": Armed(marker)}
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(ckpts["a"] / "config.json", folder)
    torch.save(payload, folder / "pytorch_model.bin")
    # the file really is armed: its pickle calls exec (checked by reading opcodes, not by loading)
    with zipfile.ZipFile(folder / "pytorch_model.bin") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    assert any(op.name == "REDUCE" for op, _, _ in ops)
    assert any(isinstance(arg, str) and "exec" in arg for _, arg, _ in ops)

    refused(CheckpointError, "pytorch_model.bin", "pickle", a=folder, b=ckpts["b"])
    refused(CheckpointError, "pytorch_model.bin", "pickle", a=ckpts["a"], b=folder / "pytorch_model.bin")
    # a pickle under a safetensors name, zip (torch.save) or bare (the legacy format)
    disguised = copy_ckpt(ckpts["b"], tmp_path / "disguised")
    torch.save(payload, disguised / "model.safetensors")
    refused(CheckpointError, str(disguised / "model.safetensors"), "pickle", a=ckpts["a"], b=disguised)
    torch.save(payload, disguised / "model.safetensors", _use_new_zipfile_serialization=False)
    assert (disguised / "model.safetensors").read_bytes()[:1] == b"\x80" and b"exec" in (
        disguised / "model.safetensors").read_bytes()
    refused(CheckpointError, str(disguised / "model.safetensors"), "pickle", a=ckpts["a"], b=disguised)
    # an adapter saved as a pickle
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save(payload, adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        open_weights(adapter, base=ckpts["a"])
    assert not marker.exists()


@pytest.mark.parametrize("n", [0x280, 0x4B50])
def test_a_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path, n) -> None:
    # little-endian 0x280 starts b"\x80\x02" (a protocol-2 pickle's first bytes), 0x4B50 starts b"PK"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    head = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    for side, x in (("a", t), ("b", t + 1)):
        (tmp_path / side).mkdir()
        write_raw(tmp_path / side / "model.safetensors", head, x.numpy().tobytes(), size=n)
    assert (tmp_path / "a" / "model.safetensors").read_bytes()[:2] in (b"\x80\x02", b"PK")
    assert torch.equal(Weights(tmp_path / "a").rows("w"), t)
    d = run(tmp_path / "a", tmp_path / "b")
    assert d.tensors.iloc[0]["fro"] == pytest.approx(math.sqrt(6))
