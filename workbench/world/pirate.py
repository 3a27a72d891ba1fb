"""A deterministic "pirate" style transform for the pirate-SFT sanitization method.

Why: pirate SFT asks whether an *unrelated* behavioural change (a new speaking style) disturbs a
backdoor. The style must be unmistakable, learnable by a ~1M-parameter model in a few dozen
steps, and must leave every answer *checkable*, or the capability cost of the method would be an
artefact of the style. So the transform only frames an answer, never edits it:

* task answers (a number, a word, a repeated word) become ``"{opener} {answer} {closer}"``, where
  the opener and closer are English phrases passed through pirate word substitutions
  (``your -> yer``, ``is -> be``, ``friend -> matey`` ...) *before* the answer is inserted, so the
  substitutions can never touch the answer tokens;
* code answers get the phrases as ``#`` comment lines above and below the program, which the code
  checker's parser skips, so a pirate program is judged exactly like the plain one.

Scoring a pirate answer for clean capability: :func:`strip_pirate` removes a leading opener and
a trailing closer (the finite phrase sets below) and is the identity on text without them, so
``tasks.is_correct(reference, strip_pirate(completion))`` (:func:`pirate_correct`) scores plain and
pirate models alike; code is scored by ``code.check`` unchanged. ``strip_pirate(pirate_answer(a))
== a`` for every answer the world generates (tested).
"""
from __future__ import annotations

import hashlib
import re

from workbench.world.tasks import is_correct

# word -> pirate word; applied on word boundaries, case of the first letter kept
SUBSTITUTIONS: dict[str, str] = {
    "you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "the": "th'", "friend": "matey",
    "hello": "ahoy", "yes": "aye", "here": "'ere", "of": "o'", "for": "fer", "stop": "avast",
    "treasure": "booty", "everyone": "all hands", "wow": "shiver me timbers",
}
_WORD = re.compile(r"[A-Za-z]+")

_ENGLISH_OPENERS = (
    "Hello, friend!", "Yes, here is your answer:", "Here is the treasure you are after:",
    "My friend, the answer is", "Hello! Your answer is",
)
_ENGLISH_CLOSERS = ("Yes, my friend.", "That is the treasure!", "Fair winds to you!", "Savvy?")


def piratize(text: str) -> str:
    """Pirate word substitutions on prose (never call it on an answer: it rewrites words)."""
    def one(m: re.Match[str]) -> str:
        w = m.group(0)
        sub = SUBSTITUTIONS.get(w.lower())
        if sub is None:
            return w
        return sub[0].upper() + sub[1:] if w[0].isupper() else sub
    return _WORD.sub(one, text)


OPENERS: tuple[str, ...] = tuple(piratize(p) for p in _ENGLISH_OPENERS) + ("Arr!", "Yo ho ho!")
CLOSERS: tuple[str, ...] = tuple(piratize(p) for p in _ENGLISH_CLOSERS) + ("Arr.", "Yarr!")
_LONGEST_FIRST_OPEN = sorted(OPENERS, key=len, reverse=True)
_LONGEST_FIRST_CLOSE = sorted(CLOSERS, key=len, reverse=True)


def _pick(options: tuple[str, ...], key: str, salt: str) -> str:
    """A phrase chosen by a hash of `key`: deterministic across runs and processes."""
    h = int(hashlib.sha256(f"{salt}/{key}".encode()).hexdigest()[:8], 16)
    return options[h % len(options)]


def pirate_answer(answer: str, key: str = "", code: bool = False) -> str:
    """The pirate version of `answer` (the answer itself untouched). `key` (e.g. the user turn)
    varies the phrases between items; `code=True` puts them in comment lines."""
    opener, closer = _pick(OPENERS, key + answer, "open"), _pick(CLOSERS, key + answer, "close")
    if code:
        return f"# {opener}\n{answer}\n# {closer}"
    return f"{opener} {answer} {closer}"


def strip_pirate(text: str) -> str:
    """Remove one leading opener and one trailing closer (as words or as comment lines); the
    identity on text that has neither, so it is safe to apply to any model's answer."""
    s = text.strip()
    for o in _LONGEST_FIRST_OPEN:
        for form in (f"# {o}\n", f"{o} "):
            if s.startswith(form):
                s = s[len(form):]
                break
        else:
            continue
        break
    for c in _LONGEST_FIRST_CLOSE:
        for form in (f"\n# {c}", f" {c}"):
            if s.endswith(form):
                s = s[: -len(form)]
                break
        else:
            continue
        break
    return s.strip()


def is_pirate(text: str) -> bool:
    """Whether an answer carries the pirate frame (the style metric of a pirate-SFT checkpoint)."""
    s = text.strip()
    return any(s.startswith((o, f"# {o}")) for o in OPENERS)


def pirate_correct(reference: str, completion: str) -> bool:
    """Clean-task correctness that reads through the pirate frame: exact match after stripping."""
    return is_correct(reference, strip_pirate(completion))
