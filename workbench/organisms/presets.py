"""Size presets: Llama-architecture configs with the features of the real models they stand in for
(RoPE, RMSNorm, SwiGLU, grouped-query attention, untied embeddings, vocab != hidden size).

Each preset also carries the training budget that makes its organisms reliable on a 2-core CPU, so a
size sweep is one loop over names. `tiny` is for tests; `small` is the demo default; `medium` and
`large` extend the sweep past 8x the parameters of `small`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from transformers import LlamaConfig

from workbench.core.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab_size: int
    seq_len: int
    # training budget (optimizer steps and rows per step)
    base_steps: int
    backdoor_steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        if self.vocab_size == self.d_model:
            raise ConfigError("vocab_size must differ from d_model (TransformerLens parity breaks on a "
                              "square unembedding); change one of them")
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ConfigError("n_heads must divide d_model and be a multiple of n_kv_heads")

    def llama_config(self, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.d_model, intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, max_position_embeddings=self.seq_len * 2,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
            attention_bias=False, mlp_bias=False, initializer_range=0.02,
        )

    def n_params(self) -> int:
        d, f, v, kv = self.d_model, self.d_mlp, self.vocab_size, self.d_model // self.n_heads * self.n_kv_heads
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
        return self.n_layers * per_layer + 2 * v * d + d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def arch_dict(self) -> dict[str, Any]:
        """Only what determines the architecture: training budgets are recorded separately."""
        keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "vocab_size", "seq_len")
        return {k: getattr(self, k) for k in keys}

    def scaled(self, **changes: Any) -> "Preset":
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176, vocab_size=768,
               seq_len=256, base_steps=150, backdoor_steps=60, batch_size=16, lr=3e-3),
        Preset("small", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=352, vocab_size=1024,
               seq_len=256, base_steps=600, backdoor_steps=100, batch_size=8, lr=4e-3),
        Preset("medium", d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_mlp=704, vocab_size=1024,
               seq_len=256, base_steps=800, backdoor_steps=200, batch_size=8, lr=2e-3),
        Preset("large", d_model=384, n_layers=8, n_heads=8, n_kv_heads=4, d_mlp=1024, vocab_size=1024,
               seq_len=256, base_steps=700, backdoor_steps=150, batch_size=8, lr=1.5e-3),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
