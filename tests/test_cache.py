"""The activation cache (workbench/cache.py): bit-identical hits, verified reads that drop corrupt
entries, atomic and concurrent writes, LRU eviction under a cap, `ls`/`gc`, and the bridge helper.

Plain tensors everywhere except the last tests, which boot a random two-layer Llama as a bridge.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from workbench.core.cache import (
    ActivationCache,
    CacheKey,
    cached_activations,
    gc,
    ls,
    make_key,
    parse_size,
    stats,
    tokens_hash,
)
from workbench.core.errors import ConfigError, PromptError

SHA = "ab" * 32
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]


def acts_for(seed: int = 0, batch: int = 6, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {HOOKS[0]: torch.randn(batch, 5, 16, generator=g).to(dtype),
            HOOKS[1]: torch.randn(batch, 5, 4, 8, generator=g).to(dtype)}


def key_for(seed: int = 0, dtype: torch.dtype = torch.float32) -> CacheKey:
    return make_key(SHA, torch.arange(12).reshape(3, 4) + seed, HOOKS, dtype)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, t in a.items():
        assert t.dtype == b[k].dtype and torch.equal(t, b[k]), k


def shards(cache: ActivationCache, key: CacheKey) -> list[Path]:
    return sorted(cache.path(key).glob("*.safetensors"))


# ------------------------------------------------------------------ keys

def test_keys_differ_by_every_field_and_ignore_hook_order() -> None:
    tokens = torch.arange(12).reshape(3, 4)
    base = make_key(SHA, tokens, HOOKS, torch.float32)
    variants = [
        make_key("cd" * 32, tokens, HOOKS, torch.float32),
        make_key(SHA, tokens + 1, HOOKS, torch.float32),
        make_key(SHA, tokens.reshape(4, 3), HOOKS, torch.float32),  # same ids, other prompt split
        make_key(SHA, tokens, HOOKS[:1], torch.float32),
        make_key(SHA, tokens, HOOKS, torch.bfloat16),
        make_key(SHA, tokens, HOOKS, torch.float32, extra={"positions": "last"}),
    ]
    ids = {base.id, *(k.id for k in variants)}
    assert len(ids) == len(variants) + 1
    assert make_key(SHA, tokens, HOOKS[::-1] + HOOKS[:1], "float32").id == base.id
    assert make_key(SHA, tokens.tolist(), HOOKS, torch.float32).id == base.id  # lists hash like tensors
    assert make_key(SHA, tokens_hash(tokens), HOOKS, torch.float32).id == base.id  # a hash passes through
    assert make_key(SHA, tokens.to(torch.int32), HOOKS).id == base.id


def test_bad_keys_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="at least one hook"):
        make_key(SHA, torch.zeros(1, 2, dtype=torch.long), [])
    with pytest.raises(ConfigError, match="unsupported cache dtype"):
        make_key(SHA, torch.zeros(1, 2, dtype=torch.long), HOOKS, "float8")
    with pytest.raises(ConfigError, match="integers"):
        make_key(SHA, torch.zeros(1, 2), HOOKS)
    with pytest.raises(ConfigError, match="not a cache key"):
        ActivationCache(Path("/nonexistent")).get("nope")


# ------------------------------------------------------------------ hits and misses

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hit_is_bit_identical_and_counted(tmp_path: Path, dtype: torch.dtype) -> None:
    cache = ActivationCache(tmp_path, shard_bytes=1000)  # forces several shards per hook
    key, acts = key_for(dtype=dtype), acts_for(dtype=dtype)
    assert cache.get(key) is None and cache.stats.misses == 1
    cache.put(key, acts, meta={"note": "test"})
    assert len(shards(cache, key)) > 2
    got = cache.get(key)
    assert_same(got, acts)
    assert cache.stats.hits == 1 and cache.stats.bytes_read > 0 and cache.stats.bytes_written > 0
    assert key in cache
    assert json.loads((cache.path(key) / "index.json").read_text())["meta"] == {"note": "test"}


def test_put_casts_to_key_dtype_and_checks_hooks(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path)
    key = key_for(dtype=torch.float16)
    cache.put(key, acts_for())
    got = cache.get(key)
    assert all(t.dtype == torch.float16 for t in got.values())
    assert torch.equal(got[HOOKS[0]], acts_for()[HOOKS[0]].half())
    with pytest.raises(ConfigError, match="do not match the key's hooks"):
        cache.put(key_for(1), {HOOKS[0]: torch.zeros(1)})


def test_get_or_compute_computes_once_and_a_rerun_reads_the_cache(tmp_path: Path) -> None:
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return acts_for(dtype=torch.float64)  # cast on the way in: a miss returns what a hit would

    first = ActivationCache(tmp_path).get_or_compute(key_for(), compute)
    rerun = ActivationCache(tmp_path)  # a new process would build a new object on the same root
    second = rerun.get_or_compute(key_for(), compute)
    assert len(calls) == 1
    assert_same(first, second)
    assert first[HOOKS[0]].dtype == torch.float32
    assert rerun.stats.hits == 1 and rerun.stats.misses == 0
    total = stats(tmp_path)
    assert total["hits"] == 1 and total["misses"] == 1 and total["puts"] == 1


# ------------------------------------------------------------------ damage

@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "index"])
def test_corrupt_entry_is_detected_dropped_and_recomputed(tmp_path: Path, damage: str) -> None:
    cache = ActivationCache(tmp_path, shard_bytes=1000)
    key, acts = key_for(), acts_for()
    cache.put(key, acts)
    shard = shards(cache, key)[1]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # a tensor byte: the file still parses, only the hash can tell
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        shard.unlink()
    else:
        (cache.path(key) / "index.json").write_text("{not json")
    assert cache.get(key) is None
    assert cache.stats.corrupt == 1 and not cache.path(key).exists()
    recomputed = cache.get_or_compute(key, lambda: acts)
    assert_same(recomputed, acts)
    assert_same(cache.get(key), acts)


def test_interrupted_write_is_never_returned_and_is_cleaned(tmp_path: Path, monkeypatch) -> None:
    cache = ActivationCache(tmp_path, shard_bytes=1000)
    key, acts = key_for(), acts_for()
    # a writer killed mid-way leaves its temp folder behind
    stale = tmp_path / f".tmp-{key.id}-killed"
    stale.mkdir(parents=True)
    (stale / "h000-00000.safetensors").write_bytes(b"partial")
    assert cache.get(key) is None and key not in cache
    # an exception mid-write leaves nothing at all
    import workbench.core.cache as mod
    real, n = mod._st_save, []

    def failing(tensors):
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return real(tensors)

    monkeypatch.setattr(mod, "_st_save", failing)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, acts)
    monkeypatch.setattr(mod, "_st_save", real)
    assert key not in cache and cache.get(key) is None
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [stale.name]
    report = cache.gc()
    assert report["temps_removed"] == 1 and not stale.exists()
    cache.put(key, acts)
    assert_same(cache.get(key), acts)


# ------------------------------------------------------------------ concurrency

def _writer(root: str, barrier, seed: int, use_compute: bool, log: str) -> None:
    cache = ActivationCache(root, shard_bytes=1000)
    key, acts = key_for(), acts_for()
    barrier.wait()
    for _ in range(3):
        if use_compute:
            def compute():
                with open(log, "a") as f:
                    f.write(f"{seed}\n")
                time.sleep(0.2)  # a slow computation, so the other process has to wait for it
                return acts
            got = cache.get_or_compute(key, compute)
        else:
            cache.put(key, acts)
            got = cache.get(key)
        assert got is not None and all(torch.equal(got[h], acts[h]) for h in HOOKS)


@pytest.mark.parametrize("use_compute", [False, True], ids=["put", "get_or_compute"])
def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path: Path, use_compute: bool) -> None:
    ctx = mp.get_context("fork")
    root, log = tmp_path / "cache", tmp_path / "computed.log"
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(root), barrier, i, use_compute, str(log))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = ActivationCache(root)
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert [p.name for p in entries] == [key_for().id]
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".del-*"))
    assert_same(cache.get(key_for()), acts_for())
    if use_compute:  # the others waited for the first computation instead of repeating it
        assert len(log.read_text().split()) == 1
    assert stats(root)["puts"] == 1


# ------------------------------------------------------------------ cap, ls, gc

def test_lru_eviction_respects_the_cap(tmp_path: Path) -> None:
    probe = ActivationCache(tmp_path / "probe")
    probe.put(key_for(), acts_for())
    size = probe.total_bytes()
    cache = ActivationCache(tmp_path / "c", cap_bytes=int(2.5 * size))
    a, b, c = key_for(1), key_for(2), key_for(3)
    cache.put(a, acts_for(1))
    cache.put(b, acts_for(2))
    assert cache.get(a) is not None  # a is now more recently used than b
    cache.put(c, acts_for(3))
    assert a in cache and c in cache and b not in cache
    assert cache.total_bytes() <= cache.cap_bytes and cache.stats.evictions == 1
    # an entry bigger than the cap is still stored: never evict the one just written
    small = ActivationCache(tmp_path / "c", cap_bytes=10)
    small.put(b, acts_for(2))
    assert b in small and a not in small and c not in small


def test_ls_and_gc(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path)
    assert ls(tmp_path).empty
    for seed in (1, 2, 3):
        cache.put(key_for(seed), acts_for(seed, batch=seed), meta={"seed": seed})
    cache.get(key_for(1))
    table = ls(tmp_path)
    assert list(table["key"]) == [key_for(s).id for s in (1, 3, 2)]  # most recently used first
    assert {"key", "checkpoint_sha", "hooks", "dtype", "shapes", "bytes", "created", "last_used"} <= set(table)
    row = table.set_index("key").loc[key_for(2).id]
    assert row["checkpoint_sha"] == SHA and row["dtype"] == "float32" and tuple(row["hooks"]) == tuple(sorted(HOOKS))
    assert row["shapes"] == ((2, 5, 16), (2, 5, 4, 8)) and row["bytes"] > 0 and row["meta"] == {"seed": 2}
    broken = tmp_path / ("0" * 64)  # an entry folder without an index is garbage
    broken.mkdir()
    report = gc(cap_bytes=int(table["bytes"].iloc[:2].sum()), root=tmp_path)
    assert set(report["removed"]) == {broken.name, key_for(2).id}
    assert report["entries"] == 2 and report["total_bytes"] <= table["bytes"].iloc[:2].sum()
    assert gc(0, tmp_path)["entries"] == 0 and ls(tmp_path).empty
    assert not list((tmp_path / ".locks").glob("*.lock"))  # no lock files left for vanished keys


def test_root_from_environment_and_sizes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("WORKBENCH_CACHE_CAP", "3M")
    cache = ActivationCache()
    assert cache.root == tmp_path / "env" and cache.cap_bytes == 3 * 2**20
    assert parse_size("2G") == 2 * 2**30 and parse_size("1.5k") == 1536 and parse_size(7) == 7
    with pytest.raises(ConfigError):
        parse_size("lots")


# ------------------------------------------------------------------ models

@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory):
    """A random two-layer Llama as a TransformerLens bridge (seconds, unlike a trained suite)."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from workbench.organisms.presets import get_preset
    from workbench.suite.loading import bridge_from_dir
    from workbench.world.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(["hello world, the answer is 7."], vocab_size=160)
    preset = replace(get_preset("tiny"), vocab_size=len(tok))
    assert preset.vocab_size != preset.d_model  # the bridge's logits are off for square unembeddings
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset.llama_config(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)).eval()
    folder = tmp_path_factory.mktemp("random_llama")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # reloaded: TransformerLens needs the saved tokenizer's name_or_path
    return bridge_from_dir(str(folder), hf_model=model, tokenizer=load_tokenizer(folder))


def test_cached_activations_from_a_bridge(tmp_path: Path, bridge) -> None:
    cache = ActivationCache(tmp_path)
    tokens = torch.randint(0, bridge.cfg.d_vocab, (5, 9), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"]
    got = cached_activations(bridge, tokens, hooks, SHA, cache=cache, batch_size=2)
    assert set(got) == set(hooks)  # only the requested hooks, not TL's aliases
    _, ref = bridge.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    for h in hooks:
        assert torch.allclose(got[h], ref[h], atol=1e-6), h
    again = cached_activations(bridge, tokens, hooks, SHA, cache=cache)
    assert_same(got, again)
    assert cache.stats.hits == 1 and cache.stats.misses == 1
    last = cached_activations(bridge, tokens, ["ln_final.hook_normalized"], SHA, cache=cache)  # full run
    assert last["ln_final.hook_normalized"].shape == (5, 9, bridge.cfg.d_model)


def test_cached_activations_bad_input(tmp_path: Path, bridge) -> None:
    cache = ActivationCache(tmp_path)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"blocks\.7\.hook_resid_pre.*blocks\.\{L\}\.hook_resid_pre"):
        cached_activations(bridge, tokens, ["blocks.7.hook_resid_pre"], SHA, cache=cache)
    with pytest.raises(PromptError, match="empty"):
        cached_activations(bridge, torch.zeros(0, 3, dtype=torch.long), ["hook_embed"], SHA, cache=cache)
    with pytest.raises(ConfigError, match="integer tensor"):
        cached_activations(bridge, torch.zeros(3), ["hook_embed"], SHA, cache=cache)
    assert not cache.root.exists() or ls(cache.root).empty


def test_cached_activations_from_a_function(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path)
    calls = []

    def fn(tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        calls.append(1)
        return {h: tokens.float() * (i + 1) for i, h in enumerate(hooks)}

    tokens = torch.arange(6).reshape(2, 3)
    a = cached_activations(fn, tokens, ["x", "y"], SHA, cache=cache)
    b = cached_activations(fn, tokens, ["y", "x"], SHA, cache=cache)
    assert len(calls) == 1 and torch.equal(a["y"], tokens.float() * 2)
    assert_same(a, b)
