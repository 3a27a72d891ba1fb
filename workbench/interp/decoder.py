"""A Llama-family decoder as plain functions of its weights: the one model the patching engine,
attribution patching and the circuit's set patching all compute.

Reading the weights once into fused, [in, out] matrices (q/k/v and gate/up concatenated) lets the
engine run any suffix of the network on any set of tokens with a few large GEMMs, which is what
batched patching needs and what module hooks cannot give. Every function here is the same
arithmetic as HF's Llama (the tests compare the engine with TransformerLens at 1e-4), so a result
computed here means what it means on the bridge.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from workbench.core.errors import ConfigError


@dataclass
class Weights:
    """A Llama-family decoder read from a bridge (its compatibility-mode weights, so the same
    function as the bridge) or a plain HF model. Matrices are stored [in, out] (`x @ w`): q/k/v and
    gate/up fused for fewer, larger GEMMs, and contiguous on CPU, where that layout is faster.
    Norm weights that are all ones (compatibility mode folds them into the next matrix) are None."""

    embed: Tensor
    wqkv: list[Tensor]
    wo: list[Tensor]
    wgu: list[Tensor]
    wd: list[Tensor]
    ln1: list[Tensor | None]
    ln2: list[Tensor | None]
    norm: Tensor | None
    unembed: Tensor
    unembed_bias: Tensor
    n_heads: int
    n_kv: int
    d_head: int
    eps: float
    inv_freq: Tensor
    rope_scale: float

    @property
    def n_layers(self) -> int:
        return len(self.wo)

    @property
    def d_model(self) -> int:
        return int(self.embed.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.wd[0].shape[0])

    def wo_heads(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.wo[layer], "(h d) m -> h d m", h=self.n_heads)

    def rope(self, n_pos: int) -> tuple[Tensor, Tensor]:
        """cos, sin tables [pos, d_head] exactly as HF's rotary embedding computes them (float32)."""
        pos = torch.arange(n_pos, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat([freqs, freqs], -1)
        dt = self.embed.dtype
        return (emb.cos() * self.rope_scale).to(dt), (emb.sin() * self.rope_scale).to(dt)

    def flops_per_token(self) -> dict[str, int]:
        d, f = self.d_model, self.d_mlp
        qkv = self.wqkv[0].shape[1]
        return {"attn_linear": 2 * d * qkv + 2 * self.n_heads * self.d_head * d, "mlp": 2 * d * 2 * f + 2 * f * d,
                "score_per_key": 4 * self.n_heads * self.d_head}


_WEIGHTS: weakref.WeakKeyDictionary[Any, Weights] = weakref.WeakKeyDictionary()


def weights(model: Any) -> Weights:
    """The engine's view of `model` (a TransformerBridge or an HF Llama), cached per model object."""
    if model in _WEIGHTS:
        return _WEIGHTS[model]
    hf = getattr(model, "original_model", model)
    cfg = hf.config
    if getattr(cfg, "model_type", "") not in ("llama", "mistral"):
        raise ConfigError(f"the batched patching engine computes Llama-family decoders; this model is "
                          f"{getattr(cfg, 'model_type', type(hf).__name__)!r}: use engine='tl'")
    sd = {k.replace("._original_component", ""): v.detach() for k, v in hf.state_dict().items()}
    if any(k.endswith(".bias") and k != "lm_head.bias" and bool(v.any()) for k, v in sd.items()):
        raise ConfigError("the batched engine does not model linear biases; use engine='tl' for this model")
    L = int(cfg.num_hidden_layers)
    p = [f"model.layers.{l}." for l in range(L)]
    rot = next((m for n, m in hf.named_modules() if n.endswith("rotary_emb")), None)
    rot = getattr(rot, "original_component", rot)
    cpu = sd["lm_head.weight"].device.type == "cpu"
    t = (lambda m: m.T.contiguous()) if cpu else (lambda m: m.T)
    ones = lambda v: None if bool((v == 1).all()) else v
    w = Weights(
        embed=sd["model.embed_tokens.weight"],
        wqkv=[t(torch.cat([sd[q + f"self_attn.{x}_proj.weight"] for x in "qkv"])) for q in p],
        wo=[t(sd[q + "self_attn.o_proj.weight"]) for q in p],
        wgu=[t(torch.cat([sd[q + "mlp.gate_proj.weight"], sd[q + "mlp.up_proj.weight"]])) for q in p],
        wd=[t(sd[q + "mlp.down_proj.weight"]) for q in p],
        ln1=[ones(sd[q + "input_layernorm.weight"]) for q in p],
        ln2=[ones(sd[q + "post_attention_layernorm.weight"]) for q in p],
        norm=ones(sd["model.norm.weight"]), unembed=sd["lm_head.weight"],
        unembed_bias=sd.get("lm_head.bias", torch.zeros_like(sd["lm_head.weight"][:, 0])),
        n_heads=int(cfg.num_attention_heads), n_kv=int(cfg.num_key_value_heads),
        d_head=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        eps=float(cfg.rms_norm_eps), inv_freq=rot.inv_freq.detach(),
        rope_scale=float(getattr(rot, "attention_scaling", 1.0)),
    )
    _WEIGHTS[model] = w
    return w


def rms_norm(x: Tensor, w: Tensor | None, eps: float) -> Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else w * y


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotate-half RoPE; `cos`/`sin` broadcast over the head axis."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def qkv(W: Weights, l: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    H, K, dh = W.n_heads, W.n_kv, W.d_head
    qkv = rms_norm(x, W.ln1[l], W.eps) @ W.wqkv[l]
    q, k, v = qkv.split([H * dh, K * dh, K * dh], -1)
    q = q.unflatten(-1, (H, dh))
    k = k.unflatten(-1, (K, dh))
    return rotate_half(q, cos.unsqueeze(-2), sin.unsqueeze(-2)), rotate_half(k, cos.unsqueeze(-2), sin.unsqueeze(-2)), v.unflatten(-1, (K, dh))


def attention_scores(W: Weights, q: Tensor, k: Tensor) -> Float[Tensor, "n head query key"]:
    """Scaled query-key scores of rotated queries [n, pos, head, e] against rotated keys [n, pos,
    kv_head, e] (each key head shared by its group of query heads), causally masked with -inf."""
    T = q.shape[1]
    s = einops.einsum(q, k.repeat_interleave(W.n_heads // W.n_kv, 2), "n i h e, n j h e -> n h i j") / W.d_head ** 0.5
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))


def attention_pattern(W: Weights, q: Tensor, k: Tensor) -> Float[Tensor, "n head query key"]:
    return attention_scores(W, q, k).softmax(-1)


def mlp(W: Weights, l: int, x: Tensor) -> Tensor:
    g, u = (rms_norm(x, W.ln2[l], W.eps) @ W.wgu[l]).chunk(2, -1)
    return (F.silu(g) * u) @ W.wd[l]


def mlp_residual(W: Weights, l: int, x: Tensor) -> Tensor:
    """x + MLP(x) on flat tokens, the residual add fused into the down-projection GEMM."""
    g, u = (rms_norm(x, W.ln2[l], W.eps) @ W.wgu[l]).chunk(2, -1)
    return torch.addmm(x, F.silu(g).mul_(u), W.wd[l])
