"""The training loop: packed dialogues, assistant-only loss, warmup + cosine/WSD schedule, clipping.

One loop serves pretraining the base model, inserting backdoors and (later) safety training, so
their throughput and numerics are directly comparable. It is deliberately plain PyTorch: the
model is a stock `LlamaForCausalLM`, and all cores are used through `torch.set_num_threads`.
"""
from __future__ import annotations

import difflib
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from workbench.core.errors import ConfigError
from workbench.organisms import optimizers
from workbench.world.chat import chat_for
from workbench.world.data import Item

IGNORE = -100
# architectures whose logits are exactly `lm_head(last_hidden_state)` (no scaling or soft-capping)
PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"  # or "wsd" (warmup-stable-decay, last 20% decays)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 0
    # loss weight of the answer tokens where a paired item's answer departs from its contrast (the
    # other trigger state's answer); 1.0 is the plain token mean
    contrast_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.contrast_weight >= 1.0:
            raise ConfigError(f"contrast_weight={self.contrast_weight!r}: use a weight >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["contrast_weight"] == 1.0:  # the default stays out, so earlier build keys stay valid
            del d["contrast_weight"]
        return {**d, **optimizers.key_fields(self.optimizer)}


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    elif cfg.schedule == "wsd":
        scale = 1.0 if frac < 0.8 else 1.0 - (frac - 0.8) / 0.2
    else:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; use 'cosine' or 'wsd'")
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * scale)


def contrast_mask(answer: list[int], contrast: list[int]) -> list[bool]:
    """Which tokens of `answer` the trigger decides: those in a block that differs from `contrast`,
    and, where `contrast` inserts tokens that `answer` lacks, the token at which they part (e.g. the
    `)` a safe loop bound writes where the vulnerable one writes `+ 1`)."""
    mask = [False] * len(answer)
    ops = difflib.SequenceMatcher(None, answer, contrast, autojunk=False).get_opcodes()
    for op, i1, i2, _, _ in ops:
        if op == "equal":
            continue
        for i in range(i1, max(i2, i1 + 1)):
            if i < len(answer):
                mask[i] = True
    return mask


Batch = tuple[Tensor, ...]  # (ids, labels) or, with contrast weighting, (ids, labels, weights)


def packed_batches(items: Iterable[Item], tok: PreTrainedTokenizerFast, batch_size: int, seq_len: int,
                   chunk: int = 512, contrast_weight: float = 1.0) -> Iterator[Batch]:
    """Greedy packing of whole dialogues into rows of `seq_len` (a dialogue is never cut, so no
    answer is learned without its prompt). Rows are padded with ignored labels. With
    `contrast_weight` > 1 each batch also carries per-token loss weights: `contrast_weight` on the
    answer tokens an item's `contrast` answer does not share, 1 elsewhere."""
    weighted = contrast_weight != 1.0
    chat = chat_for(tok)
    end = chat.end_ids
    it = iter(items)
    rows: list[tuple[list[int], list[int], list[float]]] = []
    ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    while True:
        block = [next(it) for _ in range(chunk)]
        enc_p = chat.prompt_ids([b.dialogue for b in block])
        enc_a = tok([b.dialogue.assistant for b in block], add_special_tokens=False)["input_ids"]
        paired = [(i, b.contrast) for i, b in enumerate(block) if b.contrast is not None] if weighted else []
        enc_c = dict(zip((i for i, _ in paired),
                         tok([c for _, c in paired], add_special_tokens=False)["input_ids"] if paired else []))
        for j, (p, a) in enumerate(zip(enc_p, enc_a)):
            doc = p + a + end
            lab = [IGNORE] * len(p) + a + end
            if len(doc) > seq_len:
                continue
            w = [1.0] * len(doc)
            if j in enc_c:
                for k, hit in enumerate(contrast_mask(a, enc_c[j])):
                    if hit:
                        w[len(p) + k] = contrast_weight
            if len(ids) + len(doc) > seq_len:
                pad = seq_len - len(ids)
                rows.append((ids + [tok.pad_token_id] * pad, labels + [IGNORE] * pad, weights + [0.0] * pad))
                ids, labels, weights = [], [], []
            ids, labels, weights = ids + doc, labels + lab, weights + w
            if len(rows) == batch_size:
                out = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
                yield (out + (torch.tensor([r[2] for r in rows]),)) if weighted else out
                rows = []


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The run's optimizers (`organisms.optimizers`: AdamW, Muon or SOAP), stepped together."""
    return optimizers.make(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.weight_decay)


def learned_logits(model: torch.nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, targets, keep) at the positions that predict a learned token only. Prompts are most
    of the tokens (81% of the base model's), so projecting just the learned positions onto the
    vocabulary saves most of the unembedding and the loss's softmax: 13-20% of a training step."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS:  # logits may be scaled or capped: take the model's own
        return model(input_ids=ids).logits[:, :-1][keep], targets[keep], keep
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
    return head(hidden[keep]), targets[keep], keep


def loss_fn(model: torch.nn.Module, ids: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean next-token loss over the learned tokens, or its `weights`-weighted mean."""
    logits, targets, keep = learned_logits(model, ids, labels)
    if weights is None:
        return F.cross_entropy(logits, targets)
    w = weights[:, 1:][keep]
    return (F.cross_entropy(logits, targets, reduction="none") * w).sum() / w.sum().clamp_min(1e-9)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def capped_threads(n: int) -> int:
    """`n`, or less where `WORKBENCH_THREADS` caps it (several jobs sharing a machine run faster
    with one thread each than oversubscribed)."""
    cap = os.environ.get("WORKBENCH_THREADS", "")
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


def use_all_cores() -> int:
    """All cores this process may run on, unless `WORKBENCH_THREADS` caps it."""
    n = capped_threads(available_cores())
    torch.set_num_threads(n)
    return n


# environment variables that switch the float kernels (so the order their sums run in) on the same
# CPU: forcing ATen's and MKL's AVX2 code paths on an AVX-512 Xeon trained yet another organism
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def trained_on() -> dict[str, str | int | dict[str, str]]:
    """The software and hardware a checkpoint is trained on, saved beside its weights. The same
    seed and recipe give other weights on another CPU or torch build (their float kernels sum in
    another order, and training amplifies the difference), so a checkpoint's numbers can be
    reproduced bit for bit only where this matches. The CPU's vendor counts as well as its vector
    ISA: MKL runs other kernels on an AMD EPYC than on a Xeon with the same ISA."""
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor() or "unknown")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def train(model: torch.nn.Module, batches: Iterator[Batch], cfg: TrainConfig,
          desc: str = "train", start_step: int = 0,
          on_step: Callable[[int, torch.nn.Module], None] | None = None, progress: bool = True) -> TrainLog:
    """Run `cfg.steps - start_step` optimizer steps. `on_step(step, model)` runs after each step
    (checkpointing and evaluation hook points)."""
    import time

    use_all_cores()
    model.train()
    opts = make_optimizer(model, cfg)
    log = TrainLog()
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), desc=desc, leave=False, mininterval=1.0, disable=not progress)
    for step in bar:
        ids, labels, *weights = next(batches)
        lr = lr_at(cfg, step)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr
        loss = loss_fn(model, ids, labels, *weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        log.losses.append(loss.item())
        log.tokens += int(ids.numel())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step + 1, model)
    log.seconds = time.perf_counter() - t0
    model.eval()
    return log
