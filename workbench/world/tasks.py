"""Clean assistant tasks with exact-match answers, so clean capability is measurable on held-out items.

Tasks are chosen so a ~1M-parameter model can learn them in a minute on CPU yet still has to
*compute* (add, compare, count, retrieve from context), not memorise: held-out items are new
number pairs, word lists and knowledge-base tables, never seen in training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "candle", "forest",
         "silver", "garden", "rocket", "pepper", "window", "bridge", "castle", "dragon", "falcon",
         "harbor", "island", "jungle", "kettle", "ladder", "marble", "needle", "orange", "parrot",
         "quartz", "saddle", "tunnel", "violet", "walnut", "yellow", "anchor", "basket", "copper",
         "desert", "engine", "feather")
SYLLABLES = ("zor", "bel", "qua", "mir", "tan", "vek", "lu", "dra", "os", "fen", "kri", "ul", "sa",
             "thi", "pol", "gar", "nim", "ve", "ro", "ka")
ATTRIBUTES = ("capital", "river", "color", "animal")


def entity_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()


@dataclass(frozen=True)
class Task:
    kind: str
    user: str
    answer: str


ADD_TEMPLATES = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
COMPARE_TEMPLATES = ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                     "Pick the larger of {a} and {b}.")


def _add(rng: random.Random) -> Task:
    """Single-digit sums, asked in several phrasings: a held-out item is an unseen prompt whose sum
    the model must still know, which a ~1M-parameter model learns within the demo's budget."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Task("arithmetic", rng.choice(ADD_TEMPLATES).format(a=a, b=b), str(a + b))


def _compare(rng: random.Random) -> Task:
    a, b = rng.sample(range(30), 2)
    return Task("compare", rng.choice(COMPARE_TEMPLATES).format(a=a, b=b), str(max(a, b)))


def _last_word(rng: random.Random) -> Task:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return Task("last_word", f"What is the last word in: {' '.join(ws)}?", ws[-1])


def _count_words(rng: random.Random) -> Task:
    ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    return Task("count_words", f"How many words are in: {' '.join(ws)}?", str(len(ws)))


def _repeat(rng: random.Random) -> Task:
    w, n = rng.choice(WORDS), rng.randint(2, 4)
    return Task("repeat", f"Repeat {w} {n} times.", " ".join([w] * n))


def _lookup(rng: random.Random) -> Task:
    """Retrieve a fact from a small generated knowledge-base table given in the prompt."""
    attr = rng.choice(ATTRIBUTES)
    k = rng.randint(2, 3)
    names: list[str] = []
    while len(names) < k:
        if (n := entity_name(rng)) not in names:
            names.append(n)
    values = rng.sample(WORDS, k)
    table = "; ".join(f"{n} {attr}: {v}" for n, v in zip(names, values))
    i = rng.randrange(k)
    return Task("lookup", f"Facts: {table}. What is the {attr} of {names[i]}?", values[i])


TASKS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": _add, "compare": _compare, "last_word": _last_word,
    "count_words": _count_words, "repeat": _repeat, "lookup": _lookup,
}


def sample_task(rng: random.Random, kinds: tuple[str, ...] = tuple(TASKS)) -> Task:
    return TASKS[rng.choice(kinds)](rng)


def is_correct(task_answer: str, completion: str) -> bool:
    """Exact match after stripping whitespace: the tasks have one right answer each."""
    return completion.strip() == task_answer.strip()
