"""The chat format every organism is trained and evaluated in.

One format, stored as a Jinja chat template beside the tokenizer, so that a checkpoint directory is
self-describing: `tokenizer.apply_chat_template(messages)` renders exactly what training saw.
"""
from __future__ import annotations

from dataclasses import dataclass

BOS, END, PAD, UNK = "<|bos|>", "<|end|>", "<|pad|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, END, UNK, SYSTEM, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Dialogue:
    """One system/user/assistant exchange. `meta` records what generated it (task kind, trigger...)."""

    system: str
    user: str
    assistant: str
    meta: tuple[tuple[str, str], ...] = ()

    def prompt(self) -> str:
        """The text up to and including the assistant tag: what the model is asked to continue."""
        return render_prompt(self.system, self.user)

    def text(self) -> str:
        return self.prompt() + self.assistant + END

    def get(self, key: str, default: str = "") -> str:
        return dict(self.meta).get(key, default)

    def with_(self, **changes: str) -> "Dialogue":
        fields = {"system": self.system, "user": self.user, "assistant": self.assistant}
        meta = dict(self.meta)
        for k, v in changes.items():
            (fields if k in fields else meta)[k] = v
        return Dialogue(**fields, meta=tuple(sorted(meta.items())))


def render_prompt(system: str, user: str) -> str:
    return f"{BOS}{SYSTEM}{system}{END}{USER}{user}{END}{ASSISTANT}"


def messages(d: Dialogue, with_answer: bool = True) -> list[dict[str, str]]:
    out = [{"role": "system", "content": d.system}, {"role": "user", "content": d.user}]
    if with_answer:
        out.append({"role": "assistant", "content": d.assistant})
    return out
